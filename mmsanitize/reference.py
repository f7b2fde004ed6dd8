"""The kNN detectors' reference set: a seeded uniform sample of the pairs, searched list by list.

caption_neighbours, density and kdistance ask "what is near this pair?". Above `REFERENCE_SIZE`
pairs they ask it of a seeded sample of that many pairs instead of the whole dataset, as Huang et
al. (ICLR 2025) do at web scale (their detectors take a batch or "a dedicated reference set" as
the neighbourhood, their App. B.5): a kNN search over N pairs costs ~N·√N, over a fixed reference
~N. The near-duplicate search of image_reuse still covers every pair (a copy must be found
wherever it is).

Layout of `DIR` (written once per scan, read memory-mapped by every worker):
- `gid.npy` (R,) the sampled global rows, ascending; `img.npy`, `txt.npy` their vectors (source dtype);
- `KIND_vectors.npy`, `KIND_ids.npy`, `KIND_lists.npz` per kind (image | text | joint): the
  kind's float32 vectors as searched, sorted by inverted list (joint: `density.joint`), their
  global ids, and the lists' centroids and bounds.

kdistance's search among images and captions together is not a kind of its own: `UnionIndex`
merges an image search (the one caption_neighbours already makes for the same queries) with a
search of the text lists.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

REFERENCE_SIZE = 200_000
# exact search (one list) up to this many reference vectors, IVF lists above
REFERENCE_EXACT = 20_000
# queries × list vectors per matrix product: bounds a search's scratch (64 MB of float32)
BLOCK_CELLS = 1 << 24


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """The reference's global rows: `size` of `n` drawn without replacement by `seed`, ascending
    (all rows when n ≤ size)."""
    if n <= size:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng([seed, 5]).choice(n, size, replace=False)).astype(np.int64)


def nlist_for(vectors: int) -> int:
    """Inverted lists for `vectors` reference vectors: 1 (exact) up to REFERENCE_EXACT, else 2·√n
    (lists of ~450 vectors at 200,000: one product per list is then big enough to run near the
    BLAS's speed, and the coarse search costs a quarter of 4·√n's)."""
    return 1 if vectors <= REFERENCE_EXACT else round(2 * math.sqrt(vectors))


def nprobe_for(nlist: int) -> int:
    """Lists probed per query: all of them when exact, else max(8, nlist/64) (recall@10 0.99 on
    the 2M benchmark's data, docs/scale.md)."""
    return nlist if nlist == 1 else min(nlist, max(8, nlist // 64))


def kind_vectors(kind: str, img: np.ndarray, txt: np.ndarray, gid: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 vectors as searched, global ids) of rows `gid` for index `kind`: joint =
    `density.joint`, union = images then captions (ids N + gid)."""
    img, txt = np.asarray(img, np.float32), np.asarray(txt, np.float32)
    if kind == "image":
        return img, gid
    if kind == "text":
        return txt, gid
    if kind == "joint":
        from .detectors.density import joint

        return joint(img, txt), gid
    if kind == "union":
        return np.concatenate([img, txt]), np.concatenate([gid, gid + n])
    raise ValueError(f"unknown reference kind {kind!r}")


def assign_lists(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The nearest centroid (inner product; ties to the lower list) of every row of `x`."""
    out = np.empty(len(x), np.int64)
    step = max(1, BLOCK_CELLS // max(1, len(centroids)))
    for a in range(0, len(x), step):
        out[a:a + step] = np.argmax(np.asarray(x[a:a + step], np.float32) @ centroids.T, axis=1)
    return out


def build_kind(directory: str | os.PathLike, kind: str, img: np.ndarray, txt: np.ndarray, gid: np.ndarray,
               n: int, *, seed: int) -> dict:
    """Cluster the reference's `kind` vectors into lists (seeded two-level spherical k-means on at
    most 40·nlist of them) and write `KIND_vectors.npy`, `KIND_ids.npy`, `KIND_lists.npz` into
    `directory` (temp names, renamed). Returns the kind's parameters."""
    from threadpoolctl import threadpool_limits

    from .index import two_level_centroids

    d = Path(directory)
    v, ids = kind_vectors(kind, img, txt, gid, n)
    nlist = nlist_for(len(v))
    with threadpool_limits(1, "blas"):  # centroids must not depend on the worker's thread count
        if nlist == 1:
            centroids = np.zeros((1, v.shape[1]), np.float32)
            lists = np.zeros(len(v), np.int64)
            trained_on = 0
        else:
            rng = np.random.default_rng([seed, 6])
            train = np.sort(rng.choice(len(v), min(len(v), 40 * nlist), replace=False))
            centroids = two_level_centroids(np.ascontiguousarray(v[train]), nlist, seed=seed)
            lists = assign_lists(v, centroids)
            trained_on = len(train)
    order = np.argsort(lists, kind="stable")
    lims = np.searchsorted(lists[order], np.arange(nlist + 1)).astype(np.int64)
    _save(d / f"{kind}_vectors.npy", np.ascontiguousarray(v[order]))
    _save(d / f"{kind}_ids.npy", ids[order].astype(np.int64))
    tmp = d / f"{kind}_lists.tmp.npz"
    np.savez(tmp, centroids=centroids, lims=lims)
    os.replace(tmp, d / f"{kind}_lists.npz")
    return {"vectors": len(v), "nlist": nlist, "nprobe": nprobe_for(nlist), "trained_on": int(trained_on)}


def _save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def write_rows(directory: str | os.PathLike, gid: np.ndarray, img: np.ndarray, txt: np.ndarray) -> None:
    """Write the reference rows (`gid.npy`, `img.npy`, `txt.npy`) into `directory`."""
    d = Path(directory)
    _save(d / "img.npy", np.ascontiguousarray(img))
    _save(d / "txt.npy", np.ascontiguousarray(txt))
    _save(d / "gid.npy", np.asarray(gid, np.int64))


class Reference:
    """The reference rows of a scan, memory-mapped: `take` partner vectors by global id, and one
    `ReferenceIndex` per kind."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.gid = np.load(self.dir / "gid.npy")
        self._rows = {w: np.load(self.dir / f"{w}.npy", mmap_mode="r") for w in ("img", "txt")}
        self._indexes: dict = {}

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Reference positions of global rows `ids`; -1 for a row outside the reference."""
        ids = np.asarray(ids, np.int64)
        pos = np.minimum(np.searchsorted(self.gid, ids), len(self.gid) - 1)
        return np.where(self.gid[pos] == ids, pos, -1) if len(self.gid) else np.full(len(ids), -1)

    def take(self, which: str, ids: np.ndarray) -> np.ndarray:
        """float32 `which` (img | txt) vectors of global rows `ids`, in the order given; zeros for
        a row outside the reference (callers mask ids that are not results, as with -1)."""
        pos = self.positions(ids)
        out = np.zeros((len(pos), self._rows[which].shape[1]), np.float32)
        inside = np.flatnonzero(pos >= 0)
        order = inside[np.argsort(pos[inside], kind="stable")]
        out[order] = self._rows[which][pos[order]]
        return out

    def index(self, kind: str, nprobe: int | None = None) -> ReferenceIndex:
        """The searchable reference of `kind` (image | text | joint, cached)."""
        key = (kind, nprobe)
        if key not in self._indexes:
            self._indexes[key] = ReferenceIndex(self.dir, kind, nprobe)
        return self._indexes[key]

    def union(self, n: int, nprobe: int | None = None) -> UnionIndex:
        """The reference's images and captions searched together (caption ids N + gid, N = `n`)."""
        return UnionIndex(self.index("image", nprobe), self.index("text", nprobe), n)


class ReferenceIndex:
    """kNN over one kind's reference vectors: queries bucketed by the `nprobe` lists they probe, each
    list read once and matched against its queries with one matrix product, the best k kept in
    faiss' heaps (as faiss.contrib.big_batch_search does). Exact over the probed lists, so with
    every list probed it is exact search."""

    kind = "reference"

    def __init__(self, directory: str | os.PathLike, kind: str, nprobe: int | None = None):
        d = Path(directory)
        self.search_kind = kind
        self.vectors = np.load(d / f"{kind}_vectors.npy", mmap_mode="r")
        self.ids = np.load(d / f"{kind}_ids.npy", mmap_mode="r")
        with np.load(d / f"{kind}_lists.npz") as z:
            self.centroids, self.lims = z["centroids"], z["lims"]
        self.nlist = len(self.centroids)
        self.nprobe = min(self.nlist, nprobe or nprobe_for(self.nlist))

    def __len__(self) -> int:
        return len(self.ids)

    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of the `k` nearest reference vectors of each query, best first, ties by id
        (id -1 and sim -3.4e38 = none), like `index.Index.knn`."""
        import faiss
        from threadpoolctl import threadpool_limits

        q = np.ascontiguousarray(queries, np.float32)
        heap = faiss.ResultHeap(len(q), k, keep_max=True)
        with threadpool_limits(1, "blas"):  # many small products: threads only cost (and order sums differently)
            if self.nprobe >= self.nlist:
                probe = np.broadcast_to(np.arange(self.nlist), (len(q), self.nlist))
            else:
                faiss.omp_set_num_threads(1)
                coarse = faiss.IndexFlatIP(self.centroids.shape[1])
                coarse.add(self.centroids)
                probe = coarse.search(q, self.nprobe)[1]
            qs = np.repeat(np.arange(len(q), dtype=np.int64), probe.shape[1])
            ls = probe.ravel()
            order = np.argsort(ls, kind="stable")
            qs, ls = qs[order], ls[order]
            bounds = np.searchsorted(ls, np.arange(self.nlist + 1))
            for lst in range(self.nlist):
                a, b = int(self.lims[lst]), int(self.lims[lst + 1])
                sel = qs[bounds[lst]:bounds[lst + 1]]
                if a == b or len(sel) == 0:
                    continue
                v, ids = self.vectors[a:b], self.ids[a:b]
                step = max(1, BLOCK_CELLS // (b - a))
                for c in range(0, len(sel), step):
                    part = sel[c:c + step]
                    heap.add_result_subset(part, q[part] @ v.T, ids)
        heap.finalize()
        sims = np.where(heap.I >= 0, heap.D, -np.finfo(np.float32).max).astype(np.float32)
        order = np.lexsort((np.where(heap.I >= 0, heap.I, np.iinfo(np.int64).max), -sims), axis=-1)  # ties by id
        return np.take_along_axis(sims, order, 1), np.take_along_axis(heap.I, order, 1)


def merge_knn(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of two (sims, ids) kNN results of the same queries over disjoint vectors, best
    first, ties by id (id -1 = none, last)."""
    sims, ids = np.concatenate([a[0], b[0]], 1), np.concatenate([a[1], b[1]], 1)
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -sims), axis=-1)[:, :k]
    return np.take_along_axis(sims, order, 1), np.take_along_axis(ids, order, 1)


class UnionIndex:
    """kNN among the reference's images and captions together (caption ids offset by `n`): the
    image search and the text-list search of the same queries merged. The image part can be a
    search already made (`image_found`), so kdistance costs one text-list search on top of
    caption_neighbours' image search instead of a search of 2R vectors of its own."""

    kind = "reference"

    def __init__(self, image: ReferenceIndex, text: ReferenceIndex, n: int):
        self.image, self.text, self.n = image, text, int(n)

    def __len__(self) -> int:
        return len(self.image) + len(self.text)

    def knn(self, queries: np.ndarray, k: int, image_found=None) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of the `k` nearest images and captions of each query, best first, ties by
        id; `image_found` = the image index's result for the same queries with ≥ k columns."""
        sims, ids = image_found if image_found is not None else self.image.knn(queries, k)
        ts, ti = self.text.knn(queries, k)
        return merge_knn((sims[:, :k], ids[:, :k]), (ts, np.where(ti >= 0, ti + self.n, -1)), k)
