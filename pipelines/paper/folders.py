"""Read what the verbs wrote into the run folders (the only source of the rendered numbers)."""

from __future__ import annotations

import json
from pathlib import Path


def load(path: Path) -> dict | None:
    """The JSON at `path`, or None when it is missing or half-written."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def rel(path: Path, work: Path) -> str:
    """`path` as `WORK/...` in backticks: how the results name a run folder."""
    return f"`WORK/{Path(path).relative_to(work)}`"


def history(folder: Path) -> list[dict]:
    """The per-epoch records of a train/defend folder that carry an evaluation."""
    p = Path(folder) / "history.jsonl"
    if not p.exists():
        return []
    return [r for r in (json.loads(x) for x in p.read_text().splitlines() if x.strip()) if "eval" in r]


def t2i(metrics: dict | None, goal: str) -> dict:
    """The text->image attack figures of `goal` in an evaluate result ({} when absent)."""
    return (((metrics or {}).get("attacks") or {}).get(goal) or {}).get("t2i") or {}


def utility(metrics: dict | None) -> dict:
    """The retrieval utility of an evaluate result ({} when absent)."""
    return (metrics or {}).get("utility") or {}
