"""The image pool of `poison --images-from SPEC`: class-B images from outside the dataset.

SPEC is shards (a directory of `.tar`, one `.tar`, a brace pattern or glob — see
`shards.expand_shards`) or a folder of images in the `folder` builder's layout (`captions.csv` or
`captions.jsonl` with columns file, caption[, label]). A folder is first copied into temporary
shards under the poison output's private work area (image files byte for byte, no resizing), so
both kinds are read the same way afterwards: catalogued with the Dask engine (the catalog parts
also live in the work area — the pool's own folder is never written), labelled with the
dataset's `--label-from` rule, and read by the poison tasks at their catalogued byte ranges.

Every pool sample whose image sha256 equals the sha256 of a dataset image is excluded (the pool
must be outside the dataset); how many were excluded is reported.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

FOLDER_SHARD_SIZE = 1000
POOL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class LoadedPool:
    """A catalogued pool: `catalog` (usable rows, with `origin_shard`/`origin_key` columns naming
    each image as the manifest will), shard file name -> path, and the poison.json summary."""

    catalog: object
    paths: dict
    info: dict


def is_folder(spec: str) -> bool:
    """True when `spec` is a folder holding `captions.csv` or `captions.jsonl` (the folder layout)."""
    p = Path(spec)
    return "{" not in spec and p.is_dir() and ((p / "captions.csv").is_file() or (p / "captions.jsonl").is_file())


def pool_roots(spec: str) -> list[Path]:
    """The folders a pool spec reads from (for the check that the output is outside them).

    Raises UsageError when the spec is neither a folder with a captions file nor shards."""
    from ..shards import expand_shards

    if is_folder(spec):
        return [Path(spec)]
    p = Path(spec)
    if p.is_dir() and not any(p.glob("*.tar")):
        raise UsageError(f"--images-from {spec}: neither shards (*.tar) nor a folder with captions.csv or "
                         "captions.jsonl (columns file, caption[, label])")
    try:
        paths = expand_shards(spec)
    except UsageError as e:
        raise UsageError(f"--images-from: {e}") from None
    return sorted({q.parent for q in paths})


def _folder_shards(folder: Path, work: Path) -> tuple[list[Path], dict]:
    """Write the folder's images (bytes unchanged) as shards in `work`; returns (paths, key -> file)."""
    from PIL import Image

    from ..datasets.folder import collect_items
    from ..shards import Sample, ShardWriter, image_size, sha256

    items, _ = collect_items(str(folder))
    if not items:
        raise UsageError(f"--images-from {folder}: the captions file lists no image with a caption")
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("*.tar"):
        old.unlink()
    paths, files = [], {}
    for start in range(0, len(items), FOLDER_SHARD_SIZE):
        name = f"{start // FOLDER_SHARD_SIZE:05d}"
        with ShardWriter(work, name) as w:
            for j, item in enumerate(items[start:start + FOLDER_SHARD_SIZE]):
                key = f"{name}{j:04d}"
                try:
                    data = Path(item.path).read_bytes()
                except OSError as e:
                    raise UsageError(f"--images-from {folder}: cannot read {item.source}: {e.strerror}") from None
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        fmt = im.format
                except Exception:  # Pillow raises many types for bad data
                    fmt = None
                if fmt not in POOL_FORMATS:
                    raise UsageError(f"--images-from {folder}: {item.source} is not a JPEG, PNG or WebP image"
                                     + (f" ({fmt})" if fmt else ""))
                width, height = image_size(data, str(folder), item.source)
                meta = {"key": key, "caption": item.caption, "label": item.label, "file": item.source,
                        "width": width, "height": height, "sha256": sha256(data)}
                w.write(Sample(key, data, POOL_FORMATS[fmt], item.caption, meta))
                files[key] = item.source
        paths.append(work / f"{name}.tar")
    return paths, files


def load_pool(spec: str, *, work_dir: str | Path, dataset_sha256, scheduler=None, workers=None,
              retries: int = 1) -> LoadedPool:
    """Catalogue the pool `spec` (shards or folder) using `work_dir` for temporary files, drop the
    samples whose image is bytes-equal to a dataset image (`dataset_sha256`: iterable of hex
    digests), and return the usable rows. Raises UsageError for a bad spec or an empty pool."""
    from ..catalog import build_catalog
    from ..shards import expand_shards

    work = Path(work_dir)
    roots = pool_roots(spec)
    if is_folder(spec):
        folder = roots[0]
        paths, files = _folder_shards(folder, work / "folder")
        kind = "folder"
    else:
        paths, files, kind = expand_shards(spec), None, "shards"
    catalog = build_catalog(paths, scheduler=scheduler, workers=workers, retries=retries,
                            cache_dir=work / "catalog")
    if kind == "folder":
        catalog["origin_shard"] = str(roots[0].resolve())
        catalog["origin_key"] = [files[k] for k in catalog["key"]]
    else:
        resolved = {p.name: str(p.resolve()) for p in paths}
        catalog["origin_shard"] = [resolved[s] for s in catalog["shard"]]
        catalog["origin_key"] = catalog["key"]
    fingerprint = hashlib.sha256(json.dumps(
        catalog[["origin_shard", "origin_key", "sha256", "caption", "label"]].values.tolist(),
        default=str).encode()).hexdigest()[:16]
    duplicate = catalog["sha256"].isin(set(dataset_sha256)).to_numpy()
    usable = catalog[~duplicate].reset_index(drop=True)
    info = {
        "spec": spec,
        "kind": kind,
        "roots": [str(r.resolve()) for r in roots],
        "shards": None if kind == "folder" else [p.name for p in paths],
        "fingerprint": fingerprint,
        "samples": int(len(catalog)),
        "excluded_duplicates": int(duplicate.sum()),
        "usable": int(len(usable)),
    }
    if usable.empty:
        raise UsageError(f"--images-from {spec}: all {len(catalog)} pool images are copies of dataset images; "
                         "the pool must hold images from outside the dataset")
    return LoadedPool(usable, {p.name: str(p) for p in paths}, info)
