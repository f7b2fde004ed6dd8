"""Scan a dataset for poisoned pairs: embeddings -> detectors -> scores.parquet + summary.json.

Embeddings are computed per shard with the Dask engine (resumable) unless given; the detectors
then run over the whole dataset on the client, blockwise, with a FAISS/numpy index chosen by size.
Each detector is a function of a block of embeddings plus a small fitted state (class prototypes
and temperature, a near-duplicate radius, an index), recorded in summary.json. The combined score
sums the normal quantiles of each detector's empirical p-value (`combine_scores`).

What is flagged:
  - `threshold`: pairs whose image-text cosine is below it (the paper's filter), `auto` = GMM cut;
  - `flag_fraction`: the worst fraction by combined score (DataComp-style);
  - `reuse_min`: pairs whose image is shared with ≥ reuse_min other, different captions *and*
    whose own image–text cosine is below the median pair's: of the pairs sharing an image, the
    ones whose caption does not fit it. (Without that second condition the image's original,
    well-fitting pair is flagged too: measured 7–11% of clean pairs on OpenClipArt and
    Fashion-MNIST Attack II, against 2.5–5% with it.) `reuse_min="auto"` = 1 + the median
    count, so a dataset with five captions per image (COCO) needs a sixth caption to fire;
  - with `threshold`, class_consistency: the caption names a vocabulary class, the image's top
    class has p >= CLASS_TOP_PROB and the caption's class p < CLASS_MIN_PROB.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from .errors import ShardError, UsageError
from .shards import (expand_shards, file_fingerprint, json_bytes, shard_stem, write_json_atomic,
                     write_parquet_atomic)

DETECTORS = ("similarity", "class_consistency", "image_reuse", "caption_neighbours", "density", "kdistance")
# Chosen from measurements (docs/results_detection.md): an attacker who brings its own images or
# re-encodes them defeats image_reuse, so class_consistency (does the image show the class its
# caption names?) carries the dirty-label attacks, with similarity and image_reuse beside it.
# caption_neighbours inverts on Attack I (every poisoned caption shares one image, so its
# neighbourhood agrees with it); density and kdistance are meant for the suspect model's
# embeddings (backdoors). All stay available with --detectors.
DEFAULT_DETECTORS = ("similarity", "class_consistency", "image_reuse")
COMBINE = ("stouffer", "zsum", "mean", "max")
# class_consistency's auto rule: flag a pair when its caption names a class of the vocabulary, its
# image confidently shows another class (top class probability >= CLASS_TOP_PROB) and the
# probability of the caption's class is below CLASS_MIN_PROB. Chosen on development goals (fm
# trouser2sneaker, oca computer2flag, fresh pool images at 1% and 5%, and the clean train splits;
# never the goals results_detection.md reports), see docs/scanning.md: with every rule together it
# removes 3.3% (fm) / 5.3% (oca) of the clean train pairs where p < 0.03 with top >= 0.5 and any
# caption removed 3.8% / 7.6%; on fm it still recalls 0.92 (1%) and 1.00 (5%) of the poison.
CLASS_MIN_PROB = 0.03
CLASS_TOP_PROB = 0.7
SCAN_VERSION = 5


def parse_threshold(threshold) -> float | str | None:
    """`None`, "auto" or a float in [-1, 1] (a cosine); raises UsageError otherwise."""
    if threshold is None or threshold == "auto":
        return threshold
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        raise UsageError(f"--threshold must be a cosine in [-1, 1] or 'auto', not {threshold!r}") from None
    if not -1.0 <= t <= 1.0 or math.isnan(t):
        raise UsageError(f"--threshold {t} is outside [-1, 1] (it is a cosine similarity)")
    return t


def parse_reuse_min(value) -> int | str:
    """"auto" or an int >= 0 (0 = the image_reuse rule never fires); raises UsageError otherwise."""
    if value == "auto":
        return value
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--reuse-min must be an integer >= 0 or 'auto', not {value!r}") from None
    if v < 0:
        raise UsageError(f"--reuse-min must be >= 0, got {v}")
    return v


def rank_normalise(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties share their average rank); higher input -> higher output."""
    from scipy.stats import rankdata

    n = len(x)
    if n <= 1:
        return np.zeros(n, dtype=np.float64)
    return (rankdata(x, method="average") - 1.0) / (n - 1.0)


def robust_z(x: np.ndarray, *, sample: int = 200_000, seed: int = 0) -> tuple[np.ndarray, dict]:
    """(x − median) / (1.4826 · MAD), fitted on a seeded sample; returns (z, {"median", "scale"}).

    The median and MAD ignore a poisoned minority, so every detector lands on one scale whatever
    its units. The scale has a floor (1e-3 of the score's spread, at least 1e-6) so a mostly
    constant score (image_reuse counts) cannot divide by zero.
    """
    x = np.asarray(x, np.float64)
    fit = x if len(x) <= sample else x[np.random.default_rng(seed).choice(len(x), sample, replace=False)]
    if len(fit) == 0:
        return x.copy(), {"median": 0.0, "scale": 1.0}
    med = float(np.median(fit))
    mad = 1.4826 * float(np.median(np.abs(fit - med)))
    spread = float(np.quantile(fit, 0.99) - np.quantile(fit, 0.01))
    scale = max(mad, 1e-3 * spread, 1e-6)
    return (x - med) / scale, {"median": med, "scale": scale}


def normal_scores(x: np.ndarray, *, sample: int = 200_000, seed: int = 0) -> np.ndarray:
    """Each value's empirical upper-tail p-value, as a standard normal quantile (Φ⁻¹ of its
    mid-rank CDF), fitted on a seeded sample of at most `sample` values (the small global state a
    per-shard run needs). Ties share one value; the result lies within about ±4.5."""
    from scipy.stats import norm

    x = np.asarray(x, np.float64)
    fit = x if len(x) <= sample else x[np.random.default_rng(seed).choice(len(x), sample, replace=False)]
    ref = np.sort(fit)
    m = len(ref)
    if m == 0:
        return np.zeros(len(x))
    mid = 0.5 * (np.searchsorted(ref, x, "left") + np.searchsorted(ref, x, "right"))
    return norm.ppf((mid + 0.5) / (m + 1.0))


def combine_scores(scores: dict[str, np.ndarray], how: str = "stouffer", *, seed: int = 0) -> np.ndarray:
    """Combine detector scores (higher = more suspicious) into one.

    `stouffer` (default): each score becomes the normal quantile of its empirical p-value
    (`normal_scores`) and they are summed — Stouffer's combination of p-values. Every detector
    lands on one bounded scale, so neither a weak detector's noise nor a zero-inflated count
    (image_reuse: honest duplicates all score 1) can swamp a strong one. `zsum`: robust z-scores
    ((x − median) / 1.4826·MAD) clipped below at −3 and summed; unbounded above, so a count with
    MAD 0 dominates. `mean` / `max`: of the ranks scaled to [0, 1] (a plain mean of ranks lets an
    uninformative detector dilute an informative one). Measured on development sets in
    docs/scanning.md.
    """
    if how == "stouffer":
        return np.sum([normal_scores(s, seed=seed) for s in scores.values()], 0)
    if how == "zsum":
        return np.sum([np.clip(robust_z(s, seed=seed)[0], -3.0, None) for s in scores.values()], 0)
    ranks = np.stack([rank_normalise(s) for s in scores.values()], 1)
    if how == "mean":
        return ranks.mean(1)
    if how == "max":
        return ranks.max(1)
    raise UsageError(f"unknown --combine {how!r} (choose from {', '.join(COMBINE)})")


def check_classes(classes: str | None) -> None:
    """Raise UsageError unless `classes` is None, auto, openclipart, a file or a comma list of names."""
    from pathlib import Path as _P

    if classes in (None, "auto", "openclipart") or _P(classes).is_file():
        return
    names = [c.strip() for c in str(classes).split(",") if c.strip()]
    if not names or any("/" in c or c.endswith((".txt", ".json")) for c in names):
        raise UsageError(f"--classes {classes!r}: not a vocabulary file, 'auto', 'openclipart' or a comma list")


def caption_classes(captions, classes: str | None, labels=None) -> tuple[list[str], np.ndarray]:
    """The class vocabulary and each caption's class index (−1 = no class keyword).

    `classes`: "auto" (the dataset's own label names, matched as caption keywords), a vocabulary
    file (`class: word, word` lines or JSON), "openclipart" (the packaged OpenClipArt vocabulary),
    a comma list of class names, or None (no classes: class_consistency cannot run).
    """
    from pathlib import Path as _P

    from .labels import keyword_classes, load_vocabulary

    check_classes(classes)
    if classes is None:
        return [], np.full(len(captions), -1, np.int64)
    if classes == "auto":
        names = [] if labels is None else [str(c) for c in dict.fromkeys(labels) if c is not None and str(c) != "nan"]
        vocab = {c: [c] for c in sorted(names)}
    elif classes == "openclipart":
        vocab = load_vocabulary(str(_P(__file__).parent / "datasets" / "openclipart_classes.txt"))
    elif _P(classes).is_file():
        vocab = load_vocabulary(classes)
    else:
        vocab = {c: [c] for c in (c.strip() for c in str(classes).split(",")) if c}
    return list(vocab), keyword_classes(captions, vocab)


def run_detectors(
    img: np.ndarray,
    txt: np.ndarray,
    *,
    sha256: np.ndarray | None = None,
    captions: np.ndarray | None = None,
    caption_class: np.ndarray | None = None,
    class_names: list[str] | None = None,
    detectors: tuple[str, ...] = DETECTORS,
    k: int = 10,
    index_kind: str = "auto",
    seed: int = 0,
    index_dir: str | os.PathLike | None = None,
    ids=None,
    state: dict | None = None,
) -> dict[str, np.ndarray]:
    """Run the named detectors over L2-normalised float32 embeddings; returns name -> scores (N,).

    Builds the image and text indexes once (saved with `ids` to `index_dir` when given). The
    small global state each detector fits (class prototypes and temperature, near-duplicate
    radius) is written into `state` when given, for summary.json. class_consistency needs
    `caption_class` (see `caption_classes`) and is skipped (state["skipped"]) without it.
    """
    from .detectors import caption_neighbours, class_consistency, density, image_reuse, similarity
    from .index import build_index, save_indexes

    unknown = set(detectors) - set(DETECTORS)
    if unknown:
        raise UsageError(f"unknown detector(s) {', '.join(sorted(unknown))} (choose from {', '.join(DETECTORS)})")
    state = {} if state is None else state
    out: dict[str, np.ndarray] = {}
    need_index = any(d in detectors for d in ("image_reuse", "caption_neighbours")) or index_dir is not None
    image_index = build_index(img, kind=index_kind, seed=seed) if need_index else None
    text_index = build_index(txt, kind=index_kind, seed=seed) if need_index else None
    if index_dir is not None and ids is not None:
        save_indexes(index_dir, image_index, text_index, ids)
    if "similarity" in detectors:
        out["similarity"] = similarity.score(img, txt)
    if "class_consistency" in detectors:
        cls = None if caption_class is None else np.asarray(caption_class)
        if cls is None or not class_names or (cls >= 0).sum() == 0:
            state.setdefault("skipped", {})["class_consistency"] = (
                "no caption names a class: give --classes (a vocabulary file, a comma list or 'openclipart')")
        else:
            protos, present = class_consistency.caption_prototypes(txt, cls, len(class_names))
            if present.sum() < 2:
                state.setdefault("skipped", {})["class_consistency"] = "fewer than 2 classes with 3 or more captions"
            else:
                temp = class_consistency.fit_temperature(img, cls, protos, present, seed=seed)
                out["class_consistency"], p = class_consistency.assess(
                    img, txt, prototypes=protos, present=present, caption_class=cls, temperature=temp)
                state["class_consistency"] = {
                    "classes": [c for c, ok in zip(class_names, present) if ok], "temperature": temp,
                    "captions_with_class": float(np.mean(cls >= 0)),
                    "_image_class": p.argmax(1), "_image_prob": p.max(1), "_names": list(class_names),
                    "_caption_named": class_consistency.caption_named(cls, present)}
    if "image_reuse" in detectors:
        rad = image_reuse.calibrated_radius(img, image_index, seed=seed)
        state["image_reuse"] = rad
        out["image_reuse"] = image_reuse.score(img, txt, image_index=image_index, sha256=sha256, captions=captions,
                                               radius=rad["radius"])
    if "caption_neighbours" in detectors:
        out["caption_neighbours"] = caption_neighbours.score(img, txt, image_index=image_index,
                                                             text_index=text_index, k=k)
    if "density" in detectors:
        joint = density.joint(img, txt)
        out["density"] = density.score(joint, index=build_index(joint, kind=index_kind, seed=seed), k=k)
    if "kdistance" in detectors:
        union = build_index(np.concatenate([img, txt]), kind=index_kind, seed=seed)
        out["kdistance"] = density.kdistance(img, txt, index=union, k=max(k, 16))
        state["kdistance"] = {"method": "1 - cos of the image's k-th neighbour among all images and captions "
                                        "(Huang et al. 2025)", "k": max(k, 16)}
    return out


def detection_metrics(scores: np.ndarray, flagged: np.ndarray | None, truth: np.ndarray) -> dict:
    """AUROC, precision@k (k = number of poisoned) and, given `flagged`, precision/recall."""
    from sklearn.metrics import roc_auc_score

    truth = truth.astype(bool)
    n_pos = int(truth.sum())
    m: dict = {}
    m["auroc"] = float(roc_auc_score(truth, scores)) if 0 < n_pos < len(truth) else None
    if n_pos:
        top = np.argsort(-scores, kind="stable")[:n_pos]
        m["precision_at_k"] = float(truth[top].mean())
    if flagged is not None:
        tp = int((flagged & truth).sum())
        m["flagged"] = int(flagged.sum())
        m["precision"] = float(tp / flagged.sum()) if flagged.any() else None
        m["recall"] = float(tp / n_pos) if n_pos else None
    return m


def _top_fraction(x: np.ndarray, fraction: float) -> np.ndarray:
    n = int(round(fraction * len(x)))
    mask = np.zeros(len(x), dtype=bool)
    mask[np.argsort(-x, kind="stable")[:n]] = True
    return mask


def _check_model(card: dict, model: str) -> None:
    from .embed import get_model, model_hash

    want = get_model(model).card()
    if model_hash(card) != model_hash(want):
        raise UsageError(f"embeddings were made with model {card.get('name')!r} "
                         f"(checkpoint {str(card.get('checkpoint_sha256'))[:12]}), not --model {model!r}")


def _params_hash(params: dict) -> str:
    return hashlib.sha256(json_bytes(params)).hexdigest()[:16]


def scan(
    shards: str | os.PathLike | list,
    *,
    out: str | os.PathLike,
    threshold: float | str | None = None,
    flag_fraction: float | None = None,
    embeddings: str | os.PathLike | None = None,
    model: str | None = None,
    manifest: str | os.PathLike | None = None,
    detectors: tuple[str, ...] = DEFAULT_DETECTORS,
    combine: str = "stouffer",
    classes: str | None = "auto",
    reuse_min: int | str = "auto",
    k: int = 10,
    index_kind: str = "auto",
    seed: int = 0,
    scheduler: str | None = None,
    workers: int | None = None,
    batch_size: int = 64,
    overwrite: bool = False,
    allow_untrained: bool = False,
) -> dict:
    """Scan shards and write `out/scores.parquet`, `out/summary.json`, `out/index/` and
    `out/scan_NNNNN_stats.json` markers; returns the summary dict.

    `threshold`: cosine (flag pairs below it) or "auto"; `flag_fraction`: flag the worst fraction
    by combined score; at least one is required. Without `embeddings` they are computed with
    `model` into `out/embeddings/` (resumable per shard). `classes` names the class vocabulary of
    class_consistency (see `caption_classes`). A finished scan with the same inputs and
    parameters is not recomputed. A model with untrained weights is refused unless
    `allow_untrained`; `summary["warnings"]` lists what looks wrong (e.g. most pairs flagged).
    Raises UsageError/ShardError on bad input.
    """
    import pandas as pd

    from .catalog import build_catalog
    from .embed import embed as run_embed
    from .embed import load_embeddings

    from .untrained import check_scan_model, scan_warnings

    check_scan_model(model=model, embeddings=embeddings, allow_untrained=allow_untrained)
    threshold = parse_threshold(threshold)
    reuse_min = parse_reuse_min(reuse_min)
    if threshold is None and flag_fraction is None:
        raise UsageError("give --threshold (a cosine or 'auto') and/or --flag-fraction")
    if flag_fraction is not None and not 0.0 <= flag_fraction <= 1.0:
        raise UsageError(f"--flag-fraction {flag_fraction} is outside [0, 1]")
    check_classes(classes)
    if combine not in COMBINE:
        raise UsageError(f"unknown --combine {combine!r} (choose from {', '.join(COMBINE)})")
    paths = expand_shards(shards)
    names = [shard_stem(p) for p in paths]
    out = Path(out)
    from .outputs import check_embeddings, check_seed, claim_out

    check_seed(seed)
    if embeddings is not None:
        check_embeddings(embeddings, paths)
    claim_out(out, "scan", paths, overwrite=overwrite)

    if embeddings is None:
        if model is None:
            raise UsageError("give --embeddings or --model (to compute embeddings)")
        embeddings = out / "embeddings"
        run_embed(paths, model=model, out=embeddings, scheduler=scheduler, workers=workers,
                  batch_size=batch_size, overwrite=overwrite)
    emb_dir = Path(embeddings)
    if not (emb_dir / "model.json").exists():
        raise UsageError(f"{emb_dir} is not an embeddings folder (no model.json)")
    card = json.loads((emb_dir / "model.json").read_text())
    if model is not None:
        _check_model(card, model)

    params = {"version": SCAN_VERSION, "threshold": threshold, "flag_fraction": flag_fraction,
              "detectors": list(detectors), "combine": combine, "classes": classes,
              "class_rule": [CLASS_MIN_PROB, CLASS_TOP_PROB], "reuse_min": reuse_min, "k": k,
              "index_kind": index_kind, "seed": seed, "model": card,
              "inputs": [file_fingerprint(p) for p in paths],
              "embeddings": [file_fingerprint(emb_dir / "img_emb" / f"img_emb_{n}.npy")
                             for n in names if (emb_dir / "img_emb" / f"img_emb_{n}.npy").exists()],
              "manifest": file_fingerprint(manifest) if manifest else None}
    phash = _params_hash(params)
    previous = _previous_scan(out, names, phash)
    if previous is not None and not overwrite:
        return previous

    cat = build_catalog(paths, scheduler=scheduler, workers=workers)
    emb = load_embeddings(emb_dir, names)
    _check_rows(emb.meta, cat, names)

    sha = cat["sha256"].to_numpy()
    caps = cat["caption"].to_numpy(dtype=object)
    ids = cat[["key", "shard"]]
    labels = cat["label"].to_numpy(dtype=object) if "label" in cat.columns else None
    class_names, caption_class = caption_classes(caps, classes, labels) if "class_consistency" in detectors \
        else ([], None)
    state: dict = {}
    scores = run_detectors(emb.img, emb.txt, sha256=sha, captions=caps, caption_class=caption_class,
                           class_names=class_names, detectors=tuple(detectors), k=k, index_kind=index_kind,
                           seed=seed, index_dir=out / "index", ids=ids, state=state)
    combined = combine_scores(scores, combine, seed=seed)
    n = len(combined)
    cos = 1.0 - scores["similarity"] if "similarity" in scores else None

    fired: dict[str, np.ndarray] = {}
    thresholds: dict = {}
    if threshold is not None:
        if cos is None:
            raise UsageError("--threshold needs the similarity detector")
        if threshold == "auto":
            from .detectors.similarity import auto_threshold

            fit = auto_threshold(cos, seed=seed)
            thresholds["similarity_auto"] = fit
            t = fit["threshold"]
        else:
            t = float(threshold)
        thresholds["similarity"] = t
        fired["similarity"] = cos < t
    if threshold is not None and "class_consistency" in scores:
        thresholds["class_consistency"] = {"caption_class_prob_below": CLASS_MIN_PROB,
                                           "image_top_class_prob_at_least": CLASS_TOP_PROB,
                                           "caption_names_a_class": True}
        cc_state = state["class_consistency"]
        fired["class_consistency"] = ((np.exp(-scores["class_consistency"].astype(np.float64)) < CLASS_MIN_PROB)
                                      & (cc_state["_image_prob"] >= CLASS_TOP_PROB) & cc_state["_caption_named"])
    if reuse_min == "auto":
        reuse_min = int(np.median(scores["image_reuse"])) + 1 if "image_reuse" in scores and n else 1
        thresholds["image_reuse_auto"] = True
    if "image_reuse" in scores and reuse_min > 0:
        thresholds["image_reuse"] = reuse_min
        fired["image_reuse"] = scores["image_reuse"] >= reuse_min
        if cos is not None:
            thresholds["image_reuse_cosine_below"] = float(np.median(cos))
            fired["image_reuse"] &= cos < thresholds["image_reuse_cosine_below"]
    top = None
    if flag_fraction is not None:
        thresholds["flag_fraction"] = flag_fraction
        top = _top_fraction(combined, flag_fraction)
        for name, s in scores.items():
            fired.setdefault(name, np.zeros(n, bool))
            fired[name] = fired[name] | (top & _top_fraction(s, flag_fraction))
    flagged = np.zeros(n, dtype=bool)
    for f in fired.values():
        flagged |= f
    if top is not None:
        flagged |= top
    cc_state = state.get("class_consistency", {})
    reasons = _reasons(scores, fired, flagged, top, thresholds, cc_state, caption_class)

    df = pd.DataFrame({"key": cat["key"].to_numpy(), "shard": cat["shard"].to_numpy()})
    for name, s in scores.items():
        df[name] = s.astype(np.float32)
    if cos is not None:
        df["cosine"] = cos.astype(np.float32)
    df["combined"] = combined.astype(np.float32)
    df["flagged"] = flagged
    df["reason"] = reasons
    write_parquet_atomic(df, out / "scores.parquet")

    summary = {"samples": n, "flagged": int(flagged.sum()), "fraction_flagged": float(flagged.mean()) if n else 0.0,
               "thresholds": thresholds, "detectors": list(scores), "combine": combine,
               "flagged_by": {k_: int(v.sum()) for k_, v in fired.items()}, "model": card.get("name"),
               "embeddings": str(emb_dir), "index": {"kind": _kind_used(n, index_kind), "k": k},
               "detector_state": {name: {k_: v for k_, v in st.items() if not k_.startswith("_")}
                                  if isinstance(st, dict) else st for name, st in state.items()},
               "params_hash": phash}
    summary["warnings"] = scan_warnings(n, int(flagged.sum()))
    if manifest:
        summary["detection"] = _manifest_metrics(manifest, df, scores, combined, fired, flagged)
    for name in names:
        part = df[df["shard"] == f"{name}.tar"]
        write_json_atomic(out / f"scan_{name}_stats.json",
                          {"count": len(part), "flagged": int(part["flagged"].sum()), "params_hash": phash})
    write_json_atomic(out / "summary.json", summary)
    return summary


def _kind_used(n: int, kind: str) -> str:
    from .index import choose_kind

    return choose_kind(n, kind)


def _previous_scan(out: Path, names: list[str], phash: str) -> dict | None:
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if summary.get("params_hash") != phash or not (out / "scores.parquet").exists():
        return None
    for n in names:
        try:
            if json.loads((out / f"scan_{n}_stats.json").read_text()).get("params_hash") != phash:
                return None
        except (FileNotFoundError, json.JSONDecodeError):
            return None
    return summary


def _check_rows(meta, cat, names: list[str]) -> None:
    """Embeddings must have one row per shard sample, same keys, same order."""
    for n in names:
        shard = f"{n}.tar"
        e = meta.loc[meta["shard"] == shard, "key"].to_numpy()
        c = cat.loc[cat["shard"] == shard, "key"].to_numpy()
        if len(e) != len(c):
            raise ShardError(shard, f"embeddings have {len(e)} rows but the shard has {len(c)} samples "
                                    "(stale embeddings? re-run embed)")
        bad = np.nonzero(e != c)[0]
        if len(bad):
            raise ShardError(shard, f"embedding row {bad[0]} is key {e[bad[0]]}, shard has {c[bad[0]]}",
                             key=str(c[bad[0]]))


def _reasons(scores, fired, flagged, top, thresholds, cc_state=None, caption_class=None) -> list[str]:
    n = len(flagged)
    out = [""] * n
    names = (cc_state or {}).get("_names", [])
    for i in np.nonzero(flagged)[0]:
        parts = []
        for name, f in fired.items():
            if not f[i]:
                continue
            v = float(scores[name][i])
            if name == "similarity" and "similarity" in thresholds:
                parts.append(f"similarity: cos {1 - v:.3f} < {thresholds['similarity']:.3f}")
            elif name == "image_reuse":
                below = thresholds.get("image_reuse_cosine_below")
                fit = ", its caption fits it worse than the median pair" if below is not None else ""
                parts.append(f"image_reuse: image shared with {int(v)} other captions{fit}")
            elif name == "class_consistency" and cc_state:
                shown = names[int(cc_state["_image_class"][i])]
                told = int(caption_class[i]) if caption_class is not None else -1
                cap = (f"caption says {names[told]!r}" if cc_state["_caption_named"][i]
                       else "caption is closest to another class")
                parts.append(f"class_consistency: image looks like {shown!r} (p {float(cc_state['_image_prob'][i]):.2f}), "
                             f"{cap} (p {np.exp(-v):.3f})")
            else:
                parts.append(f"{name}: {v:.3f} (top {thresholds.get('flag_fraction', 0):.1%})")
        if not parts and top is not None and top[i]:
            parts.append(f"combined rank in top {thresholds['flag_fraction']:.1%}")
        out[i] = "; ".join(parts)
    return out


def _manifest_metrics(manifest, df, scores, combined, fired, flagged) -> dict:
    import pandas as pd

    try:
        man = pd.read_parquet(manifest)
    except Exception as e:
        raise UsageError(f"cannot read manifest {manifest}: {e}") from None
    if "key" not in man.columns:
        raise UsageError(f"manifest {manifest} has no 'key' column")
    truth = df["key"].isin(set(man["key"])).to_numpy()
    res = {"poisoned": int(truth.sum()), "poisoned_in_manifest": int(len(man))}
    for name, s in scores.items():
        res[name] = detection_metrics(s, fired.get(name), truth)
    res["combined"] = detection_metrics(combined, flagged, truth)
    return res
