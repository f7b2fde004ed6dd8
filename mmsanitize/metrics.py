"""Retrieval metrics: MinRank, Hit@K and Recall@K from embeddings, computed blockwise.

Ranks are **0-based** and ties are counted in favour of the target: the rank of a query's best
target is the number of gallery items scoring strictly higher than that target. Positives are
given as groups: query q's targets are the gallery items with `gallery_group == query_group[q]`.
The full query x gallery score matrix is never held in memory; queries go in blocks sized so a
block's scores stay under `max_elements`.
"""

from __future__ import annotations

import numpy as np

HIT_KS = (1, 5, 10, 20, 50)
RECALL_KS = (1, 5, 10)


def _block_rows(n_gallery: int, max_elements: int) -> int:
    return max(1, max_elements // max(1, n_gallery))


def min_ranks(queries, gallery, query_group, gallery_group, *, max_elements: int = 1 << 24,
              device: str = "cpu") -> np.ndarray:
    """0-based rank of each query's best-scoring target in the gallery (inner-product scores).

    `queries` (Q, D) and `gallery` (G, D) are arrays or tensors (normalise them first for cosine);
    `query_group` (Q,) and `gallery_group` (G,) are integer group ids. Returns an int64 array (Q,);
    a query with no target in the gallery gets rank G (never found).
    """
    import torch

    q = torch.as_tensor(np.asarray(queries, dtype=np.float32), device=device)
    g = torch.as_tensor(np.asarray(gallery, dtype=np.float32), device=device)
    qgroup, ggroup = np.asarray(query_group), np.asarray(gallery_group)
    # gallery indices of each group, contiguous: order[starts[u] : starts[u] + counts[u]]
    order = np.argsort(ggroup, kind="stable")
    uniq, starts, counts = np.unique(ggroup[order], return_index=True, return_counts=True)
    pos = np.clip(np.searchsorted(uniq, qgroup), 0, max(len(uniq) - 1, 0))
    found = (len(uniq) > 0) & (uniq[pos] == qgroup) if len(uniq) else np.zeros(len(qgroup), bool)
    n_targets = np.where(found, counts[pos] if len(uniq) else 0, 0)
    out = np.full(len(q), len(g), dtype=np.int64)
    step = _block_rows(len(g), max_elements)
    for s in range(0, len(q), step):
        cnt = n_targets[s:s + step]
        scores = q[s:s + step] @ g.T
        # (row, target column) pairs of this block, then the best target score per row
        row = np.repeat(np.arange(len(cnt)), cnt)
        within = np.arange(len(row)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        col = order[starts[pos[s:s + step]][row] + within] if len(row) else np.zeros(0, np.int64)
        row_t, col_t = torch.as_tensor(row, device=device), torch.as_tensor(col, device=device)
        best = torch.full((len(cnt),), -torch.inf, device=device)
        best.scatter_reduce_(0, row_t, scores[row_t, col_t], reduce="amax")
        rank = (scores > best[:, None]).sum(dim=1).cpu().numpy()
        out[s:s + step] = np.where(cnt > 0, rank, len(g))
    return out


def topk(queries, gallery, k: int, *, max_elements: int = 1 << 24, device: str = "cpu"):
    """Top-k gallery indices and scores per query (descending), computed blockwise; returns (idx, scores)."""
    import torch

    q = torch.as_tensor(np.asarray(queries, dtype=np.float32), device=device)
    g = torch.as_tensor(np.asarray(gallery, dtype=np.float32), device=device)
    k = min(k, len(g))
    idx = np.empty((len(q), k), dtype=np.int64)
    val = np.empty((len(q), k), dtype=np.float32)
    step = _block_rows(len(g), max_elements)
    for s in range(0, len(q), step):
        v, i = torch.topk(q[s:s + step] @ g.T, k, dim=1)
        idx[s:s + step], val[s:s + step] = i.cpu().numpy(), v.cpu().numpy()
    return idx, val


def class_precision(queries, gallery, query_labels, gallery_labels, k: int = 10, *,
                    max_elements: int = 1 << 24) -> float:
    """Mean over queries of the fraction of the top-k gallery items that share the query's label.

    The class-level utility for data whose captions repeat word for word (templated captions):
    instance Recall@K there is decided by ties between identical captions."""
    idx, _ = topk(normalize(queries), normalize(gallery), k, max_elements=max_elements)
    ql = np.asarray(query_labels, dtype=object)[:, None]
    gl = np.asarray(gallery_labels, dtype=object)[idx]
    return float((gl == ql).mean()) if len(idx) else 0.0


def min_ranks_bruteforce(queries, gallery, query_group, gallery_group) -> np.ndarray:
    """Reference implementation of `min_ranks` on the full score matrix (for tests)."""
    scores = np.asarray(queries, np.float32) @ np.asarray(gallery, np.float32).T
    out = []
    for q in range(len(scores)):
        targets = np.flatnonzero(np.asarray(gallery_group) == np.asarray(query_group)[q])
        if len(targets) == 0:
            out.append(len(gallery))
            continue
        is_target = np.asarray(gallery_group) == np.asarray(query_group)[q]
        # full sort, score descending, ties broken in favour of targets; rank = first target's position
        order = np.lexsort((~is_target, -scores[q]))
        out.append(int(np.flatnonzero(is_target[order])[0]))
    return np.array(out, dtype=np.int64)


def rank_summary(ranks: np.ndarray, ks=HIT_KS) -> dict:
    """MinRank mean/median/min/max and Hit@K (fraction of ranks < K) of a rank array."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return {"queries": 0}
    out = {"queries": int(len(ranks)), "min_rank_mean": float(ranks.mean()),
           "min_rank_median": float(np.median(ranks)), "min_rank_min": int(ranks.min()),
           "min_rank_max": int(ranks.max())}
    for k in ks:
        out[f"hit@{k}"] = float((ranks < k).mean())
    return out


def normalize(x) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval_ranks(image_emb, text_emb, image_ids, *, max_elements: int = 1 << 24):
    """0-based rank of each caption's image among the unique images (t2i, (N,)) and of each unique
    image's best caption among all captions (i2t, (M,), images in first-seen order)."""
    image_emb, text_emb = normalize(image_emb), normalize(text_emb)
    uniq, first, group = np.unique(np.asarray(image_ids), return_index=True, return_inverse=True)
    gallery = image_emb[first]
    t2i = min_ranks(text_emb, gallery, group, np.arange(len(uniq)), max_elements=max_elements)
    i2t = min_ranks(gallery, text_emb, np.arange(len(uniq)), group, max_elements=max_elements)
    return t2i, i2t


def retrieval_recall(image_emb, text_emb, image_ids, *, ks=RECALL_KS, max_elements: int = 1 << 24) -> dict:
    """Text→image and image→text Recall@K over a test split.

    `image_emb` (N, D) and `text_emb` (N, D) are one row per pair; `image_ids` (N,) identifies the
    image of each pair (e.g. its sha256) so duplicate images are one gallery item and an image
    retrieves any of its captions. Returns {"t2i@K": ..., "i2t@K": ..., "t2i_mean": ...,
    "images": M, "captions": N}.
    """
    return recall_from_ranks(*retrieval_ranks(image_emb, text_emb, image_ids, max_elements=max_elements), ks=ks)


def recall_from_ranks(t2i: np.ndarray, i2t: np.ndarray, *, ks=RECALL_KS) -> dict:
    """The `retrieval_recall` dict from the ranks of `retrieval_ranks`."""
    out = {"images": int(len(i2t)), "captions": int(len(t2i))}
    for k in ks:
        out[f"t2i_r@{k}"] = float((t2i < k).mean())
    for k in ks:
        out[f"i2t_r@{k}"] = float((i2t < k).mean())
    out["t2i_r_mean"] = float(np.mean([out[f"t2i_r@{k}"] for k in ks]))
    out["i2t_r_mean"] = float(np.mean([out[f"i2t_r@{k}"] for k in ks]))
    return out
