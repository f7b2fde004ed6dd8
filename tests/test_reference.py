"""The kNN detectors' reference set: a seeded sample of the pairs, searched list by list."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import make_dataset
from test_scan import _error
from test_scan_scale import random_embeddings

from mmsanitize import reference as R
from mmsanitize.detectors import density


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(rng, n, d, centres):
    return _unit(centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, d)) * 0.6).astype(np.float16)


@pytest.mark.parametrize("kind", ["image", "joint", "union"])
def test_reference_index_probing_every_list_is_exact_search_and_the_default_recalls(tmp_path, kind):
    rng = np.random.default_rng(0)
    d, n_ref, n_total = 32, 24_000, 1_000_000
    centres = rng.normal(size=(40, d)).astype(np.float32)
    img, txt = _clustered(rng, n_ref, d, centres), _clustered(rng, n_ref, d, centres)
    gid = np.sort(rng.choice(n_total, n_ref, replace=False))
    R.write_rows(tmp_path, gid, img, txt)
    built = ["image", "text"] if kind == "union" else [kind]  # union: image and text lists, merged
    params = {kd: R.build_kind(tmp_path, kd, img, txt, gid, n_total, seed=0) for kd in built}[built[0]]
    assert params["nlist"] > 1 and params["nprobe"] < params["nlist"]  # above REFERENCE_EXACT: IVF lists
    base, ids = R.kind_vectors(kind, img, txt, gid, n_total)
    if kind == "joint":
        np.testing.assert_array_equal(base, density.joint(img, txt))
    queries = np.asarray(base[rng.choice(len(base), 300, replace=False)], np.float32) + 0.01
    exact = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :10]  # ties by position = by id
    ref = R.Reference(tmp_path)

    def index(nprobe=None):
        return ref.union(n_total, nprobe) if kind == "union" else ref.index(kind, nprobe)

    sims, got = index(nprobe=params["nlist"]).knn(queries, 10)
    assert np.array_equal(got, ids[exact])
    np.testing.assert_allclose(sims, np.take_along_axis(queries @ base.T, exact, 1), atol=1e-5)
    _, approx = index().knn(queries, 10)  # the default probes
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, ids[exact])])
    assert 0.95 <= recall < 1.0 or params["nprobe"] == params["nlist"], recall
    again = index().knn(queries, 10)
    assert np.array_equal(again[1], approx)
    if kind == "union":  # an image search already made for the same queries gives the same answer
        found = ref.index("image").knn(queries, 14)
        reused = index().knn(queries, 10, image_found=found)
        assert np.array_equal(reused[1], approx) and np.array_equal(reused[0], again[0])
    # partner vectors by global id, zeros outside the reference
    outside = np.setdiff1d(np.arange(50), gid)[:3]
    got = ref.take("txt", np.r_[gid[[5, 2]], outside])
    np.testing.assert_array_equal(got[:2], np.asarray(txt[[5, 2]], np.float32))
    assert not got[2:].any() and (ref.positions(outside) == -1).all()


def _random_pairs(tmp_path, n_shards=6, per_shard=20, d=24):
    """Shards plus our embed layout with random unit vectors (captions = image + noise): no ties."""
    data, emb = tmp_path / "data", tmp_path / "emb"
    make_dataset(data, n_shards=n_shards, per_shard=per_shard)
    random_embeddings(data, emb, d=d, noise=0.8, rng=np.random.default_rng(3), name="random-24")
    img = np.concatenate([np.load(f) for f in sorted((emb / "img_emb").glob("*.npy"))]).astype(np.float32)
    txt = np.concatenate([np.load(f) for f in sorted((emb / "text_emb").glob("*.npy"))]).astype(np.float32)
    return data, emb, img, txt


def _exact_agreement(mine, queries, base, partners, members, k):
    """Median cos(mine[i], partners[j]) over the k nearest reference rows j of queries[i], self skipped."""
    sims = queries @ base[members].T
    sims[members[None, :] == np.arange(len(queries))[:, None]] = -np.inf
    near = members[np.argsort(-sims, axis=1, kind="stable")[:, :k]]
    return np.median(np.einsum("bd,bkd->bk", mine, partners[near]), axis=1)


def test_scan_above_the_reference_size_finds_neighbours_among_the_seeded_sample(tmp_path, dask_address):
    from mmsanitize.scan import scan

    data, emb, img, txt = _random_pairs(tmp_path)
    n, size, k = len(img), 50, 5
    dets = ("similarity", "caption_neighbours", "density", "kdistance")
    s = scan(data, out=tmp_path / "scan", embeddings=emb, flag_fraction=0.05, detectors=dets, k=k,
             knn_reference=size, scheduler=dask_address)
    ref = s["index"]["reference"]
    assert ref["pairs"] == size and ref["sampled_from"] == n and s["index"]["kinds"] == ["image"]
    assert set(ref["kinds"]) == {"image", "text", "joint"} and ref["kinds"]["text"]["vectors"] == size
    members = R.sample_rows(n, size, 0)
    assert len(members) == size and len(set(members)) == size
    assert np.array_equal(np.load(tmp_path / "scan" / "index" / "reference" / "gid.npy"), members)
    got = pd.read_parquet(tmp_path / "scan" / "scores.parquet")
    t2i = _exact_agreement(img, txt, txt, img, members, k)
    i2t = _exact_agreement(txt, img, img, txt, members, k)
    np.testing.assert_allclose(got["caption_neighbours"], 1 - 0.5 * (t2i + i2t), atol=1e-5)
    # density: k-distance among the reference (self skipped), LOF against the neighbours' own
    joint = density.joint(img, txt)
    sims = joint @ joint[members].T
    sims[members[None, :] == np.arange(n)[:, None]] = -np.inf
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    kdist = 1 - np.take_along_axis(sims, order, 1)[:, -1]
    np.testing.assert_allclose(got["density"], density.lof(kdist.astype(np.float32), kdist[members[order]]),
                               rtol=1e-4)
    # kdistance: the 16th nearest of the image among the reference's images and captions (own pair skipped)
    sims = np.concatenate([img @ img[members].T, img @ txt[members].T], 1)
    sims[np.tile(members, 2)[None, :] == np.arange(n)[:, None]] = -np.inf
    np.testing.assert_allclose(got["kdistance"], np.maximum(1 - np.sort(sims, axis=1)[:, -16], 0), atol=1e-5)
    # 0 = every pair is a neighbour candidate, as below the reference size
    full = scan(data, out=tmp_path / "full", embeddings=emb, flag_fraction=0.05, detectors=dets, k=k,
                knn_reference=0, scheduler=dask_address)
    assert "reference" not in full["index"] and full["index"]["kinds"] == ["image", "text", "joint", "union"]
    f = pd.read_parquet(tmp_path / "full" / "scores.parquet")
    np.testing.assert_allclose(f["caption_neighbours"], 1 - 0.5 * (
        _exact_agreement(img, txt, txt, img, np.arange(n), k) + _exact_agreement(txt, img, img, txt, np.arange(n), k)),
        atol=1e-5)
    assert not np.allclose(f["caption_neighbours"], got["caption_neighbours"])
    # one local worker writes the same bytes as the two-worker cluster
    one = scan(data, out=tmp_path / "one", embeddings=emb, flag_fraction=0.05, detectors=dets, k=k,
               knn_reference=size, workers=1)
    assert one["index"] == s["index"]
    for name in ["scores.parquet", "index/reference/joint_vectors.npy", "index/reference/text_lists.npz"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "scan" / name).read_bytes(), name


def test_knn_reference_too_small_is_one_line(tmp_path, capsys, tiny_dataset):
    err = _error(capsys, ["scan", str(tiny_dataset), "--embeddings", str(tmp_path / "emb"), "--threshold", "0.2",
                          "--knn-reference", "10",
                          "--out", str(tmp_path / "s")])
    assert "--knn-reference" in err and not (tmp_path / "s").exists()
