"""Dataset builders: turn local image collections into img2dataset-style shards split by source id."""

from __future__ import annotations

from .splits import DEFAULT_SPLITS

BUILDERS = ("openclipart", "fashion-mnist", "folder")


def build_dataset(
    name: str,
    out: str,
    *,
    splits: str = DEFAULT_SPLITS,
    shard_size: int = 1000,
    image_size: int | None = None,
    source: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    scheduler: str | None = None,
    workers: int | None = None,
) -> dict:
    """Build dataset `name` (openclipart, fashion-mnist or folder) into shard folders `out/<split>/`.

    `image_size` is the longest side of the stored images (builder default when None), `source`
    the input folder (builder default when None; required for `folder`), `limit` keeps a seeded
    subset of that many samples overall. Returns the build report: counts per split and class,
    skipped files with reasons, filtered counts. Raises UsageError when the source is missing.
    """
    from ..errors import UsageError
    from .build import build_items

    if name == "openclipart":
        from .openclipart import DEFAULT_IMAGE_SIZE, collect_items
    elif name == "fashion-mnist":
        from .fashion_mnist import DEFAULT_IMAGE_SIZE, collect_items
    elif name == "folder":
        from .folder import DEFAULT_IMAGE_SIZE, collect_items
    else:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(BUILDERS)}")
    if shard_size < 1 or shard_size > 9999:
        raise UsageError("--shard-size must be between 1 and 9999 (keys hold a 4-digit index)")
    if image_size is not None and image_size < 8:
        raise UsageError("--image-size must be at least 8")
    if limit is not None and limit < 1:
        raise UsageError("--limit must be at least 1")
    items, filtered = collect_items(source)
    return build_items(
        items, out, dataset=name, splits=splits, shard_size=shard_size,
        image_size=image_size or DEFAULT_IMAGE_SIZE, limit=limit, seed=seed, filtered=filtered,
        scheduler=scheduler, workers=workers,
    )
