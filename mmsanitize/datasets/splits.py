"""Deterministic splits: a sample goes to a named split chosen by a hash of its source id."""

from __future__ import annotations

import hashlib
import re

from ..errors import UsageError

DEFAULT_SPLITS = "ref=0.4,train=0.4,test=0.2"


def parse_splits(text: str) -> list[tuple[str, float]]:
    """Parse `name=fraction,...` (fractions summing to 1) into an ordered list of (name, fraction).

    Raises UsageError for a malformed entry, a repeated or unsafe name, a negative fraction or a
    total that is not 1.
    """
    out: list[tuple[str, float]] = []
    for part in (p.strip() for p in text.split(",")):
        name, eq, frac = part.partition("=")
        name = name.strip()
        if not eq or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise UsageError(f"--splits entry {part!r} is not NAME=FRACTION (e.g. {DEFAULT_SPLITS})")
        try:
            value = float(frac)
        except ValueError:
            raise UsageError(f"--splits entry {part!r}: {frac!r} is not a number") from None
        if value < 0:
            raise UsageError(f"--splits entry {part!r}: fraction must not be negative")
        if name in dict(out):
            raise UsageError(f"--splits names split {name!r} twice")
        out.append((name, value))
    total = sum(v for _, v in out)
    if abs(total - 1.0) > 1e-6:
        raise UsageError(f"--splits fractions sum to {total:g}, not 1")
    return out


def unit_hash(text: str) -> float:
    """A stable number in [0, 1) from the sha256 of `text`."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(source: str, splits: list[tuple[str, float]], seed: int = 0) -> str:
    """The split of the sample with source id `source`: the same id and seed always give the same split."""
    u = unit_hash(f"split:{seed}:{source}")
    acc = 0.0
    for name, frac in splits:
        acc += frac
        if u < acc:
            return name
    return next(name for name, frac in reversed(splits) if frac > 0)
