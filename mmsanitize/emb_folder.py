"""Precomputed embeddings folders: our own `embed` output and clip-retrieval's, joined to shards by key.

Two layouts are read:
  - ours (`model.json` present): `img_emb/img_emb_NAME.npy`, `text_emb/text_emb_NAME.npy`,
    `metadata/metadata_NAME.parquet` named after the shard, rows in shard order;
  - clip-retrieval's (no `model.json`): `img_emb/img_emb_N.npy`, `text_emb/text_emb_N.npy`,
    `metadata/metadata_N.parquet` with `image_path` (+ `caption`, `url`), any numbering and row
    order. The webdataset key of a row is the stem of its `image_path`.
A clip-retrieval folder is joined to the catalog by key with a distributed merge
(`dask.dataframe`), then each shard's rows are gathered (memory-mapped) into
`WORK/emb/{img,text}_NAME.npy` in shard order, so every later step reads one layout.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .errors import ShardError, UsageError
from .shards import write_json_atomic


def layout(emb_dir: str | os.PathLike) -> str:
    """"own" (our `embed` output) or "clip" (clip-retrieval's); UsageError for anything else."""
    emb_dir = Path(emb_dir)
    if (emb_dir / "model.json").exists():
        return "own"
    if clip_parts(emb_dir):
        return "clip"
    raise UsageError(f"{emb_dir} is not an embeddings folder (no model.json, and no clip-retrieval "
                     "img_emb/img_emb_N.npy + metadata/metadata_N.parquet)")


def clip_parts(emb_dir: str | os.PathLike) -> list[tuple[int, Path, Path, Path]]:
    """clip-retrieval's parts as (N, img_emb, text_emb, metadata) sorted by N; [] when none.

    Raises UsageError when a part lacks one of its three files."""
    emb_dir = Path(emb_dir)
    nums = set()
    for sub, pat in (("img_emb", r"img_emb_(\d+)\.npy"), ("text_emb", r"text_emb_(\d+)\.npy"),
                     ("metadata", r"metadata_(\d+)\.parquet")):
        for p in (emb_dir / sub).glob("*"):
            m = re.fullmatch(pat, p.name)
            if m:
                nums.add(m.group(1))
    parts = []
    for n in sorted(nums, key=int):
        files = (emb_dir / "img_emb" / f"img_emb_{n}.npy", emb_dir / "text_emb" / f"text_emb_{n}.npy",
                 emb_dir / "metadata" / f"metadata_{n}.parquet")
        missing = [f for f in files if not f.exists()]
        if missing:
            raise UsageError(f"{emb_dir}: embeddings part {n} has no {missing[0].relative_to(emb_dir)}")
        parts.append((int(n), *files))
    return parts


def _key_of(image_path: str) -> str:
    name = str(image_path).replace("\\", "/").rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def _read_meta_keys(part) -> "object":
    import pandas as pd
    import pyarrow.parquet as pq

    n, img, _, meta = part
    cols = pq.read_schema(meta).names
    if "image_path" not in cols:
        raise UsageError(f"{meta}: no image_path column (clip-retrieval metadata names each row's image)")
    want = [c for c in ("image_path", "url") if c in cols]
    df = pq.read_table(meta, columns=want).to_pandas()
    rows = np.load(img, mmap_mode="r").shape[0]
    if rows != len(df):
        raise UsageError(f"{meta}: {len(df)} metadata rows but {img.name} has {rows}")
    out = pd.DataFrame({"key": [_key_of(p) for p in df["image_path"]], "part": np.int64(n),
                        "erow": np.arange(len(df), dtype=np.int64)})
    out["url"] = df["url"].astype(object) if "url" in df else None
    return out


def _read_catalog_keys(arg) -> "object":
    import pyarrow.parquet as pq

    name, path = arg
    df = pq.read_table(path, columns=["key", "position"]).to_pandas()
    df["shard"] = name
    return df


def join_clip(emb_dir: str | os.PathLike, names: list[str], catalog_parts: list[str], work: str | os.PathLike,
              client) -> None:
    """Join a clip-retrieval folder to the shards by key and write each shard's rows, in shard
    order, to `work/emb/img_NAME.npy`, `text_NAME.npy`, `meta_NAME.parquet` (key, url).

    Raises ShardError naming the first (smallest) shard key without an embedding, or UsageError
    naming the first embedding key that is in no shard. Skipped when `work/emb/_joined.json` exists.
    """
    import dask
    import dask.dataframe as dd
    import pandas as pd  # noqa: F401  (before Dask's threads import it)

    emb_dir, work = Path(emb_dir), Path(work)
    done = work / "emb" / "_joined.json"
    if done.exists():
        return
    parts = clip_parts(emb_dir)
    (work / "emb").mkdir(parents=True, exist_ok=True)
    with dask.config.set(scheduler=client):
        emb = dd.from_map(_read_meta_keys, parts, meta=_read_meta_keys(parts[0]).iloc[:0])
        cat = dd.from_map(_read_catalog_keys, list(zip(names, catalog_parts)),
                          meta=_read_catalog_keys((names[0], catalog_parts[0])).iloc[:0])
        j = emb.merge(cat, on="key", how="outer", indicator=True)
        missing = j[j["_merge"] == "right_only"][["key", "shard"]]
        extra = j[j["_merge"] == "left_only"][["key", "part"]]
        dup = emb.groupby("key").size()
        n_missing, first_missing, n_extra, first_extra, n_dup, first_dup = dask.compute(
            missing["key"].count(), _first(missing["key"]), extra["key"].count(), _first(extra["key"]),
            (dup > 1).sum(), _first(dup[dup > 1].index.to_series()))
        first_missing, first_extra, first_dup = (min(v) if len(v) else None
                                                 for v in (first_missing, first_extra, first_dup))
        if n_dup:
            raise UsageError(f"{emb_dir}: key {first_dup} has {int(dup.loc[first_dup].compute())} embedding rows")
        if n_missing:
            shard = missing[missing["key"] == first_missing]["shard"].compute().iloc[0]
            raise ShardError(f"{shard}.tar", f"no embedding in {emb_dir} for this key "
                                             f"({int(n_missing)} shard key(s) missing)", key=str(first_missing))
        if n_extra:
            part = int(extra[extra["key"] == first_extra]["part"].compute().iloc[0])
            raise UsageError(f"{emb_dir}: embedding key {first_extra} (metadata_{part}.parquet) is in no shard "
                             f"({int(n_extra)} extra key(s))")
        both = j[j["_merge"] == "both"][["shard", "position", "part", "erow", "key", "url"]]
        files = {int(n): (str(i), str(t)) for n, i, t, _ in parts}
        meta = pd.DataFrame({"shard": pd.Series(dtype=object), "count": pd.Series(dtype="int64")})
        both.shuffle(on="shard").map_partitions(_write_partition, files, str(work / "emb"), meta=meta).compute()
    write_json_atomic(done, {"embeddings": str(emb_dir), "shards": len(names)})


def _first(series):
    """Per-partition smallest value (empty partitions give nothing); the caller takes the min."""
    import pandas as pd

    return series.map_partitions(lambda s: pd.Series([s.min()] if len(s) else [], dtype=object),
                                 meta=pd.Series(dtype=object))


def _write_partition(df, files: dict, out: str):
    """Write every shard held by one partition of the joined table (see `_write_shard_rows`)."""
    import pandas as pd

    done = [(str(name), _write_shard_rows(group, files, out)) for name, group in df.groupby("shard", sort=True)]
    return pd.DataFrame({"shard": pd.Series([d[0] for d in done], dtype=object),
                         "count": pd.Series([d[1] for d in done], dtype="int64")})


def _write_shard_rows(group, files: dict, out: str) -> int:
    """Gather one shard's rows from the clip-retrieval parts (memory-mapped), in shard order."""
    import pandas as pd

    from .shards import write_parquet_atomic

    group = group.sort_values("position")
    name = str(group["shard"].iloc[0])
    n = len(group)
    arrays = {}
    for which, col in (("img", 0), ("text", 1)):
        dst = None
        for part, rows in group.groupby("part", sort=True):
            src = np.load(files[int(part)][col], mmap_mode="r")
            if dst is None:
                dst = np.zeros((n, src.shape[1]), np.float16)
            pos = np.searchsorted(group["position"].to_numpy(), rows["position"].to_numpy())
            order = np.argsort(rows["erow"].to_numpy(), kind="stable")
            dst[pos[order]] = np.asarray(src[rows["erow"].to_numpy()[order]], np.float16)
        arrays[which] = dst
    for which, arr in arrays.items():
        path = Path(out) / f"{which}_{name}.npy"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    write_parquet_atomic(pd.DataFrame({"key": group["key"].to_numpy(), "url": group["url"].to_numpy()}),
                         Path(out) / f"meta_{name}.parquet")
    return n


def model_card(emb_dir: str | os.PathLike) -> dict | None:
    """Our folder's model card, or None for a clip-retrieval folder (it records no model)."""
    p = Path(emb_dir) / "model.json"
    return json.loads(p.read_text()) if p.exists() else None
