"""Who is "class A": a json field (the catalog's `label`), caption keywords, or a catalog column.

`label_from` is one of:
  - `field` (default): the `label` in each sample's json, as the catalog's `label` column;
  - `keywords` or `keywords:PATH`: whole-word match of the class name (or of the words listed for
    it in a vocabulary file) in the caption, case-insensitive, with simple plurals (-s, -es);
  - `column:NAME`: the values of catalog column NAME.
A vocabulary file is JSON (`{"dog": ["dog", "puppy"], ...}`) or text lines `dog: dog, puppy`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import UsageError


def _vocabulary(path: str) -> dict[str, list[str]]:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"vocabulary file {path} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            return {str(k): [str(w) for w in (v if isinstance(v, list) else [v])] for k, v in data.items()}
    except json.JSONDecodeError:
        pass
    vocab: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cls, _, words = line.partition(":")
        cls = cls.strip()
        listed = [w.strip() for w in words.split(",") if w.strip()]
        vocab[cls] = list(dict.fromkeys([cls, *listed]))  # the class name itself always matches
    return vocab


def load_vocabulary(path: str) -> dict[str, list[str]]:
    """Class -> keywords from a vocabulary file (JSON or `class: word, word` lines); the class name
    itself is always one of its keywords. Raises UsageError when the file is missing."""
    return _vocabulary(path)


def keyword_classes(captions, vocab: dict[str, list[str]]):
    """Per caption, the index (in `vocab` order) of the first class whose keyword it contains as a
    whole word (or its -s/-es plural), else -1. Returns an int64 numpy array."""
    import numpy as np
    import pandas as pd

    caps = pd.Series(captions, dtype="object").fillna("").astype(str)
    out = np.full(len(caps), -1, dtype=np.int64)
    for i, words in enumerate(vocab.values()):
        hit = keyword_mask(caps, words) & (out < 0)
        out[hit] = i
    return out


def keyword_mask(captions, words: list[str]):
    """Boolean numpy mask: captions containing any of `words` as a whole word (or its -s/-es plural)."""
    alternatives = "|".join(re.escape(w.lower()) for w in words if w)
    pattern = rf"\b(?:{alternatives})(?:s|es)?\b"
    return captions.fillna("").str.lower().str.contains(pattern, regex=True).to_numpy()


def _column(catalog, label_from: str):
    if label_from == "field":
        return catalog["label"]
    if label_from.startswith("column:"):
        name = label_from.split(":", 1)[1]
        if name not in catalog.columns:
            raise UsageError(f"--label-from {label_from}: the catalog has no column {name!r} "
                             f"(columns: {', '.join(map(str, catalog.columns))})")
        return catalog[name].astype("string")
    return None


def _check_label_from(label_from: str) -> None:
    if not (label_from == "field" or label_from.startswith("column:") or label_from == "keywords"
            or label_from.startswith("keywords:")):
        raise UsageError(f"--label-from must be field, keywords, keywords:VOCAB_FILE or column:NAME, not {label_from!r}")


def known_classes(catalog, label_from: str = "field") -> dict[str, int]:
    """Class name -> number of samples, largest first, under the given labelling rule."""
    _check_label_from(label_from)
    col = _column(catalog, label_from)
    if col is None:
        if ":" in label_from:
            vocab = _vocabulary(label_from.split(":", 1)[1])
        else:  # no vocabulary: the dataset's own label names, matched as caption keywords
            vocab = {str(c): [str(c)] for c in catalog["label"].dropna().unique()}
        counts = {c: int(keyword_mask(catalog["caption"], w).sum()) for c, w in vocab.items()}
    else:
        counts = {str(k): int(v) for k, v in col.dropna().astype(str).value_counts().items()}
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def class_masks(catalog, classes, label_from: str = "field") -> dict:
    """Boolean numpy masks (aligned with catalog rows) for each class name in `classes`.

    Raises UsageError for a class with no samples, listing the known classes with their counts.
    """
    _check_label_from(label_from)
    col = _column(catalog, label_from)
    vocab = _vocabulary(label_from.split(":", 1)[1]) if label_from.startswith("keywords:") else None
    masks = {}
    for cls in classes:
        if col is not None:
            mask = (col.astype("string") == cls).fillna(False).to_numpy(dtype=bool)
        elif vocab is not None:
            mask = keyword_mask(catalog["caption"], vocab[cls]) if cls in vocab else None
        else:
            mask = keyword_mask(catalog["caption"], [cls])
        if mask is None or not mask.any():
            known = known_classes(catalog, label_from)
            listing = ", ".join(f"{k} ({v})" for k, v in list(known.items())[:30]) or "none"
            more = f", ... {len(known) - 30} more" if len(known) > 30 else ""
            raise UsageError(f"unknown class {cls!r} (labels from {label_from}); known classes: {listing}{more}")
        masks[cls] = mask
    return masks
