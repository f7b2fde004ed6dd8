"""A local folder of images with `captions.csv` or `captions.jsonl` (columns file, caption[, label])."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import UsageError
from .build import SourceItem

DEFAULT_IMAGE_SIZE = 256


def _rows(root: Path) -> list[dict]:
    csv_path, jsonl_path = root / "captions.csv", root / "captions.jsonl"
    if csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as f:
            return [dict(r) for r in csv.DictReader(f)]
    if jsonl_path.is_file():
        rows = []
        for n, line in enumerate(jsonl_path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{jsonl_path} line {n}: invalid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise UsageError(f"{jsonl_path} line {n}: expected an object")
                rows.append(row)
        return rows
    raise UsageError(f"{root} has no captions.csv or captions.jsonl (columns file, caption[, label])")


def collect_items(source: str | None = None) -> tuple[list[SourceItem], dict]:
    """Items for each row of the folder's captions file, in file order; returns (items, filtered counts).

    Rows with an empty caption are filtered (counted). Raises UsageError when the folder or
    captions file is missing, a row lacks `file`/`caption`, a file escapes the folder, or a file is
    listed twice. Unreadable or missing images are skipped later and listed in the build report.
    """
    if not source:
        raise UsageError("the folder builder needs --source DIR (a folder with captions.csv or captions.jsonl)")
    root = Path(source)
    if not root.is_dir():
        raise UsageError(f"--source {root}: no such folder")
    items = []
    filtered = {}
    seen = set()
    for n, row in enumerate(_rows(root), 1):
        if "file" not in row or "caption" not in row:
            raise UsageError(f"{root}: captions row {n} lacks a 'file' or 'caption' column")
        rel = str(row["file"]).strip()
        path = (root / rel).resolve()
        if not rel or root.resolve() not in path.parents:
            raise UsageError(f"{root}: captions row {n}: file {rel!r} is outside the folder")
        if rel in seen:
            raise UsageError(f"{root}: file {rel!r} is listed twice")
        seen.add(rel)
        caption = " ".join(str(row["caption"] or "").split())
        if not caption:
            filtered["empty caption"] = filtered.get("empty caption", 0) + 1
            continue
        label = row.get("label")
        label = str(label).strip() if label not in (None, "") else None
        items.append(SourceItem(rel, caption, label, path=str(path)))
    return items, filtered
