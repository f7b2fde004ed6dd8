"""Attack I (single target image, "A2one"): class-A captions all paired with one image x*."""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from .plan import (AttackSpec, CatalogRows, Edit, ImagePool, KeyPlacer, PoisonPlan, pick, poison_amount,
                   rng_for)


def _pool_target(pool: ImagePool, key: str) -> int | None:
    cat = pool.catalog
    column = cat["origin_key"] if "origin_key" in cat.columns else cat["key"]
    hits = np.flatnonzero((column == key).to_numpy())
    return int(hits[0]) if len(hits) else None


def plan_single_image(catalog, spec: AttackSpec, masks: dict[str, np.ndarray],
                      pool: ImagePool | None = None) -> PoisonPlan:
    """Chosen class-A samples (fraction/count/rate, seeded) get the one target image.

    The target is `spec.target_key`, or a class-B image drawn with the seed (the paper: "randomly
    selected from the target class"). The manifest goal is written `A2one` as in the reference code.
    With `pool` the drawn target is a class-B image of the pool, and `target_key` is looked up in
    the pool first (its key, or for a folder pool the file's path in the folder), then in the dataset.
    """
    if len(spec.goals) != 1:
        raise UsageError("single-image takes exactly one source class (--source A, or --goal A2B)")
    (a, b), = spec.goals
    if a == b:
        raise UsageError(f"goal {a}2{b}: source and target class are the same")
    rng = rng_for(spec.seed, 0)
    image_catalog, origin = catalog, "dataset"
    if spec.target_key is not None:
        target = _pool_target(pool, spec.target_key) if pool is not None else None
        if target is not None:
            image_catalog, origin = pool.catalog, "pool"
        else:
            hits = np.flatnonzero((catalog["key"] == spec.target_key).to_numpy())
            if len(hits) == 0:
                where = "the image pool or the dataset" if pool is not None else "the dataset"
                raise UsageError(f"target key {spec.target_key!r} not found in {where}")
            target = int(hits[0])
    elif pool is not None:
        b_mask = pool.masks.get(b) if b else None
        if b_mask is None or not (b_mask & ~pool.masks[a]).any():
            raise UsageError(f"single-image needs at least one class-{b} image in the image pool to use as "
                             "the target (or give --target-key)")
        target = int(pick(b_mask & ~pool.masks[a], 1, rng)[0])
        image_catalog, origin = pool.catalog, "pool"
    else:
        b_mask = masks.get(b) if b else None
        if b_mask is None or not (b_mask & ~masks[a]).any():
            raise UsageError(f"single-image needs at least one class-{b} image to use as the target "
                             "(or give --target-key)")
        target = int(pick(b_mask & ~masks[a], 1, rng)[0])
    a_mask = masks[a].copy()
    if origin == "dataset":
        a_mask[target] = False
    n = poison_amount(spec, int(a_mask.sum()), len(catalog), 1, 0, f"class-{a} samples")
    placer = KeyPlacer(catalog, spec.mode)
    plan = PoisonPlan()
    rows = placer.rows
    image = CatalogRows(image_catalog).ref(target)
    for ar in pick(a_mask, n, rng):
        shard, key, replaces = placer.place(ar)
        edit = Edit(shard, key, replaces, rows.caption[ar], rows.ref(ar), image, image_origin=origin)
        plan.add(edit, attack=spec.attack, goal=f"{a}2one", mode=spec.mode, source=rows.ref(ar))
    return plan
