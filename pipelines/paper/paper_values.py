"""The paper's numbers from the config (`paper:`) as table rows that sit beside ours."""

from __future__ import annotations

from .config import Config


def paper_rows(cfg: Config, section: str, goal: int | None = None) -> list[dict]:
    """Rows of `paper.SECTION` labelled 'paper: MODEL'; with `goal` (1-based) only that goal's rows
    (rows without a goal apply to every goal)."""
    rows = (cfg.paper.get(section) or {}).get("rows", [])
    return [{k: (f"paper: {v}" if k == "model" else v) for k, v in r.items() if k != "goal"}
            for r in rows if goal is None or r.get("goal", goal) == goal]


def paper_source(cfg: Config, section: str) -> str:
    """'Paper: SOURCE. NOTES' for `paper.SECTION`, or '' when the config has none."""
    p = cfg.paper.get(section) or {}
    if not p:
        return ""
    return " ".join(x for x in (f"Paper rows: {p['source']}." if p.get("source") else "",
                                p.get("notes", "").strip()) if x)


def paper_value(cfg: Config, section: str, model: str, column: str):
    """One number of the paper (None when the config does not carry it)."""
    for r in (cfg.paper.get(section) or {}).get("rows", []):
        if r.get("model") == model:
            return r.get(column)
    return None
