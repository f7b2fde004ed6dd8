"""Detectors that hold when the attacker brings its own images: class_consistency, the calibrated
near-duplicate radius of image_reuse, Huang et al.'s kdistance, the zsum combination, --classes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from mmsanitize.cli import main
from mmsanitize.detectors import class_consistency, density, image_reuse, similarity
from mmsanitize.index import build_index
from mmsanitize.labels import keyword_classes, load_vocabulary
from mmsanitize.scan import caption_classes, combine_scores, run_detectors


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _auroc(score, truth):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(truth, score)


def class_pairs(n=2000, d=48, classes=8, poison=100, goal=(0, 1), seed=0, img_noise=3.0, txt_noise=2.0):
    """Weakly aligned pairs: image and caption near their class centre (instance-level cosine is
    noisy), plus `poison` injected pairs with a class-A caption and a *fresh* class-B image."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    label = rng.integers(0, classes, n)
    a, b = goal
    img = _unit(centres[label] + img_noise * rng.normal(size=(n, d)) / np.sqrt(d) * 4)
    txt = _unit(centres[label] + txt_noise * rng.normal(size=(n, d)) / np.sqrt(d) * 4)
    p_img = _unit(centres[[b] * poison] + img_noise * rng.normal(size=(poison, d)) / np.sqrt(d) * 4)
    p_txt = _unit(centres[[a] * poison] + txt_noise * rng.normal(size=(poison, d)) / np.sqrt(d) * 4)
    caption_class = np.r_[label, [a] * poison]
    truth = np.r_[np.zeros(n, bool), np.ones(poison, bool)]
    return np.r_[img, p_img], np.r_[txt, p_txt], caption_class, truth


def test_class_consistency_finds_fresh_image_poisons_that_similarity_misses():
    img, txt, cls, truth = class_pairs()
    protos, present = class_consistency.caption_prototypes(txt, cls, 8)
    temp = class_consistency.fit_temperature(img, cls, protos, present)
    cc = class_consistency.score(img, txt, prototypes=protos, present=present, caption_class=cls, temperature=temp)
    sim = similarity.score(img, txt)
    assert _auroc(cc, truth) > 0.98
    assert _auroc(cc, truth) > _auroc(sim, truth) + 0.05
    # poisoned captions are genuine class-A captions: the prototypes barely move
    clean_protos, _ = class_consistency.caption_prototypes(txt[~truth], cls[~truth], 8)
    assert np.min(np.einsum("cd,cd->c", protos, clean_protos)) > 0.99
    # a calibrated temperature, not the hardest one on the grid
    assert 0.005 < temp < 0.5


def test_class_consistency_uses_nearest_prototype_for_captions_without_a_class():
    img, txt, cls, truth = class_pairs(poison=60)
    protos, present = class_consistency.caption_prototypes(txt, cls, 8)
    hidden = cls.copy()
    hidden[::2] = -1                        # half the captions name no class
    temp = class_consistency.fit_temperature(img, hidden, protos, present)
    cc = class_consistency.score(img, txt, prototypes=protos, present=present, caption_class=hidden,
                                 temperature=temp)
    assert _auroc(cc[hidden < 0], truth[hidden < 0]) > 0.95


def test_image_reuse_radius_is_not_switched_off_by_the_attackers_copies():
    rng = np.random.default_rng(1)
    img, txt, _, _ = class_pairs(n=1500, poison=0)
    # Attack I with perturbed copies: 8% of the pairs carry near-duplicates of one image
    copies = _unit(img[[7] * 130] + 0.02 * rng.normal(size=(130, img.shape[1])))
    img2, txt2 = np.r_[img, copies], np.r_[txt, txt[rng.integers(0, 1500, 130)]]
    truth = np.r_[np.zeros(1500, bool), np.ones(130, bool)]
    idx = build_index(img2, kind="exact")
    rad = image_reuse.calibrated_radius(img2, idx)
    assert rad["radius"] is not None and rad["radius"] <= 0.97
    s = image_reuse.score(img2, txt2, image_index=idx, radius=rad["radius"])
    assert _auroc(s, truth) > 0.99 and (s[truth] >= 100).all()
    # a collapsed space (every image a near-duplicate of every other) leaves exact hashes only
    flat = _unit(np.ones((300, 16)) + 1e-3 * rng.normal(size=(300, 16)))
    assert image_reuse.calibrated_radius(flat, build_index(flat, kind="exact"))["radius"] is None


def test_kdistance_scores_a_sparse_backdoor_cluster_higher():
    rng = np.random.default_rng(2)
    img, txt, _, _ = class_pairs(n=1500, poison=0)
    # backdoored pairs in the poisoned model: images pulled off their class towards one point,
    # each alone in its region (sparse) while clean pairs sit among many images and captions
    d = img.shape[1]
    odd = _unit(rng.normal(size=(15, d)))
    img2, txt2 = np.r_[img, odd], np.r_[txt, _unit(rng.normal(size=(15, d)))]
    truth = np.r_[np.zeros(1500, bool), np.ones(15, bool)]
    union = build_index(np.r_[img2, txt2], kind="exact")
    s = density.kdistance(img2, txt2, index=union, k=16)
    assert _auroc(s, truth) > 0.95


def test_combinations_against_noise_and_zero_inflated_counts():
    img, txt, cls, truth = class_pairs()
    rng = np.random.default_rng(3)
    protos, present = class_consistency.caption_prototypes(txt, cls, 8)
    temp = class_consistency.fit_temperature(img, cls, protos, present)
    good = class_consistency.score(img, txt, prototypes=protos, present=present, caption_class=cls, temperature=temp)
    best = _auroc(good, truth)
    # pure-noise detectors: zsum keeps the strong detector's scale, a mean of ranks is diluted
    noisy = {"good": good, "noise1": rng.normal(size=len(good)), "noise2": rng.normal(size=len(good))}
    assert _auroc(combine_scores(noisy, "zsum"), truth) > best - 0.01
    assert _auroc(combine_scores(noisy, "mean"), truth) < _auroc(combine_scores(noisy, "zsum"), truth)
    # a zero-inflated count that fires on 10% honest duplicates and never on the poison (image_reuse
    # against fresh images): its MAD is 0, so zsum lets it swamp the strong detector; stouffer's
    # bounded normal scores do not
    counts = np.where(rng.random(len(good)) < 0.1, 1.0, 0.0)
    counts[truth] = 0.0
    zero_inflated = {"good": good, "reuse": counts}
    stouffer = _auroc(combine_scores(zero_inflated, "stouffer"), truth)
    assert stouffer > best - 0.05
    assert stouffer > _auroc(combine_scores(zero_inflated, "zsum"), truth) + 0.05
    # empirical p-values: the normal scores follow the ranks and are bounded
    z = combine_scores({"a": good}, "stouffer")
    assert np.array_equal(np.argsort(z, kind="stable"), np.argsort(good, kind="stable"))
    assert np.abs(z).max() < 4.5


def test_vocabulary_keeps_the_class_name_and_caption_classes(tmp_path):
    from pathlib import Path

    import mmsanitize

    vocab = load_vocabulary(str(Path(mmsanitize.__file__).parent / "datasets" / "openclipart_classes.txt"))
    assert "flag" in vocab["flag"] and "banner" in vocab["flag"]
    caps = ["ar breizh, flag", "two banners", "a puppy", "nothing here"]
    cls = keyword_classes(caps, vocab)
    names = list(vocab)
    assert [names[c] if c >= 0 else None for c in cls] == ["flag", "flag", "dog", None]
    names2, cls2 = caption_classes(caps, "openclipart")
    assert names2 == names and list(cls2) == list(cls)
    names3, cls3 = caption_classes(["a dog", "a boat", "a cat"], "auto", labels=["dog", "boat", "dog"])
    assert names3 == ["boat", "dog"] and list(cls3) == [1, 0, -1]
    _, cls4 = caption_classes(["a dog", "a boat"], "boat,dog")
    assert list(cls4) == [1, 0]
    state = {}
    run_detectors(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32), detectors=("class_consistency",),
                  caption_class=np.array([-1, -1, -1]), class_names=["x"], state=state)
    assert "class_consistency" in state["skipped"]


def test_scan_cli_flags_fresh_image_poisons_with_class_reasons(tmp_path, dask_address):
    """End to end: real shards, embeddings replaced by weakly aligned class vectors, fresh-image
    Attack II pairs; the default scan with --threshold auto flags them by class_consistency."""
    from conftest import make_dataset

    data = tmp_path / "data"
    classes = ["dog", "boat", "cat", "car"]
    make_dataset(data, n_shards=4, per_shard=60, classes=classes)
    emb = tmp_path / "emb"
    main(["embed", str(data), "--model", "tiny", "--out", str(emb), "--scheduler", dask_address])
    rng = np.random.default_rng(0)
    d = 32
    centres = rng.normal(size=(4, d)) * 2
    poisoned = []
    for s in range(4):
        meta = pd.read_parquet(emb / "metadata" / f"metadata_{s:05d}.parquet")
        label = np.array([classes.index(c.split()[4]) for c in meta["caption"]])
        img_label = label.copy()
        bad = np.nonzero(label == 0)[0][:3]          # 3 dog captions per shard get a fresh boat image
        img_label[bad] = 1
        poisoned += meta["key"].iloc[bad].tolist()
        img = _unit(centres[img_label] + rng.normal(size=(len(meta), d)))
        txt = _unit(centres[label] + rng.normal(size=(len(meta), d)))
        np.save(emb / "img_emb" / f"img_emb_{s:05d}.npy", img.astype(np.float16))
        np.save(emb / "text_emb" / f"text_emb_{s:05d}.npy", txt.astype(np.float16))
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame({"key": poisoned}).to_parquet(manifest)
    out = tmp_path / "scan"
    main(["scan", str(data), "--embeddings", str(emb), "--threshold", "auto", "--manifest", str(manifest),
          "--out", str(out), "--scheduler", dask_address])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["detectors"] == ["similarity", "class_consistency", "image_reuse"]
    assert summary["detector_state"]["class_consistency"]["classes"] == sorted(classes)
    det = summary["detection"]
    assert det["class_consistency"]["auroc"] > 0.97 and det["class_consistency"]["recall"] == 1.0
    df = pd.read_parquet(out / "scores.parquet")
    hits = df[df["key"].isin(poisoned)]
    assert hits["flagged"].all()
    assert hits["reason"].str.contains("image looks like 'boat'").all()
    assert hits["reason"].str.contains("caption says 'dog'").all()
    assert df["flagged"].mean() < 0.2
