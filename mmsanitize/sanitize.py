"""Shards minus flagged pairs: copy every kept sample as raw bytes, log what was removed.

Reads `SCAN/scores.parquet`, drops its flagged keys shard by shard with `rewrite_shard` (one Dask
task per shard, resumable: a shard whose stats match the input fingerprint and the dropped set
is skipped), then writes `sizes.json` and `removed.parquet` (key, shard, combined, reason).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .engine import map_shards
from .errors import ShardError, UsageError
from .shards import (expand_shards, file_fingerprint, image_size, iter_raw_samples, outputs_done, parse_sample,
                     rewrite_from_layout, rewrite_shard, shard_stem, write_json_atomic, write_parquet_atomic,
                     write_sizes)


@dataclass(frozen=True)
class SanitizeTask:
    """Copy shard `path` to `out/NAME.tar` without the keys in `drop`."""

    name: str
    path: str
    out: str
    drop: tuple[str, ...]
    drop_hash: str
    catalog: str | None = None  # the dataset's catalog folder, if any (see `sanitize_shard`)


def _drop_hash(keys) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def invalid_samples(path: str) -> dict[str, str]:
    """Keys of a shard's samples that are not usable pairs (no or undecodable image, no/empty/non-UTF-8
    caption, bad json) -> reason. A structurally broken tar still raises ShardError."""
    shard = Path(path).name
    bad = {}
    for raw in iter_raw_samples(path):
        try:
            s = parse_sample(raw, shard)
            image_size(s.image, shard, s.key)
        except ShardError as e:
            bad[raw.key] = e.reason
    return bad


def sanitize_shard(task: SanitizeTask) -> dict:
    """Dask task: write the cleaned shard (flagged and invalid samples dropped); returns its stats
    (count = samples kept, invalid = samples dropped because they are not usable pairs).

    A shard with a finished catalog part for its current content has no invalid sample (the
    catalog parses every sample and decodes its image, and refuses the shard otherwise), so its
    images are not decoded again."""
    from .catalog import catalogued, shard_layout

    valid = task.catalog is not None and catalogued(task.path, task.catalog)
    invalid = {} if valid else {k: v for k, v in invalid_samples(task.path).items() if k not in task.drop}
    extra = {"input": file_fingerprint(task.path), "dropped": len(task.drop), "drop_hash": task.drop_hash,
             "invalid": len(invalid)}
    layout = shard_layout(task.path, task.catalog) if valid else None
    if layout is not None:  # copied by byte ranges, not parsed again (same bytes)
        stats = rewrite_from_layout(task.path, task.out, task.name, layout, drop=task.drop, stats_extra=extra)
        if stats is not None:
            return stats
    return rewrite_shard(task.path, task.out, task.name, drop=(*task.drop, *invalid), stats_extra=extra)


def _done(task: SanitizeTask):
    return outputs_done(task.out, task.name, input=file_fingerprint(task.path), drop_hash=task.drop_hash)


def sanitize(
    shards: str | os.PathLike | list,
    *,
    scan: str | os.PathLike | None = None,
    out: str | os.PathLike,
    verify: str | os.PathLike | None = None,
    drop: tuple[str, ...] = ("changed",),
    drop_labels: tuple[str, ...] = (),
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 1,
) -> dict:
    """Write the shards without the keys `scan` flagged into `out`; returns
    {"kept", "removed", "shards", "skipped", "seconds"}.

    `verify` (a `mmsanitize verify` folder) also drops the samples whose re-fetched URL has a
    status in `drop` (default: changed; e.g. ("changed", "gone")), reason `verify: STATUS`.
    `drop_labels` drops every sample whose catalog `label` is one of them, reason `label: LABEL`
    (e.g. a clean split without the attacked class). At least one of the three is needed.

    Raises UsageError when the scan does not cover these shards, when the output would be the
    input folder, or when a shard would lose every sample (nothing sensible to write).
    """

    paths = expand_shards(shards)
    out = Path(out)
    if out.resolve() == paths[0].parent.resolve():
        raise UsageError("--out must differ from the input folder")
    if scan is None and verify is None and not drop_labels:
        raise UsageError("give --scan DIR (mmsanitize scan), --verify DIR (mmsanitize verify) and/or --drop-label LABEL")
    names = {shard_stem(p): p for p in paths}
    rows, scanned = None, None
    if scan is not None:
        scores_path = Path(scan) / "scores.parquet"
        if not scores_path.exists():
            raise UsageError(f"{scan} is not a scan folder (no scores.parquet; `mmsanitize scan SHARDS --model REF "
                             f"--threshold auto --out {scan}` creates it)")
        from .outputs import check_artifact

        check_artifact(scan, "scan", paths, "--scan")
        try:
            scanned, rows = _scan_flags(scores_path, full=verify is not None or bool(drop_labels))
        except Exception as e:  # noqa: BLE001 - any parquet/arrow failure is a bad user file
            raise UsageError(f"{scores_path} is not a readable scan ({type(e).__name__})") from None
        missing = sorted(f"{n}.tar" for n in names if f"{n}.tar" not in scanned)
        if missing:
            raise UsageError(f"scan {scan} does not cover shard {missing[0]} ({len(missing)} shard(s) missing)")
    extra = [_verify_drops(verify, drop, names)] if verify is not None else []
    extra += [_label_drops(paths, drop_labels, scheduler, workers)] if drop_labels else []
    for flags in extra:
        if rows is None:
            rows, scanned = flags, flags.groupby("shard").size().to_dict()
        else:
            rows = _merge_flags(rows, flags)
    flagged = rows[rows["flagged"]]
    flagged = flagged[flagged["shard"].isin({f"{n}.tar" for n in names})]
    by_shard = {s: tuple(sorted(g["key"])) for s, g in flagged.groupby("shard")}
    for shard, keys in by_shard.items():
        if len(keys) == scanned.get(shard):
            raise UsageError(f"every sample of shard {shard} is flagged; refusing to write an empty shard")
    from .outputs import claim_out, input_bytes

    claim_out(out, "sanitize", paths, need_bytes=input_bytes(paths) * 11 // 10)
    from .catalog import catalog_dir

    parts = catalog_dir(paths)
    parts = str(parts) if parts.is_dir() else None
    tasks = []
    for n, p in names.items():
        drop = by_shard.get(f"{n}.tar", ())
        tasks.append(SanitizeTask(n, str(Path(p).resolve()), str(out.resolve()), drop, _drop_hash(drop), parts))
    res = map_shards(sanitize_shard, tasks, is_done=_done, scheduler=scheduler, workers=workers,
                     retries=retries, desc="sanitize")
    write_sizes(out)
    removed = flagged.sort_values(["shard", "key"], kind="stable").reset_index(drop=True)
    write_parquet_atomic(removed[["key", "shard", "combined", "reason"]], out / "removed.parquet")
    kept = sum(int(r["count"]) for r in res.results.values())
    invalid = sum(int(r.get("invalid", 0)) for r in res.results.values())
    summary = {"kept": kept, "removed": int(len(removed)), "invalid": invalid, "shards": len(tasks),
               "skipped": res.skipped, "seconds": res.seconds, "scan": None if scan is None else str(scan)}
    if verify is not None:
        summary.update(verify=str(verify), verify_drop=list(drop),
                       removed_by_verify=int(removed["reason"].str.contains("verify: ", regex=False).sum()))
    if drop_labels:
        summary.update(drop_label=list(drop_labels),
                       removed_by_label=int(removed["reason"].str.contains("label: ", regex=False).sum()))
    write_json_atomic(out / "sanitize.json", {k: v for k, v in summary.items() if k not in ("seconds", "skipped")})
    return summary


SCORE_COLUMNS = ["key", "shard", "combined", "flagged", "reason"]


def _scan_flags(scores_path: Path, full: bool = False):
    """(samples per shard, flagged rows) of a scan's scores.parquet, reading the shard column and
    the flagged rows only (`full`: every row, for merging with verify flags)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts = pc.value_counts(pq.read_table(scores_path, columns=["shard"]).column("shard"))
    scanned = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
    table = pq.read_table(scores_path, columns=SCORE_COLUMNS, filters=None if full else [("flagged", "==", True)])
    return scanned, table.to_pandas()


def _verify_drops(verify, drop, names: dict):
    """verify.parquet's rows as scores-like flags (key, shard, combined NaN, flagged, reason)."""
    import pandas as pd

    from .outputs import check_artifact
    from .verify import drop_keys

    check_artifact(verify, "verify", list(names.values()), "--verify")
    rows = drop_keys(verify, tuple(drop))
    every = pd.read_parquet(Path(verify) / "verify.parquet", columns=["key", "shard"])
    missing = sorted(f"{n}.tar" for n in names if f"{n}.tar" not in set(every["shard"]))
    if missing:
        raise UsageError(f"verify {verify} does not cover shard {missing[0]} ({len(missing)} shard(s) missing)")
    flags = every.merge(rows, on=["key", "shard"], how="left")
    return pd.DataFrame({"key": flags["key"], "shard": flags["shard"], "combined": float("nan"),
                         "flagged": flags["status"].notna(), "reason": ("verify: " + flags["status"]).fillna("")})


def _label_drops(paths: list, labels: tuple[str, ...], scheduler, workers):
    """The catalog's rows as scores-like flags: flagged when the sample's `label` is in `labels`.
    Raises UsageError for a label no sample carries (a typo would otherwise drop nothing)."""
    import pandas as pd

    from .catalog import catalog_parts, read_catalog

    cat = read_catalog(catalog_parts(paths, scheduler=scheduler, workers=workers), columns=["key", "shard", "label"])
    present = set(cat["label"].dropna())
    unknown = [x for x in labels if x not in present]
    if unknown:
        raise UsageError(f"no sample is labelled {unknown[0]!r} (labels: {', '.join(sorted(present)) or 'none'})")
    hit = cat["label"].isin(set(labels))
    return pd.DataFrame({"key": cat["key"], "shard": cat["shard"], "combined": float("nan"), "flagged": hit,
                         "reason": ("label: " + cat["label"].fillna("")).where(hit, "")})


def _merge_flags(scores, flags):
    """Scan scores with verify flags OR-ed in (reasons joined with '; ')."""
    merged = scores.merge(flags[["key", "shard", "flagged", "reason"]], on=["key", "shard"], how="left",
                          suffixes=("", "_v"))
    extra = merged["flagged_v"].fillna(False).astype(bool)
    merged["reason"] = [("; ".join(x for x in (r if f else "", rv) if x) if e else r)
                        for r, f, rv, e in zip(merged["reason"].fillna(""), merged["flagged"],
                                               merged["reason_v"].fillna(""), extra)]
    merged["flagged"] = merged["flagged"] | extra
    return merged[["key", "shard", "combined", "flagged", "reason"]]
