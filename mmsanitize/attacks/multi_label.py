"""Attack III (multiple target labels): several A→B goals at once, classes disjoint."""

from __future__ import annotations

import numpy as np

from .plan import AttackSpec, ImagePool, KeyPlacer, PoisonPlan, check_goals, dirty_label_goal


def plan_multi_label(catalog, spec: AttackSpec, masks: dict[str, np.ndarray],
                     pool: ImagePool | None = None) -> PoisonPlan:
    """Run the Attack II procedure for every goal, in the order given, each with its own seeded
    stream (seed, goal index).

    Rule for reused B images (differs from the reference code, which drops the reused B rows of
    the second goal only): no clean sample is ever dropped, for any goal — class-B samples keep
    their own captions, and their images are additionally paired with class-A captions. A sample
    already changed by an earlier goal is excluded from the pools of later goals (this only
    matters when labels overlap, e.g. keyword labels). With `pool` every goal's class-B images
    come from the pool (a pool image may serve several goals only if it is in several B classes).
    """
    check_goals(spec.goals, need=None)
    plan = PoisonPlan()
    placer = KeyPlacer(catalog, spec.mode)
    taken = np.zeros(len(catalog), dtype=bool)
    for i, (a, b) in enumerate(spec.goals):
        rows = dirty_label_goal(plan, catalog, spec, i, a, b, masks[a] & ~taken, masks[b] & ~taken,
                                placer, len(spec.goals), pool=pool)
        taken[rows] = True
    return plan
