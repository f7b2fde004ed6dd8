"""Exact duplicate keys and image hashes across a dataset's catalog parts, as a two-step hash-bucket
shuffle of fixed-width numpy arrays: one task per catalog part writes its rows' (key hash, gid) and
(sha256 digest, gid) sorted, one task per bucket reads its slice of every part (memory-mapped) and
keeps the values seen more than once. At 10M pairs the `dask.dataframe` group-bys on Python strings
this replaces took ~170 s of the scan's start-up; the client only receives the repeated rows.

Key hashes only nominate candidates: the client re-reads the candidates' keys and compares the
strings, so a 64-bit collision never raises a false "duplicate key". Digests are compared whole.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .scan_tasks import save_npy

KEY_DTYPE = np.dtype([("h", "<u8"), ("gid", "<i8")])
SHA_DTYPE = np.dtype([("d", "S32"), ("gid", "<i8")])
BUCKET_ROWS = 4_000_000  # rows per bucket task (~250 MB of arrays at most in one worker)


@dataclass(frozen=True)
class PartTask:
    """One catalog part: `name` (shard stem), its parquet `path`, the gid `offset` of its first row,
    the folder `work` for its arrays, and whether to collect its `labels`."""

    name: str
    path: str
    offset: int
    work: str
    labels: bool


@dataclass(frozen=True)
class BucketTask:
    """Bucket `index` of `buckets` over the parts `names` (arrays in `work`)."""

    name: str
    index: int
    buckets: int
    names: tuple[str, ...]
    work: str


def n_buckets(n_rows: int) -> int:
    """Buckets for `n_rows` rows: ~BUCKET_ROWS each, at most 65,536 (the digest's first 2 bytes)."""
    return int(min(65_536, max(1, -(-n_rows // BUCKET_ROWS))))


def _digests(values) -> tuple[np.ndarray, np.ndarray]:
    """(S32 digests, valid mask) of sha256 hex strings; nulls are invalid (a group-by drops them),
    other non-hex strings are kept as the sha256 of their text (equal strings, equal digests)."""
    out = np.zeros(len(values), "S32")
    ok = np.zeros(len(values), bool)
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            b = bytes.fromhex(v)
        except ValueError:
            b = b""
        out[i] = b if len(b) == 32 else hashlib.sha256(v.encode()).digest()
        ok[i] = True
    return out, ok


def part_arrays(task: PartTask) -> dict:
    """Write `keys_NAME.npy` (key hash, gid; by hash) and `sha_NAME.npy` (digest, gid; by digest,
    gid) for one catalog part; return its row count and (with `labels`) its distinct labels."""
    import pandas as pd
    import pyarrow.parquet as pq

    cols = ["key", "sha256"] + (["label"] if task.labels else [])
    table = pq.read_table(task.path, columns=cols)
    n = table.num_rows
    gid = np.arange(task.offset, task.offset + n, dtype=np.int64)
    keys = np.zeros(n, KEY_DTYPE)
    keys["h"] = pd.util.hash_array(table.column("key").to_numpy(zero_copy_only=False).astype(object))
    keys["gid"] = gid
    keys.sort(order=["h", "gid"], kind="stable")
    digests, ok = _digests(table.column("sha256").to_pylist())
    sha = np.zeros(int(ok.sum()), SHA_DTYPE)
    sha["d"], sha["gid"] = digests[ok], gid[ok]
    sha.sort(order=["d", "gid"], kind="stable")
    work = Path(task.work)
    save_npy(work / f"keys_{task.name}.npy", keys)
    save_npy(work / f"sha_{task.name}.npy", sha)
    labels = []
    if task.labels:
        labels = sorted({str(x) for x in table.column("label").drop_null().to_pylist()})
    return {"count": n, "labels": labels}


def _key_bounds(index: int, buckets: int) -> tuple[int, int]:
    lo = (index << 64) // buckets
    return lo, ((index + 1) << 64) // buckets


def _sha_bound(index: int, buckets: int) -> bytes:
    return ((index << 16) // buckets).to_bytes(2, "big")


def bucket_repeats(task: BucketTask) -> dict:
    """The bucket's repeated values over all parts: `key_gids`, the gids whose key hash occurs more
    than once (candidates), and `sha`, the (digest, gid) rows whose digest occurs more than once,
    sorted by digest then gid."""
    work = Path(task.work)
    klo, khi = _key_bounds(task.index, task.buckets)
    slo = _sha_bound(task.index, task.buckets)
    shi = _sha_bound(task.index + 1, task.buckets) if task.index + 1 < task.buckets else None
    kparts, sparts = [], []
    for name in task.names:
        k = np.load(work / f"keys_{name}.npy", mmap_mode="r")
        h = k["h"]
        a = np.searchsorted(h, np.uint64(klo))
        b = len(h) if khi >= 1 << 64 else np.searchsorted(h, np.uint64(khi))
        kparts.append(np.array(k[a:b]))
        s = np.load(work / f"sha_{name}.npy", mmap_mode="r")
        d = s["d"]
        a = np.searchsorted(d, slo)
        b = len(d) if shi is None else np.searchsorted(d, shi)
        sparts.append(np.array(s[a:b]))
    keys = np.concatenate(kparts) if kparts else np.zeros(0, KEY_DTYPE)
    sha = np.concatenate(sparts) if sparts else np.zeros(0, SHA_DTYPE)
    keys.sort(order=["h", "gid"], kind="stable")
    sha.sort(order=["d", "gid"], kind="stable")
    return {"key_gids": keys["gid"][_repeated(keys["h"])], "sha": sha[_repeated(sha["d"])]}


def _repeated(sorted_values: np.ndarray) -> np.ndarray:
    """Mask of the entries of a sorted array whose value occurs more than once."""
    if len(sorted_values) < 2:
        return np.zeros(len(sorted_values), bool)
    same = sorted_values[1:] == sorted_values[:-1]
    rep = np.zeros(len(sorted_values), bool)
    rep[1:] |= same
    rep[:-1] |= same
    return rep
