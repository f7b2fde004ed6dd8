"""Arrows point one way: evaluate never imports train (the shared batching code lives in batches)."""

from __future__ import annotations

import ast
from pathlib import Path

import mmsanitize

PKG = Path(mmsanitize.__file__).parent


def _imports(module: str) -> set[str]:
    tree = ast.parse((PKG / f"{module}.py").read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}


def test_train_and_evaluate_do_not_import_each_other_both_ways():
    assert "train" not in _imports("evaluate")
    assert "train" not in _imports("batches") and "evaluate" not in _imports("batches")
    assert "batches" in _imports("evaluate") and "batches" in _imports("train")
