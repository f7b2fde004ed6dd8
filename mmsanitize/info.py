"""`mmsanitize info`: a dataset's size, classes, caption statistics and problems."""

from __future__ import annotations

import os
from pathlib import Path

from .catalog import build_catalog, class_counts
from .labels import label_summary
from .shards import expand_shards


def dataset_info(shards: str | os.PathLike, *, scheduler: str | None = None, workers: int | None = None) -> dict:
    """Summarise a dataset from its catalog.

    Returns a dict: samples, shards, bytes (tar bytes on disk), image_bytes, classes (label ->
    count), labels (coverage of the json `label`: labelled, unlabelled, coverage, hint), caption_words
    (min/mean/median/max), image sizes, and `problems` (duplicate images, duplicate captions;
    missing labels are reported as coverage, not as a problem: crawled corpora have none). Bad shards raise (ShardError/EngineError) instead of being skipped.
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
    labels = label_summary(df["label"])
    return {
        "samples": int(len(df)),
        "shards": len(paths),
        "bytes": int(sum(Path(p).stat().st_size for p in paths)),
        "image_bytes": int(df["bytes"].sum()),
        "classes": class_counts(df),
        "caption_words": {"min": int(words.min()), "mean": round(float(words.mean()), 2),
                          "median": float(words.median()), "max": int(words.max())},
        "image_size": {"width_median": float(df["width"].median()), "height_median": float(df["height"].median())},
        "labels": {**labels, "hint": None if labels["unlabelled"] == 0 else
                   "samples without a json label can be labelled by --label-from keywords[:VOCAB] or "
                   "zeroshot[:CLASSES] --label-model REF (see mmsanitize poison --help)"},
        "problems": problems,
    }
