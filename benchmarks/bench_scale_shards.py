"""poison and sanitize at scale against `cp -r` of the same shards, with peak RSS and 1 vs 2 workers.

Data: bench_scale.py's generator (imported: seeded, cached under --cache): N tiny real PNG samples
(+ caption + json label, 50 classes) in shards of --shard-size; tar headers make ~3 KB a sample.
The catalog is built once (timed and reported, then reused: it is a cached artifact every verb
shares). sanitize reads a synthetic scan folder whose scores.parquet flags the generator's planted
poisons (1% of samples), so no scan has to run first.

Every job is `python -m mmsanitize ...` in a child process (this checkout's code) whose tree is
sampled for RSS (client = the child, worker = its largest descendant). Page cache: warm for
everything — each timing is preceded (untimed) by reading the input shards to /dev/null and a
`sync`, and `cp -r` of the same folder is timed just before each verb run, handled the same way.
Neither side waits for its written data to reach the disk. Prints per job wall s, samples/s,
peak RSS, the ratio cp time / verb time (1.0 = as fast as cp) and the 2-worker vs 1-worker ratio.

    nice python benchmarks/bench_scale_shards.py --n 2000000 --cache /work/bench/shards2m
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import ROOT, generate, run_tree


def warm(data: Path) -> None:
    """Read every input shard once (page cache warm) and flush pending writes; untimed."""
    for p in sorted(data.glob("*.tar")):
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass
    os.sync()


def timed_cp(data: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    warm(data)
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(data), str(dst)], check=True)
    seconds = time.perf_counter() - t
    shutil.rmtree(dst, ignore_errors=True)
    return seconds


def synthetic_scan(cache: Path, data: Path, scan: Path) -> int:
    """A scan folder whose scores.parquet flags the generator's planted poisons; returns how many."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    if (scan / "scores.parquet").exists():
        return int(pq.read_table(scan / "scores.parquet", columns=["flagged"]).column("flagged").to_numpy().sum())
    planted = set(pd.read_parquet(cache / "manifest.parquet", columns=["key"])["key"])
    scan.mkdir(parents=True, exist_ok=True)
    tables = []
    for meta in sorted((cache / "emb" / "metadata").glob("metadata_*.parquet")):
        keys = pd.read_parquet(meta)["key"]
        flagged = keys.isin(planted).to_numpy()
        shard = meta.stem.split("_", 1)[1] + ".tar"
        tables.append(pa.table({"key": keys.to_numpy(), "shard": [shard] * len(keys),
                                "combined": flagged.astype("float64"), "flagged": flagged,
                                "reason": ["planted" if f else "" for f in flagged]}))
    pq.write_table(pa.concat_tables(tables), scan / "scores.parquet")
    return len(planted)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2_000_000)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/mmsanitize/bench_scale"))
    ap.add_argument("--poison-fraction", type=float, default=0.01, help="Samples poisoned (single-label c00 -> c01).")
    ap.add_argument("--jobs", default="poison,sanitize", help="Comma list of poison, sanitize.")
    ap.add_argument("--workers", default="2,1", help="Worker counts to run each job with.")
    ap.add_argument("--runs", default=None,
                    help="Folder for the outputs and cp -r's copy (default CACHE/runs); e.g. a tmpfs such as "
                         "/dev/shm/runs to take the disk's writeback out of both sides")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))  # the generator writes shards with this checkout's code, installed or not
    cache = Path(args.cache) / f"n{args.n}_s{args.seed}"
    generate(cache, args.n, args.shard_size, args.seed)
    data = cache / "data"
    total = sum(p.stat().st_size for p in data.glob("*.tar"))
    print(f"data: {args.n:,} samples, {total / 1e9:.2f} GB in {len(list(data.glob('*.tar')))} shards ({cache})")
    work = Path(args.runs) if args.runs else cache / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MMSANITIZE_PROGRESS="0", XDG_CACHE_HOME=str(cache / "xdg"))
    py = [sys.executable, "-m", "mmsanitize"]
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    print(f"code: {ROOT} ({rev.stdout.strip() or 'not a git checkout'})", flush=True)
    fs = subprocess.run(["df", "--output=fstype", str(work)], capture_output=True, text=True, check=False).stdout.split()
    dirty = {k: Path(f"/proc/sys/vm/{k}").read_text().strip() for k in ("dirty_ratio", "dirty_background_ratio")
             if Path(f"/proc/sys/vm/{k}").exists()}
    print(f"outputs in {work} ({fs[-1] if fs else '?'}); vm {dirty}", flush=True)

    def job(tag, argv, out):
        shutil.rmtree(out, ignore_errors=True)
        cp = timed_cp(data, work / "cp")
        warm(data)
        load = os.getloadavg()[0]
        r = run_tree(py + argv, env)
        shutil.rmtree(out, ignore_errors=True)
        r.update(tag=tag, cp=cp, load=(load + os.getloadavg()[0]) / 2)
        print(f"  {tag}: {r['seconds']:.1f} s, {args.n / r['seconds']:,.0f} samples/s, cp -r {cp:.1f} s "
              f"-> {cp / r['seconds']:.2f}x cp; peak RSS client {r['client_rss'] / 2**30:.2f} GiB, largest worker "
              f"{r['worker_rss'] / 2**30:.2f} GiB; load avg {r['load']:.1f}", flush=True)
        return r

    r = run_tree(py + ["catalog", str(data), "--workers", "2"], env)
    print(f"catalog (cached for the jobs below): {r['seconds']:.0f} s, {args.n / r['seconds']:,.0f} samples/s, "
          f"peak RSS client {r['client_rss'] / 2**30:.2f} GiB, largest worker {r['worker_rss'] / 2**30:.2f} GiB",
          flush=True)
    scan = work / "scan"
    flagged = synthetic_scan(cache, data, scan)
    count = int(args.n * args.poison_fraction)
    rows = []
    for name in args.jobs.split(","):
        for w in [int(x) for x in args.workers.split(",")]:
            out = work / f"{name}_{w}w"
            if name == "poison":
                argv = ["poison", str(data), "--attack", "single-label", "--goal", "c002c01", "--count", str(count),
                        "--seed", "0", "--workers", str(w), "--out", str(out)]
            else:
                argv = ["sanitize", str(data), "--scan", str(scan), "--workers", str(w), "--out", str(out)]
            rows.append(job(f"{name} {w}w", argv, out))
    print(f"\n{args.n:,} samples; poison: single-label c00->c01, {count:,} samples ({args.poison_fraction:.0%}) get "
          f"another shard's image; sanitize: {flagged:,} flagged samples dropped\n")
    print("| job | wall s | samples/s | cp -r s | vs cp | peak RSS client GiB | peak RSS largest worker GiB | load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tag']} | {r['seconds']:.1f} | {args.n / r['seconds']:,.0f} | {r['cp']:.1f} | "
              f"{r['cp'] / r['seconds']:.2f}x | {r['client_rss'] / 2**30:.2f} | {r['worker_rss'] / 2**30:.2f} | "
              f"{r['load']:.1f} |")
    for name in args.jobs.split(","):  # the i-th 2-worker run against the i-th 1-worker run
        one = [r["seconds"] for r in rows if r["tag"] == f"{name} 1w"]
        two = [r["seconds"] for r in rows if r["tag"] == f"{name} 2w"]
        if one and two:
            print(f"{name}: 2 workers vs 1: " + ", ".join(f"{a / b:.2f}x" for a, b in zip(one, two)))
    print(json.dumps({"rows": [{k: v for k, v in r.items() if k != "stdout"} for r in rows]}))


if __name__ == "__main__":
    main()
