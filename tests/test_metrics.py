"""Metrics: hand-made embeddings with known ranks, blockwise == brute force, Recall@K grouping."""

from __future__ import annotations

import numpy as np
import pytest

from mmsanitize.metrics import (min_ranks, min_ranks_bruteforce, normalize, rank_summary,
                                retrieval_recall, topk)


def test_min_ranks_hand_made():
    gallery = np.eye(4, dtype=np.float32)                     # item i points along axis i
    queries = np.array([[1, 0.5, 0, 0],                       # best target (group 0 = item 0) first
                        [0.9, 0.1, 0.8, 0.0],                 # target item 2 is second
                        [0.1, 0.2, 0.3, 0.4]], np.float32)    # target item 0 is last
    ggroup = np.array([0, 1, 2, 3])
    ranks = min_ranks(queries, gallery, np.array([0, 2, 0]), ggroup)
    assert ranks.tolist() == [0, 1, 3]
    s = rank_summary(ranks, ks=(1, 2, 5))
    assert s["min_rank_mean"] == pytest.approx(4 / 3)
    assert s["hit@1"] == pytest.approx(1 / 3) and s["hit@2"] == pytest.approx(2 / 3) and s["hit@5"] == 1.0


def test_min_ranks_multiple_targets_and_missing_group():
    gallery = np.eye(3, dtype=np.float32)
    queries = np.array([[0.1, 0.5, 0.9]], np.float32)
    # targets = items 0 and 1 (group 7): best is item 1, one item (2) above it
    assert min_ranks(queries, gallery, [7], [7, 7, 3]).tolist() == [1]
    # no gallery item of the query's group: rank = gallery size
    assert min_ranks(queries, gallery, [9], [7, 7, 3]).tolist() == [3]


def test_ties_count_for_the_target():
    gallery = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    q = np.array([[1, 0]], np.float32)
    assert min_ranks(q, gallery, [1], [0, 1, 2]).tolist() == [0]
    assert min_ranks_bruteforce(q, gallery, [1], [0, 1, 2]).tolist() == [0]


@pytest.mark.parametrize("max_elements", [7, 100, 1 << 24])
def test_blockwise_equals_bruteforce(max_elements):
    rng = np.random.default_rng(0)
    q = normalize(rng.normal(size=(57, 16)))
    g = normalize(rng.normal(size=(203, 16)))
    qg = rng.integers(0, 12, size=57)
    gg = rng.integers(0, 12, size=203)
    assert np.array_equal(min_ranks(q, g, qg, gg, max_elements=max_elements), min_ranks_bruteforce(q, g, qg, gg))
    idx, val = topk(q, g, 5, max_elements=max_elements)
    full = q @ g.T
    assert np.array_equal(idx, np.argsort(-full, axis=1, kind="stable")[:, :5])
    assert np.allclose(val, np.take_along_axis(full, idx, 1), atol=1e-6)


def test_retrieval_recall_groups_duplicate_images():
    # 3 distinct images; image "a" appears in two pairs with different captions
    img = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    txt = np.array([[1, 0.1, 0], [0.9, 0, 0.2], [0, 0, 1], [0, 1, 0]], np.float32)  # last two swapped
    r = retrieval_recall(img, txt, ["a", "a", "b", "c"], ks=(1, 2))
    assert r["images"] == 3 and r["captions"] == 4
    assert r["t2i_r@1"] == pytest.approx(0.5)      # the two captions of "a" find it first
    assert r["i2t_r@1"] == pytest.approx(1 / 3)    # "a" retrieves one of its captions first
    assert r["t2i_r@2"] == 1.0
    assert r["i2t_r@2"] == pytest.approx(1 / 3)    # "b" and "c" have two captions above their own


def test_class_precision_hand_made():
    from mmsanitize.metrics import class_precision

    gallery = np.eye(4, dtype=np.float32)             # images 0,1 are class a; 2,3 class b
    q = np.array([[1, 0.9, 0, 0], [0, 0, 0.2, 1], [1, 0, 0.8, 0]], np.float32)
    # top-2: q0 -> {0,1} both a (1.0); q1 -> {3,2} both b (1.0); q2 (label a) -> {0,2}: one a (0.5)
    assert class_precision(q, gallery, ["a", "b", "a"], ["a", "a", "b", "b"], k=2) == pytest.approx(2.5 / 3)
    assert class_precision(q, gallery, ["b", "a", "b"], ["a", "a", "b", "b"], k=2) == pytest.approx(0.5 / 3)


def test_attack_metrics_known_answer(tmp_path):
    import pandas as pd

    from mmsanitize.evaluate import attack_metrics

    meta = {"key": ["k0", "k1", "k2", "k3"], "shard": ["00000.tar"] * 4, "sha256": ["d1", "d2", "b1", "c1"],
            "label": ["dog", "dog", "boat", "cat"], "caption": ["c0", "c1", "c2", "c3"]}
    img = np.eye(4, dtype=np.float32)
    txt = normalize(np.array([[0.2, 0, 0.9, 0],       # dog caption pointing at the boat image
                              [0.1, 0.5, 0, 0.9],     # dog caption: cat > dog2 > dog1 > boat
                              [0, 0.1, 0.2, 1],
                              [0, 0, 0, 1]], np.float32))
    rows = [{"key": "p0", "shard": "00000.tar", "attack": "single-label", "goal": "dog2boat", "sha256": "x"},
            {"key": "p1", "shard": "00000.tar", "attack": "single-image", "goal": "dog2one", "sha256": "c1"}]
    pd.DataFrame(rows).to_parquet(tmp_path / "manifest.parquet")
    res = attack_metrics(None, meta, img, txt, tmp_path / "manifest.parquet", seed=0)
    ii = res["dog2boat"]
    assert ii["target_images"] == 1 and ii["class_a_captions"] == 2
    assert ii["t2i"]["min_rank_mean"] == 1.5 and ii["t2i"]["hit@1"] == 0.5 and ii["t2i"]["hit@5"] == 1.0
    assert ii["baseline_random_t2i"]["queries"] == 2
    assert ii["i2t"]["queries"] == 1 and ii["i2t"]["min_rank_mean"] == 0   # boat image finds a dog caption first
    one = res["dog2one"]
    assert one["target_in_gallery"] is True and one["target_sha256"] == "c1"
    assert one["t2i"]["min_rank_mean"] == 1.0 and one["t2i"]["hit@1"] == 0.5
    # utility without the attacked class: captions c2 (boat; own image ranks 1) and c3 (cat; rank 0)
    from mmsanitize.metrics import retrieval_ranks

    t2i, _ = retrieval_ranks(img, txt, meta["sha256"])
    assert list(t2i) == [1, 1, 1, 0]
    res = attack_metrics(None, meta, img, txt, tmp_path / "manifest.parquet", seed=0, t2i_ranks=t2i)
    assert res["dog2boat"]["utility_other_captions"] == {"t2i_r@1": 0.5, "t2i_r@5": 1.0, "t2i_r@10": 1.0}
