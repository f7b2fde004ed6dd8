"""Ranking speed: blockwise torch MinRank/top-k vs a single numpy matmul, 10k queries x 100k gallery.

The numpy baseline computes the whole 10k x 100k score matrix (4 GB float32) in one matmul and
nothing else; `min_ranks` and `topk` do the same arithmetic in blocks (<= 64 MB of scores at a
time) plus the ranking. Prints seconds and ratios. Use --queries/--gallery to shrink it.

Usage: python benchmarks/bench_rank.py [--queries 10000] [--gallery 100000] [--dim 256]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--gallery", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--skip-baseline", action="store_true", help="Skip the full-matrix numpy baseline (needs Q*G*4 bytes).")
    args = ap.parse_args()
    from mmsanitize.metrics import min_ranks, normalize, topk

    rng = np.random.default_rng(0)
    q = normalize(rng.normal(size=(args.queries, args.dim)))
    g = normalize(rng.normal(size=(args.gallery, args.dim)))
    qg = rng.integers(0, 100, size=args.queries)
    gg = rng.integers(0, 100, size=args.gallery)
    flops = 2 * args.queries * args.gallery * args.dim
    base = None
    if not args.skip_baseline:
        t0 = time.monotonic()
        s = q @ g.T
        base = time.monotonic() - t0
        del s
        print(f"numpy single matmul (full {args.queries}x{args.gallery} matrix): {base:7.2f} s "
              f"({flops / base / 1e9:.0f} GFLOP/s)")
    t0 = time.monotonic()
    min_ranks(q, g, qg, gg)
    t_rank = time.monotonic() - t0
    t0 = time.monotonic()
    topk(q, g, 50)
    t_top = time.monotonic() - t0
    print(f"blockwise min_ranks: {t_rank:7.2f} s" + (f"  ({t_rank / base:.2f}x the matmul)" if base else ""))
    print(f"blockwise topk(50):  {t_top:7.2f} s" + (f"  ({t_top / base:.2f}x the matmul)" if base else ""))


if __name__ == "__main__":
    main()
