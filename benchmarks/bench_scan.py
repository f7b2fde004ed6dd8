"""Scan speed on synthetic clustered pairs with precomputed embeddings.

Prints, against same-run baselines:
  - the similarity detector vs a plain numpy row-wise dot product (target >= 0.5x);
  - exact kNN (faiss IndexFlatIP and the numpy matmul + torch.topk path) vs the IVF index:
    per-query speed-up and recall@10 (target >= 0.95);
  - the full detector pass (IVF indexes) and each detector's AUROC, mean vs max combination.

Usage: nice python benchmarks/bench_scan.py [--n 200000] [--dim 512] [--queries 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def clustered(n: int, d: int, classes: int, swapped: float, seed: int = 0):
    """Unit image/text embeddings near class centres; a `swapped` fraction gets another class's image."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)).astype(np.float32)
    label = rng.integers(0, classes, n)
    img_label = label.copy()
    bad = rng.choice(n, int(swapped * n), replace=False)
    img_label[bad] = (label[bad] + rng.integers(1, classes, len(bad))) % classes
    scale = rng.uniform(0.7, 1.6, classes).astype(np.float32)  # tight and loose classes
    img = np.empty((n, d), np.float32)
    txt = np.empty((n, d), np.float32)
    for a in range(0, n, 50_000):
        sl = slice(a, min(n, a + 50_000))
        m = sl.stop - sl.start
        img[sl] = centres[img_label[sl]] + scale[img_label[sl], None] * rng.normal(size=(m, d)).astype(np.float32)
        txt[sl] = centres[label[sl]] + scale[label[sl], None] * rng.normal(size=(m, d)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    truth = np.zeros(n, bool)
    truth[bad] = True
    return img, txt, truth


def best_of(fn, repeat=3):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from sklearn.metrics import roc_auc_score

    from mmsanitize.detectors import similarity
    from mmsanitize.index import build_index, exact_knn
    from mmsanitize.scan import combine_scores, run_detectors

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--skip-full", action="store_true")
    args = ap.parse_args()

    t = time.perf_counter()
    img, txt, truth = clustered(args.n, args.dim, args.classes, 0.005)
    print(f"data: {args.n:,} pairs x {args.dim}-d, {args.classes} classes, {truth.sum()} swapped "
          f"({time.perf_counter() - t:.1f}s to generate)")

    t_base, base = best_of(lambda: (img * txt).sum(1))
    t_sim, sim = best_of(lambda: similarity.score(img, txt))
    assert np.allclose(1 - sim, base, atol=1e-5)
    print(f"similarity detector: {args.n / t_sim:,.0f} pairs/s; numpy row-wise dot {args.n / t_base:,.0f} pairs/s; "
          f"ratio {t_base / t_sim:.2f}x (target >= 0.5x)")

    rng = np.random.default_rng(1)
    q = img[rng.choice(args.n, args.queries, replace=False)]
    import faiss

    faiss.omp_set_num_threads(1)
    exact_knn(img[:1000], q[:10], 10)  # warm up torch
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(img)
    t_flat, (_, ids_exact) = best_of(lambda: flat.search(q, 10), 1)
    t_np, (_, ids_np) = best_of(lambda: exact_knn(img, q, 10), 1)
    gflop = 2 * args.n * args.queries * args.dim / 1e9
    print(f"exact kNN, {args.queries} queries: faiss IndexFlatIP {t_flat:.2f}s ({gflop / t_flat:.0f} GFLOP/s), "
          f"numpy matmul + torch.topk {t_np:.2f}s ({gflop / t_np:.0f} GFLOP/s); agree {np.mean(ids_np == ids_exact):.4f}")
    t = time.perf_counter()
    ivf = build_index(img, kind="ivf", seed=0)
    t_build = time.perf_counter() - t
    t_ivf, (_, ids_ivf) = best_of(lambda: ivf.knn(q, 10), 1)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids_exact, ids_ivf)])
    print(f"IVF nlist={ivf.faiss_index.nlist} nprobe={ivf.nprobe}: build {t_build:.1f}s, "
          f"{args.queries} queries {t_ivf:.3f}s ({t_ivf / args.queries * 1e3:.3f} ms/query); "
          f"speed-up vs faiss flat {t_flat / t_ivf:.1f}x, vs numpy {t_np / t_ivf:.1f}x; recall@10 {recall:.4f} (target >= 0.95)")
    est = t_flat / args.queries * args.n
    print(f"  (an exact self-kNN over all {args.n:,} rows would take ~{est:.0f}s per pass with faiss flat)")

    if args.skip_full:
        return
    t = time.perf_counter()
    scores = run_detectors(img, txt, index_kind="ivf", k=10, seed=0)
    t_full = time.perf_counter() - t
    print(f"full detector pass (IVF, k=10): {t_full:.1f}s = {args.n / t_full:,.0f} pairs/s")
    for name, s in scores.items():
        auc = roc_auc_score(truth, s) if s.std() > 0 else float("nan")
        print(f"  {name:<20} AUROC {auc:.4f}")
    for how in ("mean", "max"):
        c = combine_scores({k: v for k, v in scores.items() if v.std() > 0}, how)
        top = np.argsort(-c, kind="stable")[: truth.sum()]
        print(f"  combined ({how}) AUROC {roc_auc_score(truth, c):.4f}, precision@k {truth[top].mean():.4f}")


if __name__ == "__main__":
    main()
