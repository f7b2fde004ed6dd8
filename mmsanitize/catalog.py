"""The catalog: one parquet row per sample, built once per dataset with the Dask engine.

Columns: key, shard, position, caption, label, sha256 (of the stored image bytes), width, height,
bytes (image size), image_ext, url and source_sha256 (img2dataset's json `url` and `sha256`, the
hash of the bytes originally downloaded, before resizing; None when absent), offset and end (the
sample's byte range in the tar: its members, headers included, so one read fetches it). Per-shard parts live
in a cache folder under `XDG_CACHE_HOME` (never beside the shards), each with a stats file holding
the shard's content fingerprint, so a rerun rebuilds only shards that changed or were never finished.
Planning steps (poison, scan thresholds, evaluation) read the catalog, never the tars. Beside each
part, `NAME.rows.parquet` holds the shard's own parquet table (key, caption, json fields) when its
json fields are plain, so poison and sanitize splice the shard by byte ranges without parsing it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .engine import map_shards
from .errors import ShardError
from .shards import (ShardLayout, expand_shards, file_fingerprint, image_size, iter_raw_samples, json_fields,
                     parse_sample, plain_rows_table, sha256, shard_stem, write_json_atomic, write_parquet_atomic,
                     write_table_atomic)

CATALOG_VERSION = 5  # 5: the shard's own parquet rows (NAME.rows.parquet) and its json fields
COLUMNS = ["key", "shard", "position", "caption", "label", "sha256", "width", "height", "bytes", "image_ext",
           "url", "source_sha256", "offset", "end"]


@dataclass(frozen=True)
class CatalogTask:
    """Catalog one shard `path` into `part_dir`."""

    name: str
    path: str
    part_dir: str


def catalog_dir(shard_paths: list[Path], cache_home: str | os.PathLike | None = None) -> Path:
    """Where a dataset's catalog parts live: `CACHE_HOME/mmsanitize/catalogs/<hash of the folder>`,
    CACHE_HOME being `cache_home`, else `$XDG_CACHE_HOME`, else `~/.cache`. Never beside the shards:
    inputs are read-only to mmsanitize. The shards need not exist yet (pipelines plan ahead)."""
    root = Path(shard_paths[0]).parent.resolve()
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    base = Path(cache_home or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "mmsanitize" / "catalogs" / digest


def catalog_rows(path: str | os.PathLike) -> list[dict]:
    """Read one shard fully and return its catalog rows (decodes every image once to check it)."""
    return _catalog_rows(path)[0]


def _catalog_rows(path: str | os.PathLike) -> tuple[list[dict], list[tuple[str, str, dict | None]]]:
    """(catalog rows, (key, caption, json) per sample as the shard's own parquet takes them)."""
    shard = Path(path).name
    rows, samples = [], []
    for position, raw in enumerate(iter_raw_samples(path)):
        s = parse_sample(raw, shard)
        samples.append((s.key, s.caption, s.meta))
        w, h = image_size(s.image, shard, s.key)
        meta = s.meta if isinstance(s.meta, dict) else {}
        label, url, source = (None if meta.get(f) is None else str(meta[f]) for f in ("label", "url", "sha256"))
        rows.append({
            "key": s.key, "shard": shard, "position": position, "caption": s.caption,
            "label": label, "sha256": sha256(s.image), "width": w, "height": h,
            "bytes": len(s.image), "image_ext": s.image_ext, "url": url, "source_sha256": source,
            "offset": raw.start, "end": raw.end,
        })
    return rows, samples


def catalog_shard(task: CatalogTask) -> dict:
    """Dask task: write `part_dir/NAME.parquet` (+ `NAME.rows.parquet`, see `shard_layout`) then
    `NAME_stats.json` for one shard."""
    import pandas as pd

    rows, samples = _catalog_rows(task.path)
    part_dir = Path(task.part_dir)
    part_dir.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows, columns=COLUMNS)
    write_parquet_atomic(df, part_dir / f"{task.name}.parquet")
    stats = {"count": len(rows), "input": file_fingerprint(task.path), "version": CATALOG_VERSION}
    table = plain_rows_table(samples)
    if table is not None:
        write_table_atomic(table, part_dir / f"{task.name}.rows.parquet")
        stats.update(rows="plain", json_fields=json_fields(samples[0][2]) if samples else None)
    write_json_atomic(part_dir / f"{task.name}_stats.json", stats)
    return stats


def catalogued(path: str | os.PathLike, part_dir: str | os.PathLike) -> bool:
    """True when `part_dir` holds a finished catalog part of shard `path` as it is now (same content
    fingerprint and catalog version): every sample of it then parsed and its image decoded."""
    return _part_done(CatalogTask(shard_stem(path), str(path), str(part_dir))) is not None


def shard_layout(path: str | os.PathLike, part_dir: str | os.PathLike) -> ShardLayout | None:
    """The `ShardLayout` of shard `path` from its finished catalog part (keys, byte ranges, the
    table of its own parquet rows); None when the part is missing, stale or has no such table
    (json fields that need pandas' inference are not stored). Lets a verb splice the shard
    without parsing it (`rewrite_from_layout`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = shard_stem(path)
    stats = _part_done(CatalogTask(name, str(path), str(part_dir)))
    rows_path = Path(part_dir) / f"{name}.rows.parquet"
    if stats is None or stats.get("rows") != "plain" or not rows_path.exists():
        return None
    try:
        with pq.ParquetFile(Path(part_dir) / f"{name}.parquet") as f:  # not read_table: no dataset discovery
            part = f.read(columns=["key", "offset", "end"])
        with pq.ParquetFile(rows_path) as f:
            rows = f.read()
    except (OSError, ValueError, pa.ArrowException):  # a damaged cache file: parse the shard instead
        return None
    if rows.num_rows != part.num_rows:
        return None
    return ShardLayout(part.column("key").to_pylist(), part.column("offset").to_numpy(),
                       part.column("end").to_numpy(), rows, stats.get("json_fields"))


def _part_done(task: CatalogTask) -> dict | None:
    stats_path = Path(task.part_dir) / f"{task.name}_stats.json"
    try:
        stats = json.loads(stats_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if stats.get("version") != CATALOG_VERSION or stats.get("input") != file_fingerprint(task.path):
        return None
    if not (Path(task.part_dir) / f"{task.name}.parquet").exists():
        return None
    return stats


@dataclass(frozen=True)
class CatalogParts:
    """A built catalog on disk: one parquet part per shard (in shard order) and the sample count.

    Read columns with `read_catalog(parts, columns)`; nothing here holds the table in memory."""

    paths: tuple[Path, ...]
    count: int
    joined: Path
    inputs: tuple[str, ...] = ()  # each shard's content sha256, as its part was built from


def catalog_parts(
    shards: str | os.PathLike | list,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 1,
    cache_dir: str | os.PathLike | None = None,
) -> CatalogParts:
    """Catalog a dataset (finished shards skipped: their fingerprint matches) and return its parts.

    The client reads only the `key` column (as Arrow) to refuse a key that appears in two shards
    (and the `shard` column when one does), and writes the joined table `<cache>/catalog.parquet` part by part when
    it is missing or older than a part. Raises ShardError on bad samples and duplicate keys,
    EngineError when shards fail.
    """
    import pyarrow.compute as pc

    paths = expand_shards(shards)
    part_dir = Path(cache_dir) if cache_dir else catalog_dir(paths)
    names = [shard_stem(p) for p in paths]
    if len(set(names)) != len(names):
        raise ShardError(paths[0].parent, "two shards share a name; shard names must be unique")
    tasks = [CatalogTask(n, str(p), str(part_dir)) for n, p in zip(names, paths)]
    run = map_shards(catalog_shard, tasks, is_done=_part_done, scheduler=scheduler, workers=workers,
                     retries=retries, desc="catalog")
    parts = tuple(part_dir / f"{t.name}.parquet" for t in tasks)
    inputs = tuple(run.results[t.name]["input"]["sha256"] for t in tasks)
    checked = part_dir / "unique_keys.json"  # the check passed for exactly these shard contents
    if _saved_inputs(checked) != list(inputs):
        keys = _read_table(parts, ["key"]).column("key")
        if len(pc.unique(keys)) != len(keys):
            df = read_catalog(parts, ["key", "shard"])
            first = df[df["key"].duplicated(keep=False)].iloc[0]
            shards_with = sorted(df.loc[df["key"] == first["key"], "shard"])
            raise ShardError(shards_with[-1], f"duplicate key across shards ({', '.join(shards_with)})",
                             key=first["key"])
        write_json_atomic(checked, {"inputs": list(inputs)})
    joined = part_dir / "catalog.parquet"
    built = CatalogParts(parts, int(sum(run.results[t.name]["count"] for t in tasks)), joined, inputs)
    if not joined.exists() or joined.stat().st_mtime_ns < max(p.stat().st_mtime_ns for p in parts):
        _write_joined(built)
    return built


def _read_table(parts, columns=None):
    """The parts' rows (in order) as one Arrow table with a common schema (a part whose column is
    all None has Arrow type null there; it is cast to the type the other parts have)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for p in parts:
        with pq.ParquetFile(p) as f:  # not read_table: no dataset discovery per part (~1 ms each)
            tables.append(f.read(columns=columns))
    if not tables:
        return pa.table({c: pa.array([], pa.string()) for c in (columns or COLUMNS)})
    schema = pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
    return pa.concat_tables([t.cast(schema) for t in tables])


def _write_joined(parts: CatalogParts) -> None:
    """Write the parts as one parquet file, one part in memory at a time (atomic rename), and the
    content hash computed on the way (`content_hash`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .shards import atomic_path

    schema = pa.unify_schemas([pq.read_schema(p).remove_metadata() for p in parts.paths],
                              promote_options="permissive")
    digest = _ContentHash()
    with atomic_path(parts.joined) as tmp, pq.ParquetWriter(tmp, schema) as w:
        for p in parts.paths:
            table = pq.read_table(p).replace_schema_metadata(None).cast(schema)
            digest.update(table)
            w.write_table(table)
    _save_content_hash(parts, digest.hexdigest())


HASH_COLUMNS = ["key", "shard", "sha256", "caption"]


class _ContentHash:
    """sha256 of `json.dumps(rows, sort_keys=True, default=str)` for the catalog's HASH_COLUMNS
    rows as one list, fed one part at a time: a list's JSON text is its items' texts joined by
    ", " in brackets."""

    def __init__(self):
        self.h = hashlib.sha256(b"[")
        self.sep = b""

    def update(self, table) -> None:
        rows = table.select(HASH_COLUMNS).to_pandas().values.tolist()
        if rows:
            self.h.update(self.sep + json.dumps(rows, sort_keys=True, default=str)[1:-1].encode())
            self.sep = b", "

    def hexdigest(self) -> str:
        h = self.h.copy()
        h.update(b"]")
        return h.hexdigest()[:16]


def _saved_inputs(path: Path) -> list | None:
    """The `inputs` list saved in a catalog marker file (`content_hash.json`, `unique_keys.json`), or None."""
    try:
        return json.loads(path.read_text())["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_content_hash(parts: CatalogParts, value: str) -> None:
    write_json_atomic(parts.joined.with_name("content_hash.json"), {"inputs": list(parts.inputs), "hash": value})


def content_hash(parts: CatalogParts) -> str:
    """A 16-hex-digit hash of the catalog's (key, shard, sha256, caption) rows in order (what a
    poison plan depends on). Saved beside the joined table when that is written, and reused while
    every shard's content is the one its part was built from; else computed part by part."""
    import pyarrow.parquet as pq

    saved = parts.joined.with_name("content_hash.json")
    if _saved_inputs(saved) == list(parts.inputs):
        try:
            return json.loads(saved.read_text())["hash"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    digest = _ContentHash()
    for p in parts.paths:
        digest.update(pq.read_table(p, columns=HASH_COLUMNS))
    _save_content_hash(parts, digest.hexdigest())
    return digest.hexdigest()


# one value per sample: converted without pyarrow's object de-duplication, whose hash table cost
# 0.35 GB and 0.4 s per 2M-row column (the repeated columns, shard, label, ..., keep it: it makes
# their 2M cells a few hundred shared strings)
UNIQUE_COLUMNS = frozenset({"key", "caption", "sha256", "url", "source_sha256"})


def read_catalog(parts: CatalogParts | list, columns: list[str] | None = None, *, arrow_strings=()):
    """The catalog's rows (shard, then position order) as a pandas DataFrame with only `columns`
    (all when None), read from the parts with pyarrow. String columns named in `arrow_strings`
    stay in Arrow memory (`pd.ArrowDtype(pa.string())`, one chunk) instead of becoming a Python
    str per row: for a column the caller reads only a few rows of (at 2M captions, ~0.26 GiB less).

    Converted one column at a time, each column's Arrow buffers returned to the allocator before
    the next: the client's peak is the Arrow table plus the pandas columns, not twice the table."""
    import pandas as pd
    import pyarrow as pa

    paths = parts.paths if isinstance(parts, CatalogParts) else parts
    table = _read_table(paths, columns)
    pool = pa.default_memory_pool()
    data = {}
    for name in table.column_names:
        column = table.column(name)
        if name in arrow_strings and pa.types.is_string(column.type):
            data[name] = pd.Series(pd.arrays.ArrowExtensionArray(column.combine_chunks()), copy=False)
        else:
            data[name] = column.to_pandas(deduplicate_objects=name not in UNIQUE_COLUMNS)
        table = table.drop_columns([name])
        pool.release_unused()  # mimalloc keeps freed pages otherwise: +0.5 GB of RSS at 2M rows
    return pd.DataFrame(data, copy=False)


def build_catalog(
    shards: str | os.PathLike | list,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 1,
    cache_dir: str | os.PathLike | None = None,
):
    """Catalog a dataset and return it as a pandas DataFrame (rows in shard, then position order).

    The whole table, every column: planning steps that need a few columns use `catalog_parts`
    and `read_catalog` instead. Raises as `catalog_parts`.
    """
    return read_catalog(catalog_parts(shards, scheduler=scheduler, workers=workers, retries=retries,
                                      cache_dir=cache_dir))


def class_counts(df) -> "dict[str, int]":
    """Samples per label (labels missing counted under '<none>'), largest first."""
    counts = df["label"].fillna("<none>").value_counts()
    return {str(k): int(v) for k, v in counts.items()}
