"""Ownership of output folders: a verb writes only into an `--out` it owns.

An `--out` is owned when it is absent, empty, or carries the marker `.mmsanitize-out.json`
written by the same verb on the same input (`verb`, `input` = a content fingerprint of the input
shards). Anything else (a file, an unrelated folder, another verb's or another dataset's output,
the input folder itself or a folder inside it) is refused with one line before any work, so a
verb can never overwrite data it did not write. The marker also lists each input shard's sha256,
so an artifact (a scan, embeddings) used with other shards is refused (`check_artifact`). Free
space is checked up front for verbs that copy a dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

from .errors import UsageError, escape

MARKER = ".mmsanitize-out.json"


def inputs_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """A short content fingerprint of a list of input files (names, sizes, sha256s, in order)."""
    from .shards import file_fingerprint

    fps = [file_fingerprint(p) for p in paths]
    return hashlib.sha256(json.dumps(fps, sort_keys=True).encode()).hexdigest()[:32]


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def claim_out(out: str | os.PathLike, verb: str, inputs: list, *, overwrite: bool = False,
              need_bytes: int = 0, mark: bool = True, scratch: tuple = ()) -> Path:
    """Make sure `verb` may write into folder `out` for input files `inputs`; unless `mark` is
    False (the caller calls `mark_out` once its plan is valid), create it and write the marker.
    Entries named in `scratch` (a killed run's work area) do not make a folder non-empty.
    Returns the folder.

    Raises UsageError (one line, nothing written) when `out` is a file, is or lies inside an input's
    folder, is a non-empty folder without our marker, or carries the marker of another verb or (unless
    `overwrite`) another input; and when the file system has less than `need_bytes` free.
    """
    out = Path(out)
    shown = escape(out)
    resolved = out.resolve()
    for root in sorted({Path(p).resolve().parent for p in inputs}):
        if _inside(resolved, root):
            raise UsageError(f"--out {shown} is an input folder or inside one ({escape(root)}); "
                             "inputs are never written: choose another --out")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {shown} exists and is not a directory")
    fingerprint = inputs_fingerprint(inputs)
    marker = out / MARKER
    if out.is_dir() and any(p.name not in scratch for p in out.iterdir()):
        if not marker.is_file():
            raise UsageError(f"--out {shown} is a non-empty folder that mmsanitize {verb} did not write; "
                             "choose an absent or empty folder")
        try:
            owner = json.loads(marker.read_text())
            owner_verb, owner_input = owner["verb"], owner["input"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"--out {shown} has an unreadable {MARKER}; choose another --out") from None
        if owner_verb != verb:
            raise UsageError(f"--out {shown} holds the output of mmsanitize {escape(owner_verb)}, not {verb}; "
                             "choose another --out")
        if owner_input != fingerprint and not overwrite:
            raise UsageError(f"--out {shown} holds mmsanitize {verb} output of other input data; "
                             "choose another --out (or pass --overwrite where the verb has it)")
    check_free_space(out, need_bytes)
    if mark:
        mark_out(out, verb, inputs, fingerprint)
    return out


def mark_out(out: str | os.PathLike, verb: str, inputs: list, fingerprint: str | None = None) -> None:
    """Create `out` and write its ownership marker (after `claim_out(..., mark=False)` said yes)."""
    out = Path(out)
    marker = out / MARKER
    fingerprint = fingerprint or inputs_fingerprint(inputs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        from .shards import write_json_atomic

        from .shards import file_fingerprint

        shards = {Path(p).name: file_fingerprint(p)["sha256"] for p in inputs}
        write_json_atomic(marker, {"verb": verb, "input": fingerprint, "shards": shards})
    except OSError as e:
        raise UsageError(f"cannot write --out {escape(out)}: {escape(e.strerror or e)}") from None


def check_free_space(out: str | os.PathLike, need_bytes: int) -> None:
    """Raise UsageError when the file system that will hold `out` has less than `need_bytes` free."""
    if need_bytes <= 0:
        return
    probe = Path(out).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise UsageError(f"not enough free space for --out {escape(out)}: {free / 2**20:,.1f} MiB free, "
                         f"about {need_bytes / 2**20:,.1f} MiB needed")


def input_bytes(paths: Iterable[str | os.PathLike]) -> int:
    """Total size of input files (what a copying verb needs free, plus its parquet/stats)."""
    return sum(os.path.getsize(p) for p in paths)


def check_out_file(out: str | os.PathLike, what: str = "--out") -> Path:
    """For verbs whose --out is one file (evaluate's metrics.json): refuse a directory."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"{what} {escape(out)} is a directory; give a file path such as metrics.json")
    if out.exists() and not out.is_file():
        raise UsageError(f"{what} {escape(out)} is not a regular file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the folder of {what} {escape(out)}: {escape(e.strerror or e)}") from None
    return out


def check_seed(seed: int | None) -> None:
    """Seeds are non-negative integers (numpy's generators refuse negative ones)."""
    if seed is not None and (not isinstance(seed, int) or seed < 0 or seed >= 2**63):
        raise UsageError(f"--seed must be an integer in [0, 2**63), got {escape(seed)}")


def check_artifact(folder: str | os.PathLike, verb: str, paths: list, what: str) -> None:
    """Refuse (UsageError) to use `folder`, written by `verb`, with shards `paths` when its marker
    records a different content for any of them (same names and keys, other data)."""
    from .shards import file_fingerprint

    marker = Path(folder) / MARKER
    try:
        owner = json.loads(marker.read_text())
        recorded = owner.get("shards") or {}
    except (OSError, ValueError, AttributeError):
        return  # written before markers existed: nothing to compare
    if owner.get("verb") not in (verb, None):
        raise UsageError(f"{what} {escape(folder)} was written by mmsanitize {escape(owner.get('verb'))}, not {verb}")
    for p in paths:
        name = Path(p).name
        if name in recorded and recorded[name] != file_fingerprint(p)["sha256"]:
            raise UsageError(f"{what} {escape(folder)} was computed from another version of shard {escape(name)} "
                             "(content differs); recompute it for these shards")


def check_embeddings(emb_dir: str | os.PathLike, paths: list) -> None:
    """Validate an `--embeddings` folder before use: a valid model card, and per-shard done markers
    whose input fingerprint matches each shard's content."""
    from .models import read_card
    from .shards import file_fingerprint, read_stats, shard_stem

    emb_dir = Path(emb_dir)
    if not (emb_dir / "model.json").is_file():
        raise UsageError(f"{escape(emb_dir)} is not an embeddings folder (no model.json)")
    read_card(emb_dir / "model.json", need_base=False)
    check_artifact(emb_dir, "embed", paths, "--embeddings")
    for p in paths:
        stats = read_stats(emb_dir, f"embed_{shard_stem(p)}")
        if isinstance(stats, dict) and "input" in stats and stats["input"] != file_fingerprint(p):
            raise UsageError(f"--embeddings {escape(emb_dir)} were computed from another version of shard "
                             f"{escape(Path(p).name)} (content differs); recompute them for these shards")


def check_parquet(path: str | os.PathLike, what: str, columns: tuple = ()) -> None:
    """Refuse (UsageError) an input parquet (e.g. `--manifest`) that is missing, unreadable or lacks
    `columns`, before any work."""
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} {escape(p)} does not exist or is not a file")
    try:
        names = pq.read_schema(p).names
    except Exception as e:  # noqa: BLE001 - any arrow/parquet failure is a bad user file
        raise UsageError(f"{what} {escape(p)} is not a readable parquet file ({type(e).__name__})") from None
    missing = [c for c in columns if c not in names]
    if missing:
        raise UsageError(f"{what} {escape(p)} has no column {missing[0]!r}")
