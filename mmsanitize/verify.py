"""Split-view poisoning check (Carlini et al., "Poisoning Web-Scale Training Datasets is Practical",
2023): re-fetch every sample's URL and compare the bytes with the hash recorded at download time.

A crawled dataset is distributed as URLs; whoever controls a URL's domain later can serve other
bytes to everyone who downloads it after the curator did. img2dataset records the sha256 of the
bytes it downloaded in each json (the catalog's `source_sha256`); `verify` downloads every URL
again and sorts samples into:
  - unchanged: HTTP 200 and the same sha256;
  - changed: HTTP 200 and other bytes (the split-view risk);
  - gone: HTTP 404 or 410;
  - error: anything else after the retries (timeout, refused connection, other HTTP status);
  - unverifiable: the sample has no URL or no recorded hash.
The plan comes from the catalog; one Dask task per shard fetches its URLs with a bounded thread
pool (`concurrency` connections per task), a timeout per request and retries with backoff for
errors that may be transient. Outputs (in `out`, written via temp names): `verify_NAME.parquet`
+ `verify_NAME_stats.json` per shard (a rerun skips finished shards), then `verify.parquet`
(key, shard, url, status, http_status, sha256, error) and `summary.json` (counts by status).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .engine import ShardProgress, map_shards
from .errors import UsageError
from .shards import expand_shards, shard_stem, write_json_atomic, write_parquet_atomic

STATUSES = ("unchanged", "changed", "gone", "error", "unverifiable")
COLUMNS = ["key", "shard", "url", "status", "http_status", "sha256", "error"]
MAX_BYTES = 64 << 20
USER_AGENT = "mmsanitize-verify (+https://github.com/; split-view check of a downloaded dataset)"


@dataclass(frozen=True)
class VerifyTask:
    """Re-fetch the `rows` (key, url, source_sha256) of one shard into `out/verify_NAME.parquet`."""

    name: str
    shard: str
    out: str
    rows: tuple[tuple[str, str | None, str | None], ...]
    plan_hash: str
    concurrency: int
    timeout: float
    retries: int


def fetch(url: str, *, timeout: float, retries: int) -> tuple[int | None, bytes | None, str | None]:
    """GET `url`: (HTTP status or None, body when 200, error text). Retries (with 0.5 s x attempt
    backoff) on timeouts, connection errors and HTTP 5xx/429; never on 4xx."""
    import urllib.error
    import urllib.request

    err = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(0.5 * attempt)
        try:
            req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read(MAX_BYTES + 1)
                if len(body) > MAX_BYTES:
                    return resp.status, None, f"larger than {MAX_BYTES} bytes"
                return resp.status, body, None
        except urllib.error.HTTPError as e:
            if e.code < 500 and e.code != 429:
                return e.code, None, f"HTTP {e.code}"
            err = (e.code, f"HTTP {e.code}")
        except (urllib.error.URLError, OSError, ValueError) as e:  # refused, DNS, timeout, bad URL
            reason = getattr(e, "reason", e)
            err = (None, f"{type(reason).__name__}: {reason}")
            if isinstance(e, ValueError):
                break
    return err[0], None, err[1]


def check_one(key: str, url: str | None, source: str | None, *, timeout: float, retries: int) -> dict:
    """One sample's verdict (a row of verify.parquet)."""
    if not url or not source:
        return {"key": key, "url": url, "status": "unverifiable", "http_status": None, "sha256": None,
                "error": "no url" if not url else "no recorded sha256"}
    status, body, error = fetch(url, timeout=timeout, retries=retries)
    if body is not None:
        digest = hashlib.sha256(body).hexdigest()
        verdict = "unchanged" if digest == source else "changed"
        return {"key": key, "url": url, "status": verdict, "http_status": status, "sha256": digest, "error": None}
    verdict = "gone" if status in (404, 410) else "error"
    return {"key": key, "url": url, "status": verdict, "http_status": status, "sha256": None, "error": error}


def verify_shard(task: VerifyTask) -> dict:
    """Dask task: fetch one shard's URLs (bounded thread pool) and write its verdicts; returns stats."""
    import concurrent.futures as cf

    import pandas as pd

    progress = ShardProgress(task.name)
    rows = []
    with cf.ThreadPoolExecutor(max_workers=max(1, task.concurrency)) as pool:
        for row in pool.map(lambda r: check_one(*r, timeout=task.timeout, retries=task.retries), task.rows):
            rows.append(row)
            progress.add(1)
    df = pd.DataFrame(rows, columns=[c for c in COLUMNS if c != "shard"])
    df.insert(1, "shard", task.shard)
    df["http_status"] = df["http_status"].astype("Int64")
    out = Path(task.out)
    write_parquet_atomic(df[COLUMNS], out / f"verify_{task.name}.parquet")
    counts = {s: int((df["status"] == s).sum()) for s in STATUSES}
    stats = {"count": len(df), "plan": task.plan_hash, "counts": counts}
    write_json_atomic(out / f"verify_{task.name}_stats.json", stats)
    return stats


def _done(task: VerifyTask) -> dict | None:
    try:
        stats = json.loads((Path(task.out) / f"verify_{task.name}_stats.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if stats.get("plan") != task.plan_hash or not (Path(task.out) / f"verify_{task.name}.parquet").exists():
        return None
    return stats


def verify(
    shards: str | os.PathLike | list,
    *,
    out: str | os.PathLike,
    concurrency: int = 8,
    timeout: float = 10.0,
    retries: int = 2,
    scheduler: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Re-fetch every sample's URL and compare it with its recorded `source_sha256`.

    Writes `out/verify.parquet` and `out/summary.json`; returns the summary: {"samples",
    "shards", "counts" (status -> n), "changed_keys" (first 20), "skipped" (shards done earlier)}.
    Shards verified by an earlier run with the same plan are skipped unless `overwrite` (a
    rerun re-fetches nothing; use `overwrite` or a new `out` to check again later).
    Raises UsageError for bad options or when no sample has a URL (not img2dataset output).
    """
    import pandas as pd

    from .catalog import build_catalog

    if concurrency < 1 or timeout <= 0 or retries < 0:
        raise UsageError("--concurrency must be >= 1, --timeout > 0 and --retries >= 0")
    paths = expand_shards(shards)
    from .outputs import claim_out, mark_out

    out = claim_out(out, "verify", paths, overwrite=overwrite, mark=False)
    cat = build_catalog(paths, scheduler=scheduler, workers=workers)
    if cat["url"].isna().all():
        raise UsageError(f"{paths[0].parent}: no sample has a url in its json; verify needs img2dataset output "
                         "(`mmsanitize ingest URLS --out DIR` creates it)")
    mark_out(out, "verify", paths)
    tasks = []
    for p in paths:
        sub = cat[cat["shard"] == p.name]
        rows = tuple((str(k), None if pd.isna(u) else str(u), None if pd.isna(h) else str(h))
                     for k, u, h in sub[["key", "url", "source_sha256"]].itertuples(index=False))
        plan = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
        tasks.append(VerifyTask(shard_stem(p), p.name, str(out.resolve()), rows, plan, concurrency, timeout, retries))
    res = map_shards(verify_shard, tasks, is_done=None if overwrite else _done, scheduler=scheduler,
                     workers=workers, desc="verify")
    df = pd.concat([pd.read_parquet(out / f"verify_{t.name}.parquet") for t in tasks], ignore_index=True)
    write_parquet_atomic(df, out / "verify.parquet")
    counts = {s: int((df["status"] == s).sum()) for s in STATUSES}
    summary = {"samples": int(len(df)), "shards": len(tasks), "counts": counts,
               "changed_keys": df.loc[df["status"] == "changed", "key"].head(20).tolist(),
               "input": str(paths[0].parent.resolve())}
    write_json_atomic(out / "summary.json", summary)
    return {**summary, "skipped": res.skipped}


def drop_keys(verify_dir: str | os.PathLike, drop: tuple[str, ...] | list[str]):
    """The rows of `verify_dir/verify.parquet` whose status is in `drop` (key, shard, status).

    Raises UsageError for a folder without verify.parquet or an unknown status."""
    import pandas as pd

    bad = [s for s in drop if s not in STATUSES]
    if bad or not drop:
        raise UsageError(f"--drop {','.join(drop)}: choose from {', '.join(STATUSES)}")
    path = Path(verify_dir) / "verify.parquet"
    if not path.exists():
        raise UsageError(f"{verify_dir} is not a verify folder (no verify.parquet; `mmsanitize verify SHARDS "
                         f"--out {verify_dir}` creates it)")
    df = pd.read_parquet(path, columns=["key", "shard", "status"])
    return df[df["status"].isin(list(drop))].reset_index(drop=True)
