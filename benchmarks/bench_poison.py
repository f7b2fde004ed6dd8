"""Benchmark `poison` against `cp -r` of the same shards (same run, alternating, median of N runs).

Generates ~1 GB of labelled noise-JPEG shards (~100 KB images, 10 classes) in a temp dir under
/tmp, builds the catalog once (untimed; it is a cached artifact reused by every verb), then times:
  - `cp -r` of the shard folder,
  - poison single-label, replace, 1% of samples (images move between shards),
  - poison caption-only (the same pairs made by rewriting 1% of captions; no image moves),
each timing preceded by an untimed `sync`; each with 2 Dask workers: once on a cluster started for the benchmark (`--scheduler`), and once
starting its own 2-worker LocalCluster per run (what `--workers 2` alone does).
Prints the ratios cp_time / poison_time (higher is better; 1.0 = as fast as cp) and deletes the data.

    python benchmarks/bench_poison.py [--gb 1.0] [--runs 5]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MMSANITIZE_PROGRESS", "0")


def make_data(root: Path, gb: float, per_shard: int = 1000, classes: int = 10) -> int:
    """Write noise-JPEG shards (~100 KB each image); returns the number of samples."""
    import numpy as np
    from PIL import Image

    from mmsanitize.shards import Sample, ShardWriter, write_sizes

    rng = np.random.default_rng(0)
    pool = []
    for _ in range(64):
        arr = rng.integers(0, 256, size=(360, 360, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=85)
        pool.append(buf.getvalue())
    size = sum(map(len, pool)) / len(pool)
    n = int(gb * 1e9 / (size + 2048))
    i = 0
    for s in range(-(-n // per_shard)):
        with ShardWriter(root, f"{s:05d}") as w:
            for j in range(min(per_shard, n - i)):
                label = f"class{i % classes}"
                key = f"{s:05d}{j:04d}"
                w.write(Sample(key, pool[i % len(pool)], "jpg", f"a photo of a {label} number {i}",
                               {"key": key, "label": label, "width": 360, "height": 360}))
                i += 1
    write_sizes(root)
    return n


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    from distributed import LocalCluster

    from mmsanitize.catalog import build_catalog
    from mmsanitize.poison import poison_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench_poison_", dir="/tmp"))
    cluster = None
    try:
        data = tmp / "data"
        n = make_data(data, args.gb)
        total = sum(p.stat().st_size for p in data.glob("*.tar"))
        print(f"{n:,} samples, {total / 1e9:.2f} GB in {len(list(data.glob('*.tar')))} shards")
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, silence_logs=logging.ERROR)
        addr = cluster.scheduler_address
        t = timed(lambda: build_catalog(data, scheduler=addr))
        print(f"catalog (once, untimed below): {t:.1f} s")
        count = max(1, n // 100)
        common = dict(attack="single-label", goals=["class0toclass1".replace("to", "2")], count=count, seed=0)

        def cp():
            dst = tmp / "cp"
            subprocess.run(["cp", "-r", str(data), str(dst)], check=True)

        def run(caption_only: bool, own_cluster: bool):
            kw = dict(workers=2) if own_cluster else dict(scheduler=addr)
            return lambda: poison_dataset(str(data), out=str(tmp / "out"), caption_only=caption_only,
                                          overwrite=True, **common, **kw)

        cases = {"image 1% (shared cluster)": run(False, False),
                 "caption-only 1% (shared cluster)": run(True, False),
                 "image 1% (--workers 2, own cluster)": run(False, True),
                 "caption-only 1% (--workers 2, own cluster)": run(True, True)}
        times = {"cp": [], **{k: [] for k in cases}}
        for r in range(args.runs):
            for name, fn in cases.items():
                # start each timing with no pending writeback from the previous one (untimed)
                shutil.rmtree(tmp / "cp", ignore_errors=True)
                os.sync()
                times["cp"].append(timed(cp))
                shutil.rmtree(tmp / "out", ignore_errors=True)
                os.sync()
                times[name].append(timed(fn))
        shutil.rmtree(tmp / "cp", ignore_errors=True)
        cp_med = statistics.median(times["cp"])
        print(f"cp -r: median {cp_med:.2f} s ({total / cp_med / 1e6:.0f} MB/s) over {len(times['cp'])} runs")
        for name in cases:
            med = statistics.median(times[name])
            print(f"{name:45s} median {med:.2f} s  ratio vs cp {cp_med / med:.2f}x")
    finally:
        if cluster is not None:
            cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
