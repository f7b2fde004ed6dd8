"""Common builder: ordered source items -> split shard folders `OUT/<split>/NNNNN.tar` via the Dask engine.

Each output shard is one Dask task that decodes, flattens alpha on white, resizes (longest side =
`image_size`, aspect kept) and stores JPEG at a fixed quality. Shards are numbered across splits
(ref 00000.., then train, then test) so keys `SSSSSIIII` are unique over the whole dataset.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..engine import map_shards
from ..errors import UsageError
from ..shards import Sample, ShardWriter, outputs_done, sha256, write_json_atomic, write_sizes
from .splits import assign_split, parse_splits, unit_hash

JPEG_QUALITY = 90
MAX_PIXELS = 40_000_000  # larger images are skipped unread (decompression-bomb guard)
BUILD_VERSION = 1


@dataclass(frozen=True)
class SourceItem:
    """One input sample: an image file `path` or raw 8-bit grey `pixels` of `shape` (h, w)."""

    source: str
    caption: str
    label: str | None
    path: str | None = None
    pixels: bytes | None = None
    shape: tuple[int, int] | None = None
    extra: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class BuildTask:
    """Write shard `index` (file `NNNNN.tar`) of one split from `items`."""

    name: str
    out_dir: str
    index: int
    items: tuple[SourceItem, ...]
    image_size: int
    spec: str


def load_image(item: SourceItem, image_size: int, max_pixels: int = MAX_PIXELS):
    """Decode an item to an RGB PIL image (alpha flattened on white) with longest side `image_size`.

    Raises ValueError with a short reason for unreadable files or images over `max_pixels`
    (checked from the header, before any pixel is decoded).
    """
    from PIL import Image

    if item.pixels is not None:
        h, w = item.shape
        im = Image.frombytes("L", (w, h), item.pixels)
    else:
        try:
            with warnings.catch_warnings():  # sizes over MAX_PIXELS are refused just below
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(item.path)
        except Image.DecompressionBombError as e:
            raise ValueError(f"decompression bomb, not decoded ({e})") from None
        except FileNotFoundError:
            raise ValueError("file not found") from None
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad data
            raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None
        w, h = im.size
        if w * h > max_pixels:
            im.close()
            raise ValueError(f"image declares {w}x{h} = {w * h:,} pixels > limit {max_pixels:,}, not decoded")
        try:
            im.load()
        except Exception as e:  # noqa: BLE001 - truncated or corrupt pixel data
            raise ValueError(f"undecodable image ({type(e).__name__}: {e})") from None
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    im = im.convert("RGB")
    w, h = im.size
    scale = image_size / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        im = im.resize(size, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    return im


def encode_jpeg(im) -> bytes:
    """JPEG bytes at the fixed quality, no metadata (deterministic for a given Pillow)."""
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
    return buf.getvalue()


def build_shard(task: BuildTask) -> dict:
    """Dask task: write one shard; returns its stats (count, classes, skipped items with reasons)."""
    classes: Counter = Counter()
    skipped = []
    samples = []
    for i, item in enumerate(task.items):
        key = f"{task.index:05d}{i:04d}"
        try:
            im = load_image(item, task.image_size)
        except ValueError as e:
            skipped.append({"source": item.source, "reason": str(e)})
            continue
        data = encode_jpeg(im)
        meta = {"key": key, "label": item.label, "source": item.source, "caption": item.caption,
                "width": im.size[0], "height": im.size[1], "sha256": sha256(data), "status": "success",
                **dict(item.extra)}
        samples.append(Sample(key, data, "jpg", item.caption, meta))
        classes[item.label or "<none>"] += 1
    name = f"{task.index:05d}"
    if not samples:
        return {"count": 0, "classes": {}, "skipped": skipped, "spec": task.spec}
    with ShardWriter(task.out_dir, name, {"spec": task.spec}) as w:
        for s in samples:
            w.write(s)
        w.stats_extra.update(classes=dict(sorted(classes.items())), skipped=skipped)
    return json.loads((Path(task.out_dir) / f"{name}_stats.json").read_text())


def _done(task: BuildTask) -> dict | None:
    return outputs_done(task.out_dir, f"{task.index:05d}", spec=task.spec)


def plan_tasks(items: list[SourceItem], out: Path, splits: list[tuple[str, float]], shard_size: int,
               image_size: int, seed: int) -> list[BuildTask]:
    """Assign items to splits (by hash of source id), then cut each split into shards in item order."""
    by_split: dict[str, list[SourceItem]] = {name: [] for name, _ in splits}
    for item in items:
        by_split[assign_split(item.source, splits, seed)].append(item)
    tasks = []
    index = 0
    for split, members in by_split.items():
        for start in range(0, len(members), shard_size):
            chunk = tuple(members[start:start + shard_size])
            h = hashlib.sha256(f"v{BUILD_VERSION}:{image_size}:{JPEG_QUALITY}:{MAX_PIXELS}".encode())
            for it in chunk:
                h.update(json.dumps([it.source, it.caption, it.label, it.path, list(it.extra)]).encode())
                h.update(it.pixels or b"")
            tasks.append(BuildTask(f"{split}/{index:05d}", str(out / split), index, chunk, image_size,
                                   h.hexdigest()))
            index += 1
    if index > 99999:
        raise UsageError("too many shards for 5-digit shard ids; raise --shard-size")
    return tasks


def build_items(
    items: list[SourceItem],
    out: str,
    *,
    dataset: str,
    splits: str,
    shard_size: int,
    image_size: int,
    limit: int | None = None,
    seed: int = 0,
    filtered: dict | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
) -> dict:
    """Write `items` as shards under `out/<split>/` plus `sizes.json` per split and `out/build_report.json`.

    `limit` keeps the `limit` items with the smallest seeded hash of their source id (a stable
    random subset). Finished shards of an identical earlier build are reused. Returns the report:
    `counts` (split -> class -> n), `samples` (split -> n), `skipped` (source, reason), `filtered`.
    Raises UsageError for bad splits, an empty input, or an output folder holding other shards.
    """
    split_list = parse_splits(splits)
    if not items:
        raise UsageError(f"{dataset}: no samples to build")
    sources = [it.source for it in items]
    if len(set(sources)) != len(sources):
        raise UsageError(f"{dataset}: two samples share a source id")
    if limit is not None and limit < len(items):
        keep = set(sorted(sources, key=lambda s: unit_hash(f"limit:{seed}:{s}"))[:limit])
        items = [it for it in items if it.source in keep]
    out_path = Path(out)
    tasks = plan_tasks(items, out_path, split_list, shard_size, image_size, seed)
    planned = {Path(t.out_dir) / f"{t.index:05d}.tar" for t in tasks}
    for split, _ in split_list:
        for tar in sorted((out_path / split).glob("*.tar")):
            if tar not in planned:
                raise UsageError(f"{tar} is not part of this build (a different earlier build?); "
                                 f"use an empty output folder")
    run = map_shards(build_shard, tasks, is_done=_done, scheduler=scheduler, workers=workers,
                     desc=f"build {dataset}")
    counts: dict[str, Counter] = {split: Counter() for split, _ in split_list}
    skipped = []
    for t in tasks:
        res = run.results[t.name]
        split = t.name.split("/")[0]
        counts[split].update(res.get("classes", {}))
        skipped.extend(res.get("skipped", []))
    for split, _ in split_list:
        if (out_path / split).is_dir():
            write_sizes(out_path / split)
    report = {
        "dataset": dataset,
        "splits": dict(split_list),
        "seed": seed,
        "image_size": image_size,
        "shard_size": shard_size,
        "jpeg_quality": JPEG_QUALITY,
        "max_pixels": MAX_PIXELS,
        "limit": limit,
        "samples": {s: sum(c.values()) for s, c in counts.items()},
        "shards": {s: sum(1 for t in tasks if t.name.startswith(s + "/")) for s, _ in split_list},
        "counts": {s: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for s, c in counts.items()},
        "filtered": filtered or {},
        "skipped": sorted(skipped, key=lambda d: d["source"]),
    }
    out_path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_path / "build_report.json", report)
    return report
