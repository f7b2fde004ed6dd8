"""Evaluate an encoder on test shards: retrieval utility and, with a poison manifest, attack success.

Utility: text→image / image→text Recall@1/5/10, images grouped by sha256.
Attack (per goal of the manifest, paper §4): queries = every test caption labelled A, gallery =
every test image; targets = test images labelled B (Attack II/III) or the single target image x*
(Attack I, goal `A2one`). MinRank is 0-based (mean, median, min, max) and Hit@K for K in
{1, 5, 10, 20, 50}; the same for as many random test captions (seeded baseline); and the
image→text direction (targets as queries, class-A captions as their targets).

Attack I target: the image of the manifest's poisoned samples (read from the poisoned shard next
to the manifest). If an identical image (same sha256) is in the test gallery it is the target;
otherwise it is embedded and ADDED to the gallery as one extra item, and the result says
`target_in_gallery: false`.

Backdoors (`patch`, `blended`, `label-consistent` goals of the manifest; `result["backdoor"]`):
the trigger of the `poison.json` next to the manifest (kind from the attack, size, position rule,
pattern, opacity, seed) is stamped with `poison.apply_trigger` on every unique test image whose
label is not the target class, placed by the same rule as `attacks/backdoor.py` (a `random`
position is drawn per image from a generator seeded with the spec's seed, in test order). Both
the triggered and the untriggered versions of those images are embedded the same way, and for
each the attack success rate (ASR) is reported two ways:
- i2t: the fraction of images whose top-K retrieved test captions include a caption of the
  target class, K in (1, 5, 10) (0-based ranks, ties in favour of the target, as above);
- zero-shot: the fraction classified as the target class among the test split's class names
  (`zeroshot.DEFAULT_TEMPLATES` prompts).
The untriggered numbers are the base rate; the same command on a clean model gives the
clean-model row on the same triggered images. Backdoor goals get no `attacks` entry.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import UsageError
from .metrics import HIT_KS, min_ranks, normalize, rank_summary, recall_from_ranks, retrieval_ranks
from .shards import iter_samples, sha256, write_json_atomic

BACKDOOR_ATTACKS = ("patch", "blended", "label-consistent")
ASR_KS = (1, 5, 10)
# salt of the generator that places `random`-position triggers on test images
TEST_TRIGGER_SALT = 9001


def embed_split(model, test, *, batch_size: int = 64, workers: int = 0):
    """Embed every pair of `test` shards; return (meta dict of lists, image emb (N,D), text emb (N,D)), L2-normalised numpy."""
    import torch

    from .batches import backbone_features, iter_batches

    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        # the feature cache holds *pretrained* backbone features: only for models whose backbones never trained
        if getattr(model, "family", "") == "offline" and not getattr(model, "backbones_trained", True):
            meta, fi, ft = backbone_features(model, test, batch_size=batch_size, workers=workers)
            img = model.image_proj(fi.to(dev)).float().cpu().numpy()
            txt = model.text_proj(ft.to(dev)).float().cpu().numpy()
            return meta, normalize(img), normalize(txt)
        meta = {k: [] for k in ("key", "shard", "sha256", "label", "caption")}
        imgs, txts = [], []
        for batch in iter_batches(test, model.preprocess, batch_size=batch_size, workers=workers):
            for k in meta:
                meta[k].extend(batch[k])
            toks = model.tokenize(batch["caption"])
            toks = {k: v.to(dev) for k, v in toks.items()} if isinstance(toks, dict) else toks.to(dev)
            imgs.append(model.encode_image(batch["image"].to(dev)).float().cpu().numpy())
            txts.append(model.encode_text(toks).float().cpu().numpy())
    return meta, normalize(np.concatenate(imgs)), normalize(np.concatenate(txts))


def _embed_images(model, images: list[bytes]) -> np.ndarray:
    import io

    import torch
    from PIL import Image

    dev = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        x = torch.stack([model.preprocess(Image.open(io.BytesIO(b))) for b in images]).to(dev)
        return normalize(model.encode_image(x).float().cpu().numpy())


def _goal_classes(goal: str, rows) -> tuple[str, str]:
    if "source_label" in rows and "target_label" in rows:
        return str(rows["source_label"].iloc[0]), str(rows["target_label"].iloc[0])
    if "2" not in goal:
        raise UsageError(f"manifest goal {goal!r} is not of the form A2B or A2one")
    a, b = goal.split("2", 1)
    return a, b


def _target_image_bytes(manifest_path: Path, rows) -> bytes:
    """The image every poisoned sample of an Attack I goal carries (read from the poisoned shard)."""
    row = rows.iloc[0]
    shard = manifest_path.parent / str(row["shard"])
    if not shard.is_file():
        raise UsageError(f"manifest {manifest_path}: poisoned shard {shard} not found (needed for the "
                         f"Attack I target image)")
    for s in iter_samples(shard):
        if s.key == row["key"]:
            return s.image
    raise UsageError(f"manifest {manifest_path}: key {row['key']} not in {shard}")


def attack_metrics(model, meta, img, txt, manifest, *, seed: int = 0, t2i_ranks=None) -> dict:
    """Per-goal attack success (see module doc) given the test split's embeddings; returns {goal: {...}}.

    With `t2i_ranks` (each test caption's rank of its own image) a goal also gets
    `utility_other_captions`: text→image Recall@K over the captions *not* of class A."""
    import pandas as pd

    manifest_path = Path(manifest)
    if not manifest_path.is_file():
        raise UsageError(f"manifest {manifest} does not exist")
    mf = pd.read_parquet(manifest_path)
    for col in ("goal", "key", "shard"):
        if col not in mf.columns:
            raise UsageError(f"manifest {manifest} has no column {col!r}")
    labels = np.array([lb if lb is not None else "" for lb in meta["label"]], dtype=object)
    uniq, first = np.unique(np.asarray(meta["sha256"]), return_index=True)
    first = np.sort(first)
    gallery, gallery_labels = img[first], labels[first]
    gallery_sha = np.asarray(meta["sha256"])[first]
    results = {}
    for goal, rows in mf.groupby("goal", sort=True):
        if "attack" in rows and str(rows["attack"].iloc[0]) in BACKDOOR_ATTACKS:
            continue  # measured by backdoor_metrics
        a, b = _goal_classes(str(goal), rows)
        single = b == "one" or ("attack" in rows and str(rows["attack"].iloc[0]) == "single-image")
        res: dict = {"source_class": a, "attack": str(rows["attack"].iloc[0]) if "attack" in rows else None,
                     "poisoned_samples": int(len(rows))}
        g, groups = gallery, np.zeros(len(gallery), dtype=np.int64)
        if single:
            target_bytes = None
            if "sha256" in rows and rows["sha256"].notna().all():
                digest = str(rows["sha256"].iloc[0])
            else:
                target_bytes = _target_image_bytes(manifest_path, rows)
                digest = sha256(target_bytes)
            res["target_sha256"] = digest
            hit = np.flatnonzero(gallery_sha == digest)
            res["target_in_gallery"] = bool(len(hit))
            if len(hit):
                groups[hit] = 1
            else:
                target_bytes = target_bytes or _target_image_bytes(manifest_path, rows)
                g = np.concatenate([gallery, _embed_images(model, [target_bytes])])
                groups = np.concatenate([groups, [1]])
        else:
            res["target_class"] = b
            groups[gallery_labels == b] = 1
            res["target_images"] = int(groups.sum())
        query_idx = np.flatnonzero(labels == a)
        res["class_a_captions"] = int(len(query_idx))
        if t2i_ranks is not None and len(query_idx) < len(labels):
            other = t2i_ranks[labels != a]
            res["utility_other_captions"] = {f"t2i_r@{k}": float((other < k).mean()) for k in (1, 5, 10)}
        if len(query_idx) == 0 or groups.sum() == 0:
            res["error"] = f"no test captions of class {a!r}" if len(query_idx) == 0 else f"no test images of class {b!r}"
            results[str(goal)] = res
            continue
        ranks = min_ranks(txt[query_idx], g, np.ones(len(query_idx), np.int64), groups)
        res["t2i"] = rank_summary(ranks, HIT_KS)
        rng = np.random.default_rng(seed)
        rand_idx = rng.choice(len(txt), size=min(len(query_idx), len(txt)), replace=False)
        res["baseline_random_t2i"] = rank_summary(
            min_ranks(txt[rand_idx], g, np.ones(len(rand_idx), np.int64), groups), HIT_KS)
        # image->text: do the target images retrieve class-A captions?
        targets = g[groups == 1]
        cap_groups = (labels == a).astype(np.int64)
        res["i2t"] = rank_summary(min_ranks(targets, txt, np.ones(len(targets), np.int64), cap_groups), HIT_KS)
        results[str(goal)] = res
    return results


# --------------------------------------------------------------------------- backdoor success


def backdoor_spec(manifest) -> dict:
    """The trigger spec of a backdoor manifest: `poison.json`'s `spec` next to it.

    Returns {"attack", "trigger_size", "trigger_position", "trigger_pattern", "opacity", "seed"}.
    Raises UsageError when poison.json is missing or is not a backdoor's."""
    import json

    path = Path(manifest).parent / "poison.json"
    try:
        spec = json.loads(path.read_text())["spec"]
    except FileNotFoundError:
        raise UsageError(f"backdoor manifest {manifest}: {path} not found (it holds the trigger spec)") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UsageError(f"{path} is not a poison.json (no spec)") from None
    if spec.get("attack") not in BACKDOOR_ATTACKS:
        raise UsageError(f"{path}: attack {spec.get('attack')!r} is not a backdoor ({', '.join(BACKDOOR_ATTACKS)})")
    keys = ("attack", "trigger_size", "trigger_position", "trigger_pattern", "opacity", "seed")
    missing = [k for k in keys if k not in spec]
    if missing:
        raise UsageError(f"{path}: spec has no {missing[0]!r}")
    return {k: spec[k] for k in keys}


def trigger_for_image(spec: dict, width: int, height: int, rng):
    """The `attacks.plan.Trigger` that `poison` would stamp on a `width` x `height` image.

    `spec` is `backdoor_spec(...)`; the kind (patch/blended) follows the attack and the position
    rule is `attacks.backdoor._trigger`'s (`random` draws from `rng`)."""
    from .attacks.backdoor import _trigger
    from .attacks.plan import AttackSpec

    aspec = AttackSpec(attack=spec["attack"], seed=int(spec["seed"]), trigger_size=int(spec["trigger_size"]),
                       trigger_position=spec["trigger_position"], trigger_pattern=spec["trigger_pattern"],
                       opacity=float(spec["opacity"]))
    kind = "blended" if spec["attack"] == "blended" else "patch"
    return _trigger(aspec, kind, int(width), int(height), rng)


def triggered_images(samples, spec: dict):
    """Yield (sample, triggered image bytes) for an iterable of shard Samples, in order.

    Each image gets `trigger_for_image` for its own size and `poison.apply_trigger` (same re-encoding
    as `poison`). A `random` position is drawn from one generator seeded with (seed,
    TEST_TRIGGER_SALT), so the same samples in the same order give the same bytes."""
    from .attacks.plan import rng_for
    from .poison import apply_trigger
    from .shards import image_size

    rng = rng_for(int(spec["seed"]), TEST_TRIGGER_SALT)
    for s in samples:
        w, h = image_size(s.image, "test", s.key)
        data, _ = apply_trigger(s.image, s.image_ext, trigger_for_image(spec, w, h, rng), "test", s.key)
        yield s, data


def _asr(emb: np.ndarray, txt: np.ndarray, caption_is_target: np.ndarray, class_emb: np.ndarray,
         target_index: int, own_index: np.ndarray) -> dict:
    """i2t ASR@K, zero-shot ASR and zero-shot accuracy (own class) of image embeddings `emb`."""
    from .zeroshot import zeroshot_predict

    out = {}
    if len(emb) == 0:
        return {**{f"i2t_asr@{k}": None for k in ASR_KS}, "zeroshot_asr": None, "zeroshot_accuracy": None}
    ranks = min_ranks(emb, txt, np.ones(len(emb), np.int64), caption_is_target.astype(np.int64))
    for k in ASR_KS:
        out[f"i2t_asr@{k}"] = float((ranks < k).mean())
    pred, _ = zeroshot_predict(emb, class_emb)
    out["zeroshot_asr"] = float((pred == target_index).mean())
    out["zeroshot_accuracy"] = float((pred == own_index).mean())
    return out


def backdoor_metrics(model, meta, txt, test, manifest, *, batch_size: int = 64, templates=None) -> dict:
    """Backdoor success per backdoor goal of `manifest` (see module doc); returns {goal: {...}}.

    `meta`/`txt` are `embed_split`'s for the `test` shards (captions are the i2t gallery, labels
    the classes). Each goal's dict: attack, target_class, source_class, poisoned_samples,
    trigger (the spec used), images (triggered test images: unique, labelled, not of the target
    class), target_captions, zeroshot_classes, zeroshot_templates, chance_zeroshot (1/C), and
    `triggered` / `untriggered` = {i2t_asr@1, i2t_asr@5, i2t_asr@10, zeroshot_asr,
    zeroshot_accuracy}; with a source class also `source` = the same two dicts on the
    source-class images only. {} when the manifest has no backdoor goal.
    """
    import pandas as pd

    from .shards import expand_shards
    from .zeroshot import DEFAULT_TEMPLATES, class_text_embeddings

    manifest_path = Path(manifest)
    if not manifest_path.is_file():
        raise UsageError(f"manifest {manifest} does not exist")
    mf = pd.read_parquet(manifest_path)
    if "attack" not in mf.columns or "goal" not in mf.columns:
        return {}
    mf = mf[mf["attack"].isin(BACKDOOR_ATTACKS)]
    if mf.empty:
        return {}
    spec = backdoor_spec(manifest_path)
    templates = tuple(templates or DEFAULT_TEMPLATES)
    labels = np.array([lb if lb is not None else "" for lb in meta["label"]], dtype=object)
    classes = sorted(set(labels.tolist()) - {""})
    digests = np.asarray(meta["sha256"])
    _, first = np.unique(digests, return_index=True)
    first = np.sort(first)
    class_emb = class_text_embeddings(model, classes, templates) if classes else None
    results = {}
    for goal, rows in mf.groupby("goal", sort=True):
        a, b = _goal_classes(str(goal), rows)
        source = a if a not in ("", "any", b) else None
        attack = str(rows["attack"].iloc[0])
        res: dict = {"attack": attack, "target_class": b, "source_class": source,
                     "poisoned_samples": int(len(rows)),
                     "trigger": {"kind": "blended" if attack == "blended" else "patch",
                                 **{k: v for k, v in spec.items() if k != "attack"}}}
        if spec["attack"] != attack:
            res["error"] = f"poison.json describes a {spec['attack']} attack, the manifest a {attack} one"
            results[str(goal)] = res
            continue
        chosen = [i for i in first if labels[i] not in ("", b)]
        res["images"] = len(chosen)
        res["target_captions"] = int((labels == b).sum())
        res["zeroshot_classes"] = len(classes)
        res["zeroshot_templates"] = len(templates)
        if not classes:
            res["error"] = "the test split has no labels"
        elif b not in classes:
            res["error"] = f"no test pair of the target class {b!r}"
        elif not chosen:
            res["error"] = f"no labelled test image outside the target class {b!r}"
        if "error" in res:
            results[str(goal)] = res
            continue
        res["chance_zeroshot"] = 1.0 / len(classes)
        wanted = {digests[i]: labels[i] for i in chosen}
        clean, trig, own = _embed_backdoor_images(model, expand_shards(test), wanted, spec, batch_size)
        own_idx = np.array([classes.index(lb) for lb in own], dtype=np.int64)
        is_target = labels == b
        t = classes.index(b)
        res["triggered"] = _asr(trig, txt, is_target, class_emb, t, own_idx)
        res["untriggered"] = _asr(clean, txt, is_target, class_emb, t, own_idx)
        if source is not None:
            m = np.asarray(own, dtype=object) == source
            res["source"] = {"images": int(m.sum()),
                             "triggered": _asr(trig[m], txt, is_target, class_emb, t, own_idx[m]),
                             "untriggered": _asr(clean[m], txt, is_target, class_emb, t, own_idx[m])}
        results[str(goal)] = res
    return results


def _embed_backdoor_images(model, paths, wanted: dict, spec: dict, batch_size: int):
    """Stream the test shards once; embed the untriggered and triggered version of every image
    whose sha256 is in `wanted` (first occurrence, test order). Returns (clean (n,D), triggered
    (n,D), labels list)."""
    def selected():
        seen = set()
        for path in paths:
            for s in iter_samples(path):
                d = sha256(s.image)
                if d in wanted and d not in seen:
                    seen.add(d)
                    own.append(wanted[d])
                    yield s

    own: list = []
    clean, trig, batch = [], [], []
    for s, data in triggered_images(selected(), spec):
        batch.append((s.image, data))
        if len(batch) >= batch_size:
            clean.append(_embed_images(model, [c for c, _ in batch]))
            trig.append(_embed_images(model, [t for _, t in batch]))
            batch = []
    if batch:
        clean.append(_embed_images(model, [c for c, _ in batch]))
        trig.append(_embed_images(model, [t for _, t in batch]))
    return np.concatenate(clean), np.concatenate(trig), own


def _class_utility(meta, img, txt, k: int = 10) -> dict:
    """Class precision@k both ways when every test pair has a label (else {})."""
    from .metrics import class_precision

    labels = np.array([lb if lb is not None else "" for lb in meta["label"]], dtype=object)
    if len(labels) == 0 or (labels == "").any():
        return {}
    _, first = np.unique(np.asarray(meta["sha256"]), return_index=True)
    first = np.sort(first)
    share = np.unique(labels, return_counts=True)[1] / len(labels)
    return {f"t2i_class_p@{k}": class_precision(txt, img[first], labels, labels[first], k),
            f"i2t_class_p@{k}": class_precision(img[first], txt, labels[first], labels, k),
            f"chance_class_p@{k}": float((share ** 2).sum())}


def evaluate_model(model, *, test, manifest: str | None = None, workers: int = 0, seed: int = 0) -> dict:
    """Utility (and, with `manifest`, attack success per goal in `attacks` and backdoor success per
    backdoor goal in `backdoor`) metrics of a loaded model on test shards; returns a dict."""
    meta, img, txt = embed_split(model, test, workers=workers)
    t2i_ranks, i2t_ranks = retrieval_ranks(img, txt, meta["sha256"])
    out = {"model": model.name, "checkpoint_sha256": model.checkpoint_sha256, "test_pairs": len(txt),
           "utility": recall_from_ranks(t2i_ranks, i2t_ranks)}
    out["utility"]["chance_r@10"] = min(1.0, 10 / max(1, out["utility"]["images"]))
    out["utility"].update(_class_utility(meta, img, txt))
    if manifest:
        out["attacks"] = attack_metrics(model, meta, img, txt, manifest, seed=seed, t2i_ranks=t2i_ranks)
        backdoor = backdoor_metrics(model, meta, txt, test, manifest)
        if backdoor:
            out["backdoor"] = backdoor
    return out


def evaluate(checkpoint: str, *, test, manifest: str | None = None, out: str | os.PathLike | None = None,
             device: str = "cpu", workers: int = 0, seed: int = 0) -> dict:
    """Load `checkpoint` (dir or model spec), evaluate on `test` shards, write `out` (metrics.json) if given."""
    from .models import load_model
    from .outputs import check_out_file, check_parquet, check_seed

    check_seed(seed)
    if out:
        check_out_file(out)
    if manifest:
        check_parquet(manifest, "--manifest", ("key", "goal"))
    model = load_model(checkpoint, device=device)
    result = evaluate_model(model, test=test, manifest=manifest, workers=workers, seed=seed)
    result["checkpoint"] = str(checkpoint)
    result["test"] = str(test)
    result["manifest"] = str(manifest) if manifest else None
    if out:
        write_json_atomic(out, result)
    return result


def metrics_rows(result: dict) -> list[dict]:
    """Flatten an evaluate() result into table rows (what, direction, metric values)."""
    u = result["utility"]
    rows = [{"what": "utility", "dir": d, "R@1": u[f"{d}_r@1"], "R@5": u[f"{d}_r@5"], "R@10": u[f"{d}_r@10"]}
            for d in ("t2i", "i2t")]
    for goal, r in (result.get("attacks") or {}).items():
        for name in ("t2i", "baseline_random_t2i", "i2t"):
            s = r.get(name)
            if not s:
                continue
            rows.append({"what": goal, "dir": name, "queries": s["queries"], "MinRank": s["min_rank_mean"],
                         **{f"Hit@{k}": s[f"hit@{k}"] for k in HIT_KS}})
    for goal, r in (result.get("backdoor") or {}).items():
        for name in ("triggered", "untriggered"):
            s = r.get(name)
            if not s:
                continue
            rows.append({"what": goal, "dir": f"backdoor {name}", "queries": r["images"],
                         **{f"ASR i2t@{k}": s[f"i2t_asr@{k}"] for k in ASR_KS},
                         "ASR zero-shot": s["zeroshot_asr"]})
    return rows
