"""`mmsanitize info`: a dataset's size, classes, caption statistics and problems."""

from __future__ import annotations

import os
from pathlib import Path

from .catalog import build_catalog, class_counts
from .shards import expand_shards


def dataset_info(shards: str | os.PathLike, *, scheduler: str | None = None, workers: int | None = None) -> dict:
    """Summarise a dataset from its catalog.

    Returns a dict: samples, shards, bytes (tar bytes on disk), image_bytes, classes (label ->
    count), caption_words (min/mean/median/max), image sizes, and `problems` (duplicate images,
    duplicate captions). Bad shards raise (ShardError/EngineError) instead of being skipped.
    """
    paths = expand_shards(shards)
    df = build_catalog(paths, scheduler=scheduler, workers=workers)
    words = df["caption"].str.split().str.len()
    problems = []
    dup_img = int(df["sha256"].duplicated().sum())
    if dup_img:
        problems.append(f"{dup_img} sample(s) reuse an image already seen (same sha256)")
    dup_cap = int(df["caption"].duplicated().sum())
    if dup_cap:
        problems.append(f"{dup_cap} sample(s) repeat a caption already seen")
    unlabelled = int(df["label"].isna().sum())
    if unlabelled:
        problems.append(f"{unlabelled} sample(s) have no label in their json")
    return {
        "samples": int(len(df)),
        "shards": len(paths),
        "bytes": int(sum(Path(p).stat().st_size for p in paths)),
        "image_bytes": int(df["bytes"].sum()),
        "classes": class_counts(df),
        "caption_words": {"min": int(words.min()), "mean": round(float(words.mean()), 2),
                          "median": float(words.median()), "max": int(words.max())},
        "image_size": {"width_median": float(df["width"].median()), "height_median": float(df["height"].median())},
        "problems": problems,
    }
