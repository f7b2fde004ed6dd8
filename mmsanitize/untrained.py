"""Guards against a meaningless scan: a reference model that was never trained, and a scan that
flags most of the dataset.

A fresh `offline-b0-minilm` has random projections and an `open_clip:NAME` without pretrained
weights is random throughout: every image–text cosine is noise, so the similarity cut flags
nearly every pair (measured: 100% of the pairs, exit 0, before this guard). `tiny` is the test
suite's fixed-seed model and stays allowed so tests can scan without training a model first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import UsageError

# more than this fraction flagged -> a warning in the scan summary
FLAGGED_WARN_FRACTION = 0.5
ALIGN_HINT = "train one with `mmsanitize align SHARDS --out REF` (or use open_clip:NAME/PRETRAINED)"


def untrained_reason(card: dict) -> str | None:
    """Why the model described by `card` (a model.json dict: base, checkpoint_sha256, training) has
    untrained weights, or None when it has trained ones."""
    base = str(card.get("base") or card.get("name") or "")
    if card.get("checkpoint_sha256") or card.get("training"):
        return None
    if base == "offline-b0-minilm":
        return "offline-b0-minilm as shipped has random projections (never aligned)"
    if base.startswith("open_clip:") and "/" not in base[len("open_clip:"):]:
        return f"{base} has random weights (no PRETRAINED tag or checkpoint)"
    return None


def model_card(model: str) -> dict:
    """The card of a model spec without building it: model.json of a checkpoint folder, or the spec."""
    path = Path(model)
    if path.is_dir():
        try:
            return json.loads((path / "model.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"base": str(model), "checkpoint_sha256": "unknown"}  # load_model reports the bad folder
    return {"base": str(model)}


def check_scan_model(*, model: str | None, embeddings: str | os.PathLike | None,
                     allow_untrained: bool = False) -> None:
    """Raise UsageError when a scan has no reference model, or one with untrained weights
    (unless `allow_untrained`)."""
    if model is None and embeddings is None:
        raise UsageError(f"give --model REF (a reference encoder: {ALIGN_HINT}) or --embeddings DIR")
    if allow_untrained:
        return
    card = model_card(model) if model is not None else None
    if card is None:
        try:
            card = json.loads((Path(embeddings) / "model.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return  # scan reports the folder that is not an embeddings folder
    why = untrained_reason(card)
    if why:
        src = f"--model {model}" if model is not None else f"embeddings {embeddings}"
        raise UsageError(f"{src}: {why}, so every cosine is noise and the scan would flag nearly every "
                         f"pair; {ALIGN_HINT}, or pass --allow-untrained")


def scan_warnings(samples: int, flagged: int) -> list[str]:
    """Warning lines for a scan summary (empty when nothing looks wrong)."""
    if samples and flagged / samples > FLAGGED_WARN_FRACTION:
        return [(f"flagged {flagged:,} of {samples:,} pairs ({flagged / samples:.1%}), more than half: the reference "
                 "model probably does not fit this data (was it aligned on similar pairs?) or the threshold is too high")]
    return []
