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

import contextlib
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from .errors import ShardError, UsageError
from .shards import (expand_shards, file_fingerprint, json_bytes, shard_stem, write_json_atomic)

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
SCAN_VERSION = 7
# The client's budget: seeded samples of at most FIT_SAMPLE values per detector (thresholds, the
# combination's references); every other per-pair array lives in one shard's task.
FIT_SAMPLE = 200_000
# IVF kNN: FAISS returns REFINE_FACTOR·k candidates by their SQ8 codes, re-ranked exactly. With
# nprobe max(64, nlist/64) this recalled 0.9995 of the exact top 10 at 1M pairs (0.9733 in SQ8
# order; the old nprobe 31: 0.907, 0.920 re-ranked), docs/scale.md.
REFINE_FACTOR = 2


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


def fit_reference(sample: np.ndarray, how: str) -> dict:
    """The small state `combine_with` needs for one detector, from a seeded sample of its scores:
    the sorted sample (stouffer, mean, max) or the robust median and scale (zsum)."""
    sample = np.asarray(sample, np.float64)
    if how == "zsum":
        return robust_z(sample, sample=len(sample) + 1)[1]
    return {"sorted": np.sort(sample)}


def combine_with(scores: dict[str, np.ndarray], how: str, refs: dict[str, dict]) -> np.ndarray:
    """`combine_scores` for one shard's rows against references fitted on a sample of the whole
    dataset (`fit_reference`); equal to `combine_scores` when every sample is the whole dataset."""
    from scipy.stats import norm

    parts = []
    for name, x in scores.items():
        x = np.asarray(x, np.float64)
        ref = refs[name]
        if how == "zsum":
            parts.append(np.clip((x - ref["median"]) / ref["scale"], -3.0, None))
            continue
        r = ref["sorted"]
        m = len(r)
        lo, hi = np.searchsorted(r, x, "left"), np.searchsorted(r, x, "right")
        if how == "stouffer":
            parts.append(norm.ppf((0.5 * (lo + hi) + 0.5) / (m + 1.0)) if m else np.zeros(len(x)))
        else:
            parts.append((lo + 0.5 * (hi - lo - 1)) / max(m - 1.0, 1.0) if m > 1 else np.zeros(len(x)))
    if how == "stouffer" or how == "zsum":
        return np.sum(parts, 0)
    if how == "mean":
        return np.stack(parts, 1).mean(1)
    if how == "max":
        return np.stack(parts, 1).max(1)
    raise UsageError(f"unknown --combine {how!r} (choose from {', '.join(COMBINE)})")


def check_classes(classes: str | None) -> None:
    """Raise UsageError unless `classes` is None, auto, openclipart, a file or a comma list of names."""
    from pathlib import Path as _P

    if classes in (None, "auto", "openclipart") or _P(classes).is_file():
        return
    names = [c.strip() for c in str(classes).split(",") if c.strip()]
    if not names or any("/" in c or c.endswith((".txt", ".json")) for c in names):
        raise UsageError(f"--classes {classes!r}: not a vocabulary file, 'auto', 'openclipart' or a comma list")


def class_vocabulary(classes: str | None, labels=None) -> dict[str, list[str]]:
    """The class vocabulary {class: keywords} for `classes` (see `caption_classes`); `labels`
    are the dataset's label names (used by "auto")."""
    from pathlib import Path as _P

    from .labels import load_vocabulary

    check_classes(classes)
    if classes is None:
        return {}
    if classes == "auto":
        names = [] if labels is None else [str(c) for c in dict.fromkeys(labels) if c is not None and str(c) != "nan"]
        return {c: [c] for c in sorted(names)}
    if classes == "openclipart":
        return load_vocabulary(str(_P(__file__).parent / "datasets" / "openclipart_classes.txt"))
    if _P(classes).is_file():
        return load_vocabulary(classes)
    return {c: [c] for c in (c.strip() for c in str(classes).split(",")) if c}


def caption_classes(captions, classes: str | None, labels=None) -> tuple[list[str], np.ndarray]:
    """The class vocabulary and each caption's class index (−1 = no class keyword).

    `classes`: "auto" (the dataset's own label names, matched as caption keywords), a vocabulary
    file (`class: word, word` lines or JSON), "openclipart" (the packaged OpenClipArt vocabulary),
    a comma list of class names, or None (no classes: class_consistency cannot run).
    """
    from .labels import keyword_classes

    vocab = class_vocabulary(classes, labels)
    if not vocab:
        return [], np.full(len(captions), -1, np.int64)
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
    knn_reference: int = 200_000,
    seed: int = 0,
    scheduler: str | None = None,
    workers: int | None = None,
    batch_size: int = 64,
    overwrite: bool = False,
    allow_untrained: bool = False,
    fit_sample: int = FIT_SAMPLE,
) -> dict:
    """Scan shards and write `out/scores.parquet`, `out/summary.json`, `out/index/` and per-shard
    `out/scores_NNNNN.parquet` + `out/scan_NNNNN_stats.json`; returns the summary dict.

    `threshold`: cosine (flag pairs below it) or "auto"; `flag_fraction`: flag the worst fraction
    by combined score; at least one is required. `embeddings`: our `embed` output or a
    clip-retrieval folder (joined to the shards by key); without it they are computed with
    `model` into `out/embeddings/` (resumable per shard). `classes` names the class vocabulary of
    class_consistency (see `caption_classes`). caption_neighbours, density and kdistance find
    neighbours among all pairs up to `knn_reference` pairs, above that among a seeded sample of
    `knn_reference` pairs (`reference.py`; 0 = always all pairs). Every per-pair computation is
    a Dask task per shard; the client keeps only seeded samples of at most `fit_sample` values per detector, the
    class sums and the rows whose image hash repeats. A killed scan resumes where it stopped; a
    finished one with the same inputs and parameters is not recomputed. A model with untrained
    weights is refused unless `allow_untrained`; `summary["warnings"]` lists what looks wrong (e.g.
    most pairs flagged). Raises UsageError/ShardError on bad input, before anything is written.
    """
    import pandas as pd  # noqa: F401  (imported here, in the main thread, before Dask's threads need it)

    from . import scan_tasks as T
    from .catalog import CatalogTask, _part_done, catalog_dir, catalog_shard
    from .emb_folder import join_clip, layout, model_card
    from .embed import embed as run_embed
    from .engine import Call, dask_client, gather_calls, map_shards, submit_call
    from .index import choose_kind

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
    detectors = tuple(detectors)
    unknown = set(detectors) - set(DETECTORS)
    if unknown or not detectors:
        raise UsageError(f"unknown detector(s) {', '.join(sorted(unknown)) or '(none)'} "
                         f"(choose from {', '.join(DETECTORS)})")
    if threshold is not None and "similarity" not in detectors:
        raise UsageError("--threshold needs the similarity detector")
    if k < 1:
        raise UsageError(f"-k must be >= 1, got {k}")
    if knn_reference < 0 or 0 < knn_reference <= max(k, 16) + 2:
        raise UsageError(f"--knn-reference must be 0 (all pairs) or more than {max(k, 16) + 2}, got {knn_reference}")
    choose_kind(1, index_kind)
    paths = expand_shards(shards)
    names = [shard_stem(p) for p in paths]
    if len(set(names)) != len(names):
        raise UsageError("two shards share a name; shard names must be unique")
    truth_keys = _read_manifest(manifest) if manifest else None
    if embeddings is not None:
        embeddings = Path(embeddings).resolve()
        emb_layout = layout(embeddings)
        if emb_layout == "own" and model is not None:
            _check_model(json.loads((embeddings / "model.json").read_text()), model)
    from .outputs import check_embeddings, check_seed, claim_out

    check_seed(seed)
    if embeddings is not None and emb_layout == "own":
        check_embeddings(embeddings, paths)
    out = claim_out(Path(out).resolve(), "scan", paths, overwrite=overwrite)

    if embeddings is None:
        embeddings = out / "embeddings"
        emb_layout = "own"
        run_embed(paths, model=model, out=embeddings, scheduler=scheduler, workers=workers,
                  batch_size=batch_size, overwrite=overwrite)
    card = model_card(embeddings)
    if emb_layout == "own":
        emb_files = [embeddings / "img_emb" / f"img_emb_{n}.npy" for n in names]
    else:
        from .emb_folder import clip_parts

        emb_files = [f for part in clip_parts(embeddings) for f in part[1:]]
    params = {"version": SCAN_VERSION, "threshold": threshold, "flag_fraction": flag_fraction,
              "detectors": list(detectors), "combine": combine, "classes": classes,
              "class_rule": [CLASS_MIN_PROB, CLASS_TOP_PROB], "reuse_min": reuse_min, "k": k,
              "index_kind": index_kind, "knn_reference": knn_reference, "seed": seed, "model": card,
              "fit_sample": fit_sample,
              "inputs": [file_fingerprint(p) for p in paths],
              "embeddings": [file_fingerprint(f) for f in emb_files if f.exists()],
              "manifest": file_fingerprint(manifest) if manifest else None}
    phash = _params_hash(params)
    previous = _previous_scan(out, names, phash)
    if previous is not None and not overwrite:
        return previous

    work = out / "work"
    work.mkdir(exist_ok=True)

    def phase(fn, desc, marker=None, groups=None):
        # one task per shard, or per group of shards ((first, end) positions: named by the first)
        tasks = [T.ShardTask(n, i, state) for i, n in enumerate(names)] if groups is None else \
            [T.ShardTask(names[a], g, state) for g, (a, _) in enumerate(groups)]
        done = None if overwrite else (lambda t: T.done_marker(work, marker, t.name, phash))
        return map_shards(fn, tasks, is_done=done, client=client, desc=f"scan: {desc}")

    with contextlib.ExitStack() as stack:
        client = stack.enter_context(dask_client(scheduler, workers))
        cdir = catalog_dir(paths)
        ctasks = [CatalogTask(n, str(p), str(cdir)) for n, p in zip(names, paths)]
        cres = map_shards(catalog_shard, ctasks, is_done=_part_done, client=client, desc="catalog")
        counts = [int(cres.results[n]["count"]) for n in names]
        offsets = np.r_[0, np.cumsum(counts)].astype(np.int64)
        n_total = int(offsets[-1])
        catalog_parts = [str(cdir / f"{n}.parquet") for n in names]
        if emb_layout == "clip":
            join_clip(embeddings, names, catalog_parts, work, client)
            files = [(work / "emb" / f"img_{n}.npy", work / "emb" / f"text_{n}.npy", work / "emb" / f"meta_{n}.parquet")
                     for n in names]
        else:
            files = [(embeddings / "img_emb" / f"img_emb_{n}.npy", embeddings / "text_emb" / f"text_emb_{n}.npy",
                      embeddings / "metadata" / f"metadata_{n}.parquet") for n in names]
            for n, fs in zip(names, files):
                missing = [str(f) for f in fs if not f.exists()]
                if missing:
                    raise ShardError(f"{n}.tar", f"no embeddings in {embeddings} (missing {missing[0]})")
        import pyarrow.parquet as pq

        has_url = any("url" in pq.read_schema(f[2]).names for f in files)
        need_cc = "class_consistency" in detectors
        dups, labels = _catalog_groups(names, catalog_parts, offsets, client, need_cc and classes == "auto", work)
        vocab = class_vocabulary(classes, labels) if need_cc else {}
        kind = choose_kind(n_total, index_kind)
        knn_kinds = (["text"] if "caption_neighbours" in detectors else []) \
            + (["joint"] if "density" in detectors else []) + (["union"] if "kdistance" in detectors else [])
        ref_kinds = (["image", "text"] if {"caption_neighbours", "kdistance"} & set(detectors) else []) \
            + (["joint"] if "density" in detectors else [])  # kdistance: image + text lists (reference.UnionIndex)
        use_ref = bool(ref_kinds) and 0 < knn_reference < n_total
        kinds = ["image"] + ([] if use_ref else knn_kinds)  # dataset-wide indexes
        index = {"kind": kind, "k": k, "vectors": n_total, "kinds": kinds}
        if kind == "ivf":
            nlist = max(1, min(int(round(4 * math.sqrt(n_total))), n_total // 39 or 1))
            # kNN probes nprobe lists and re-ranks refine_factor·k SQ8 candidates with the exact
            # vectors (docs/scale.md: the recall curve); the near-duplicate range search (cosine
            # >= ~0.94) only range_nprobe: a copy that close sits in its original's cell or a
            # neighbouring one.
            index.update(nlist=nlist, nprobe=max(64, nlist // 64), refine_factor=REFINE_FACTOR, range_nprobe=8,
                         codec="SQ8",
                         train=min(n_total, 40 * nlist), storage="on-disk inverted lists (faiss OnDiskInvertedLists)")
        st = {"work": str(work), "out": str(out), "params_hash": phash, "seed": seed, "k": k,
              "detectors": detectors, "combine": combine, "fit_sample": fit_sample, "temp_sample": min(50_000, fit_sample),
              "calib_sample": min(20_000, fit_sample), "index": index, "offsets": offsets, "vocab": vocab, "has_url": has_url,
              "shards": [{"name": n, "catalog": c, "img": str(f[0]), "txt": str(f[1]), "meta": str(f[2])}
                         for n, c, f in zip(names, catalog_parts, files)]}
        if use_ref:
            st["reference"] = {"dir": str(out / "index" / "reference"), "size": knn_reference, "kinds": ref_kinds}
            (out / "index" / "reference").mkdir(parents=True, exist_ok=True)
        state = T.write_state(work / "state_prep.pkl", st)
        training = []
        if kind == "ivf":  # on seeded samples read from the embeddings: beside prepare, which does not need them
            training = [submit_call(client, Call(f"{kd} index training", T.train_index, (state, kd))) for kd in kinds
                        if overwrite or not (work / f"{kd}.trained.json").exists()]
        building = [] if not use_ref else [  # the kNN reference, from the embeddings too
            (p, submit_call(client, Call(f"kNN reference {p}", T.build_reference, (state, p))))
            for p in ["rows"] + ref_kinds if overwrite or T.done_marker(work, "reference", p, phash) is None]
        phase(T.prepare_shard, "prepare", "prep")

        # ---- small global state, fitted on the client from the shards' samples
        det_state: dict = {}
        # one pass over the shards' prepare outputs, each file closed after use: tens of thousands
        # of shards must not mean as many open files or all their class sums in memory at once
        cos_parts, timg_parts, tcls_parts, sums, cnt = [], [], [], None, None
        for n in names:
            with np.load(work / f"prep_{n}.npz") as p:
                cos_parts.append(p["cos"])
                if need_cc and vocab:
                    sums = p["class_sum"] if sums is None else sums + p["class_sum"]
                    cnt = p["class_count"] if cnt is None else cnt + p["class_count"]
                    timg_parts.append(p["temp_img"])
                    tcls_parts.append(p["temp_cls"])
        auto_fit = None
        if threshold == "auto" and "similarity" in detectors:  # fitted in a client thread while the workers go on
            from concurrent.futures import ThreadPoolExecutor

            from .detectors.similarity import auto_threshold

            # the same float32 values as 1 - similarity's sampled scores (prepare samples the same rows)
            cos_sample = 1.0 - (1.0 - np.concatenate(cos_parts))
            pool = stack.enter_context(ThreadPoolExecutor(1))
            auto_fit = pool.submit(auto_threshold, cos_sample, seed=seed)
        if need_cc:
            if not vocab or cnt is None or int(cnt.sum()) == 0:
                det_state.setdefault("skipped", {})["class_consistency"] = (
                    "no caption names a class: give --classes (a vocabulary file, a comma list or 'openclipart')")
            else:
                from .detectors.class_consistency import EPS, fit_temperature

                sums = sums.astype(np.float32)
                present = cnt >= 3
                norms = np.linalg.norm(sums, axis=1, keepdims=True)
                protos = np.where(present[:, None], sums / np.maximum(norms, EPS), 0.0).astype(np.float32)
                if present.sum() < 2:
                    det_state.setdefault("skipped", {})["class_consistency"] = \
                        "fewer than 2 classes with 3 or more captions"
                else:
                    timg = np.concatenate(timg_parts).astype(np.float32)
                    tcls = np.concatenate(tcls_parts)
                    temp = fit_temperature(timg, tcls, protos, present, seed=seed)
                    names_c = list(vocab)
                    st["class_consistency"] = {"prototypes": protos, "present": present, "temperature": temp,
                                               "names": names_c}
                    det_state["class_consistency"] = {
                        "classes": [c for c, ok in zip(names_c, present) if ok], "temperature": temp,
                        "captions_with_class": float(cnt.sum() / n_total) if n_total else 0.0}
        del cos_parts, timg_parts, tcls_parts

        # ---- indexes: trained once on a sample, filled per shard, merged on disk (IVF)
        state = T.write_state(work / "state_index.pkl", st)
        if kind == "ivf":
            gather_calls(client, training)
            index["trained_on"] = json.loads((work / f"{kinds[0]}.trained.json").read_text())["trained_on"]
            phase(T.fill_shard, "index", "fill")
            gather_calls(client, [submit_call(client, Call(f"{kd} index merge", T.merge_index, (state, kd, names)))
                                  for kd in kinds])
        else:
            gather_calls(client, [submit_call(client, Call(f"{kd} index", T.save_exact_index, (state, kd)))
                                  for kd in kinds[:2]])
        if "image_reuse" in detectors:
            if n_total < 3:
                det_state["image_reuse"] = {"radius": 0.94, "median_nn_cosine": None, "sampled": 0}
            else:
                from .detectors import image_reuse

                phase(T.calibrate_shard, "calibrate", "calib")
                nn = np.concatenate([np.load(work / f"calib_{n}.npy") for n in names])
                med = float(np.median(nn))
                r = image_reuse.radius_from_median(med)
                det_state["image_reuse"] = {"radius": r, "median_nn_cosine": med, "sampled": int(len(nn))}
            st["image_reuse"] = det_state["image_reuse"]
            if kind == "ivf":  # near-duplicate pairs by groups of shards: each inverted list read once per group
                # 16·nlist rows probe each list ~16·range_nprobe = 128 times per group (products big
                # enough to be efficient), capped at 256 MB of float32 rows per task
                dim = int(np.load(files[0][0], mmap_mode="r").shape[1])
                groups = T.near_groups(offsets, min(16 * index["nlist"], 2**26 // dim))
                index["range_groups"] = len(groups)
                st["near_groups"] = groups
                state = T.write_state(work / "state_near.pkl", st)
                phase(T.near_group, "near-duplicates", "near", groups)
        if use_ref:
            gather_calls(client, [c for _, c in building])
            index["reference"] = {"pairs": knn_reference, "sampled_from": n_total, "seed": seed,
                                  "search": "exact over the probed lists, list by list (reference.py)"
                                  + ("; kdistance's images and captions: the image and text searches merged"
                                     if "kdistance" in detectors else ""),
                                  "kinds": {p: {k_: v for k_, v in T.done_marker(work, "reference", p, phash).items()
                                                if k_ != "params_hash"} for p in ref_kinds}}
        if "kdistance" in detectors:
            det_state["kdistance"] = {"method": "1 - cos of the image's k-th neighbour among all images and captions "
                                                "(Huang et al. 2025)", "k": max(k, 16)}
        st["dups"] = dups
        st["detectors"] = tuple(d for d in detectors
                                if d != "class_consistency" or "class_consistency" in st)
        topk = int(round(flag_fraction * n_total)) if flag_fraction is not None else None
        st["topk"] = topk
        state = T.write_state(work / "state_raw.pkl", st)
        phase(T.raw_shard, "detectors", "raw")
        if use_ref and "density" in st["detectors"]:  # the reference rows' k-distances, for every shard's LOF
            gather_calls(client, [submit_call(client, Call("kNN reference k-distances", T.reference_kdist, (state,)))])
        phase(T.sample_shard, "sample", "sample")

        # ---- thresholds and references from the samples
        used = st["detectors"]
        samples = {d: [] for d in used}
        tops: dict = {d: _Best(topk) for d in used} if flag_fraction is not None else {}
        for n in names:
            z = np.load(work / f"sample_{n}.npz")
            for d in used:
                samples[d].append(z[f"s_{d}"])
                if flag_fraction is not None:
                    tops[d].add(z[f"t_{d}"])
        samples = {d: np.concatenate(v) for d, v in samples.items()}
        st["refs"] = {d: fit_reference(v, combine) for d, v in samples.items()}
        thresholds: dict = {}
        cos = 1.0 - samples["similarity"] if "similarity" in samples else None
        if threshold is not None:
            if threshold == "auto":
                fit = auto_fit.result()
                thresholds["similarity_auto"] = fit
                t = fit["threshold"]
            else:
                t = float(threshold)
            thresholds["similarity"] = t
        if threshold is not None and "class_consistency" in used:
            thresholds["class_consistency"] = {"caption_class_prob_below": CLASS_MIN_PROB,
                                               "image_top_class_prob_at_least": CLASS_TOP_PROB,
                                               "caption_names_a_class": True}
        if reuse_min == "auto":
            reuse_min = int(np.median(samples["image_reuse"])) + 1 if "image_reuse" in samples and n_total else 1
            thresholds["image_reuse_auto"] = True
        if "image_reuse" in samples and reuse_min > 0:
            thresholds["image_reuse"] = reuse_min
            if cos is not None:
                thresholds["image_reuse_cosine_below"] = float(np.median(cos))
        boundaries = None
        if flag_fraction is not None:
            thresholds["flag_fraction"] = flag_fraction
            boundaries = {d: _boundary(v.result()) for d, v in tops.items()}
        del samples, cos
        st["thresholds"], st["boundaries"] = thresholds, boundaries
        st["truth_keys"], st["n_truth"] = truth_keys, 0
        if flag_fraction is not None:
            state = T.write_state(work / "state_rank.pkl", st)
            phase(T.rank_shard, "rank", "rank")
            top_c = _Best(topk)
            for n in names:
                top_c.add(np.load(work / f"rank_{n}.npy"))
            boundaries["combined"] = _boundary(top_c.result())
        if truth_keys is not None:
            st["n_truth"] = int(len(truth_keys))
        state = T.write_state(work / "state_final.pkl", st)
        final = phase(T.final_shard, "flag", "final")
        detection = _detection(st, names, work, final, client, phase) if truth_keys is not None else None

    summary = _merge_outputs(out, names, final.results)
    fired_names = list(dict.fromkeys(k_ for n in names for k_ in final.results[n]["flagged_by"]))
    summary.update({
        "thresholds": thresholds, "detectors": list(used), "combine": combine,
        "flagged_by": {k_: int(sum(final.results[n]["flagged_by"].get(k_, 0) for n in names)) for k_ in fired_names},
        "model": card.get("name") if card else None, "embeddings": str(embeddings),
        "embeddings_layout": emb_layout, "index": {k_: v for k_, v in index.items() if k_ != "kinds"} | {"kinds": kinds},
        "detector_state": det_state, "client_state": {"fit_sample": fit_sample, "hash_duplicate_rows": int(len(dups))},
        "params_hash": phash})
    summary["warnings"] = scan_warnings(summary["samples"], summary["flagged"])
    if detection is not None:
        summary["detection"] = detection
    write_json_atomic(out / "summary.json", summary)
    import shutil

    shutil.rmtree(work, ignore_errors=True)  # scratch of a finished scan (state pickles name this run's paths)
    return summary



def _read_manifest(manifest) -> np.ndarray:
    """The manifest's poisoned keys (sorted, unique); UsageError when it cannot be read."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(manifest)
    except Exception as e:
        raise UsageError(f"cannot read manifest {manifest}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if "key" not in schema.names:
        raise UsageError(f"manifest {manifest} has no 'key' column")
    keys = pq.read_table(manifest, columns=["key"]).column(0).to_numpy(zero_copy_only=False)
    return np.unique(keys.astype(str)).astype(object)


def _catalog_groups(names, parts, offsets, client, labels: bool, work: Path):
    """Duplicate keys and image hashes over the catalog parts (`dup_groups`: per part, then per
    hash bucket, on the workers): a key in two shards raises ShardError; returns the rows whose
    image hash appears more than once as a (gid, group) structured array (groups numbered in digest
    order, rows by gid within one), and the label names (when `labels`)."""
    from collections import Counter

    import pyarrow.parquet as pq

    from . import dup_groups as G
    from .engine import map_shards

    gdir = work / "dups"
    gdir.mkdir(exist_ok=True)
    ptasks = [G.PartTask(n, str(p), int(o), str(gdir), labels) for n, p, o in zip(names, parts, offsets)]
    pres = map_shards(G.part_arrays, ptasks, client=client, desc="scan: duplicate groups, parts")
    b = G.n_buckets(int(offsets[-1]))
    btasks = [G.BucketTask(f"bucket {i + 1} of {b}", i, b, tuple(names), str(gdir)) for i in range(b)]
    bres = map_shards(G.bucket_repeats, btasks, client=client, desc="scan: duplicate groups, buckets")
    found = [bres.results[t.name] for t in btasks]
    cand = np.sort(np.concatenate([f["key_gids"] for f in found]))
    if len(cand):  # key hashes only nominate: compare the candidates' keys themselves
        part_of = np.searchsorted(offsets, cand, side="right") - 1
        rows = []
        for i in np.unique(part_of):
            keys = pq.read_table(parts[i], columns=["key"]).column(0).to_numpy(zero_copy_only=False)
            rows += [(str(keys[g - offsets[i]]), f"{names[i]}.tar") for g in cand[part_of == i]]
        repeated = [k for k, c in Counter(k for k, _ in rows).items() if c > 1]
        if repeated:
            first = min(repeated)
            shards_with = sorted(sh for k, sh in rows if k == first)
            raise ShardError(shards_with[-1], f"duplicate key across shards ({', '.join(shards_with)})", key=first)
    sha = np.concatenate([f["sha"] for f in found])
    dups = np.zeros(len(sha), dtype=[("gid", "i8"), ("group", "i8")])
    dups["gid"] = sha["gid"]
    if len(sha):
        dups["group"] = np.cumsum(np.r_[False, sha["d"][1:] != sha["d"][:-1]])
    names_ = sorted({x for n in names for x in pres.results[n]["labels"]}) if labels else None
    return dups, names_


def _merge_top(current, new, k: int):
    """The best `k` of two (value, gid) structured arrays by (value desc, gid asc)."""
    both = new if current is None else np.concatenate([current, new])
    order = np.lexsort((both["g"], -both["v"]))[:k]
    return both[order]


class _Best:
    """The best `k` (value desc, gid asc) of (value, gid) structured arrays added one shard at a
    time: pieces are first cut at the current k-th entry, then merged in batches of about 2·k rows
    (one sort per shard cost ~20 ms at k = 100,000, minutes of an idle cluster at 1,000 shards)."""

    def __init__(self, k: int):
        self.k, self.best, self.pending, self.size = k, None, [], 0

    def add(self, piece: np.ndarray) -> None:
        """Offer one shard's (value, gid) entries."""
        b = self.best
        if b is not None and len(b) == self.k and self.k:
            v, g = b["v"][-1], b["g"][-1]
            piece = piece[(piece["v"] > v) | ((piece["v"] == v) & (piece["g"] < g))]
        self.pending.append(piece)
        self.size += len(piece)
        if self.size > 2 * self.k:
            self._merge()

    def _merge(self) -> None:
        self.best = _merge_top(self.best, np.concatenate(self.pending), self.k)
        self.pending, self.size = [], 0

    def result(self):
        """The best `k` entries, best first (None when nothing was added)."""
        if self.pending:
            self._merge()
        return self.best


def _boundary(top) -> tuple[float, int] | None:
    """The last (value, gid) of a merged top list, or None when it is empty."""
    if top is None or len(top) == 0:
        return None
    return float(top["v"][-1]), int(top["g"][-1])


def _detection(st, names, work, final, client, phase) -> dict:
    """AUROC, precision@k and precision/recall per detector and combined, from per-shard counts
    (exact, and without gathering N scores on the client)."""
    from . import scan_tasks as T

    cols = list(st["detectors"]) + ["combined"]
    P = st["n_truth"]
    pos: dict = {d: [] for d in cols}
    tops: dict = {d: _Best(P) for d in cols}
    pos_gids, n_pos = [], 0
    offsets = st["offsets"]
    for i, n in enumerate(names):
        z = np.load(work / f"truth_{n}.npz")
        for d in cols:
            pos[d].append(z[f"p_{d}"].astype(np.float32).astype(np.float64))
            tops[d].add(z[f"t_{d}"])
        pos_gids.append(offsets[i] + np.nonzero(z["truth"])[0])
    pos_gids = np.concatenate(pos_gids)
    n_pos = len(pos_gids)
    n_total = int(offsets[-1])
    st = dict(st, positives={d: np.sort(np.concatenate(v)) for d, v in pos.items()}, auc_columns=cols)
    state = T.write_state(work / "state_auc.pkl", st)
    tasks = [T.ShardTask(n, i, state) for i, n in enumerate(names)]
    from .engine import map_shards

    map_shards(T.auc_shard, tasks, is_done=lambda t: T.done_marker(work, "auc", t.name, st["params_hash"]),
               client=client, desc="scan: metrics")
    lt = {d: 0.0 for d in cols}
    for n in names:
        z = np.load(work / f"auc_{n}.npz")
        for d in cols:
            lt[d] += float(z[f"lt_{d}"]) + 0.5 * float(z[f"eq_{d}"])
    out = {"poisoned": n_pos, "poisoned_in_manifest": P}
    flagged_by = {k_: sum(final.results[n]["flagged_by"].get(k_, 0) for n in names) for k_ in cols}
    tp_by = {k_: sum(final.results[n].get("tp_by", {}).get(k_, 0) for n in names) for k_ in cols}
    tp_by["combined"] = sum(final.results[n].get("tp", 0) for n in names)
    flagged_by["combined"] = sum(final.results[n]["flagged"] for n in names)
    pos_set = set(pos_gids.tolist())
    for d in cols:
        m: dict = {"auroc": lt[d] / (n_pos * (n_total - n_pos)) if 0 < n_pos < n_total else None}
        if n_pos:
            m["precision_at_k"] = float(np.mean([g in pos_set for g in tops[d].result()["g"][:n_pos]]))
        has_rule = d == "combined" or any(d in final.results[n]["flagged_by"] for n in names)
        if has_rule:
            m["flagged"] = int(flagged_by[d])
            m["precision"] = float(tp_by[d] / flagged_by[d]) if flagged_by[d] else None
            m["recall"] = float(tp_by[d] / n_pos) if n_pos else None
        out[d] = m
    return out


def _merge_outputs(out: Path, names: list[str], results: dict) -> dict:
    """Stream the shards' `scores_NAME.parquet` into `scores.parquet` and `index/ids.parquet`
    (one row group per shard, temp + rename); returns the counts for the summary."""
    import pyarrow.parquet as pq

    (out / "index").mkdir(exist_ok=True)
    targets = {"scores": out / "scores.parquet", "ids": out / "index" / "ids.parquet"}
    writers: dict = {}
    try:
        for n in names:
            t = pq.read_table(out / f"scores_{n}.parquet")
            for what, path in targets.items():
                tt = t if what == "scores" else t.select(["key", "shard"])
                if what not in writers:
                    writers[what] = pq.ParquetWriter(path.with_name(path.name + ".tmp"), tt.schema)
                writers[what].write_table(tt)
    finally:
        for w in writers.values():
            w.close()
    for path in targets.values():
        os.replace(path.with_name(path.name + ".tmp"), path)
    n = sum(int(results[x]["count"]) for x in names)
    f = sum(int(results[x]["flagged"]) for x in names)
    return {"samples": n, "flagged": f, "fraction_flagged": float(f / n) if n else 0.0}


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


def reasons_for(scores, fired, flagged, top, thresholds, cc_state=None, caption_class=None) -> list[str]:
    """One reason string per row: every rule that fired with its value ("" when not flagged)."""
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
