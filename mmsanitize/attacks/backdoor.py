"""Backdoors (Carlini & Terzis 2022; BadNets/Blended/label-consistent as in CleanCLIP).

`patch` / `blended`: random images (of `--source` class if given, else of any class but the
target) get a trigger and a caption of the target class. `label-consistent`: images whose
captions already belong to the target class get the trigger; captions untouched.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError
from .plan import (PATTERNS, POSITIONS, AttackSpec, Edit, KeyPlacer, PoisonPlan, Trigger, pick,
                   poison_amount, rng_for)


def _trigger(spec: AttackSpec, kind: str, width: int, height: int, rng: np.random.Generator) -> Trigger:
    size = max(1, min(spec.trigger_size, int(width), int(height)))
    pos = spec.trigger_position
    if pos == "random":
        x, y = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
    else:
        x = {"left": 0, "right": width - size}.get(pos.split("-")[-1], (width - size) // 2)
        y = {"top": 0, "bottom": height - size}.get(pos.split("-")[0], (height - size) // 2)
    return Trigger(kind, size, int(x), int(y), spec.trigger_pattern, float(spec.opacity), int(spec.seed))


def plan_backdoor(catalog, spec: AttackSpec, masks: dict[str, np.ndarray]) -> PoisonPlan:
    """Plan a `patch`, `blended` or `label-consistent` backdoor toward the goal's target class.

    The goal is (source or "", target). The amount is `--count`, `--rate`, or `--source-fraction`
    of the pool (no default for patch/blended, whose pool is most of the dataset; 1.0 for
    label-consistent). Trigger positions are computed here from the catalog's image sizes.
    """
    if len(spec.goals) != 1:
        raise UsageError(f"{spec.attack} takes exactly one target class (--target CLASS)")
    (a, b), = spec.goals
    if a and a == b:
        raise UsageError(f"goal {a}2{b}: source and target class are the same")
    if spec.trigger_position not in POSITIONS:
        raise UsageError(f"--trigger-position must be one of {', '.join(POSITIONS)}")
    if spec.trigger_pattern not in PATTERNS:
        raise UsageError(f"--trigger-pattern must be one of {', '.join(PATTERNS)}")
    if spec.trigger_size < 1:
        raise UsageError("--trigger-size must be at least 1 px")
    if not 0 < spec.opacity <= 1:
        raise UsageError("--opacity must be in (0, 1]")
    kind = "patch" if spec.attack in ("patch", "label-consistent") else "blended"
    rng = rng_for(spec.seed, 0)
    target = masks[b]
    placer = KeyPlacer(catalog, spec.mode)
    rows = placer.rows
    width, height = catalog["width"].to_numpy(), catalog["height"].to_numpy()
    plan = PoisonPlan()
    if spec.attack == "label-consistent":
        n = poison_amount(spec, int(target.sum()), len(catalog), 1, 0, f"class-{b} samples")
        goal = f"{b}2{b}"
        for row in pick(target, n, rng):
            trig = _trigger(spec, kind, width[row], height[row], rng)
            shard, key, replaces = placer.place(row)
            edit = Edit(shard, key, replaces, rows.caption[row], rows.ref(row), rows.ref(row), trig)
            plan.add(edit, attack=spec.attack, goal=goal, mode=spec.mode, source=rows.ref(row))
        return plan
    pool = (masks[a] if a else np.ones(len(catalog), dtype=bool)) & ~target
    default = 1.0 if a else None
    n = poison_amount(spec, int(pool.sum()), len(catalog), 1, 0,
                      f"class-{a} samples" if a else f"non-{b} samples", default_fraction=default)
    goal = f"{a or 'any'}2{b}"
    image_rows = pick(pool, n, rng)
    caption_rows = np.flatnonzero(target)
    caption_rows = caption_rows[rng.integers(0, len(caption_rows), size=n)]
    for row, crow in zip(image_rows, caption_rows):
        trig = _trigger(spec, kind, width[row], height[row], rng)
        shard, key, replaces = placer.place(row)
        template = rows.ref(row) if spec.mode == "replace" else rows.ref(crow)
        edit = Edit(shard, key, replaces, rows.caption[crow], template, rows.ref(row), trig)
        plan.add(edit, attack=spec.attack, goal=goal, mode=spec.mode, source=rows.ref(crow))
    return plan
