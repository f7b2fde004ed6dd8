"""Local-density outlier scores of a pair in a (possibly poisoned) model's embedding space.

After Huang et al. (ICLR 2025): poisoned pairs sit in abnormal local neighbourhoods. The pair is
represented by its joint vector [image, text]/√2 (cosine = mean of image and text cosines); its
k-distance is 1 − the cosine of its k-th nearest neighbour, and the score is a simplified LOF:
k-distance of the pair divided by the mean k-distance of its neighbours (> 1 = sparser than its
surroundings).
"""

from __future__ import annotations

import numpy as np


def joint(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """The pair's joint unit vector [image, text]/√2 (float32, (N, 2D))."""
    return (np.concatenate([np.asarray(img, np.float32), np.asarray(txt, np.float32)], 1)
            / np.float32(np.sqrt(2.0)))


def kdist_block(queries: np.ndarray, rows: np.ndarray, *, index, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k-distance (1 − cos of the k-th neighbour, self skipped) and the k neighbour ids of each
    query whose own row in `index` is `rows` (global ids); a missing neighbour counts as self."""
    sims, ids = index.knn(np.asarray(queries, np.float32), k + 1)
    rows = np.asarray(rows)[:, None]
    is_self = ids == rows
    # remove self if present, else drop the last column
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    ids = np.take_along_axis(ids, order, 1)
    sims = np.take_along_axis(sims, order, 1)
    ids = np.where(ids < 0, rows, ids)
    return np.maximum(1.0 - sims[:, -1], 0.0).astype(np.float32), ids


def lof(kdist: np.ndarray, neighbour_kdist: np.ndarray) -> np.ndarray:
    """kdist(i) / mean(kdist of i's neighbours), float32; `neighbour_kdist` is (N, k)."""
    eps = np.float32(1e-6)
    return ((kdist + eps) / (neighbour_kdist.mean(axis=1) + eps)).astype(np.float32)


def score(vectors: np.ndarray, *, index, k: int = 10, block: int = 1024) -> np.ndarray:
    """Simplified LOF over `vectors` (the rows indexed by `index`), float32 (N,).

    Returns kdist(i) / mean(kdist(j) for j in kNN(i)), with kdist = 1 − cos of the k-th neighbour.
    """
    n = len(vectors)
    k = max(1, min(k, n - 1))
    kdist = np.zeros(n, dtype=np.float32)
    neigh = np.zeros((n, k), dtype=np.int64)
    for a in range(0, n, block):
        q = vectors[a:a + block]
        kdist[a:a + len(q)], neigh[a:a + len(q)] = kdist_block(q, np.arange(a, a + len(q)), index=index, k=k)
    return lof(kdist, kdist[neigh])


def kdistance_block(queries: np.ndarray, rows: np.ndarray, n: int, *, index, k: int, found=None) -> np.ndarray:
    """`kdistance` for image `queries` whose global rows are `rows` in a union index of `n` images
    then `n` captions (self and the pair's own caption skipped); `found` = `index.knn(queries,
    k + 2)` when it was already made."""
    sims, ids = index.knn(np.asarray(queries, np.float32), k + 2) if found is None else found
    rows = np.asarray(rows)[:, None]
    own = (ids == rows) | (ids == rows + n)
    order = np.argsort(own, axis=1, kind="stable")[:, :k]
    sims = np.take_along_axis(sims, order, 1)
    return np.maximum(1.0 - sims[:, -1], 0.0).astype(np.float32)


def kdistance(img: np.ndarray, txt: np.ndarray, *, index, k: int = 16, block: int = 1024) -> np.ndarray:
    """Huang et al.'s k-distance for image–text pairs: 1 − cos of the k-th nearest neighbour of the
    image among all images *and* captions (`index` over `union(img, txt)`, img rows first), float32 (N,).

    Self (row i) and the pair's own caption (row N + i) are skipped. Backdoored pairs sit in sparse
    neighbourhoods of the poisoned model's space (their repository's `KDistanceDetector`), so run
    this on the suspect model's embeddings.
    """
    n = len(img)
    k = max(1, min(k, 2 * n - 2))
    out = np.zeros(n, dtype=np.float32)
    for a in range(0, n, block):
        q = img[a:a + block]
        out[a:a + len(q)] = kdistance_block(q, np.arange(a, a + len(q)), n, index=index, k=k)
    return out
