"""Who is "class A": a json field (the catalog's `label`), caption keywords, or a catalog column.

`label_from` is one of:
  - `field` (default): the `label` in each sample's json, as the catalog's `label` column;
  - `keywords` or `keywords:PATH`: whole-word match of the class name (or of the words listed for
    it in a vocabulary file) in the caption, case-insensitive, with simple plurals (-s, -es);
  - `column:NAME`: the values of catalog column NAME (e.g. `url`, or `label` carried through ingest);
  - `zeroshot` or `zeroshot:CLASSES`: the image's zero-shot class under a reference encoder
    (`label_model`), over CLASSES = a vocabulary file, `openclipart` (the project's vocabulary,
    the default) or a comma list; prompts are open_clip's templates (`zeroshot.DEFAULT_TEMPLATES`).
    Images whose top class beats the runner-up by less than a margin are labelled `unknown`.
    The labels are computed once per dataset by `attach_zeroshot` and cached in a folder the
    calling verb owns (under its `--out`).
A vocabulary file is JSON (`{"dog": ["dog", "puppy"], ...}`) or text lines `dog: dog, puppy`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from .errors import UsageError

LABEL_FROM_CHOICES = "field, keywords[:VOCAB_FILE], zeroshot[:CLASSES] (with --label-model REF) or column:NAME"
ZEROSHOT_COLUMNS = ("zeroshot_label", "zeroshot_confidence", "zeroshot_margin")
OPENCLIPART_VOCABULARY = Path(__file__).parent / "datasets" / "openclipart_classes.txt"


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

    lowered = pd.Series(captions, dtype="object").fillna("").astype(str).str.lower().to_numpy(dtype=object)
    out = np.full(len(lowered), -1, dtype=np.int64)
    todo = np.arange(len(lowered))  # captions without a class yet: the only ones a later class can take
    for i, words in enumerate(vocab.values()):
        if not len(todo):
            break
        hit = _lowered_mask(lowered[todo], words)
        out[todo[hit]] = i
        todo = todo[~hit]
    return out


def keyword_mask(captions, words: list[str]):
    """Boolean numpy mask: captions containing any of `words` as a whole word (or its -s/-es plural)."""
    alternatives = "|".join(re.escape(w.lower()) for w in words if w)
    pattern = rf"\b(?:{alternatives})(?:s|es)?\b"
    return captions.fillna("").str.lower().str.contains(pattern, regex=True).to_numpy()


def _lowered_mask(lowered, words: list[str]):
    """`keyword_mask` of captions already lower-cased, as an object array of str."""
    import pandas as pd

    alternatives = "|".join(re.escape(w.lower()) for w in words if w)
    pattern = rf"\b(?:{alternatives})(?:s|es)?\b"
    return pd.Series(lowered, dtype="object").str.contains(pattern, regex=True).to_numpy(dtype=bool)


def _column(catalog, label_from: str):
    if label_from == "field":
        return catalog["label"]
    if is_zeroshot(label_from):
        if "zeroshot_label" not in catalog.columns:
            raise UsageError(f"--label-from {label_from}: zero-shot labels were not computed for this catalog "
                             "(labels.attach_zeroshot)")
        return catalog["zeroshot_label"].astype("string")
    if label_from.startswith("column:"):
        name = label_from.split(":", 1)[1]
        if name not in catalog.columns:
            raise UsageError(f"--label-from {label_from}: the catalog has no column {name!r} "
                             f"(columns: {', '.join(map(str, catalog.columns))})")
        return catalog[name].astype("string")
    return None


def _check_label_from(label_from: str) -> None:
    if not (label_from == "field" or label_from.startswith("column:") or label_from == "keywords"
            or label_from.startswith("keywords:") or is_zeroshot(label_from)):
        raise UsageError(f"--label-from must be {LABEL_FROM_CHOICES}, not {label_from!r}")


def is_zeroshot(label_from: str) -> bool:
    """True for `zeroshot` and `zeroshot:CLASSES`."""
    return label_from == "zeroshot" or label_from.startswith("zeroshot:")


def zeroshot_class_names(label_from: str) -> list[str]:
    """The class list of `zeroshot[:CLASSES]`: a vocabulary file's classes (in file order),
    `openclipart` (default) or a comma list. Raises UsageError for fewer than two classes or a
    missing file."""
    spec = label_from.split(":", 1)[1].strip() if ":" in label_from else "openclipart"
    if spec == "openclipart":
        names = list(_vocabulary(str(OPENCLIPART_VOCABULARY)))
    elif Path(spec).is_file():
        names = list(_vocabulary(spec))
    elif "," in spec:
        names = list(dict.fromkeys(c.strip() for c in spec.split(",") if c.strip()))
    else:
        raise UsageError(f"--label-from {label_from}: {spec!r} is neither a vocabulary file, 'openclipart' "
                         "nor a comma list of class names")
    if len(names) < 2:
        raise UsageError(f"--label-from {label_from}: zero-shot labelling needs at least two classes")
    return names


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
    import numpy as np
    import pandas as pd

    _check_label_from(label_from)
    col = _column(catalog, label_from)
    vocab = _vocabulary(label_from.split(":", 1)[1]) if label_from.startswith("keywords:") else None
    masks = {}
    codes = names = None
    for cls in classes:
        if col is not None:
            if codes is None:  # each distinct label compared, not every row once per class
                codes, uniques = pd.factorize(col)  # missing labels: code -1
                names = pd.Series(uniques, dtype=object).astype("string")
            lut = np.append((names == cls).fillna(False).to_numpy(dtype=bool), False)
            mask = lut[codes]
        elif vocab is not None:
            mask = keyword_mask(catalog["caption"], vocab[cls]) if cls in vocab else None
        else:
            mask = keyword_mask(catalog["caption"], [cls])
        if mask is None or not mask.any():
            known = known_classes(catalog, label_from)
            listing = ", ".join(f"{k} ({v})" for k, v in list(known.items())[:30]) or "none"
            more = f", ... {len(known) - 30} more" if len(known) > 30 else ""
            raise UsageError(f"unknown class {cls!r} (labels from {label_from}); known classes: {listing}{more}; "
                             f"--label-from chooses the labelling: {LABEL_FROM_CHOICES}")
        masks[cls] = mask
    return masks


def attach_zeroshot(catalog, shards, label_from: str, *, label_model: str | None, cache_dir,
                    margin: float = 0.05, scheduler: str | None = None, workers: int | None = None,
                    retries: int = 1):
    """The catalog plus columns zeroshot_label, zeroshot_confidence, zeroshot_margin (rows aligned).

    Image embeddings come from `embed` (one Dask task per shard, resumable) into
    `cache_dir/embeddings`; class embeddings from `label_model`'s text tower over the open_clip
    templates; the assignment from `zeroshot.zeroshot_assign` (top-1 probability as confidence,
    `unknown` under `margin`). The table is cached as `cache_dir/zeroshot-HASH.parquet` (HASH of
    the model, classes, templates, margin and the catalog's keys and image hashes), so a rerun
    reads it. Raises UsageError without `label_model` (naming `mmsanitize align`).
    """
    import pandas as pd

    from .embed import embed, get_model, load_embeddings, model_hash
    from .shards import expand_shards, shard_stem, write_parquet_atomic
    from .zeroshot import DEFAULT_TEMPLATES, UNKNOWN, class_text_embeddings, zeroshot_assign

    if not label_model:
        raise UsageError(f"--label-from {label_from} needs --label-model REF, a reference encoder "
                         "(`mmsanitize align CLEAN_SHARDS --out runs/ref/` creates one; open_clip:NAME/PRETRAINED "
                         "also works)")
    classes = zeroshot_class_names(label_from)
    if UNKNOWN in classes:
        raise UsageError(f"--label-from {label_from}: {UNKNOWN!r} is reserved for images under the margin")
    paths = expand_shards(shards)
    cache_dir = Path(cache_dir)
    model = get_model(label_model)
    fingerprint = hashlib.sha256(json.dumps(
        {"model": model_hash(model.card()), "classes": classes, "templates": list(DEFAULT_TEMPLATES),
         "margin": float(margin), "rows": catalog[["key", "sha256"]].values.tolist()}).encode()).hexdigest()[:16]
    table_path = cache_dir / f"zeroshot-{fingerprint}.parquet"
    if table_path.exists():
        table = pd.read_parquet(table_path)
    else:
        emb_dir = cache_dir / "embeddings"
        card = emb_dir / "model.json"
        stale = card.exists() and model_hash(json.loads(card.read_text())) != model_hash(model.card())
        embed(paths, model=label_model, out=emb_dir, scheduler=scheduler, workers=workers, retries=retries,
              overwrite=stale)
        emb = load_embeddings(emb_dir, [shard_stem(p) for p in paths])
        idx, conf, gap = zeroshot_assign(emb.img, class_text_embeddings(model, classes), margin=margin)
        names = [*classes, UNKNOWN]  # index -1 -> unknown
        table = pd.DataFrame({"key": emb.meta["key"].astype(str).to_numpy(), "shard": emb.meta["shard"].to_numpy(),
                              "zeroshot_label": [names[i] for i in idx], "zeroshot_confidence": conf,
                              "zeroshot_margin": gap})
        write_parquet_atomic(table, table_path)
    merged = catalog.drop(columns=[c for c in ZEROSHOT_COLUMNS if c in catalog.columns]).merge(
        table[["key", "shard", *ZEROSHOT_COLUMNS]], on=["key", "shard"], how="left", validate="one_to_one")
    if merged["zeroshot_label"].isna().any():
        row = merged[merged["zeroshot_label"].isna()].iloc[0]
        raise UsageError(f"zero-shot labels in {table_path} miss shard {row['shard']} key {row['key']}")
    return merged


def label_summary(labels) -> dict:
    """Coverage of a label column: {"labelled", "unlabelled", "coverage"} (None / NaN / `unknown` unlabelled)."""
    import pandas as pd

    s = pd.Series(labels, dtype="object")
    ok = s.notna() & (s.astype(str) != "unknown")
    n = int(len(s))
    return {"labelled": int(ok.sum()), "unlabelled": n - int(ok.sum()), "coverage": (float(ok.mean()) if n else 0.0)}
