"""The per-shard work of `scan`: Dask task functions that read one shard's embeddings and write its
results, plus the worker-side readers (rows of any shard by global id, the dataset-wide indexes).

Every task reads a small job state (`WORK/state_PHASE.pkl`, cached per worker process), does
one shard and writes its outputs under temp names, then its marker (`*_done.json`) last, so a
killed run redoes only the shards without a marker. Global ids are positions in the dataset
(shards in order, rows in shard order), as in a whole-dataset scan.

Phases (driven by `scan.scan`): prepare (cosines, class sums, seeded samples), with the IVF
training tasks and the kNN reference's (`reference.py`) running beside it -> [index fill] -> [image_reuse's radius calibration] -> [its
near-duplicate pairs, IVF: by groups of shards] -> raw detector scores -> [density's second
pass] -> final (combined score, flags, reasons, `scores_NAME.parquet`) -> [manifest metrics].
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import ShardError
from .shards import write_json_atomic

VECTOR_KINDS = ("image", "text", "joint", "union")
CAPTION_SHARDS = 1024  # shards' caption columns a worker keeps (Rows.captions): ~0.4 GB at 10,000 rows each
MAPPED_FILES = 128  # embedding files a worker keeps memory-mapped (Rows._array)


@dataclass(frozen=True)
class ShardTask:
    """One shard of one scan phase: `name` (stem), `index` (position), `state` (pickled job state)."""

    name: str
    index: int
    state: str


# ----------------------------------------------------------------------------------- worker state

@lru_cache(maxsize=8)
def _load_state(path: str, mtime_ns: int) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def load_state(path: str) -> dict:
    """The job state at `path` (cached per process while the file is unchanged)."""
    return _load_state(path, os.stat(path).st_mtime_ns)


def write_state(path: str | os.PathLike, state: dict) -> str:
    """Pickle `state` to `path` atomically; returns the path as a string."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(state, f, protocol=4)
    os.replace(tmp, path)
    return str(path)


def save_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    """np.save via temp + rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def save_npz(path: str | os.PathLike, **arrays) -> None:
    """np.savez via temp + rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def done_marker(work: str | os.PathLike, phase: str, name: str, phash: str) -> dict | None:
    """The marker of `phase` for shard `name` when it was written by this job (params hash), else
    None. The final phase's marker is `OUT/scan_NAME_stats.json` (beside `scores_NAME.parquet`)."""
    path = Path(work) / f"{phase}_{name}_done.json"
    if phase == "final":
        path = Path(work).parent / f"scan_{name}_stats.json"
        if not (Path(work).parent / f"scores_{name}.parquet").exists():
            return None
    try:
        m = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return m if m.get("params_hash") == phash else None


def _mark(work: str, phase: str, name: str, phash: str, **extra) -> dict:
    m = {"params_hash": phash, **extra}
    write_json_atomic(Path(work) / f"{phase}_{name}_done.json", m)
    return m


class Rows:
    """Worker-side access to any shard's rows by global id (embeddings memory-mapped)."""

    def __init__(self, st: dict):
        self.st = st
        self.shards = st["shards"]  # list of dicts: name, catalog, img, txt, count
        self.offsets = np.asarray(st["offsets"], np.int64)  # S + 1
        self.n = int(self.offsets[-1])
        self._mm: dict = {}
        self._caps: dict = {}

    def _array(self, which: str, s: int) -> np.ndarray:
        key = (which, s)
        arr = self._mm.pop(key, None)
        if arr is None:
            sh = self.shards[s]
            if which in ("img", "txt"):
                arr = np.load(sh[which], mmap_mode="r")
            else:  # kdist of density's first pass
                arr = np.load(Path(self.st["work"]) / f"kdist_{sh['name']}.npy", mmap_mode="r")
        self._mm[key] = arr  # most recently used last
        if len(self._mm) > MAPPED_FILES:  # unmapped when dropped: the pages read leave the worker's RSS
            del self._mm[next(iter(self._mm))]
        return arr

    def shard(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(img, txt) float32 of shard `s`."""
        return (np.asarray(self._array("img", s), np.float32), np.asarray(self._array("txt", s), np.float32))

    def take(self, which: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` (global) of `which` (img | txt | joint | kdist | union), float32, in the order
        given; union ids are images below N, captions N + i above."""
        ids = np.asarray(ids, np.int64)
        if which == "union":
            out = np.zeros((len(ids), self._array("img", 0).shape[1]), np.float32)
            cap = ids >= self.n
            out[~cap], out[cap] = self.take("img", ids[~cap]), self.take("txt", ids[cap] - self.n)
            return out
        if which == "joint":
            from .detectors.density import joint

            return joint(self.take("img", ids), self.take("txt", ids))
        s_of = np.searchsorted(self.offsets, ids, side="right") - 1
        first = self._array(which, 0)
        out = np.zeros((len(ids),) + first.shape[1:], np.float32)
        for s in np.unique(s_of):
            m = s_of == s
            local = ids[m] - self.offsets[s]
            order = np.argsort(local, kind="stable")
            vals = np.asarray(self._array(which, int(s))[local[order]], np.float32)
            res = np.empty_like(vals)
            res[order] = vals
            out[m] = res
        return out

    def captions(self, ids: np.ndarray) -> np.ndarray:
        """Captions of rows `ids` (global), from the catalog parts."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids = np.asarray(ids, np.int64)
        s_of = np.searchsorted(self.offsets, ids, side="right") - 1
        out = np.empty(len(ids), dtype=object)
        for s in np.unique(s_of):
            caps = self._caps.pop(s, None)
            if caps is None:  # kept as arrow strings (~40 B a caption, not a Python object each)
                caps = pq.read_table(self.shards[s]["catalog"], columns=["caption"]).column(0).combine_chunks()
            self._caps[s] = caps  # most recently used last
            if len(self._caps) > CAPTION_SHARDS:  # partners spread over every shard: bounded, not N captions
                del self._caps[next(iter(self._caps))]
            m = s_of == s
            out[m] = caps.take(pa.array(ids[m] - self.offsets[s])).to_numpy(zero_copy_only=False)
        return out

    def vectors(self, kind: str, s: int) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, global ids) of shard `s` for index `kind` (union: images then captions, ids N + i)."""
        from .reference import kind_vectors

        img, txt = self.shard(s)
        return kind_vectors(kind, img, txt, np.arange(self.offsets[s], self.offsets[s + 1], dtype=np.int64), self.n)

    def all_vectors(self, kind: str) -> np.ndarray:
        """Every shard's vectors of `kind` in global-id order (only for exact indexes, N ≤ EXACT_MAX)."""
        parts = [self.vectors(kind, s)[0] for s in range(len(self.shards))]
        if kind == "union":
            return np.concatenate([p[:len(p) // 2] for p in parts] + [p[len(p) // 2:] for p in parts])
        return np.concatenate(parts)


@lru_cache(maxsize=2)
def _rows(state_path: str, mtime_ns: int) -> Rows:
    return Rows(_load_state(state_path, mtime_ns))


def rows_for(state_path: str) -> Rows:
    """The cached `Rows` of a job state."""
    return _rows(state_path, os.stat(state_path).st_mtime_ns)


_INDEXES: dict = {}


def get_index(st: dict, kind: str):
    """The dataset-wide index of `kind` for this job, loaded once per worker process: exact/hnsw
    built in memory from every shard (N ≤ EXACT_MAX), IVF read from `OUT/index/KIND.index` with
    its inverted lists memory-mapped from disk, its kNN candidates re-ranked with the exact vectors
    read from the shards' embedding files."""
    key = (st["work"], st["params_hash"], kind)
    if key in _INDEXES:
        return _INDEXES[key]
    from .index import build_index, load_ondisk

    if st["index"]["kind"] == "ivf":
        rows, which = Rows(st), {"image": "img", "text": "txt"}.get(kind, kind)
        index = load_ondisk(Path(st["out"]) / "index" / f"{kind}.index", nprobe=st["index"]["nprobe"],
                            refine=lambda ids: rows.take(which, ids), refine_factor=st["index"]["refine_factor"])
    else:
        rows = Rows(st)
        index = build_index(rows.all_vectors(kind), kind=st["index"]["kind"], seed=st["seed"])
    _INDEXES.clear()  # one job at a time per worker: drop the previous job's indexes
    _INDEXES[key] = index
    return index


_REFERENCES: dict = {}


def reference_for(st: dict):
    """The job's kNN reference (`reference.Reference`, loaded once per worker process), or None
    when the kNN detectors search every pair."""
    ref = st.get("reference")
    if ref is None:
        return None
    key = (st["work"], st["params_hash"])
    if key not in _REFERENCES:
        from .reference import Reference

        _REFERENCES.clear()
        _REFERENCES[key] = Reference(ref["dir"])
    return _REFERENCES[key]


def knn_index(st: dict, kind: str):
    """What the kNN detectors search for `kind`: the reference's index, or the dataset-wide one."""
    ref = reference_for(st)
    if ref is None:
        return get_index(st, kind)
    return ref.union(int(st["offsets"][-1])) if kind == "union" else ref.index(kind)


def build_reference(state: str, part: str) -> dict:
    """Write one part of the kNN reference (`rows`, or a kind's lists) into `st["reference"]["dir"]`
    from the seeded sample of rows (read memory-mapped, so it runs beside the prepare phase)."""
    from . import reference as R

    st = load_state(state)
    rows = rows_for(state)
    gid = R.sample_rows(rows.n, st["reference"]["size"], st["seed"])
    img, txt = rows.take("img", gid), rows.take("txt", gid)
    if part == "rows":
        R.write_rows(st["reference"]["dir"], gid, img, txt)
        return _mark(st["work"], "reference", part, st["params_hash"], pairs=len(gid))
    params = R.build_kind(st["reference"]["dir"], part, img, txt, gid, rows.n, seed=st["seed"])
    return _mark(st["work"], "reference", part, st["params_hash"], **params)


def reference_kdist(state: str) -> dict:
    """Gather the reference rows' k-distances (density's first pass, one file per shard) into
    `WORK/ref_kdist.npy`, in reference order: every shard's LOF reads its neighbours' from it."""
    st = load_state(state)
    rows = rows_for(state)
    gid = reference_for(st).gid
    s_of = np.searchsorted(rows.offsets, gid, side="right") - 1
    out = np.empty(len(gid), np.float32)
    for s in np.unique(s_of):
        m = s_of == s
        out[m] = np.load(Path(st["work"]) / f"kdist_{rows.shards[s]['name']}.npy", mmap_mode="r")[gid[m] - rows.offsets[s]]
    save_npy(Path(st["work"]) / "ref_kdist.npy", out)
    return {"rows": len(gid)}


def _sample_rows(n_shard: int, n_total: int, cap: int, seed: int, shard_index: int) -> np.ndarray:
    """A seeded sample of a shard's rows at rate cap / n_total (all rows when n_total ≤ cap)."""
    if n_total <= cap:
        return np.arange(n_shard)
    m = int(round(cap * n_shard / n_total))
    rng = np.random.default_rng([seed, shard_index])
    return np.sort(rng.choice(n_shard, min(m, n_shard), replace=False))


def _top(values: np.ndarray, gids: np.ndarray, k: int) -> np.ndarray:
    """The best `k` (value desc, gid asc) as a structured (value, gid) array."""
    order = np.lexsort((gids, -values.astype(np.float64)))[:k]
    out = np.zeros(len(order), dtype=[("v", "f8"), ("g", "i8")])
    out["v"], out["g"] = values[order], gids[order]
    return out


def in_top(values: np.ndarray, gids: np.ndarray, boundary) -> np.ndarray:
    """Rows ranked at or above `boundary` = (value, gid) by (value desc, gid asc); none for None."""
    if boundary is None:
        return np.zeros(len(values), bool)
    v, g = boundary
    values = values.astype(np.float64)
    return (values > v) | ((values == v) & (gids <= g))


# ------------------------------------------------------------------------------------ phases

def prepare_shard(task: ShardTask) -> dict:
    """Check the shard's embeddings against its catalog, compute cosines, caption classes, class
    sums and the seeded samples the client fits on; writes `prep_NAME.npz` + marker."""
    import pyarrow.parquet as pq

    from .detectors.similarity import pair_cosine

    st = load_state(task.state)
    rows = rows_for(task.state)
    sh = rows.shards[task.index]
    shard = f"{task.name}.tar"
    img16 = np.load(sh["img"], mmap_mode="r")
    txt16 = np.load(sh["txt"], mmap_mode="r")
    cat = pq.read_table(sh["catalog"], columns=["key", "caption"]).to_pandas()
    ekeys = pq.read_table(sh["meta"], columns=["key"]).column(0).to_numpy(zero_copy_only=False)
    if not (len(img16) == len(txt16) == len(ekeys)):
        raise ShardError(shard, f"embedding files disagree: {len(img16)} image rows, {len(txt16)} text rows, "
                                f"{len(ekeys)} metadata rows")
    if len(ekeys) != len(cat):
        raise ShardError(shard, f"embeddings have {len(ekeys)} rows but the shard has {len(cat)} samples "
                                "(stale embeddings? re-run embed)")
    bad = np.nonzero(ekeys != cat["key"].to_numpy())[0]
    if len(bad):
        raise ShardError(shard, f"embedding row {bad[0]} is key {ekeys[bad[0]]}, shard has {cat['key'].iloc[bad[0]]}",
                         key=str(cat["key"].iloc[bad[0]]))
    img, txt = rows.shard(task.index)
    n, total, seed = len(img), rows.n, st["seed"]
    cos = pair_cosine(img, txt)
    out = {"cos": cos[_sample_rows(n, total, st["fit_sample"], seed, task.index)]}
    if st.get("vocab"):
        from .labels import keyword_classes

        cls = keyword_classes(cat["caption"].to_numpy(dtype=object), st["vocab"])
        c = len(st["vocab"])
        sums = np.zeros((c, img.shape[1]), np.float64)
        order = np.argsort(cls, kind="stable")
        order = order[cls[order] >= 0]
        if len(order):  # per-class sums of the sorted rows (np.add.at was a tenth of prepare's time)
            starts = np.flatnonzero(np.r_[True, np.diff(cls[order]) != 0])
            sums[cls[order][starts]] = np.add.reduceat(txt[order].astype(np.float64), starts, axis=0)
        out["class_sum"], out["class_count"] = sums, np.bincount(cls[cls >= 0], minlength=c)
        pick = _sample_rows(n, total, st["temp_sample"], seed + 1, task.index)
        pick = pick[cls[pick] >= 0]
        out["temp_img"], out["temp_cls"] = img[pick].astype(np.float16), cls[pick]
        save_npy(Path(st["work"]) / f"cls_{task.name}.npy", cls)
    q = _sample_rows(n, total, st["calib_sample"], seed + 2, task.index)
    out["calib_img"], out["calib_gid"] = img[q], q + rows.offsets[task.index]
    save_npz(Path(st["work"]) / f"prep_{task.name}.npz", **out)
    return _mark(st["work"], "prep", task.name, st["params_hash"], count=n)


def train_index(state: str, kind: str) -> dict:
    """Train the IVF index of `kind` on a seeded sample of every shard's rows (read memory-mapped,
    so it runs beside the prepare phase); writes `WORK/KIND.trained`."""
    import faiss

    from .index import train_ivf

    st = load_state(state)
    rows = rows_for(state)
    which = {"image": "img", "text": "txt", "joint": "joint", "union": "img"}[kind]  # union: its image rows
    gids = np.concatenate([_sample_rows(int(rows.offsets[s + 1] - rows.offsets[s]), rows.n, st["index"]["train"],
                                        st["seed"] + 3, s) + rows.offsets[s] for s in range(len(rows.shards))])
    sample = rows.take(which, gids).astype(np.float16)
    p = st["index"]
    idx = train_ivf(sample, nlist=p["nlist"], codec=p["codec"], seed=st["seed"])
    tmp = Path(st["work"]) / f"{kind}.trained.tmp"
    faiss.write_index(idx, str(tmp))
    os.replace(tmp, Path(st["work"]) / f"{kind}.trained")
    res = {"trained_on": len(sample)}
    write_json_atomic(Path(st["work"]) / f"{kind}.trained.json", res)
    return res


def fill_shard(task: ShardTask) -> dict:
    """Add the shard's vectors (with global ids) to copies of the trained IVF indexes and keep their
    inverted lists only: `WORK/KIND_NAME.invlists`.
    For the image index it also keeps each row's `range_nprobe` nearest lists (`WORK/assign_NAME.npy`):
    image_reuse's range search of the same rows then skips its coarse-quantizer search."""
    import faiss

    from .index import ivf_add, write_invlists

    st = load_state(task.state)
    faiss.omp_set_num_threads(1)
    rows = rows_for(task.state)
    for kind in st["index"]["kinds"]:
        idx = faiss.read_index(str(Path(st["work"]) / f"{kind}.trained"))
        v, gid = rows.vectors(kind, task.index)
        keep = kind == "image" and "image_reuse" in st["detectors"]
        assign = ivf_add(idx, v, gid, st["index"]["range_nprobe"] if keep else 1)
        if keep:
            save_npy(Path(st["work"]) / f"assign_{task.name}.npy", assign)
        write_invlists(idx, Path(st["work"]) / f"{kind}_{task.name}.invlists")
    return _mark(st["work"], "fill", task.name, st["params_hash"], count=int(rows.offsets[task.index + 1]
                                                                               - rows.offsets[task.index]))


def merge_index(state: str, kind: str, names: list[str]) -> dict:
    """Merge the shards' inverted lists into `OUT/index/KIND.index` + `KIND.ivfdata` (on-disk
    inverted lists, as autofaiss does for LAION). The parts stay until the scan's work folder is
    removed: a resumed scan merges again."""
    import faiss

    from .index import merge_invlists_ondisk

    st = load_state(state)
    d = Path(st["out"]) / "index"
    d.mkdir(parents=True, exist_ok=True)
    idx = faiss.read_index(str(Path(st["work"]) / f"{kind}.trained"))
    for p in (d / f"{kind}.ivfdata", d / f"{kind}.index"):
        p.unlink(missing_ok=True)
    merge_invlists_ondisk(idx, [str(Path(st["work"]) / f"{kind}_{n}.invlists") for n in names],
                          str(d / f"{kind}.ivfdata"))
    tmp = d / f"{kind}.index.tmp"
    faiss.write_index(idx, str(tmp))
    os.replace(tmp, d / f"{kind}.index")
    return {"ntotal": int(idx.ntotal)}


def save_exact_index(state: str, kind: str) -> dict:
    """Write the in-memory (exact/hnsw) index of `kind` to `OUT/index/KIND.index`."""
    st = load_state(state)
    d = Path(st["out"]) / "index"
    d.mkdir(parents=True, exist_ok=True)
    get_index(st, kind).save(d / f"{kind}.index")
    return {}


def calibrate_shard(task: ShardTask) -> dict:
    """image_reuse's calibration queries of one shard (its seeded share of the sample drawn in
    prepare): cosine to the nearest *other* image in the dataset-wide index, `calib_NAME.npy` + marker.
    The client takes the median over the shards (`calibrated_radius`'s rule)."""
    st = load_state(task.state)
    p = np.load(Path(st["work"]) / f"prep_{task.name}.npz")
    img, gid = p["calib_img"].astype(np.float32), p["calib_gid"]
    nn = np.zeros(0, np.float32)
    if len(img):
        sims, ids = get_index(st, "image").knn(img, 2)
        nn = np.where(ids[:, 0] == gid, sims[:, 1], sims[:, 0]).astype(np.float32)
    save_npy(Path(st["work"]) / f"calib_{task.name}.npy", nn)
    return _mark(st["work"], "calib", task.name, st["params_hash"], count=len(nn))


def near_groups(offsets: np.ndarray, rows: int) -> list[tuple[int, int]]:
    """Consecutive shards cut into groups of at least `rows` rows (the last may be smaller):
    [(first, end)] shard positions. A function of the shard sizes only, never of the cluster."""
    groups, a = [], 0
    for s in range(len(offsets) - 1):
        if offsets[s + 1] - offsets[a] >= rows:
            groups.append((a, s + 1))
            a = s + 1
    if a < len(offsets) - 1:
        groups.append((a, len(offsets) - 1))
    return groups


def near_group(task: ShardTask) -> dict:
    """image_reuse's near-duplicate pairs (cosine ≥ the calibrated radius) of one group of shards
    (`st["near_groups"][task.index]`) against the IVF image index: one list-bucketed range search
    over all the group's rows, so each probed inverted list is read and decoded once per group
    instead of once per shard (at 10M pairs a shard's 10,000 rows probe nearly every list), with
    the lists kept by `fill_shard`. Writes `near_NAME.npy` (2 × pairs: row, other row; self pairs
    dropped) per shard of the group, then the group's marker."""
    st = load_state(task.state)
    rows = rows_for(task.state)
    work = Path(st["work"])
    a, b = st["near_groups"][task.index]
    index = get_index(st, "image")
    img = np.concatenate([np.asarray(rows._array("img", s), np.float32) for s in range(a, b)])
    assign = np.concatenate([np.load(work / f"assign_{rows.shards[s]['name']}.npy") for s in range(a, b)])
    index.faiss_index.nprobe = st["index"]["range_nprobe"]
    try:
        lims, _, ids = index.range_search(img, st["image_reuse"]["radius"], assign)
    finally:  # the cached index serves kNN (nprobe) in the later phases
        index.faiss_index.nprobe = st["index"]["nprobe"]
    q = np.repeat(np.arange(rows.offsets[a], rows.offsets[b], dtype=np.int64), np.diff(lims))
    keep = ids != q
    q, ids = q[keep], ids[keep]
    cuts = np.searchsorted(q, rows.offsets[a:b + 1])
    for j, s in enumerate(range(a, b)):
        part = slice(cuts[j], cuts[j + 1])
        save_npy(work / f"near_{rows.shards[s]['name']}.npy", np.stack([q[part], ids[part]]))
    return _mark(st["work"], "near", task.name, st["params_hash"], count=int(rows.offsets[b] - rows.offsets[a]))


def raw_shard(task: ShardTask) -> dict:
    """Every detector's raw score for the shard's rows against the dataset-wide state and indexes;
    writes `raw_NAME.npz` (+ `kdist_NAME.npy` for density) and returns nothing large."""
    from .detectors import caption_neighbours, class_consistency, density, image_reuse, similarity

    st = load_state(task.state)
    rows = rows_for(task.state)
    img, txt = rows.shard(task.index)
    n, off = len(img), int(rows.offsets[task.index])
    gid = np.arange(off, off + n, dtype=np.int64)
    dets, k, block = st["detectors"], st["k"], 1024
    out: dict[str, np.ndarray] = {}
    if "similarity" in dets:
        out["similarity"] = similarity.score(img, txt)
    cc = st.get("class_consistency")
    if "class_consistency" in dets and cc:
        cls = np.load(Path(st["work"]) / f"cls_{task.name}.npy")
        s, p = class_consistency.assess(img, txt, prototypes=cc["prototypes"], present=cc["present"],
                                        caption_class=cls, temperature=cc["temperature"])
        out["class_consistency"] = s
        out["_cc_class"], out["_cc_prob"] = p.argmax(1), p.max(1)
        out["_cc_named"], out["_cc_caption"] = class_consistency.caption_named(cls, cc["present"]), cls
    if "image_reuse" in dets:
        pa_, pb_ = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        radius = st["image_reuse"]["radius"]
        if radius is not None:
            if st["index"]["kind"] == "ivf":  # found by near_group
                pairs = np.load(Path(st["work"]) / f"near_{task.name}.npy")
                pa_.append(pairs[0])
                pb_.append(pairs[1])
            else:
                lims, _, ids = get_index(st, "image").range_search(img, radius)
                q = np.repeat(gid, np.diff(lims))
                keep = ids != q
                pa_.append(q[keep])
                pb_.append(ids[keep])
        dups = st["dups"]  # (gid, group) of rows whose image hash appears more than once
        mine = (dups["gid"] >= off) & (dups["gid"] < off + n)
        if mine.any():
            groups = np.unique(dups["group"][mine])
            members = dups[np.isin(dups["group"], groups)]
            for g in groups:
                m = members["gid"][members["group"] == g]
                a, b = np.meshgrid(m[(m >= off) & (m < off + n)], m, indexing="ij")
                pa_.append(a[a != b])
                pb_.append(b[a != b])
        out["image_reuse"] = image_reuse.count_different(
            np.concatenate(pa_), np.concatenate(pb_), n, off, lambda ids: rows.take("txt", ids), rows.captions)
    ref = reference_for(st)
    kk_union = max(1, min(max(k, 16), (2 * len(ref.gid) if ref is not None else 2 * rows.n) - 2))
    img_found = None
    if ref is not None:  # searched list by list: one call per shard, not per block
        block, source = max(1, n), ref
        cols = max(k + 1 if "caption_neighbours" in dets else 0, kk_union + 2 if "kdistance" in dets else 0)
        if cols:  # one image search for caption_neighbours and kdistance
            img_found = knn_index(st, "image").knn(np.asarray(img, np.float32), cols)
    else:
        source = rows
    if "caption_neighbours" in dets:
        ti, ii = knn_index(st, "text"), knn_index(st, "image")
        t2i = np.zeros(n, np.float32)
        i2t = np.zeros(n, np.float32)
        for a in range(0, n, block):
            b = min(n, a + block)
            t2i[a:b] = caption_neighbours.agreement(img[a:b], txt[a:b], gid[a:b], ti,
                                                    lambda ids: source.take("img", ids), k)
            i2t[a:b] = caption_neighbours.agreement(txt[a:b], img[a:b], gid[a:b], ii,
                                                    lambda ids: source.take("txt", ids), k, found=_rows_of(img_found, a, b))
        out["caption_neighbours"] = (1.0 - 0.5 * (t2i + i2t)).astype(np.float32)
    if "density" in dets:
        index = knn_index(st, "joint")
        kk = max(1, min(k, (len(index) if ref is not None else rows.n) - 1))
        joint = density.joint(img, txt)
        kd = np.zeros(n, np.float32)
        neigh = np.zeros((n, kk), np.int64)
        for a in range(0, n, block):
            kd[a:a + block], neigh[a:a + block] = density.kdist_block(joint[a:a + block], gid[a:a + block],
                                                                      index=index, k=kk)
        out["_neigh"] = neigh
        save_npy(Path(st["work"]) / f"kdist_{task.name}.npy", kd)
    if "kdistance" in dets:
        index = knn_index(st, "union")
        kd = np.zeros(n, np.float32)
        for a in range(0, n, block):
            b = min(n, a + block)
            found = None if img_found is None else index.knn(img[a:b], kk_union + 2,  # its image part already made
                                                             image_found=_rows_of(img_found, a, b))
            kd[a:b] = density.kdistance_block(img[a:b], gid[a:b], rows.n, index=index, k=kk_union, found=found)
        out["kdistance"] = kd
    save_npz(Path(st["work"]) / f"raw_{task.name}.npz", **out)
    return _mark(st["work"], "raw", task.name, st["params_hash"], count=n)


def _rows_of(found, a: int, b: int):
    """Rows a:b of a (sims, ids) kNN result, or None."""
    return None if found is None else (found[0][a:b], found[1][a:b])


def _load_raw(st: dict, rows: Rows, task: ShardTask) -> dict:
    from .detectors.density import lof

    raw = dict(np.load(Path(st["work"]) / f"raw_{task.name}.npz"))
    if "density" in st["detectors"]:
        kd = np.load(Path(st["work"]) / f"kdist_{task.name}.npy")
        neigh = raw["_neigh"]
        ref = reference_for(st)
        if ref is not None:  # neighbours are reference rows, or the row itself where none was found
            pos = ref.positions(neigh.ravel()).reshape(neigh.shape)
            theirs = np.load(Path(st["work"]) / "ref_kdist.npy")[np.maximum(pos, 0)]
            theirs = np.where(pos >= 0, theirs, kd[:, None])
        else:
            theirs = rows.take("kdist", neigh.ravel()).reshape(neigh.shape)
        raw["density"] = lof(kd, np.asarray(theirs, np.float32))
    return raw


def scores_of(st: dict, raw: dict) -> dict[str, np.ndarray]:
    """The detector scores (in the job's detector order) from a shard's raw results."""
    return {d: raw[d] for d in st["detectors"] if d in raw}


def sample_shard(task: ShardTask) -> dict:
    """The seeded sample of every detector's scores (for the combination's reference) and the
    shard's best rows per detector (for `--flag-fraction`); writes `sample_NAME.npz` + marker."""
    st = load_state(task.state)
    rows = rows_for(task.state)
    raw = _load_raw(st, rows, task)
    sc = scores_of(st, raw)
    n = len(next(iter(sc.values())))
    gid = np.arange(rows.offsets[task.index], rows.offsets[task.index] + n)
    pick = _sample_rows(n, rows.n, st["fit_sample"], st["seed"], task.index)
    out = {f"s_{d}": v[pick] for d, v in sc.items()}
    if st["topk"] is not None:
        out.update({f"t_{d}": _top(v, gid, st["topk"]) for d, v in sc.items()})
    save_npz(Path(st["work"]) / f"sample_{task.name}.npz", **out)
    return _mark(st["work"], "sample", task.name, st["params_hash"], count=n)


def combined_of(st: dict, sc: dict[str, np.ndarray]) -> np.ndarray:
    """The combined score of a shard's rows from the fitted per-detector references."""
    from .scan import combine_with

    return combine_with(sc, st["combine"], st["refs"])


def rank_shard(task: ShardTask) -> dict:
    """The shard's best rows by combined score (for `--flag-fraction`): `rank_NAME.npy` + marker."""
    st = load_state(task.state)
    rows = rows_for(task.state)
    sc = scores_of(st, _load_raw(st, rows, task))
    comb = combined_of(st, sc)
    gid = np.arange(rows.offsets[task.index], rows.offsets[task.index] + len(comb))
    save_npy(Path(st["work"]) / f"rank_{task.name}.npy", _top(comb, gid, st["topk"]))
    return _mark(st["work"], "rank", task.name, st["params_hash"], count=len(comb))


def final_shard(task: ShardTask) -> dict:
    """Combined score, rules, flags and reasons for the shard: `OUT/scores_NAME.parquet`, then its
    marker `OUT/scan_NAME_stats.json`; returns counts (flagged per rule)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .scan import reasons_for

    st = load_state(task.state)
    rows = rows_for(task.state)
    sh = rows.shards[task.index]
    raw = _load_raw(st, rows, task)
    sc = scores_of(st, raw)
    comb = combined_of(st, sc)
    n = len(comb)
    gid = np.arange(rows.offsets[task.index], rows.offsets[task.index] + n)
    th = st["thresholds"]
    cos = 1.0 - sc["similarity"] if "similarity" in sc else None
    fired: dict[str, np.ndarray] = {}
    if "similarity" in th:
        fired["similarity"] = cos < th["similarity"]
    if "class_consistency" in th and "class_consistency" in sc:
        fired["class_consistency"] = ((np.exp(-sc["class_consistency"].astype(np.float64)) < th["class_consistency"]
                                       ["caption_class_prob_below"])
                                      & (raw["_cc_prob"] >= th["class_consistency"]["image_top_class_prob_at_least"])
                                      & raw["_cc_named"])
    if "image_reuse" in th and "image_reuse" in sc:
        fired["image_reuse"] = sc["image_reuse"] >= th["image_reuse"]
        if "image_reuse_cosine_below" in th:
            fired["image_reuse"] &= cos < th["image_reuse_cosine_below"]
    top = None
    if st["boundaries"] is not None:
        top = in_top(comb, gid, st["boundaries"].get("combined"))
        for name, s in sc.items():
            fired.setdefault(name, np.zeros(n, bool))
            fired[name] = fired[name] | (top & in_top(s, gid, st["boundaries"].get(name)))
    flagged = np.zeros(n, bool)
    for f in fired.values():
        flagged |= f
    if top is not None:
        flagged |= top
    cc_state = {}
    if "_cc_class" in raw:
        cc_state = {"_image_class": raw["_cc_class"], "_image_prob": raw["_cc_prob"],
                    "_caption_named": raw["_cc_named"], "_names": st["class_consistency"]["names"]}
    reasons = reasons_for(sc, fired, flagged, top, th, cc_state, raw.get("_cc_caption"))
    cat = pq.read_table(sh["catalog"], columns=["key", "caption"])
    cols = {"key": cat.column("key"), "shard": pa.array([f"{task.name}.tar"] * n, pa.string()),
            "caption": cat.column("caption").cast(pa.string())}
    if st["has_url"]:
        meta = pq.read_table(sh["meta"])
        cols["url"] = (meta.column("url").cast(pa.string()) if "url" in meta.column_names
                       else pa.nulls(n, pa.string()))
    for name, s in sc.items():
        cols[name] = pa.array(s.astype(np.float32))
    if cos is not None:
        cols["cosine"] = pa.array(cos.astype(np.float32))
    cols["combined"] = pa.array(comb.astype(np.float32))
    cols["flagged"] = pa.array(flagged)
    cols["reason"] = pa.array(reasons, pa.string())
    table = pa.table(cols)
    path = Path(st["out"]) / f"scores_{task.name}.parquet"
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    stats = {"count": n, "flagged": int(flagged.sum()), "flagged_by": {k_: int(v.sum()) for k_, v in fired.items()},
             "params_hash": st["params_hash"]}
    if st["truth_keys"] is not None:
        import pyarrow.compute as pc

        # a hash lookup: np.isin on object arrays compares every key with every manifest key
        truth = pc.is_in(cat.column("key").cast(pa.string()),
                         value_set=pa.array(st["truth_keys"], pa.string())).to_numpy(zero_copy_only=False)
        pos = {d: s[truth] for d, s in {**sc, "combined": comb}.items()}
        tops = {d: _top(s.astype(np.float32), gid, st["n_truth"]) for d, s in {**sc, "combined": comb}.items()}
        save_npz(Path(st["work"]) / f"truth_{task.name}.npz", truth=truth,
                 **{f"p_{d}": v for d, v in pos.items()}, **{f"t_{d}": v for d, v in tops.items()})
        stats["tp"] = int((flagged & truth).sum())
        stats["tp_by"] = {k_: int((v & truth).sum()) for k_, v in fired.items()}
    write_json_atomic(Path(st["out"]) / f"scan_{task.name}_stats.json", stats)
    return stats


def auc_shard(task: ShardTask) -> dict:
    """For the manifest's AUROC: per detector, how many (clean row, poisoned row) pairs have the
    clean row scoring below / equal to the poisoned one, counted over the shard's clean rows and
    all poisoned scores; writes `auc_NAME.npz` (two integers per detector: per-poison counts
    took 6.4 MB per shard at 10M pairs with 100,000 poisons, and filled the disk) + marker."""
    import pyarrow.parquet as pq

    st = load_state(task.state)
    t = np.load(Path(st["work"]) / f"truth_{task.name}.npz")
    truth = t["truth"]
    cols = st["auc_columns"]
    table = pq.read_table(Path(st["out"]) / f"scores_{task.name}.parquet", columns=cols)
    out = {}
    for d in cols:
        neg = np.sort(table.column(d).to_numpy()[~truth].astype(np.float64))
        pos = st["positives"][d]
        lo, hi = np.searchsorted(neg, pos, "left"), np.searchsorted(neg, pos, "right")
        out[f"lt_{d}"], out[f"eq_{d}"] = lo.sum(dtype=np.int64), (hi - lo).sum(dtype=np.int64)
    save_npz(Path(st["work"]) / f"auc_{task.name}.npz", **out)
    return _mark(st["work"], "auc", task.name, st["params_hash"], count=len(truth))
