"""Ingest a URL list into shards with img2dataset, then summarise its per-shard stats and failures."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from .errors import UsageError
from .shards import write_json_atomic

INPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": "txt"}
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
RESERVED = ("key", "caption", "url", "width", "height", "original_width", "original_height", "status",
            "error_message", "exif", "md5", "sha256", "sha512")  # img2dataset's own json fields
WORK = "_ingest"  # our state inside --out; img2dataset reads every top-level *.json as a finished shard


def ingest(
    urls: str,
    out: str,
    *,
    image_size: int = 256,
    resize_mode: str = "border",
    processes: int = 2,
    threads: int = 16,
    caption_col: str | None = "caption",
    url_col: str = "url",
    keep_columns: list[str] | None = None,
    shard_size: int = 10000,
    timeout: int = 10,
) -> dict:
    """Download the images of URL list `urls` (csv/tsv/parquet/txt) into webdataset shards in `out`.

    Runs `img2dataset.download` (multiprocessing distributor, `processes` processes, sha256 of
    the downloaded bytes in each json). The list's other columns (default: all but the URL and
    caption columns and img2dataset's reserved names; `keep_columns` to choose) are carried into
    each sample's json and the shard parquet (img2dataset's `save_additional_columns`).

    Resumes into its own folder: URLs that a finished shard (one with `NNNNN_stats.json`) already
    attempted are not fetched again; partial shards of a killed run are removed and their URLs
    fetched again; the remaining URLs go into new shards after the last one (img2dataset's
    `extend` mode), so a grown list only downloads what is new. Afterwards writes `sizes.json`
    (shard -> successful samples) and returns `{"shards": {name: {count, successes, failed}},
    "successes", "attempted", "new_urls", "status" (error message -> n), "failures": [{url, error}]}`.
    Raises UsageError for a missing list, an unknown format or resize mode, a missing column, or
    a shard size other than the folder's.
    """
    path = Path(urls)
    if not path.is_file():
        raise UsageError(f"URL list {path}: no such file")
    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"URL list {path}: unknown format (use {', '.join(INPUT_FORMATS)})")
    if resize_mode not in RESIZE_MODES:
        raise UsageError(f"--resize-mode {resize_mode!r}: choose one of {', '.join(RESIZE_MODES)}")
    if processes < 1 or image_size < 8:
        raise UsageError("--processes must be >= 1 and --image-size >= 8")
    table = _read_list(path, fmt, url_col)
    if fmt == "txt":
        caption_col = None
    wanted = [url_col] + ([caption_col] if caption_col else []) + list(keep_columns or [])
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise UsageError(f"URL list {path}: no column {missing[0]!r} (columns: {', '.join(map(str, table.columns))})")
    if keep_columns is None:
        keep_columns = [c for c in table.columns if c not in (url_col, caption_col) and c not in RESERVED]
    reserved = [c for c in keep_columns if c in RESERVED]
    if reserved:
        raise UsageError(f"--keep-columns {reserved[0]!r}: img2dataset reserves that name for its own field")
    out_path = Path(out)
    work = out_path / WORK
    state_path = work / "ingest.json"
    if state_path.exists():
        prev = json.loads(state_path.read_text())
        if prev.get("shard_size") != shard_size:
            raise UsageError(f"{out} was ingested with --shard-size {prev.get('shard_size')}; resume with the same "
                             "value (keys are shard id x shard size + position)")
    foreign = sorted(f.name for f in out_path.glob("*.json") if f.name != "sizes.json"
                     and not (f.name.endswith("_stats.json") and f.name.split("_")[0].isdigit()))
    if foreign:
        raise UsageError(f"{out} holds {foreign[0]}, which img2dataset would read as a finished shard; "
                         "ingest into an empty folder or a previous ingest's --out")
    done_urls = _clean_and_done_urls(out_path)
    new = table[~table[url_col].astype(str).isin(done_urls)]
    if len(new):
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations would query PyPI
        from img2dataset import download

        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(state_path, {"shard_size": shard_size})
        digest = hashlib.sha256(new[url_col].astype(str).str.cat(sep="\n").encode()).hexdigest()[:16]
        batch = work / f"batch-{digest}.parquet"
        new.reset_index(drop=True).to_parquet(batch, index=False)
        (out_path / "sizes.json").unlink(missing_ok=True)  # img2dataset would read it as a finished shard id
        download(
            url_list=str(batch),
            output_folder=str(out_path),
            output_format="webdataset",
            input_format="parquet",
            url_col=url_col,
            caption_col=caption_col,
            save_additional_columns=list(keep_columns) or None,
            image_size=image_size,
            resize_mode=resize_mode,
            processes_count=processes,
            thread_count=threads,
            number_sample_per_shard=shard_size,
            timeout=timeout,
            distributor="multiprocessing",
            compute_hash="sha256",
            enable_wandb=False,
            incremental_mode="extend",
            retries=0,
        )
    summary = summarize(out_path)
    summary["new_urls"] = int(len(new))
    return summary


def _read_list(path: Path, fmt: str, url_col: str):
    import pandas as pd

    if fmt == "parquet":
        return pd.read_parquet(path)
    if fmt == "txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return pd.DataFrame({url_col: lines})
    return pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False)


def _clean_and_done_urls(out: Path) -> set[str]:
    """Remove shards a killed run left without `_stats.json`; return the URLs finished shards attempted."""
    import pandas as pd

    if not out.is_dir():
        return set()
    done: set[str] = set()
    for f in sorted(out.iterdir()):
        stem = f.name.split(".")[0].split("_")[0]
        if not stem.isdigit() or not f.is_file():
            continue
        if not (out / f"{stem}_stats.json").exists():
            f.unlink()  # a partial shard (tar, parquet, failed-urls) of an interrupted download
        elif f.name == f"{stem}.parquet":
            done.update(pd.read_parquet(f, columns=["url"])["url"].astype(str))
    return done


def summarize(out: str | os.PathLike) -> dict:
    """Read img2dataset's `NNNNN_stats.json` and `NNNNN.parquet` in `out`; write `sizes.json`; return the summary.

    `sizes.json` counts successful samples (the stats' `successes`, what the tar holds), not
    attempted URLs.
    """
    import pandas as pd

    out = Path(out)
    shards, sizes = {}, {}
    status: Counter = Counter()
    failures = []
    for stats_path in sorted(out.glob("*_stats.json")):
        name = stats_path.name[: -len("_stats.json")]
        stats = json.loads(stats_path.read_text())
        ok = int(stats.get("successes", 0))
        shards[name] = {"count": int(stats.get("count", 0)), "successes": ok,
                        "failed": int(stats.get("count", 0)) - ok}
        status.update({k: int(v) for k, v in stats.get("status_dict", {}).items()})
        if (out / f"{name}.tar").exists():
            sizes[f"{name}.tar"] = ok
        parquet = out / f"{name}.parquet"
        if parquet.exists():
            df = pd.read_parquet(parquet)
            bad = df[df["status"] != "success"] if "status" in df else df.iloc[0:0]
            for _, row in bad.iterrows():
                failures.append({"shard": name, "url": row.get("url"), "error": row.get("error_message")})
    write_json_atomic(out / "sizes.json", sizes)
    return {
        "shards": shards,
        "attempted": sum(s["count"] for s in shards.values()),
        "successes": sum(s["successes"] for s in shards.values()),
        "status": dict(status),
        "failures": failures,
    }
