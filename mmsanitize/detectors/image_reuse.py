"""Attack I's signature: one image (same bytes or a near-duplicate) paired with many captions.

For each pair, count the other pairs whose image is the same (equal sha256) or a near-duplicate
(image cosine ≥ `radius`: clip-retrieval's dedup threshold 0.94, raised for datasets whose
images are unusually close to each other, see `calibrated_radius`) while their caption differs
(different text and text cosine < `caption_radius`). Honest duplicates (same image, same caption)
score 0; a target image reused by n poisoned captions scores n − 1 on each of them.
"""

from __future__ import annotations

import numpy as np


def calibrated_radius(img: np.ndarray, image_index, *, radius: float = 0.94, sample: int = 20_000,
                      seed: int = 0, collapsed: float = 0.98) -> dict:
    """The near-duplicate radius for this dataset: max(`radius`, 1 − (1 − m)/4), where m is the
    median cosine between an image and its nearest *other* image (seeded sample of queries).

    A copy must sit four times closer than a typical nearest neighbour. The median cannot be moved
    by an attacker who controls less than half of the data, unlike the old global guard (switch
    near-duplicate search off when > 1% of random pairs exceed 0.94), which the attacker's own
    copies tripped. A collapsed space (m ≥ `collapsed`, e.g. an untrained model, where every
    image is every other's near-duplicate) gets radius None: exact hashes only.
    Returns {"radius", "median_nn_cosine", "sampled"}.
    """
    n = len(img)
    if n < 3 or image_index is None:
        return {"radius": float(radius), "median_nn_cosine": None, "sampled": 0}
    rng = np.random.default_rng(seed)
    rows = np.arange(n) if n <= sample else np.sort(rng.choice(n, sample, replace=False))
    sims, ids = image_index.knn(np.asarray(img[rows], np.float32), 2)
    nn = np.where(ids[:, 0] == rows, sims[:, 1], sims[:, 0])
    med = float(np.median(nn))
    return {"radius": radius_from_median(med, radius=radius, collapsed=collapsed), "median_nn_cosine": med,
            "sampled": int(len(rows))}


def radius_from_median(med: float, *, radius: float = 0.94, collapsed: float = 0.98) -> float | None:
    """`calibrated_radius`'s rule from the median nearest-other-image cosine `med`: max(`radius`,
    1 − (1 − med)/4), or None for a collapsed space (med ≥ `collapsed`)."""
    return None if med >= collapsed else float(max(radius, 1.0 - (1.0 - med) / 4.0))


def score(
    img: np.ndarray,
    txt: np.ndarray,
    *,
    image_index=None,
    sha256: np.ndarray | None = None,
    captions: np.ndarray | None = None,
    radius: float | None = 0.94,
    caption_radius: float = 0.94,
    block: int = 4096,
) -> np.ndarray:
    """Number of other pairs sharing this pair's image with a different caption (float32, (N,)).

    `image_index` (over `img`, same row order) gives the near-duplicates (image cosine ≥ `radius`,
    see `calibrated_radius`); without it only exact `sha256` matches count. `captions` (strings)
    lets identical captions count as the same.
    """
    n = len(img)
    out = np.zeros(n, dtype=np.float32)
    pairs_a, pairs_b = [], []
    if image_index is not None and radius is not None:
        for a in range(0, n, block):
            lims, _, ids = image_index.range_search(np.asarray(img[a:a + block], np.float32), radius)
            q = np.repeat(np.arange(a, a + len(lims) - 1), np.diff(lims))
            keep = ids != q
            pairs_a.append(q[keep])
            pairs_b.append(ids[keep])
    if sha256 is not None:
        a, b = hash_pairs(sha256)
        pairs_a.append(a)
        pairs_b.append(b)
    if not pairs_a:
        return out
    return count_different(np.concatenate(pairs_a), np.concatenate(pairs_b), n, 0,
                           lambda ids: txt[ids], None if captions is None else (lambda ids: np.asarray(captions, dtype=object)[ids]),
                           caption_radius)


def hash_pairs(sha256: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every ordered pair (a, b), a != b, of rows with equal `sha256`."""
    sha256 = np.asarray(sha256)
    n = len(sha256)
    pairs_a, pairs_b = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    codes = np.unique(sha256, return_inverse=True)[1].ravel()
    order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_codes))[0] + 1] if n else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, n])
    for s, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        members = order[s:s + size]
        a, b = np.meshgrid(members, members, indexing="ij")
        m = a != b
        pairs_a.append(a[m])
        pairs_b.append(b[m])
    return np.concatenate(pairs_a).astype(np.int64), np.concatenate(pairs_b).astype(np.int64)


def count_different(a: np.ndarray, b: np.ndarray, n: int, offset: int, text_of, caption_of=None,
                    caption_radius: float = 0.94) -> np.ndarray:
    """For rows `offset .. offset + n` (global ids), the number of distinct partners b among the
    pairs (a, b) whose caption differs: text cosine < `caption_radius` and, given `caption_of`,
    unequal caption strings. `text_of(ids)` / `caption_of(ids)` return those rows' text
    embeddings / captions, so partners may live in other shards. Returns float32 (n,)."""
    out = np.zeros(n, dtype=np.float32)
    if len(a) == 0:
        return out
    ab = np.unique(np.stack([np.asarray(a, np.int64), np.asarray(b, np.int64)], 1), axis=0)
    a, b = ab[:, 0], ab[:, 1]
    tcos = np.einsum("ij,ij->i", np.asarray(text_of(a), np.float32), np.asarray(text_of(b), np.float32))
    different = tcos < caption_radius
    if caption_of is not None:
        different &= np.asarray(caption_of(a), dtype=object) != np.asarray(caption_of(b), dtype=object)
    np.add.at(out, a[different] - offset, 1.0)
    return out
