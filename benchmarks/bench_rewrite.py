"""Micro-benchmark of `rewrite_shard` alone on one shard: µs per sample, best of --repeat.

Reports process CPU time (user + system; a loaded machine inflates it less than wall time) and wall time.

Cases: `copy` (nothing changed), `drop` (every 100th key dropped, like sanitize) and `replace`
(every 100th key replaced by a copy of itself under a new key, like poison). The code measured is
whichever `mmsanitize` is first on sys.path (PYTHONPATH), so one script times two checkouts:

    PYTHONPATH=/work/main python benchmarks/bench_rewrite.py SHARD.tar --out /tmp/rw
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shard")
    ap.add_argument("--out", default="/tmp/bench_rewrite")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cases", default="copy,drop,replace")
    ap.add_argument("--profile", action="store_true", help="cProfile one run of each case instead.")
    args = ap.parse_args()
    from mmsanitize import shards

    src = Path(args.shard)
    raws = list(shards.iter_raw_samples(src))
    n = len(raws)
    every = [r.key for r in raws[::100]]
    replace = {}
    for r in raws[::100]:
        s = shards.parse_sample(r, src.name)
        s.key = s.key + "x"
        replace[r.key] = s
    kwargs = {"copy": {}, "drop": {"drop": every}, "replace": {"replace": replace}}
    out = Path(args.out)
    print(f"code: {shards.__file__}; {src} ({n:,} samples)")
    for case in args.cases.split(","):
        best = best_cpu = float("inf")
        for _ in range(1 if args.profile else args.repeat):
            shutil.rmtree(out, ignore_errors=True)
            if args.profile:
                import cProfile
                import pstats

                prof = cProfile.Profile()
                prof.enable()
                shards.rewrite_shard(src, out, "00000", **kwargs[case])
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(18)
                continue
            t, c = time.perf_counter(), time.process_time()
            shards.rewrite_shard(src, out, "00000", **kwargs[case])
            best_cpu = min(best_cpu, time.process_time() - c)
            best = min(best, time.perf_counter() - t)
        if not args.profile:
            print(f"  {case}: CPU {best_cpu * 1e6 / n:.2f} µs/sample, wall {best * 1e6 / n:.2f} µs/sample "
                  f"(best of {args.repeat})")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
