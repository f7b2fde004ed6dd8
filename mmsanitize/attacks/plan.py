"""The shared vocabulary of attacks: the spec they take, the plan they return, and helpers.

A PoisonPlan is a list of Edits (one per poisoned sample) plus one manifest row per edit. An Edit
names where the new sample goes (output shard + key, replacing a key or appended), its caption,
the sample whose json is the template for its metadata, the sample whose image it carries (in the
input dataset, or with `poison --images-from` in an image pool outside it), an optional trigger to
stamp on that image and an optional per-copy perturbation (`poison --perturb`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError

MODES = ("replace", "inject")
POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center", "random")
PATTERNS = ("checkerboard", "noise")


@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger: a `size` px patch at (x, y) or a full-image noise pattern blended at `opacity`."""

    kind: str  # "patch" | "blended"
    size: int = 16
    x: int = 0
    y: int = 0
    pattern: str = "checkerboard"
    opacity: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class Edit:
    """One poisoned sample to write; sample references are (shard file name, key).

    `template` is always a sample of the input dataset; `image_source` is one of the dataset
    (`image_origin` "dataset") or of the image pool (`image_origin` "pool"). `perturb` is a
    `perturb.Perturbation` (kind, seed, copy index) or None.
    """

    shard: str
    key: str
    replaces: str | None
    caption: str
    template: tuple[str, str]
    image_source: tuple[str, str]
    trigger: Trigger | None = None
    image_origin: str = "dataset"
    perturb: object = None


@dataclass(frozen=True)
class ImagePool:
    """Class-B images from outside the dataset (`poison --images-from`): the pool's catalog rows
    that may be used (copies of dataset images already removed) and one boolean mask per class,
    aligned with those rows (all False for a class the pool does not have)."""

    catalog: object
    masks: dict


@dataclass(frozen=True)
class AttackSpec:
    """Everything an attack needs besides the catalog and class masks."""

    attack: str
    goals: tuple[tuple[str, str], ...] = ()
    mode: str = "replace"
    seed: int = 0
    source_fraction: float | None = None
    count: int | None = None
    rate: float | None = None
    target_key: str | None = None
    trigger_size: int = 16
    trigger_position: str = "bottom-right"
    trigger_pattern: str = "checkerboard"
    opacity: float = 0.1
    caption_only: bool = False


@dataclass
class PoisonPlan:
    """Edits and their manifest rows (same order)."""

    edits: list[Edit] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)

    def add(self, edit: Edit, *, attack: str, goal: str, mode: str, source: tuple[str, str]) -> None:
        """Append an edit and its manifest row (`source` = the sample whose caption is used; an
        edit with a trigger adds its fields as `trigger_*` columns)."""
        self.edits.append(edit)
        row = {
            "key": edit.key, "shard": edit.shard, "attack": attack, "goal": goal,
            "source_shard": source[0], "source_key": source[1],
            "image_source_shard": edit.image_source[0], "image_source_key": edit.image_source[1],
            "image_origin": edit.image_origin, "caption": edit.caption, "mode": mode,
        }
        if edit.trigger is not None:  # trigger_kind, _size, _x, _y, _pattern, _opacity, _seed
            row.update({f"trigger_{k}": v for k, v in vars(edit.trigger).items()})
        self.rows.append(row)

    def by_shard(self) -> dict[str, list[Edit]]:
        """Edits grouped by output shard file name."""
        out: dict[str, list[Edit]] = {}
        for e in self.edits:
            out.setdefault(e.shard, []).append(e)
        return out


def goal_name(source: str, target: str) -> str:
    """`dog`, `boat` -> `dog2boat`."""
    return f"{source}2{target}"


def rng_for(seed: int, *salt: int) -> np.random.Generator:
    """A numpy Generator derived from the user seed and a salt (e.g. the goal index)."""
    return np.random.default_rng([int(seed), *[int(s) for s in salt]])


def poison_amount(spec: AttackSpec, available: int, n_total: int, n_goals: int, goal_index: int,
                  what: str, default_fraction: float | None = 1.0) -> int:
    """How many samples one goal poisons.

    `--count N` is per goal; `--rate R` is poisoned pairs over the whole output dataset, split
    evenly across goals (replace: R*|D|; inject: R*|D|/(1-R), as the injected pairs join D);
    `--source-fraction F` is a fraction of the `available` class-A samples (paper's knob).
    Raises UsageError when the amount is zero or larger than `available`.
    """
    if spec.count is not None:
        n = int(spec.count)
        how = f"--count {spec.count}"
    elif spec.rate is not None:
        r = float(spec.rate)
        if spec.mode == "inject" and r >= 1:
            raise UsageError("--rate 1 is impossible with --mode inject (the clean samples stay)")
        total = r * n_total / (1 - r) if spec.mode == "inject" else r * n_total
        total = int(round(total))
        n = total // n_goals + (1 if goal_index < total % n_goals else 0)
        how = f"--rate {spec.rate}"
    else:
        frac = spec.source_fraction if spec.source_fraction is not None else default_fraction
        if frac is None:
            raise UsageError(f"attack {spec.attack} needs --count, --rate or --source-fraction")
        n = int(math.floor(frac * available + 0.5))
        how = f"--source-fraction {frac}"
    if n <= 0:
        raise UsageError(f"{how} selects no sample ({available} {what} available)")
    if n > available:
        raise UsageError(f"{how} asks for {n} samples but only {available} {what} are available")
    return n


def pick(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` distinct row indices drawn without replacement from the True rows of `mask`, in draw order."""
    idx = np.flatnonzero(mask)
    return idx[rng.permutation(len(idx))[:n]]


def cycle_images(b_idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """The reference code's B-image list, seeded: every B image ⌊n/|B|⌋ times, plus a random
    sample of n mod |B| more, then shuffled."""
    b_idx = np.sort(b_idx)
    reps, extra = divmod(n, len(b_idx))
    out = np.concatenate([np.tile(b_idx, reps), rng.choice(b_idx, size=extra, replace=False)])
    return out[rng.permutation(len(out))]


class ArrowStrings:
    """Row -> str of an Arrow-backed string column (`read_catalog(..., arrow_strings=...)`), one
    value converted per lookup (~1 µs) instead of a Python str made for every row up front."""

    def __init__(self, column):
        self.values = column.array.__arrow_array__()

    def __getitem__(self, row) -> str:
        return self.values[row].as_py()


class CatalogRows:
    """Catalog rows by position: their (shard, key) and caption, read from numpy views of the
    columns (a pandas lookup per poisoned sample costs tens of microseconds: seconds per 10,000s)."""

    def __init__(self, catalog):
        import pandas as pd

        self.shard = catalog["shard"].to_numpy()
        self.key = catalog["key"].to_numpy()
        self.caption = None
        if "caption" in catalog.columns:
            column = catalog["caption"]
            self.caption = ArrowStrings(column) if isinstance(column.dtype, pd.ArrowDtype) else column.to_numpy()

    def ref(self, row: int) -> tuple[str, str]:
        """(shard, key) of row `row`."""
        return self.shard[row], self.key[row]


class KeyPlacer:
    """Where a poisoned sample goes: in place (replace) or appended round-robin with a fresh key (inject).

    New keys look like the dataset's own: the shard stem followed by a running 4-digit index
    that continues after the shard's samples, skipping any key already used anywhere.
    """

    def __init__(self, catalog, mode: str):
        self.mode = mode
        self.turn = 0
        self.rows = CatalogRows(catalog)
        if mode == "replace":  # keys stay: no key index needed
            return
        self.shards = list(dict.fromkeys(catalog["shard"]))
        self.used = set(catalog["key"])
        self.next_index = catalog.groupby("shard", sort=False).size().to_dict()

    def place(self, row: int) -> tuple[str, str, str | None]:
        """(output shard, key, replaced key or None) for the sample built from catalog row `row`."""
        if self.mode == "replace":
            shard, key = self.rows.ref(row)
            return shard, key, key
        shard = self.shards[self.turn % len(self.shards)]
        self.turn += 1
        stem = shard[:-4] if shard.endswith(".tar") else shard
        while True:
            key = f"{stem}{self.next_index[shard]:04d}"
            self.next_index[shard] += 1
            if key not in self.used:
                self.used.add(key)
                return shard, key, None


def check_goals(goals, need: int | None = 1) -> None:
    """Raise UsageError unless there are `need` goals (None: at least one) with A != B, classes disjoint."""
    if need is not None and len(goals) != need:
        raise UsageError(f"this attack takes exactly {need} goal (got {len(goals)}); use multi-label for several")
    if not goals:
        raise UsageError("no goal given: use --goal A2B or --source A --target B")
    seen: list[str] = []
    for a, b in goals:
        if a == b:
            raise UsageError(f"goal {a}2{b}: source and target class are the same")
        for c in (a, b):
            if c in seen:
                raise UsageError(f"class {c!r} appears in two goals; goals must use disjoint classes")
            seen.append(c)


def dirty_label_goal(plan: PoisonPlan, catalog, spec: AttackSpec, goal_index: int, a: str, b: str,
                     a_mask: np.ndarray, b_mask: np.ndarray, placer: KeyPlacer, n_goals: int,
                     pool: ImagePool | None = None) -> list[int]:
    """Attack II for one goal (A2B): chosen class-A captions paired with class-B images.

    Samples in both masks belong to neither pool. Returns the catalog rows whose sample was
    changed (replace) or used as caption source. With `spec.caption_only` the pairs are made by
    giving class-B samples class-A captions instead (each B sample at most once). With `pool`,
    the class-B images are the pool's (its class-B rows that are not also class A), drawn by the
    same procedure and seeded stream as dataset images.
    """
    rng = rng_for(spec.seed, goal_index)
    a_only, b_only = a_mask & ~b_mask, b_mask & ~a_mask
    if pool is not None:
        pool_b = pool.masks[b] & ~pool.masks[a]
        if not pool_b.any():
            raise UsageError(f"goal {a}2{b}: the image pool has no class-{b} image to pair with")
    elif not b_only.any():
        raise UsageError(f"goal {a}2{b}: no class-{b} image to pair with")
    n = poison_amount(spec, int(a_only.sum()), len(catalog), n_goals, goal_index, f"class-{a} samples")
    a_rows = pick(a_only, n, rng)
    goal = goal_name(a, b)
    rows = placer.rows
    if spec.caption_only:
        if n > b_only.sum():
            raise UsageError(f"caption-only pairing needs {n} class-{b} samples, only {int(b_only.sum())} exist")
        b_rows = pick(b_only, n, rng)
        for ar, br in zip(a_rows, b_rows):
            shard, key = rows.ref(br)
            edit = Edit(shard, key, key, rows.caption[ar], (shard, key), (shard, key))
            plan.add(edit, attack=spec.attack, goal=goal, mode="replace", source=rows.ref(ar))
        return list(b_rows)
    if pool is not None:
        b_rows = cycle_images(np.flatnonzero(pool_b), n, rng)
        images, origin = CatalogRows(pool.catalog), "pool"
    else:
        b_rows = cycle_images(np.flatnonzero(b_only), n, rng)
        images, origin = rows, "dataset"
    for ar, br in zip(a_rows, b_rows):
        shard, key, replaces = placer.place(ar)
        edit = Edit(shard, key, replaces, rows.caption[ar], rows.ref(ar), images.ref(br), image_origin=origin)
        plan.add(edit, attack=spec.attack, goal=goal, mode=spec.mode, source=rows.ref(ar))
    return list(a_rows)
