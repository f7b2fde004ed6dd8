"""Nearest-neighbour search over L2-normalised embeddings (inner product = cosine).

`build_index` picks the kind by size: exact below `EXACT_MAX` vectors, IVF with nlist ≈ 4·√N
above it, HNSW on request. Exact search runs on one of two backends (`MMSANITIZE_EXACT` =
`faiss` | `numpy`, default faiss): faiss-cpu's bundled OpenBLAS can run in a generic core mode
that makes IndexFlatIP ~5x slower than numpy's BLAS; on the development machine it did not
(faiss 82-98 GFLOP/s vs numpy matmul + torch.topk ~50), so faiss is the default and the numpy
path (blockwise matmul + torch.topk) is the fallback; benchmarks/bench_scan.py measures both.
The backend is fixed, not picked per run, so tie order (hence outputs) never changes between
runs. IVF/HNSW use FAISS, on the GPU when faiss-gpu and CUDA are present. Scan's on-disk
IVF-SQ8 (`load_ondisk`) re-ranks its kNN candidates with the exact vectors (`rerank`) and
answers range searches list by list (`ivf_batch_range`). Indexes save as FAISS files (`image.index`, `text.index`)
with `ids.parquet` (row -> key, shard) beside them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .errors import UsageError

EXACT_MAX = 200_000
KINDS = ("auto", "exact", "ivf", "hnsw")
QUERY_BLOCK = 1024
BASE_BLOCK = 65536


def _as_f32(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def exact_knn(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-`k` inner products of each query against `base` by blockwise matmul.

    Returns (sims, ids), each (len(queries), k), best first; ids are -1 where base has < k rows.
    Deterministic for a given input (torch.topk on CPU).
    """
    import torch

    base, queries = _as_f32(base), _as_f32(queries)
    n, m = len(base), len(queries)
    kk = min(k, n)
    out_s = np.full((m, k), -np.inf, dtype=np.float32)
    out_i = np.full((m, k), -1, dtype=np.int64)
    for q0 in range(0, m, QUERY_BLOCK):
        q = queries[q0:q0 + QUERY_BLOCK]
        best_s = torch.full((len(q), 0), -float("inf"))
        best_i = torch.zeros((len(q), 0), dtype=torch.int64)
        for b0 in range(0, n, BASE_BLOCK):
            s = torch.from_numpy(q @ base[b0:b0 + BASE_BLOCK].T)  # numpy BLAS; torch.topk beats argpartition ~10x
            v, i = torch.topk(s, min(kk, s.shape[1]), dim=1)
            cand_s = torch.cat([best_s, v], 1)
            cand_i = torch.cat([best_i, i + b0], 1)
            v, j = torch.topk(cand_s, min(kk, cand_s.shape[1]), dim=1)
            best_s, best_i = v, torch.gather(cand_i, 1, j)
        out_s[q0:q0 + len(q), :kk] = best_s.numpy()
        out_i[q0:q0 + len(q), :kk] = best_i.numpy()
    return out_s, out_i


def exact_range(base: np.ndarray, queries: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All base rows with inner product ≥ `radius` for each query, by blockwise matmul.

    Returns FAISS-style (lims, sims, ids): the results of query i are `[lims[i], lims[i+1])`,
    ids ascending within a query.
    """
    base, queries = _as_f32(base), _as_f32(queries)
    sims_parts, ids_parts, counts = [], [], np.zeros(len(queries), dtype=np.int64)
    for q0 in range(0, len(queries), QUERY_BLOCK):
        s = queries[q0:q0 + QUERY_BLOCK] @ base.T
        rows, cols = np.nonzero(s >= radius)
        counts[q0:q0 + len(s)] = np.bincount(rows, minlength=len(s))
        sims_parts.append(s[rows, cols])
        ids_parts.append(cols.astype(np.int64))
    lims = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    sims = np.concatenate(sims_parts) if sims_parts else np.zeros(0, np.float32)
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
    return lims, sims.astype(np.float32), ids


def exact_backend() -> str:
    """The exact-search backend: `MMSANITIZE_EXACT` (faiss | numpy), default faiss."""
    b = os.environ.get("MMSANITIZE_EXACT", "faiss")
    if b not in ("faiss", "numpy"):
        raise UsageError(f"MMSANITIZE_EXACT={b!r}: use faiss or numpy")
    return b


def _gpu_available() -> bool:
    try:
        import faiss
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:
        return False


def ivf_add(index, vectors: np.ndarray, ids: np.ndarray, probes: int = 1) -> np.ndarray:
    """Add `vectors` with `ids` to the IVF `index` and return each vector's `probes` nearest lists
    (int32, nearest first): one coarse-quantizer search serves the add (its first column, as
    `add_with_ids` assigns) and a later `ivf_batch_range(..., assign=)` of the same vectors."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    x = np.ascontiguousarray(_as_f32(vectors))
    xids = np.ascontiguousarray(ids, np.int64)
    _, assign = ivf.quantizer.search(x, max(1, probes))
    first = np.ascontiguousarray(assign[:, 0], np.int64)
    ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(xids), faiss.swig_ptr(first))
    return assign.astype(np.int32)


def ivf_batch_range(index, queries: np.ndarray, radius: float,
                    assign: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`index.range_search` (an IVF-SQ or IVF-Flat with `index.nprobe`) done list by list: the
    queries are bucketed by the lists they probe (as faiss.contrib.big_batch_search does for kNN),
    each probed list is read once and matched against its queries with one matrix product (SQ8:
    on the raw codes). Same candidates and SQ-decoded similarities as faiss' per-query scan (up to
    float rounding); about 2x faster than it for a shard of 10,000 queries on the 1M-pair bench
    index. `assign` (queries × ≥ nprobe lists, nearest first, e.g. from `ivf_add`) skips the
    coarse-quantizer search. Returns (lims, sims, ids), ids ascending per query."""
    import faiss
    from faiss.contrib.inspect_tools import get_invlist
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # many small products: threads only cost (and order sums differently)
        return _ivf_batch_range(faiss, get_invlist, index, _as_f32(queries), radius, assign)


def _ivf_batch_range(faiss, get_invlist, index, queries, radius, assign):
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    lhs, bias, raw_sq8 = queries, np.zeros(len(queries), np.float32), False
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer) and ivf.sq.qtype == faiss.ScalarQuantizer.QT_8bit:
        # x = vmin + (code + 0.5) / 255 * vdiff per dimension, so q·x = (q * vdiff / 255)·code plus a
        # per-query constant: products with the raw codes instead of decoding every list per shard
        vmin, vdiff = np.split(faiss.vector_to_array(ivf.sq.trained).astype(np.float32), 2)
        lhs = queries * (vdiff / np.float32(255.0))
        bias = queries @ vmin + np.float32(0.5) * lhs.sum(1)
        decode, by_residual, raw_sq8 = None, ivf.by_residual, True
    elif isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        decode, by_residual = ivf.sq.decode, ivf.by_residual
    elif isinstance(ivf, faiss.IndexIVFFlat):
        decode, by_residual = (lambda codes: codes.view(np.float32)), False
    else:
        raise UsageError(f"range search over {type(ivf).__name__} is not supported")
    if assign is None:
        _, assign = ivf.quantizer.search(queries, ivf.nprobe)
    elif assign.shape != (len(queries), assign.shape[1]) or assign.shape[1] < ivf.nprobe:
        raise ValueError(f"assign has shape {assign.shape}, need ({len(queries)}, >= {ivf.nprobe})")
    else:
        assign = assign[:, :ivf.nprobe]
    qs = np.repeat(np.arange(len(queries), dtype=np.int64), assign.shape[1])
    ls = assign.ravel().astype(np.int64)
    order = np.argsort(ls, kind="stable")
    qs, ls = qs[order], ls[order]
    starts = np.flatnonzero(np.r_[True, ls[1:] != ls[:-1]])
    ends = np.r_[starts[1:], len(ls)]
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    cs = invlists.code_size
    # one buffer each for the queries of a list, its converted codes and the products, reused
    # across lists: fresh arrays of this size (hundreds of KB) go through mmap/munmap and
    # page faults (py-spy at 10M pairs: munmap in array_dealloc, 37% system CPU time)
    sizes = np.array([invlists.list_size(int(ls[a])) if ls[a] >= 0 else 0 for a in starts], np.int64)
    widest, most = int(sizes.max(initial=0)), int((ends - starts).max(initial=0))
    qbuf = np.empty(most * queries.shape[1], np.float32)
    cbuf = np.empty(widest * queries.shape[1], np.float32)
    sbuf = np.empty(most * widest, np.float32)
    hit_q, hit_i, hit_s = [], [], []
    for a, b, n in zip(starts, ends, sizes):
        lst, n, m = int(ls[a]), int(n), int(b - a)
        if lst < 0 or n == 0:
            continue
        sel = qs[a:b]
        q = np.take(lhs, sel, axis=0, out=qbuf[:m * lhs.shape[1]].reshape(m, lhs.shape[1]))
        sims = sbuf[:m * n].reshape(m, n)
        if raw_sq8:  # the list's codes read in place (memory-mapped), converted into the buffer
            ptr = invlists.get_codes(lst)
            try:
                codes = cbuf[:n * cs].reshape(n, cs)
                np.copyto(codes, faiss.rev_swig_ptr(ptr, n * cs).reshape(n, cs), casting="unsafe")
            finally:
                invlists.release_codes(lst, ptr)
            ids = _list_ids(faiss, invlists, lst, n)
        else:
            ids, raw = get_invlist(ivf.invlists, lst)
            codes = decode(raw)
        np.matmul(q, codes.T, out=sims)
        # the per-query terms, added to each row's maximum first: float addition is monotonic, so
        # only rows whose maximum reaches the radius can hold a hit (a few per list), and only those
        # rows get the full additions and comparison (all rows: ~0.75x the product's own time)
        top = sims.max(axis=1) + bias[sel]
        res = (queries[sel] @ ivf.quantizer.reconstruct(lst)) if by_residual else None
        if res is not None:
            top += res
        rows = np.flatnonzero(top >= radius)
        if len(rows) == 0:
            continue
        part = sims[rows] + bias[sel[rows]][:, None]
        if res is not None:
            part += res[rows][:, None]
        r, c = np.nonzero(part >= radius)
        hit_q.append(sel[rows[r]])
        hit_i.append(ids[c])
        hit_s.append(part[r, c])
    if not hit_q:
        return np.zeros(len(queries) + 1, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
    hq, hi, hs = np.concatenate(hit_q), np.concatenate(hit_i), np.concatenate(hit_s).astype(np.float32)
    order = np.lexsort((hi, hq))
    lims = np.r_[0, np.cumsum(np.bincount(hq, minlength=len(queries)))].astype(np.int64)
    return lims, hs[order], hi[order]


def _list_ids(faiss, invlists, lst: int, n: int) -> np.ndarray:
    """A copy of the ids of inverted list `lst` (`n` entries)."""
    out = np.empty(n, np.int64)
    ptr = invlists.get_ids(lst)
    try:
        faiss.memcpy(faiss.swig_ptr(out), ptr, out.nbytes)
    finally:
        invlists.release_ids(lst, ptr)
    return out


def rerank(queries: np.ndarray, candidates: np.ndarray, fetch, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of each query's `candidates` (ids, -1 = none) by exact inner product with
    `fetch(ids)` (their float32 vectors); ties by id. Returns (sims, ids) like `Index.knn`."""
    queries = _as_f32(queries)
    valid = candidates >= 0
    vecs = np.asarray(fetch(np.where(valid, candidates, 0).ravel()), np.float32)
    sims = np.einsum("qd,qkd->qk", queries, vecs.reshape(candidates.shape + (queries.shape[1],)))
    sims = np.where(valid, sims, -np.inf).astype(np.float32)
    order = np.lexsort((np.where(valid, candidates, np.iinfo(np.int64).max), -sims), axis=-1)[:, :k]
    ids = np.where(np.take_along_axis(valid, order, 1), np.take_along_axis(candidates, order, 1), -1)
    sims = np.take_along_axis(sims, order, 1)
    return np.where(ids >= 0, sims, -np.finfo(np.float32).max).astype(np.float32), ids.astype(np.int64)


class Index:
    """A searchable set of normalised vectors: `knn(queries, k)` and `range_search(queries, r)`.

    `kind` is "exact" (numpy matmul over `vectors`), "ivf" or "hnsw" (a FAISS index in `faiss_index`).
    With `refine` (ids -> their exact float32 vectors), `knn` takes `refine_factor`·k candidates
    from the FAISS index and re-ranks them exactly (`rerank`): compressed codes (SQ8) only pick
    candidates, the order and similarities returned are the exact ones.
    """

    def __init__(self, kind: str, vectors: np.ndarray, faiss_index=None, nprobe: int = 1, *, refine=None,
                 refine_factor: int = 1):
        self.kind = kind
        self.vectors = vectors
        self.faiss_index = faiss_index
        self.nprobe = nprobe
        self.refine = refine
        self.refine_factor = refine_factor

    def __len__(self) -> int:
        return len(self.vectors)

    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of the `k` nearest base rows of each query, best first (id -1 = none)."""
        queries = _as_f32(queries)
        if self.kind == "exact" and exact_backend() == "numpy":
            return exact_knn(self.vectors, queries, k)
        if self.faiss_index is None:
            import faiss

            faiss.omp_set_num_threads(1)
            self.faiss_index = faiss.IndexFlatIP(self.vectors.shape[1])
            self.faiss_index.add(self.vectors)
        if self.refine is not None:
            _, cand = self.faiss_index.search(queries, k * self.refine_factor)
            return rerank(queries, cand.astype(np.int64), self.refine, k)
        s, i = self.faiss_index.search(queries, k)
        return s, i.astype(np.int64)

    def range_search(self, queries: np.ndarray, radius: float,
                     assign: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lims, sims, ids) of every base row with cosine ≥ `radius` per query (FAISS layout);
        `assign`: the queries' nearest lists when already known (IVF only, see `ivf_batch_range`)."""
        queries = _as_f32(queries)
        if self.kind in ("exact", "hnsw"):
            # HNSW has no range search; exact is the honest answer (and what dedup needs).
            return exact_range(self.vectors, queries, radius)
        return ivf_batch_range(self.faiss_index, queries, radius, assign)

    def save(self, path: str | os.PathLike) -> None:
        """Write the index as one FAISS file (exact indexes as IndexFlatIP) via temp + rename."""
        import faiss

        path = Path(path)
        idx = self.faiss_index
        if idx is None:
            idx = faiss.IndexFlatIP(self.vectors.shape[1])
            idx.add(self.vectors)
        elif type(idx).__name__.startswith("Gpu"):
            idx = faiss.index_gpu_to_cpu(idx)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(idx, str(tmp))
        os.replace(tmp, path)


def choose_kind(n: int, kind: str = "auto") -> str:
    """The index kind for `n` vectors: `kind` itself unless "auto" (exact ≤ EXACT_MAX, else IVF)."""
    if kind not in KINDS:
        raise UsageError(f"unknown index kind {kind!r} (choose from {', '.join(KINDS)})")
    if kind != "auto":
        return kind
    return "exact" if n <= EXACT_MAX else "ivf"


def build_index(
    vectors: np.ndarray,
    *,
    kind: str = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    seed: int = 0,
    gpu: bool | None = None,
) -> Index:
    """Build an Index over L2-normalised `vectors` (N, D).

    `kind`: "auto" (by size), "exact", "ivf" (nlist ≈ 4·√N, trained on a seeded sample of at
    most 40·nlist vectors; `nprobe` default max(8, nlist/128)) or "hnsw" (M=`hnsw_m`,
    efSearch 128). `gpu=None` uses a GPU when faiss-gpu and CUDA are present.
    """
    vectors = _as_f32(vectors)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise UsageError(f"cannot index an array of shape {vectors.shape}")
    n, d = vectors.shape
    kind = choose_kind(n, kind)
    if kind == "exact":
        return Index("exact", vectors)
    import faiss

    faiss.omp_set_num_threads(1)
    if kind == "hnsw":
        idx = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efSearch = 128
        idx.add(vectors)
        return Index("hnsw", vectors, idx)
    nlist = nlist or max(1, min(int(round(4 * math.sqrt(n))), n // 39 or 1))
    nprobe = nprobe or max(8, nlist // 128)
    quantizer = faiss.IndexFlatIP(d)
    idx = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    idx.cp.seed = seed
    idx.cp.niter = 10
    rng = np.random.default_rng(seed)
    n_train = min(n, 40 * nlist)
    train = vectors if n_train == n else vectors[np.sort(rng.choice(n, n_train, replace=False))]
    if gpu or (gpu is None and _gpu_available()):
        res = faiss.StandardGpuResources()
        idx = faiss.index_cpu_to_gpu(res, 0, idx)
    idx.train(train)
    idx.add(vectors)
    idx.nprobe = nprobe
    return Index("ivf", vectors, idx, nprobe)


def load_index(path: str | os.PathLike, nprobe: int | None = None) -> Index:
    """Load an index saved by `Index.save` (flat indexes come back as "exact")."""
    import faiss

    idx = faiss.read_index(str(path))
    vectors = idx.reconstruct_n(0, idx.ntotal) if not isinstance(idx, faiss.IndexIVF) else None
    if isinstance(idx, faiss.IndexFlat):
        return Index("exact", _as_f32(vectors))
    if isinstance(idx, faiss.IndexIVF):
        idx.make_direct_map()
        vectors = idx.reconstruct_n(0, idx.ntotal)
        if nprobe:
            idx.nprobe = nprobe
        return Index("ivf", _as_f32(vectors), idx, idx.nprobe)
    return Index("hnsw", _as_f32(vectors), idx)


def train_ivf(sample: np.ndarray, *, nlist: int, codec: str = "SQ8", seed: int = 0):
    """A faiss `IVF{nlist},{codec}` inner-product index trained on `sample` on one thread: its
    centroids by seeded two-level spherical k-means (`two_level_centroids`), then the codec.
    Centroids depend on the thread count (BLAS partitions the products differently; measured), so
    scan trains single-threaded and beside other work rather than with more threads: 1- and
    2-worker scans then write the same outputs."""
    import faiss

    faiss.omp_set_num_threads(1)
    x = np.ascontiguousarray(_as_f32(sample))
    idx = faiss.index_factory(x.shape[1], f"IVF{nlist},{codec}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(idx)
    ivf.quantizer.add(two_level_centroids(x, nlist, seed=seed))
    idx.train(x)  # the quantizer holds nlist centroids, so this trains only the codec (on residuals)
    return idx


def two_level_centroids(x: np.ndarray, nlist: int, *, seed: int = 0, niter: int = 10) -> np.ndarray:
    """`nlist` spherical k-means centroids of `x` found in two levels, as faiss'
    `contrib.clustering.two_level_clustering` does: ~√nlist coarse clusters, then each split into
    a share of the `nlist` proportional to its points. Costs ~N·2√nlist products per iteration
    instead of N·nlist (at 10M pairs, 12,649 lists: ~20 s instead of ~330 s of one thread)."""
    import faiss

    n, d = x.shape
    opts = {"niter": niter, "spherical": True, "min_points_per_centroid": 1, "verbose": False}
    nc1 = max(1, min(n, round(math.sqrt(nlist))))
    top = faiss.Kmeans(d, nc1, seed=seed, **opts)
    top.train(x)
    _, a1 = top.index.search(x, 1)
    a1 = a1.ravel()
    counts = np.bincount(a1, minlength=nc1)
    share = np.diff(np.r_[0, np.cumsum(counts) * nlist // n])  # sums to nlist; never above a cluster's points
    order = np.argsort(a1, kind="stable")
    starts = np.r_[0, np.cumsum(counts)]
    parts = []
    for c in range(nc1):
        if share[c] == 0:
            continue
        sub = x[order[starts[c]:starts[c + 1]]]
        km = faiss.Kmeans(d, int(share[c]), seed=seed + 1 + c, **opts)
        km.train(sub)
        parts.append(km.centroids)
    return np.ascontiguousarray(np.vstack(parts), np.float32)


def write_invlists(index, path: str | os.PathLike) -> None:
    """Write only the inverted lists of the IVF `index` to `path` (via temp + rename): a shard's
    part of the dataset-wide index without a copy of the trained quantizer (nlist·D floats: 13 MB
    per shard at 10M pairs, 13 GB over 1,000 shards)."""
    import faiss

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = faiss.FileIOWriter(str(tmp))
    faiss.write_InvertedLists(faiss.extract_index_ivf(index).invlists, writer)
    del writer  # flushes and closes the file
    os.replace(tmp, path)


def merge_invlists_ondisk(index, parts: list[str], ivfdata: str) -> None:
    """Fill the empty trained IVF `index` with the inverted lists of `parts` (`write_invlists`
    files, memory-mapped, in order) as on-disk inverted lists in `ivfdata`:
    faiss.contrib.ondisk.merge_ondisk for parts that hold lists only."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    if index.ntotal:
        raise ValueError("merge_invlists_ondisk needs an empty index")
    readers = [faiss.FileIOReader(str(p)) for p in parts]
    lists = [faiss.read_InvertedLists(r, faiss.IO_FLAG_MMAP) for r in readers]
    merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    vec = faiss.InvertedListsPtrVector()
    for inv in lists:
        vec.push_back(inv)
    ntotal = merged.merge_from_multiple(vec.data(), vec.size(), False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(merged, True)
    merged.this.disown()


def load_ondisk(path: str | os.PathLike, *, nprobe: int, refine=None, refine_factor: int = 1) -> Index:
    """An IVF index written by scan's merge (`KIND.index` + its on-disk `KIND.ivfdata`, memory-mapped),
    searched single-threaded with `nprobe` lists; `refine`/`refine_factor` as in `Index`."""
    import faiss

    faiss.omp_set_num_threads(1)
    idx = faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)
    idx.nprobe = nprobe
    return Index("ivf", None, idx, nprobe, refine=refine, refine_factor=refine_factor)


def save_indexes(out_dir: str | os.PathLike, image: Index, text: Index, ids) -> None:
    """Write `image.index`, `text.index` and `ids.parquet` (row -> key, shard) into `out_dir`."""
    from .shards import write_parquet_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image.save(out / "image.index")
    text.save(out / "text.index")
    write_parquet_atomic(ids.reset_index(drop=True)[["key", "shard"]], out / "ids.parquet")
