"""scan: detectors on synthetic embeddings with known answers, the index, the CLI end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmsanitize.cli import main
from mmsanitize.detectors import caption_neighbours, density, image_reuse, similarity
from mmsanitize.index import build_index, exact_knn, exact_range
from mmsanitize.scan import combine_scores, run_detectors
from mmsanitize.shards import Sample, iter_samples, rewrite_shard, write_sizes


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered_pairs(n=3000, d=32, classes=20, swapped=30, noise=0.6, seed=0):
    """Pairs whose image and text sit near their class centre; `swapped` pairs get another class's image."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    label = rng.integers(0, classes, n)
    img_label = label.copy()
    bad = rng.choice(n, swapped, replace=False)
    img_label[bad] = (label[bad] + rng.integers(1, classes, swapped)) % classes
    img = _unit(centres[img_label] + noise * rng.normal(size=(n, d)))
    txt = _unit(centres[label] + noise * rng.normal(size=(n, d)))
    truth = np.zeros(n, bool)
    truth[bad] = True
    return img, txt, truth


def _auroc(score, truth):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(truth, score)


def test_swapped_pairs_get_top_scores_from_every_embedding_detector():
    img, txt, truth = clustered_pairs()
    scores = run_detectors(img, txt, detectors=("similarity", "caption_neighbours", "density"))
    for name, s in scores.items():
        assert _auroc(s, truth) > 0.97, name
    top = np.argsort(-combine_scores(scores))[: truth.sum()]
    assert truth[top].mean() > 0.9


def test_caption_neighbours_catches_what_a_global_threshold_misses():
    # two kinds of classes: tight ones (cos ~0.9) and loose ones (cos ~0.3); swaps among tight classes
    # still have higher cosine than many clean loose pairs, but disagree with their neighbourhood.
    rng = np.random.default_rng(1)
    d, n = 64, 2000
    centres = rng.normal(size=(10, d))
    label = rng.integers(0, 10, n)
    tight = label < 5
    noise = np.where(tight, 0.25, 1.6)[:, None]
    img_label = label.copy()
    bad = np.nonzero(tight)[0][:20]
    img_label[bad] = (label[bad] + 1) % 5
    mix = 0.8
    img = _unit(mix * centres[img_label] + (1 - mix) * centres[label] + noise * rng.normal(size=(n, d)) / np.sqrt(d) * 8)
    txt = _unit(centres[label] + noise * rng.normal(size=(n, d)) / np.sqrt(d) * 8)
    truth = np.zeros(n, bool)
    truth[bad] = True
    sim = similarity.score(img, txt)
    idx_i, idx_t = build_index(img, kind="exact"), build_index(txt, kind="exact")
    cn = caption_neighbours.score(img, txt, image_index=idx_i, text_index=idx_t, k=10)
    assert _auroc(cn, truth) > _auroc(sim, truth)
    assert _auroc(cn, truth) > 0.95


def test_image_reuse_finds_one_image_with_many_captions():
    img, txt, _ = clustered_pairs(n=500, swapped=0)
    sha = np.array([f"h{i}" for i in range(500)], dtype=object)
    reused = np.arange(10, 18)
    img[reused] = img[3]                # same image bytes, captions of other pairs
    sha[reused] = sha[3]
    img[400] = _unit(img[3:4] + 0.01)[0]  # a near-duplicate re-encoding
    idx = build_index(img, kind="exact")
    s = image_reuse.score(img, txt, image_index=idx, sha256=sha)
    group = np.r_[3, reused, 400]
    assert set(np.nonzero(s >= 5)[0]) == set(group)
    assert s[np.setdiff1d(np.arange(500), group)].max() == 0
    # honest duplicates (same image, same caption) do not count
    txt2 = txt.copy()
    txt2[reused] = txt[3]
    assert image_reuse.score(img, txt2, sha256=sha, captions=np.array(["c"] * 500, dtype=object)).max() == 0


def test_density_scores_isolated_pairs_higher():
    img, txt, truth = clustered_pairs(n=1000, swapped=10)
    joint = density.joint(img, txt)
    s = density.score(joint, index=build_index(joint, kind="exact"), k=10)
    assert _auroc(s, truth) > 0.95


def test_auto_threshold_splits_a_bimodal_mixture():
    rng = np.random.default_rng(0)
    cos = np.r_[rng.normal(0.30, 0.03, 5000), rng.normal(0.10, 0.03, 100)]
    fit = similarity.auto_threshold(cos, seed=0)
    assert fit["method"] == "gmm" and 0.14 < fit["threshold"] < 0.24
    # a skewed clean distribution (broad low bulk, tight high peak) must not flag the bulk
    skew = np.r_[rng.normal(0.15, 0.15, 8000), rng.normal(0.6, 0.04, 2000)]
    fit = similarity.auto_threshold(skew, seed=0)
    assert fit["method"] == "quantile-0.01" and np.mean(skew < fit["threshold"]) < 0.02


def test_ivf_index_agrees_with_exact_search(tmp_path):
    img, _, _ = clustered_pairs(n=6000, d=32, classes=50, noise=0.3)
    exact = build_index(img, kind="exact")
    ivf = build_index(img, kind="ivf", nlist=64, nprobe=16)
    _, e_ids = exact.knn(img[:300], 10)
    _, i_ids = ivf.knn(img[:300], 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(e_ids, i_ids)])
    assert recall >= 0.95
    lims, sims, ids = ivf.range_search(img[:50], 0.9)
    lims_e, sims_e, ids_e = exact_range(img, img[:50], 0.9)
    assert lims[-1] >= 0.95 * lims_e[-1] and (sims >= 0.9 - 1e-6).all()
    s, i = exact_knn(img, img[:5], 3)
    assert (i[:, 0] == np.arange(5)).all() and np.all(np.diff(s, axis=1) <= 1e-7)
    from mmsanitize.index import load_index

    for index, name in ((ivf, "ivf"), (exact, "exact")):
        index.save(tmp_path / f"{name}.index")
        back = load_index(tmp_path / f"{name}.index")
        assert back.kind == name and np.array_equal(back.knn(img[:20], 5)[1], index.knn(img[:20], 5)[1])


def test_list_bucketed_range_search_finds_what_faiss_finds():
    """ivf_batch_range (queries bucketed by inverted list, one product per list) against faiss'
    own per-query range_search on the same IVF-SQ8 (residual codes) and IVF-Flat indexes."""
    import faiss

    from mmsanitize.index import ivf_batch_range

    img, _, _ = clustered_pairs(n=6000, d=32, classes=50, noise=0.3)
    img = np.ascontiguousarray(img, np.float32)
    faiss.omp_set_num_threads(1)
    for spec in ("IVF64,SQ8", "IVF64,Flat"):
        idx = faiss.index_factory(32, spec, faiss.METRIC_INNER_PRODUCT)
        idx.train(img)
        idx.add(img)
        idx.nprobe = 4
        lims, sims, ids = ivf_batch_range(idx, img[:400], 0.9)
        f_lims, f_sims, f_ids = idx.range_search(img[:400], 0.9)
        assert lims[-1] > 400  # not only each query itself
        for q in range(400):
            mine = dict(zip(ids[lims[q]:lims[q + 1]].tolist(), sims[lims[q]:lims[q + 1]].tolist()))
            theirs = dict(zip(f_ids[f_lims[q]:f_lims[q + 1]].tolist(), f_sims[f_lims[q]:f_lims[q + 1]].tolist()))
            near_edge = {i for i, v in {**mine, **theirs}.items() if abs(v - 0.9) < 1e-5}
            assert set(mine) ^ set(theirs) <= near_edge, (spec, q)
            assert all(abs(mine[i] - theirs[i]) < 1e-4 for i in set(mine) & set(theirs))
            assert list(mine) == sorted(mine)


def test_near_duplicate_groups_depend_on_the_shard_sizes_only():
    from mmsanitize.scan_tasks import near_groups

    offsets = np.r_[0, np.cumsum([10, 10, 5, 30, 10, 10, 1])]
    assert near_groups(offsets, 20) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert near_groups(offsets, 1) == [(i, i + 1) for i in range(7)]
    assert near_groups(offsets, 10**6) == [(0, 7)]
    assert near_groups(np.zeros(1, np.int64), 5) == []


def test_range_search_reuses_the_lists_found_when_the_index_was_filled():
    """ivf_add (one quantizer search for the add and the later range search) fills the same index
    as faiss' add_with_ids, and its kept lists give the same range results as a fresh search."""
    import faiss

    from mmsanitize.index import ivf_add, ivf_batch_range

    img, _, _ = clustered_pairs(n=6000, d=32, classes=50, noise=0.3)
    img = np.ascontiguousarray(img, np.float32)
    faiss.omp_set_num_threads(1)
    trained = faiss.index_factory(32, "IVF64,SQ8", faiss.METRIC_INNER_PRODUCT)
    trained.train(img)
    ids = np.arange(len(img), dtype=np.int64) + 1000
    ref, mine = faiss.clone_index(trained), faiss.clone_index(trained)
    ref.add_with_ids(img, ids)
    assign = ivf_add(mine, img, ids, probes=6)
    assert assign.shape == (len(img), 6) and assign.dtype == np.int32
    assert np.array_equal(faiss.serialize_index(ref), faiss.serialize_index(mine))
    mine.nprobe = 4
    fresh = ivf_batch_range(mine, img[:500], 0.9)
    kept = ivf_batch_range(mine, img[:500], 0.9, assign[:500])
    assert fresh[0][-1] > 500
    for a, b in zip(fresh, kept):
        assert np.array_equal(a, b)
    wrong = np.roll(assign[:500], 1, axis=0)  # other rows' lists: the kept lists are what is searched
    assert not np.array_equal(ivf_batch_range(mine, img[:500], 0.9, wrong)[2], fresh[2])
    with pytest.raises(ValueError, match="need"):
        ivf_batch_range(mine, img[:500], 0.9, assign[:500, :2])


def test_ivf_training_is_seeded_and_single_threaded():
    """scan trains its IVF with one thread: faiss' k-means with 2 threads gives other centroids
    (measured: BLAS splits the products differently), so a thread count taken from the cluster's
    size would make 1- and 2-worker scans differ."""
    import faiss

    from mmsanitize.index import train_ivf

    img, _, _ = clustered_pairs(n=20000, d=64, classes=40, noise=0.3)
    blob = lambda idx: faiss.serialize_index(idx).tobytes()  # noqa: E731
    faiss.omp_set_num_threads(2)
    first = train_ivf(img, nlist=256, codec="SQ8", seed=3)
    assert faiss.omp_get_max_threads() == 1
    assert blob(first) == blob(train_ivf(img, nlist=256, codec="SQ8", seed=3))
    assert blob(first) != blob(train_ivf(img, nlist=256, codec="SQ8", seed=4))


def test_two_level_centroids_fit_as_well_as_flat_k_means():
    """The IVF's two-level k-means (√nlist coarse clusters, each split in proportion to its points)
    gives exactly nlist centroids that fit the data about as well as one flat k-means over all
    nlist, with lists no less balanced (at 10M pairs it trains in ~20 s instead of ~330 s)."""
    import faiss

    from mmsanitize.index import two_level_centroids

    img, _, _ = clustered_pairs(n=30000, d=32, classes=120, noise=0.3)
    x = np.ascontiguousarray(img, np.float32)
    faiss.omp_set_num_threads(1)
    flat = faiss.Kmeans(32, 512, niter=10, spherical=True, seed=0, verbose=False)
    flat.train(x)
    two = two_level_centroids(x, 512, seed=0)
    assert two.shape == (512, 32)
    fit = {}
    for name, c in (("flat", flat.centroids), ("two", two)):
        q = faiss.IndexFlatIP(32)
        q.add(c)
        sims, lists = q.search(x, 1)
        sizes = np.bincount(lists.ravel(), minlength=512).astype(float)
        fit[name] = (float(sims.mean()), float((sizes ** 2).sum() * 512 / len(x) ** 2))
    assert fit["two"][0] > fit["flat"][0] - 0.005, fit
    assert fit["two"][1] < 1.2 * fit["flat"][1], fit


# ----------------------------------------------------------------------------- CLI end to end


@pytest.fixture(scope="module")
def emb_data(tmp_path_factory, dask_address):
    """Tiny shards + their tiny-model embeddings, shared by the CLI tests of this module."""
    from conftest import make_dataset

    root = tmp_path_factory.mktemp("scan")
    data = root / "data"
    make_dataset(data)
    main(["embed", str(data), "--model", "tiny", "--out", str(root / "emb"), "--scheduler", dask_address])
    return data, root / "emb"


def _scan(data, out, dask_address, *extra):
    main(["scan", str(data), "--out", str(out), "--scheduler", dask_address, *extra])


def test_precomputed_and_inline_embeddings_give_identical_scans(emb_data, tmp_path, dask_address):
    data, emb = emb_data
    alld = ["--detectors", "similarity,image_reuse,caption_neighbours,density"]
    _scan(data, tmp_path / "a", dask_address, "--embeddings", str(emb), "--threshold", "auto", "--flag-fraction", "0.1", *alld)
    _scan(data, tmp_path / "b", dask_address, "--model", "tiny", "--threshold", "auto", "--flag-fraction", "0.1", *alld)
    a = (tmp_path / "a" / "scores.parquet").read_bytes()
    assert a == (tmp_path / "b" / "scores.parquet").read_bytes()
    df = pd.read_parquet(tmp_path / "a" / "scores.parquet")
    assert list(df.columns[:2]) == ["key", "shard"] and len(df) == 36
    assert {"similarity", "image_reuse", "caption_neighbours", "density", "combined", "flagged", "reason"} <= set(df.columns)
    assert (df.loc[df["flagged"], "reason"].str.len() > 0).all() and (df.loc[~df["flagged"], "reason"] == "").all()
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["flagged"] == int(df["flagged"].sum()) >= 4
    assert -1 <= summary["thresholds"]["similarity"] <= 1
    assert (tmp_path / "a" / "index" / "image.index").exists()
    ids = pd.read_parquet(tmp_path / "a" / "index" / "ids.parquet")
    assert list(ids["key"]) == list(df["key"])
    # a rerun with the same inputs reuses the result
    mtime = (tmp_path / "a" / "scores.parquet").stat().st_mtime_ns
    _scan(data, tmp_path / "a", dask_address, "--embeddings", str(emb), "--threshold", "auto", "--flag-fraction", "0.1", *alld)
    assert (tmp_path / "a" / "scores.parquet").stat().st_mtime_ns == mtime
    (tmp_path / "a" / "scan_00001_stats.json").unlink()
    _scan(data, tmp_path / "a", dask_address, "--embeddings", str(emb), "--threshold", "auto", "--flag-fraction", "0.1", *alld)
    assert (tmp_path / "a" / "scores.parquet").read_bytes() == a


def test_attack_one_image_reuse_found_with_manifest_metrics(tmp_path, dask_address):
    from conftest import make_dataset

    data = tmp_path / "clean"
    paths = make_dataset(data)
    # Attack I by hand: dog captions in shard 1 all get the image of boat sample 000000001
    target = next(s for s in iter_samples(paths[0]) if s.key == "000000001")
    victims = [s for s in iter_samples(paths[1]) if "dog" in s.caption]
    poisoned = tmp_path / "poisoned"
    shutil.copytree(data, poisoned, ignore=shutil.ignore_patterns("_catalog"))
    rewrite_shard(paths[1], poisoned, "00001",
                  replace={v.key: Sample(v.key, target.image, target.image_ext, v.caption, v.meta) for v in victims})
    write_sizes(poisoned)
    keys = [v.key for v in victims]
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame({"key": keys, "shard": "00001.tar", "attack": "single-image", "goal": "dog2one",
                  "source_key": keys, "image_source_key": "000000001", "caption": [v.caption for v in victims],
                  "mode": "replace"}).to_parquet(manifest)
    # image_reuse alone: every pair sharing the reused image counts, the original included
    out = tmp_path / "scan"
    _scan(poisoned, out, dask_address, "--model", "tiny", "--detectors", "image_reuse", "--flag-fraction", "0",
          "--manifest", str(manifest))
    df = pd.read_parquet(out / "scores.parquet")
    flagged = set(df.loc[df["flagged"], "key"])
    assert flagged == set(keys) | {"000000001"}
    assert df.loc[df["flagged"], "reason"].str.contains("image_reuse").all()
    det = json.loads((out / "summary.json").read_text())["detection"]
    assert det["poisoned"] == len(keys)
    assert det["image_reuse"]["recall"] == 1.0 and det["image_reuse"]["auroc"] > 0.95
    # the per-shard pair counts give sklearn's AUROC over the whole scores.parquet
    truth = df["key"].isin(keys).to_numpy()
    assert abs(det["image_reuse"]["auroc"] - _auroc(df["image_reuse"].to_numpy(), truth)) < 1e-12
    assert abs(det["combined"]["auroc"] - _auroc(df["combined"].to_numpy(), truth)) < 1e-12
    assert {"auroc", "precision_at_k", "precision", "recall"} <= set(det["combined"])

    # with similarity too, the pair whose caption fits the shared image (the original) is spared:
    # hand-made embeddings where clean captions sit on their image and the victims' do not
    emb = tmp_path / "emb"
    main(["embed", str(poisoned), "--model", "tiny", "--out", str(emb), "--scheduler", dask_address])
    rng = np.random.default_rng(0)
    for shard in ("00000", "00001", "00002"):
        meta = pd.read_parquet(emb / "metadata" / f"metadata_{shard}.parquet")
        img = np.load(emb / "img_emb" / f"img_emb_{shard}.npy").astype(np.float32)
        d = img.shape[1]
        img = _unit(rng.normal(size=(len(meta), d)))
        if shard == "00000":
            original = img[meta["key"].tolist().index("000000001")].copy()
        else:
            img[meta["key"].isin(keys).to_numpy()] = original
        txt = _unit(img + 0.3 * rng.normal(size=img.shape) / np.sqrt(d))
        bad = meta["key"].isin(keys).to_numpy()
        txt[bad] = _unit(rng.normal(size=(int(bad.sum()), d)))
        np.save(emb / "img_emb" / f"img_emb_{shard}.npy", img.astype(np.float16))
        np.save(emb / "text_emb" / f"text_emb_{shard}.npy", txt.astype(np.float16))
    out2 = tmp_path / "scan2"
    _scan(poisoned, out2, dask_address, "--embeddings", str(emb), "--threshold", "-1", "--manifest", str(manifest),
          "--detectors", "similarity,image_reuse")
    df = pd.read_parquet(out2 / "scores.parquet")
    assert set(df.loc[df["flagged"], "key"]) == set(keys)
    assert df.loc[df["flagged"], "reason"].str.contains("fits it worse than the median pair").all()
    det = json.loads((out2 / "summary.json").read_text())["detection"]
    assert det["combined"]["auroc"] == 1.0 and det["image_reuse"]["precision"] == 1.0


def test_reuse_min_auto_spares_honest_multi_caption_images(tmp_path, dask_address):
    """COCO-like data (3 captions per image): only an image under more captions than usual fires."""
    from conftest import make_image
    from mmsanitize.shards import ShardWriter

    data = tmp_path / "multi"
    with ShardWriter(data, "00000") as w:
        for i in range(12):
            img = make_image("dog", i)
            for c in range(3):
                w.write(Sample(f"{i:04d}{c}", img, "jpg", f"caption {c} of image {i}", {"label": "dog"}))
        for j in range(6):  # image 0 reused under 6 more, unrelated captions
            w.write(Sample(f"9999{j}", make_image("dog", 0), "jpg", f"a boat {j}", {"label": "boat"}))
    write_sizes(data)
    out = tmp_path / "scan"
    _scan(data, out, dask_address, "--model", "tiny", "--detectors", "image_reuse", "--flag-fraction", "0")
    df = pd.read_parquet(out / "scores.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["thresholds"]["image_reuse"] == 3      # median count 2, + 1
    assert set(df.loc[df["flagged"], "key"]) == {f"0000{c}" for c in range(3)} | {f"9999{j}" for j in range(6)}


def _error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line_errors(emb_data, tmp_path, dask_address, capsys):
    data, emb = emb_data
    base = ["scan", str(data), "--scheduler", dask_address]
    assert "outside [-1, 1]" in _error(capsys, base + ["--out", str(tmp_path / "s1"), "--embeddings", str(emb),
                                                       "--threshold", "1.5"])
    assert "--threshold" in _error(capsys, base + ["--out", str(tmp_path / "s1"), "--embeddings", str(emb),
                                                   "--threshold", "abc"])
    assert "--reuse-min" in _error(capsys, base + ["--out", str(tmp_path / "s1"), "--embeddings", str(emb),
                                                   "--threshold", "0.2", "--reuse-min", "-2"])
    assert "--classes" in _error(capsys, base + ["--out", str(tmp_path / "s0"), "--embeddings", str(emb),
                                                 "--threshold", "auto", "--classes", "no/such/vocab.txt"])
    assert not (tmp_path / "s0").exists()
    other = tmp_path / "other"
    shutil.copytree(emb, other)
    card = json.loads((other / "model.json").read_text())
    card["name"], card["checkpoint_sha256"] = "open_clip:ViT-B-32", "ab" * 32
    (other / "model.json").write_text(json.dumps(card))
    assert "not --model 'tiny'" in _error(capsys, base + ["--out", str(tmp_path / "s2"), "--embeddings", str(other),
                                                          "--model", "tiny", "--threshold", "0.2"])
    short = tmp_path / "short"
    shutil.copytree(emb, short)
    for sub in ("img_emb", "text_emb"):
        p = short / sub / f"{sub}_00001.npy"
        np.save(p, np.load(p)[:-1])
    meta = pd.read_parquet(short / "metadata" / "metadata_00001.parquet")
    meta.iloc[:-1].to_parquet(short / "metadata" / "metadata_00001.parquet")
    err = _error(capsys, base + ["--out", str(tmp_path / "s3"), "--embeddings", str(short), "--threshold", "0.2"])
    assert "00001.tar" in err and "11 rows" in err and "12 samples" in err
    assert not (tmp_path / "s3" / "scores.parquet").exists()


def test_worker_caption_cache_is_bounded_and_stays_correct(tmp_path, monkeypatch):
    """Rows.captions keeps at most CAPTION_SHARDS shards' captions (near-duplicate partners can sit
    in every shard of a web-scale scan) and still returns each row's own caption."""
    from mmsanitize import scan_tasks as T

    monkeypatch.setattr(T, "CAPTION_SHARDS", 2)
    shards = []
    for s in range(5):
        path = tmp_path / f"{s:05d}.parquet"
        pd.DataFrame({"caption": [f"shard {s} row {i}" for i in range(3)]}).to_parquet(path)
        shards.append({"name": f"{s:05d}", "catalog": str(path)})
    rows = T.Rows({"shards": shards, "offsets": np.arange(0, 16, 3), "work": str(tmp_path)})
    ids = np.array([14, 0, 7, 3, 12, 1, 8, 5, 13])
    for _ in range(2):
        got = rows.captions(ids)
        assert list(got) == [f"shard {i // 3} row {i % 3}" for i in ids]
        assert len(rows._caps) <= 2


def test_worker_keeps_a_bounded_number_of_embedding_files_mapped(tmp_path, monkeypatch):
    """Rows maps at most MAPPED_FILES embedding files (a kNN re-rank or the training sample reads
    rows of every shard: mapped pages count in the worker's RSS) and still reads the right rows."""
    from mmsanitize import scan_tasks as T

    monkeypatch.setattr(T, "MAPPED_FILES", 3)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(20, 4)).astype(np.float16)
    shards = []
    for s in range(5):
        np.save(tmp_path / f"img_{s}.npy", vecs[4 * s:4 * s + 4])
        shards.append({"name": f"{s:05d}", "img": str(tmp_path / f"img_{s}.npy")})
    rows = T.Rows({"shards": shards, "offsets": np.arange(0, 21, 4), "work": str(tmp_path)})
    ids = np.array([19, 0, 9, 4, 13, 2, 17, 6])
    for _ in range(2):
        assert np.array_equal(rows.take("img", ids), vecs[ids].astype(np.float32))
        assert len(rows._mm) <= 3


def test_shard_parts_hold_inverted_lists_only_and_merge_as_faiss_does(tmp_path):
    """A shard's IVF part is its inverted lists without the trained quantizer (13 MB per shard
    at 10M pairs); merged on disk they give the same index and .ivfdata as faiss' merge_ondisk
    of full per-shard indexes."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    from mmsanitize.index import merge_invlists_ondisk, write_invlists

    img, _, _ = clustered_pairs(n=6000, d=32, classes=50, noise=0.3)
    img = np.ascontiguousarray(img, np.float32)
    faiss.omp_set_num_threads(1)
    trained = faiss.index_factory(32, "IVF512,SQ8", faiss.METRIC_INNER_PRODUCT)
    trained.train(img)
    full, lists = [], []
    for s in range(3):
        part = faiss.clone_index(trained)
        part.add_with_ids(img[2000 * s:2000 * (s + 1)], np.arange(2000 * s, 2000 * (s + 1)))
        full.append(str(tmp_path / f"{s}.index"))
        faiss.write_index(part, full[-1])
        lists.append(str(tmp_path / f"{s}.invlists"))
        write_invlists(part, lists[-1])
    assert Path(lists[0]).stat().st_size < Path(full[0]).stat().st_size - 512 * 32 * 4  # no centroids
    ref, mine = faiss.clone_index(trained), faiss.clone_index(trained)
    merge_ondisk(ref, full, str(tmp_path / "ref.ivfdata"))
    merge_invlists_ondisk(mine, lists, str(tmp_path / "new.ivfdata"))
    assert mine.ntotal == ref.ntotal == 6000
    assert (tmp_path / "new.ivfdata").read_bytes() == (tmp_path / "ref.ivfdata").read_bytes()
    for name, idx in (("ref", ref), ("mine", mine)):
        faiss.write_index(idx, str(tmp_path / f"{name}.index"))
    assert (tmp_path / "mine.index").read_bytes() == \
        (tmp_path / "ref.index").read_bytes().replace(b"ref.ivfdata", b"new.ivfdata")
    with pytest.raises(ValueError, match="empty"):
        merge_invlists_ondisk(mine, lists, str(tmp_path / "again.ivfdata"))
