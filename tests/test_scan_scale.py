"""scan as a per-shard pipeline: kill + resume, bounded client memory, clip-retrieval embeddings
folders, near-duplicate reuse on perturbed copies, and an external cluster with relative paths."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_dataset
from mmsanitize.cli import main
from mmsanitize.shards import iter_samples
from test_scan import _error

ENV = dict(os.environ, MMSANITIZE_PROGRESS="0", PYTHONPATH=str(Path(__file__).resolve().parents[1]))


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def thumbnail_embeddings(data: Path, out: Path, d_text: int = 256) -> None:
    """A real, simple encoder written in our embed layout: the image as a 16x16 grey thumbnail minus
    its mean (re-encoded and resized copies stay close, other images do not), the caption as a
    seeded random projection of its words. Deterministic."""
    from PIL import Image

    vocab_rng = {}
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for tar in sorted(data.glob("*.tar")):
        img, txt, rows = [], [], []
        for i, s in enumerate(iter_samples(tar)):
            with Image.open(io.BytesIO(s.image)) as im:
                a = np.asarray(im.convert("L").resize((16, 16), Image.BILINEAR), np.float32).ravel()
            img.append(a - a.mean() + 1e-3)
            v = np.zeros(d_text, np.float32)
            for w in s.caption.lower().split():
                if w not in vocab_rng:
                    seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little")
                    vocab_rng[w] = np.random.default_rng(seed).normal(size=d_text).astype(np.float32)
                v += vocab_rng[w]
            txt.append(v)
            rows.append({"key": s.key, "caption": s.caption, "row": i, "shard": tar.name})
        np.save(out / "img_emb" / f"img_emb_{tar.stem}.npy", _unit(img).astype(np.float16))
        np.save(out / "text_emb" / f"text_emb_{tar.stem}.npy", _unit(txt).astype(np.float16))
        pd.DataFrame(rows).to_parquet(out / "metadata" / f"metadata_{tar.stem}.parquet")
    (out / "model.json").write_text(json.dumps({"name": "thumbnail-16x16"}))


def random_embeddings(data: Path, out: Path, *, d: int, noise: float, rng, name: str) -> None:
    """Our embed layout for `data`'s shards: random unit image vectors, captions = image + `noise`
    times Gaussian noise (no ties), float16."""
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir(parents=True)
    for tar in sorted(data.glob("*.tar")):
        keys = [s.key for s in iter_samples(tar)]
        img = _unit(rng.normal(size=(len(keys), d)))
        txt = _unit(img + rng.normal(size=img.shape) * noise)
        np.save(out / "img_emb" / f"img_emb_{tar.stem}.npy", img.astype(np.float16))
        np.save(out / "text_emb" / f"text_emb_{tar.stem}.npy", txt.astype(np.float16))
        pd.DataFrame({"key": keys}).to_parquet(out / "metadata" / f"metadata_{tar.stem}.parquet")
    (out / "model.json").write_text(json.dumps({"name": name}))


def _scan_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mmsanitize", "scan", *map(str, args)], env=ENV, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["200000", "100"])  # all 400 pairs as neighbours / a sample of 100
def test_sigkill_mid_scan_then_rerun_is_byte_identical_and_skips_finished_shards(tmp_path, reference):
    data = tmp_path / "data"
    make_dataset(data, n_shards=40, per_shard=10)
    emb = tmp_path / "emb"
    thumbnail_embeddings(data, emb)
    args = [data, "--embeddings", emb, "--threshold", "auto", "--flag-fraction", "0.05", "--workers", "1",
            "--detectors", "similarity,class_consistency,image_reuse,caption_neighbours,density",
            "--knn-reference", reference]
    ref = _scan_cli(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "scan"
    proc = subprocess.Popen([sys.executable, "-m", "mmsanitize", "scan", *map(str, args), "--out", str(out)],
                            env=ENV, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(out.glob("scan_*_stats.json"))) < 3:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("scores_*.parquet")}
    done = list(out.glob("scan_*_stats.json"))
    assert 3 <= len(done) < 40, "the kill should land while shards are being flagged"
    assert not (out / "summary.json").exists() and not (out / "scores.parquet").exists()
    resumed = _scan_cli(*args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    for p in done:  # shards whose marker was written were not recomputed
        name = p.name.replace("scan_", "scores_").replace("_stats.json", ".parquet")
        assert (out / name).stat().st_mtime_ns == finished[name]
    files = [p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*") if p.is_file()]
    assert len(files) >= 43 and (Path("index/reference/gid.npy") in files) == (reference == "100")
    for f in files:
        assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_client_never_holds_an_n_row_embedding_matrix(tmp_path, dask_address):
    """10,000 pairs of 2048-d embeddings (82 MB per N x D float32 matrix) scanned with a client
    sample budget of 500 values: the client's traced peak (Python + numpy allocations, modules
    imported beforehand) stays far below one such matrix."""
    import dask.dataframe  # noqa: F401  (imports are not the client's data: load them before tracing)
    import distributed  # noqa: F401
    import faiss  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import scipy.stats  # noqa: F401
    import sklearn.mixture  # noqa: F401

    from mmsanitize.scan import scan

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    make_dataset(data, n_shards=20, per_shard=500)
    emb = tmp_path / "emb"
    d = 2048
    random_embeddings(data, emb, d=d, noise=0.05, rng=rng, name="random-1024")
    n_bytes = 10_000 * d * 4
    tracemalloc.start()
    try:
        s = scan(data, out=tmp_path / "scan", embeddings=emb, threshold="auto", scheduler=dask_address,
                 fit_sample=500, detectors=("similarity", "class_consistency", "image_reuse"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert s["samples"] == 10_000 and s["client_state"]["fit_sample"] == 500
    assert peak < n_bytes / 4, f"client peak {peak / 1e6:.1f} MB vs {n_bytes / 1e6:.0f} MB for one N x D matrix"
    df = pd.read_parquet(tmp_path / "scan" / "scores.parquet", columns=["key", "caption", "combined"])
    assert len(df) == 10_000 and df["caption"].str.startswith("a photo of").all()


def _clip_folder(emb: Path, out: Path, *, drop: str | None = None, extra: bool = False) -> None:
    """Rewrite our embed output as clip-retrieval writes it: parts numbered 0, 1, 2 that cut across
    shards, rows shuffled, metadata with image_path / caption / url, no model.json."""
    rng = np.random.default_rng(1)
    metas = [pd.read_parquet(p) for p in sorted((emb / "metadata").glob("*.parquet"))]
    names = [p.stem.split("_")[1] for p in sorted((emb / "metadata").glob("*.parquet"))]
    meta = pd.concat(metas, ignore_index=True)
    img = np.concatenate([np.load(emb / "img_emb" / f"img_emb_{n}.npy") for n in names])
    txt = np.concatenate([np.load(emb / "text_emb" / f"text_emb_{n}.npy") for n in names])
    order = rng.permutation(len(meta))
    if drop is not None:
        order = order[meta["key"].to_numpy()[order] != drop]
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for part, rows in enumerate(np.array_split(order, 3)):
        m = pd.DataFrame({"image_path": [f"{meta['shard'][r][:-4]}/{meta['key'][r]}.jpg" for r in rows],
                          "caption": meta["caption"].to_numpy()[rows],
                          "url": [f"http://127.0.0.1/{meta['key'][r]}.jpg" for r in rows]})
        i, t = img[rows], txt[rows]
        if extra and part == 2:
            m = pd.concat([m, pd.DataFrame({"image_path": ["99999/zz_not_in_any_shard.jpg"], "caption": ["x"],
                                            "url": ["http://127.0.0.1/x.jpg"]})], ignore_index=True)
            i, t = np.concatenate([i, i[:1]]), np.concatenate([t, t[:1]])
        np.save(out / "img_emb" / f"img_emb_{part}.npy", i)
        np.save(out / "text_emb" / f"text_emb_{part}.npy", t)
        m.to_parquet(out / "metadata" / f"metadata_{part}.parquet")


@pytest.mark.slow
def test_clip_retrieval_folder_gives_the_same_scores_as_our_embeddings(tmp_path, dask_address, capsys):
    data = tmp_path / "data"
    make_dataset(data, n_shards=3, per_shard=30)
    emb = tmp_path / "emb"
    thumbnail_embeddings(data, emb)
    clip = tmp_path / "clip"
    _clip_folder(emb, clip)
    opts = ["--threshold", "auto", "--flag-fraction", "0.05", "--scheduler", dask_address,
            "--detectors", "similarity,class_consistency,image_reuse,caption_neighbours"]
    main(["scan", str(data), "--embeddings", str(emb), "--out", str(tmp_path / "a"), *opts])
    main(["scan", str(data), "--embeddings", str(clip), "--out", str(tmp_path / "b"), *opts])
    a = pd.read_parquet(tmp_path / "a" / "scores.parquet")
    b = pd.read_parquet(tmp_path / "b" / "scores.parquet")
    assert "url" not in a.columns and list(b["url"]) == [f"http://127.0.0.1/{k}.jpg" for k in b["key"]]
    pd.testing.assert_frame_equal(a, b.drop(columns="url"))
    assert a["flagged"].sum() > 0
    sb = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert sb["embeddings_layout"] == "clip" and sb["model"] is None
    # keys that disagree: one line naming the first missing / extra key, nothing written
    _clip_folder(emb, tmp_path / "clip_missing", drop="000010005")
    err = _error(capsys, ["scan", str(data), "--embeddings", str(tmp_path / "clip_missing"),
                          "--out", str(tmp_path / "c"), *opts])
    assert "key 000010005" in err and "00001.tar" in err and "no embedding" in err
    assert not (tmp_path / "c" / "scores.parquet").exists()
    _clip_folder(emb, tmp_path / "clip_extra", extra=True)
    err = _error(capsys, ["scan", str(data), "--embeddings", str(tmp_path / "clip_extra"),
                          "--out", str(tmp_path / "d"), *opts])
    assert "zz_not_in_any_shard" in err and "metadata_2.parquet" in err
    # our embed output names image_path like clip-retrieval (the key)
    main(["embed", str(data), "--model", "tiny", "--out", str(tmp_path / "tiny"), "--scheduler", dask_address])
    meta = pd.read_parquet(tmp_path / "tiny" / "metadata" / "metadata_00000.parquet")
    assert list(meta["image_path"]) == list(meta["key"])


@pytest.mark.slow
@pytest.mark.parametrize("perturb", ["reencode", "resize"])
def test_near_duplicate_copies_count_as_one_image(tmp_path, dask_address, perturb):
    data = tmp_path / "data"
    make_dataset(data, n_shards=3, per_shard=40)
    poisoned = tmp_path / "poisoned"
    main(["poison", str(data), "--attack", "single-image", "--goal", "dog2boat", "--perturb", perturb,
          "--out", str(poisoned), "--scheduler", dask_address])
    man = pd.read_parquet(poisoned / "manifest.parquet")
    images = {s.key: s.image for p in sorted(poisoned.glob("*.tar")) for s in iter_samples(p)}
    copies = [images[k] for k in man["key"]]
    assert len(set(copies)) == len(copies)  # no two copies share bytes: exact hashes cannot see them
    emb = tmp_path / "emb"
    thumbnail_embeddings(poisoned, emb)
    out = tmp_path / "scan"
    main(["scan", str(poisoned), "--embeddings", str(emb), "--detectors", "similarity,image_reuse",
          "--threshold", "-1", "--manifest", str(poisoned / "manifest.parquet"), "--out", str(out),
          "--scheduler", dask_address])
    df = pd.read_parquet(out / "scores.parquet")
    s = json.loads((out / "summary.json").read_text())
    poison = df["key"].isin(set(man["key"]))
    original = df["key"] == man["image_source_key"].iloc[0]
    # every copy is found with at least half of the other copies; clean pairs share no image
    assert (df.loc[poison, "image_reuse"] >= len(man) // 2).all()
    assert (df.loc[~poison & ~original, "image_reuse"] == 0).mean() >= 0.99
    assert s["detection"]["image_reuse"]["auroc"] >= 0.99
    assert s["detector_state"]["image_reuse"]["radius"] == pytest.approx(0.94)


@pytest.mark.slow
def test_external_cluster_with_relative_paths(tmp_path, dask_address):
    from test_engine import dask_cli, free_port, wait_for_workers

    data = tmp_path / "data"
    make_dataset(data, n_shards=3, per_shard=20)
    thumbnail_embeddings(data, tmp_path / "emb")
    opts = ["--threshold", "auto", "--flag-fraction", "0.05", "--detectors",
            "similarity,class_consistency,image_reuse,caption_neighbours"]
    main(["scan", str(data), "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "local"),
          "--scheduler", dask_address, *opts])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**ENV, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [subprocess.Popen([dask_cli(), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", "127.0.0.1:0"], cwd=elsewhere, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen([dask_cli(), "worker", address, "--nthreads", "1", "--no-dashboard",
                                           "--host", "127.0.0.1"], cwd=elsewhere, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_workers(address, 2)
        r = _scan_cli("data", "--embeddings", "emb", "--out", "remote", "--scheduler", address, *opts, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    assert (tmp_path / "remote" / "scores.parquet").read_bytes() == (tmp_path / "local" / "scores.parquet").read_bytes()
    assert not list(elsewhere.iterdir())  # workers wrote nothing relative to their own directory


@pytest.mark.slow
def test_ivf_scan_knn_is_reranked_exactly_and_recalls_the_exact_neighbours(tmp_path, dask_address):
    """A 20,000-pair clustered set scanned with a forced on-disk IVF-SQ8 index: kNN with the scan's
    settings (nprobe, refine factor) recalls >= 0.95 of the exact top 10 and returns exact cosines;
    the same index without the re-ranking (SQ8 order) recalls measurably less; one worker writes
    the same outputs as two."""
    import importlib.util

    from mmsanitize import scan_tasks as T
    from mmsanitize.index import load_ondisk
    from mmsanitize.scan_tasks import Rows

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_scale", root / "benchmarks" / "bench_scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.generate(tmp_path / "gen", 20_000, 5_000, 0)
    data, emb = tmp_path / "gen" / "data", tmp_path / "gen" / "emb"
    r = _scan_cli(data, "--embeddings", emb, "--threshold", "auto", "--index", "ivf", "--scheduler", dask_address,
                  "--out", tmp_path / "scan")
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "scan" / "summary.json").read_text())["index"]
    assert s["kind"] == "ivf" and s["codec"] == "SQ8" and s["refine_factor"] > 1
    files = sorted((emb / "img_emb").glob("*.npy"))
    base = np.concatenate([np.load(f) for f in files]).astype(np.float32)
    rows = Rows({"shards": [{"img": str(f)} for f in files], "offsets": np.arange(0, 20_001, 5_000), "work": ""})
    q = base[np.random.default_rng(1).choice(len(base), 1_000, replace=False)]
    exact = np.argsort(-(q @ base.T), axis=1, kind="stable")[:, :10]

    def recall(ids):
        return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)]))

    path = tmp_path / "scan" / "index" / "image.index"
    refined = load_ondisk(path, nprobe=s["nprobe"], refine=lambda ids: rows.take("img", ids),
                          refine_factor=s["refine_factor"])
    sims, ids = refined.knn(q, 10)
    _, sq8_ids = load_ondisk(path, nprobe=s["nprobe"]).knn(q, 10)
    assert recall(ids) >= 0.95
    assert recall(sq8_ids) < recall(ids) - 0.005, (recall(sq8_ids), recall(ids))
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", q, base[ids]), rtol=0, atol=1e-5)
    assert (np.diff(sims, axis=1) <= 0).all()
    again = refined.knn(q, 10)
    assert np.array_equal(again[0], sims) and np.array_equal(again[1], ids)
    # the IVF path (training beside prepare, per-shard calibration) gives the same outputs on one
    # local worker as on the two-worker cluster
    one = _scan_cli(data, "--embeddings", emb, "--threshold", "auto", "--index", "ivf", "--workers", "1",
                    "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr
    for f in ("scores.parquet", "summary.json", "index/image.ivfdata"):  # (image.index names its folder)
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "scan" / f).read_bytes(), f
    # the near-duplicate pairs, found by groups of shards through the IVF lists kept at fill time,
    # are the exact ones: every row's image_reuse equals the count from an exact all-pairs search
    radius = json.loads((tmp_path / "scan" / "summary.json").read_text())["detector_state"]["image_reuse"]["radius"]
    assert s["range_groups"] == len(T.near_groups(np.arange(0, 20_001, 5_000), min(16 * s["nlist"], 2**26 // 256))) >= 1
    sc = pd.read_parquet(tmp_path / "scan" / "scores.parquet", columns=["key", "image_reuse"])
    man = pd.read_parquet(tmp_path / "gen" / "manifest.parquet")
    near = sc["key"].isin(man.loc[man["kind"] == "near-copy", "key"])
    assert near.sum() == 50 and (sc.loc[near, "image_reuse"] > 0).all()
    close = np.zeros(len(base), bool)
    for a in range(0, len(base), 2_000):
        sims = base[a:a + 2_000] @ base.T
        sims[np.arange(len(sims)), np.arange(a, a + len(sims))] = -1
        close[a:a + 2_000] = (sims >= radius + 0.01).any(1)  # clear of the SQ8 rounding at the edge
    assert close[near.to_numpy()].all()
    assert (sc["image_reuse"].to_numpy()[close] > 0).all()


def test_bad_embeddings_with_ivf_give_one_line_while_the_index_trains(tmp_path):
    """The IVF training runs beside the prepare phase on data prepare has not checked yet: a
    truncated embedding file must still give prepare's one-line error (exit 2), not the training
    task's Dask worker log."""
    data = tmp_path / "data"
    make_dataset(data, n_shards=4, per_shard=60)
    emb = tmp_path / "emb"
    thumbnail_embeddings(data, emb)
    f = emb / "img_emb" / "img_emb_00002.npy"
    np.save(f, np.load(f)[:-7])
    r = _scan_cli(data, "--embeddings", emb, "--threshold", "auto", "--index", "ivf", "--workers", "2",
                  "--out", tmp_path / "scan")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "00002.tar" in lines[0] and "53 image rows" in lines[0], r.stderr
    assert "distributed" not in r.stderr and "Traceback" not in r.stderr



def _catalog_parts(tmp_path: Path, rows_per_part: list[int], seed: int = 0):
    """Catalog-like parquet parts (key, sha256, label) with repeated hashes within and across parts,
    nulls and a non-hex hash; returns (names, paths, offsets, the whole table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    pool = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(300)]
    names, paths, frames = [], [], []
    for p, n in enumerate(rows_per_part):
        sha = [pool[i] if rng.random() < 0.4 else hashlib.sha256(f"u{p}-{j}".encode()).hexdigest()
               for j, i in enumerate(rng.integers(0, len(pool), n))]
        sha[0] = None
        if p == 1:
            sha[1] = sha[2] = "not-a-hex-digest"
        df = pd.DataFrame({"key": [f"{p:05d}{j:04d}" for j in range(n)], "sha256": sha,
                           "label": [None if j % 7 == 0 else f"c{j % 3}" for j in range(n)]})
        names.append(f"{p:05d}")
        paths.append(str(tmp_path / f"{p:05d}.parquet"))
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), paths[-1])
        frames.append(df)
    offsets = np.r_[0, np.cumsum(rows_per_part)].astype(np.int64)
    return names, paths, offsets, pd.concat(frames, ignore_index=True)


def test_duplicate_image_groups_match_a_group_by_over_the_whole_table(tmp_path, dask_address, monkeypatch):
    """The bucketed shuffle (many buckets forced) gives exactly the group-by's rows and groups:
    hashes seen more than once, by hash then gid, nulls dropped; and the distinct labels."""
    from distributed import Client

    from mmsanitize import dup_groups
    from mmsanitize.scan import _catalog_groups

    names, paths, offsets, table = _catalog_parts(tmp_path, [400, 250, 1, 380])
    table["gid"] = np.arange(len(table))
    valid = table.dropna(subset=["sha256"])
    multi = valid[valid.groupby("sha256")["sha256"].transform("size") > 1].sort_values(["sha256", "gid"])
    assert multi["sha256"].nunique() > 50 and (multi["sha256"] == "not-a-hex-digest").sum() == 2
    for rows in (10**9, 97):  # one bucket; then 11 buckets (cut inside runs of one part)
        monkeypatch.setattr(dup_groups, "BUCKET_ROWS", rows)
        work = tmp_path / f"w{rows}"
        work.mkdir()
        with Client(dask_address) as client:
            dups, labels = _catalog_groups(names, paths, offsets, client, True, work)
        by_hex = multi[multi["sha256"] != "not-a-hex-digest"]
        mine = pd.DataFrame({"gid": dups["gid"], "group": dups["group"]})
        hexed = mine[~mine["gid"].isin(multi.loc[multi["sha256"] == "not-a-hex-digest", "gid"])]
        assert hexed["gid"].tolist() == by_hex["gid"].tolist()
        assert (hexed["group"].diff().fillna(1) > 0).tolist() == \
            (by_hex["sha256"] != by_hex["sha256"].shift()).tolist()
        assert len(dups) == len(multi) and mine["group"].max() == multi["sha256"].nunique() - 1
        assert labels == ["c0", "c1", "c2"]


def test_a_key_in_two_catalog_parts_is_one_line_naming_both_shards(tmp_path, dask_address):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from distributed import Client

    from mmsanitize.errors import ShardError
    from mmsanitize.scan import _catalog_groups

    names, paths, offsets, _ = _catalog_parts(tmp_path, [50, 60, 70])
    t = pq.read_table(paths[2]).to_pandas()
    t.loc[33, "key"] = "000010007"  # part 00001's row 7
    pq.write_table(pa.Table.from_pandas(t, preserve_index=False), paths[2])
    with Client(dask_address) as client, pytest.raises(ShardError) as err:
        _catalog_groups(names, paths, offsets, client, False, tmp_path)
    assert "00002.tar" in str(err.value) and "duplicate key across shards (00001.tar, 00002.tar)" in str(err.value)
    assert "000010007" in str(err.value)


def test_best_k_merged_in_batches_equals_one_sort_of_every_shard():
    from mmsanitize.scan import _Best

    rng = np.random.default_rng(4)
    pieces = []
    for s in range(60):  # few distinct values: many ties, broken by gid
        p = np.zeros(int(rng.integers(0, 300)), dtype=[("v", "f8"), ("g", "i8")])
        p["v"], p["g"] = rng.integers(0, 6, len(p)), s * 1000 + rng.permutation(1000)[:len(p)]
        pieces.append(p)
    both = np.concatenate(pieces)
    for k in (0, 1, 37, 500, len(both) + 5):
        best = _Best(k)
        for p in pieces:
            best.add(p)
        assert np.array_equal(best.result(), both[np.lexsort((both["g"], -both["v"]))[:k]]), k
