"""Ingest a URL list into shards with img2dataset, then summarise its per-shard stats and failures."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from .errors import UsageError
from .shards import write_json_atomic

INPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": "txt"}
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")


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
    shard_size: int = 10000,
    timeout: int = 10,
) -> dict:
    """Download the images of URL list `urls` (csv/tsv/parquet/txt) into webdataset shards in `out`.

    Runs `img2dataset.download` (multiprocessing distributor, `processes` processes, sha256 per
    image), resuming shards whose `_stats.json` already exists. Afterwards writes `sizes.json`
    (shard -> successful samples) and returns `{"shards": {name: {count, successes, failed}},
    "successes", "attempted", "status" (error message -> n), "failures": [{url, error}]}`.
    Raises UsageError for a missing list, an unknown format or resize mode, or a missing column.
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
    if fmt == "txt":
        caption_col = None
    else:
        _check_columns(path, fmt, [url_col] + ([caption_col] if caption_col else []))
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations would query PyPI
    from img2dataset import download

    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    download(
        url_list=str(path),
        output_folder=str(out_path),
        output_format="webdataset",
        input_format=fmt,
        url_col=url_col,
        caption_col=caption_col,
        image_size=image_size,
        resize_mode=resize_mode,
        processes_count=processes,
        thread_count=threads,
        number_sample_per_shard=shard_size,
        timeout=timeout,
        distributor="multiprocessing",
        compute_hash="sha256",
        enable_wandb=False,
        incremental_mode="incremental",
        retries=0,
    )
    return summarize(out_path)


def _check_columns(path: Path, fmt: str, columns: list[str]) -> None:
    import pandas as pd

    if fmt == "parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
    else:
        names = list(pd.read_csv(path, sep="\t" if fmt == "tsv" else ",", nrows=0).columns)
    missing = [c for c in columns if c not in names]
    if missing:
        raise UsageError(f"URL list {path}: no column {missing[0]!r} (columns: {', '.join(names)})")


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
