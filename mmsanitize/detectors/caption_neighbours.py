"""Does a pair's image look like the images of its caption's nearest captions (and vice versa)?

For pair i, take the k nearest captions of its caption (text index) and compute the median
cosine between image i and their images; symmetrically, the median cosine between caption i and
the captions of its image's k nearest images. A dirty-label pair (a dog caption on a boat image)
disagrees with both neighbourhoods even when its own image–text cosine passes a global
threshold. The median keeps the score robust while poisoned pairs are a minority of a
neighbourhood. Score = 1 − mean of the two medians (higher = more suspicious).
"""

from __future__ import annotations

import numpy as np


def agreement(mine: np.ndarray, queries: np.ndarray, rows: np.ndarray, index, fetch, k: int,
              found=None) -> np.ndarray:
    """Median cosine between `mine[i]` and `fetch(j)` for j in the k nearest of `queries[i]` in
    `index`, skipping the pair's own row `rows[i]` (global ids); 1.0 where no neighbour exists.

    `fetch(ids)` returns the rows of the searched modality's partner vectors (ids ≥ 0), so a
    shard's rows can be scored against a dataset-wide index. `found` = `index.knn(queries, m)`
    already made with m ≥ k + 1 (its first k + 1 columns are used).
    """
    ids = index.knn(np.asarray(queries, np.float32), k + 1)[1] if found is None else found[1][:, :k + 1]
    rows = np.asarray(rows)[:, None]
    # drop self (wherever it appears) and keep k neighbours
    ids = np.where(ids == rows, -1, ids)
    valid = ids >= 0
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(ids, order, 1)
    valid = ids >= 0
    mine = np.asarray(mine, np.float32)
    flat = np.where(valid, ids, 0).ravel()
    neigh = np.asarray(fetch(flat), np.float32).reshape(ids.shape + (mine.shape[1],))
    cos = np.einsum("bd,bkd->bk", mine, neigh)
    cos = np.where(valid, cos, np.nan)
    med = np.median(cos, axis=1) if valid.all() else np.nanmedian(cos, axis=1)
    return np.nan_to_num(med, nan=1.0).astype(np.float32)


def _cross_agreement(own: np.ndarray, other: np.ndarray, index, k: int, block: int) -> np.ndarray:
    """Median cosine between `own[i]` and `own[j]` for j in the k nearest of `other[i]` (self excluded)."""
    n = len(own)
    out = np.zeros(n, dtype=np.float32)
    for a in range(0, n, block):
        q = other[a:a + block]
        out[a:a + len(q)] = agreement(own[a:a + len(q)], q, np.arange(a, a + len(q)), index,
                                      lambda ids: own[ids], k)
    return out


def score(img: np.ndarray, txt: np.ndarray, *, image_index, text_index, k: int = 10,
          block: int = 1024) -> np.ndarray:
    """1 − mean(median cos(image i, images of caption i's k nearest captions),
    median cos(caption i, captions of image i's k nearest images)), float32 (N,)."""
    t2i = _cross_agreement(img, txt, text_index, k, block)
    i2t = _cross_agreement(txt, img, image_index, k, block)
    return (1.0 - 0.5 * (t2i + i2t)).astype(np.float32)
