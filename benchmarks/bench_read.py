"""Read throughput: every sample through `mmsanitize.shards.iter_samples` vs `cat FILES > /dev/null`.

Generates ~1 GB of shards once (random-noise 256 px JPEGs, which barely compress) into DIR
(default: a folder under the system temp dir, reused across runs), warms the page cache, then
alternates the two readers for `--runs` rounds and prints the medians and their ratio
(iter_samples throughput / cat throughput; target >= 0.5).

Usage: python benchmarks/bench_read.py [--dir DIR] [--gb 1.0] [--runs 3]
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def generate(out: Path, gb: float, per_shard: int = 1000) -> list[Path]:
    """Write noise-JPEG shards into `out` until they hold about `gb` GB; reuse existing ones."""
    import numpy as np
    from PIL import Image

    from mmsanitize.shards import Sample, ShardWriter, write_sizes

    tars = sorted(out.glob("*.tar"))
    if tars and sum(t.stat().st_size for t in tars) >= gb * 1e9 * 0.95:
        return tars
    rng = np.random.default_rng(0)
    # a pool of distinct noise images, reused so generation stays fast
    pool = []
    for i in range(200):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        pool.append(buf.getvalue())
    total, s, i = 0, 0, 0
    while total < gb * 1e9:
        with ShardWriter(out, f"{s:05d}") as w:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                w.write(Sample(key, pool[i % len(pool)], "jpg", f"random noise image {i}",
                               {"key": key, "label": "noise"}))
                i += 1
        total += (out / f"{s:05d}.tar").stat().st_size
        s += 1
    write_sizes(out)
    return sorted(out.glob("*.tar"))


def time_cat(tars: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, tars)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def time_iter(tars: list[Path]) -> tuple[float, int]:
    from mmsanitize.shards import iter_samples

    t0 = time.perf_counter()
    n = 0
    for tar in tars:
        for _ in iter_samples(tar):
            n += 1
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "mmsanitize-bench-read"))
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    tars = generate(out, args.gb)
    size = sum(t.stat().st_size for t in tars)
    time_cat(tars)  # warm the page cache
    cats, iters = [], []
    n = 0
    for _ in range(args.runs):
        cats.append(time_cat(tars))
        t, n = time_iter(tars)
        iters.append(t)
    c, it = statistics.median(cats), statistics.median(iters)
    print(f"shards {len(tars)}  samples {n:,}  bytes {size / 1e9:.2f} GB  runs {args.runs}")
    print(f"cat          median {c:.2f} s  {size / c / 1e6:,.0f} MB/s   runs {[round(x, 2) for x in cats]}")
    print(f"iter_samples median {it:.2f} s  {size / it / 1e6:,.0f} MB/s  {n / it:,.0f} samples/s   "
          f"runs {[round(x, 2) for x in iters]}")
    print(f"ratio iter_samples/cat throughput = {c / it:.2f}x (target >= 0.5x)")


if __name__ == "__main__":
    main()
