"""Attack II (single target label, "A2B"): class-A captions re-paired with class-B images."""

from __future__ import annotations

import numpy as np

from .plan import AttackSpec, ImagePool, KeyPlacer, PoisonPlan, check_goals, dirty_label_goal


def plan_single_label(catalog, spec: AttackSpec, masks: dict[str, np.ndarray],
                      pool: ImagePool | None = None) -> PoisonPlan:
    """The reference code's Attack II, seeded.

    A fraction (or count, or rate) of class-A samples is drawn; a list of class-B images of the
    same length is built (each B image ⌊n_A/n_B⌋ times plus a seeded sample of the remainder,
    shuffled with the seed) and paired with them. Captions are unchanged; in replace mode the
    chosen A samples lose their own image (dataset size unchanged), in inject mode the pairs are
    appended with new keys. Class-B samples keep their own clean captions. With `pool` the
    class-B images come from the pool instead of the dataset.
    """
    check_goals(spec.goals, need=1)
    (a, b), = spec.goals
    plan = PoisonPlan()
    dirty_label_goal(plan, catalog, spec, 0, a, b, masks[a], masks[b], KeyPlacer(catalog, spec.mode), 1,
                     pool=pool)
    return plan
