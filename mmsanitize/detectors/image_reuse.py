"""Attack I's signature: one image (same bytes or a near-duplicate) paired with many captions.

For each pair, count the other pairs whose image is the same (equal sha256) or a near-duplicate
(image cosine ≥ `radius`, clip-retrieval's dedup threshold 0.94) while their caption differs
(different text and text cosine < `caption_radius`). Honest duplicates (same image, same caption)
score 0; a target image reused by n poisoned captions scores n − 1 on each of them.
"""

from __future__ import annotations

import numpy as np


def concentrated(img: np.ndarray, radius: float = 0.94, *, pairs: int = 2000, seed: int = 0) -> bool:
    """True when > 1% of random image pairs already have cosine ≥ `radius`: the space is too
    collapsed (e.g. an untrained model) for near-duplicate search to mean anything."""
    n = len(img)
    if n < 3:
        return False
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, pairs)
    b = (a + rng.integers(1, n, pairs)) % n
    cos = np.einsum("ij,ij->i", np.asarray(img[a], np.float32), np.asarray(img[b], np.float32))
    return float((cos >= radius).mean()) > 0.01


def score(
    img: np.ndarray,
    txt: np.ndarray,
    *,
    image_index=None,
    sha256: np.ndarray | None = None,
    captions: np.ndarray | None = None,
    radius: float = 0.94,
    caption_radius: float = 0.94,
    block: int = 4096,
) -> np.ndarray:
    """Number of other pairs sharing this pair's image with a different caption (float32, (N,)).

    `image_index` (over `img`, same row order) gives the near-duplicates; without it, or when
    the image space is `concentrated`, only exact `sha256` matches count. `captions` (strings) lets identical captions count as the same.
    """
    n = len(img)
    out = np.zeros(n, dtype=np.float32)
    pairs_a, pairs_b = [], []
    if image_index is not None and not concentrated(img, radius):
        for a in range(0, n, block):
            lims, _, ids = image_index.range_search(np.asarray(img[a:a + block], np.float32), radius)
            q = np.repeat(np.arange(a, a + len(lims) - 1), np.diff(lims))
            keep = ids != q
            pairs_a.append(q[keep])
            pairs_b.append(ids[keep])
    if sha256 is not None:
        codes = np.unique(np.asarray(sha256), return_inverse=True)[1].ravel()
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        starts = np.r_[0, np.nonzero(np.diff(sorted_codes))[0] + 1]
        sizes = np.diff(np.r_[starts, n])
        for s, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            members = order[s:s + size]
            a, b = np.meshgrid(members, members, indexing="ij")
            m = a != b
            pairs_a.append(a[m])
            pairs_b.append(b[m])
    if not pairs_a:
        return out
    a = np.concatenate(pairs_a)
    b = np.concatenate(pairs_b)
    if len(a) == 0:
        return out
    ab = np.unique(np.stack([a, b], 1), axis=0)
    a, b = ab[:, 0], ab[:, 1]
    tcos = np.einsum("ij,ij->i", np.asarray(txt[a], np.float32), np.asarray(txt[b], np.float32))
    different = tcos < caption_radius
    if captions is not None:
        caps = np.asarray(captions, dtype=object)
        different &= caps[a] != caps[b]
    np.add.at(out, a[different], 1.0)
    return out
