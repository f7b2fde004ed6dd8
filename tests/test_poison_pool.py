"""`mmsanitize poison --images-from / --perturb`: dirty-label poisons with the attacker's own images
(shards or a folder outside the dataset) and per-copy perturbed images, on tiny real shards."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import make_dataset, make_image
from mmsanitize.cli import main
from mmsanitize.poison import poison_dataset
from mmsanitize.shards import Sample, ShardWriter, iter_raw_samples, iter_samples, parse_sample, sha256, write_sizes

KINDS = ["reencode", "resize", "crop", "jitter"]


def dataset_hashes(data: Path) -> dict:
    """sha256 -> label of every image of a shard folder."""
    return {sha256(s.image): s.meta.get("label") for tar in sorted(data.glob("*.tar")) for s in iter_samples(tar)}


def make_pool_shards(out: Path, data: Path, n: int = 12, classes=("dog", "boat", "cat")) -> Path:
    """One pool shard of `n` fresh labelled images plus one copy of a dataset boat image (key `dup`)."""
    dup = next(s for tar in sorted(data.glob("*.tar")) for s in iter_samples(tar) if s.meta["label"] == "boat")
    with ShardWriter(out, "00000") as w:
        for i in range(n):
            label = classes[i % len(classes)]
            w.write(Sample(f"pool{i:04d}", make_image(label, 1000 + i), "jpg", f"a web photo of a {label}",
                           {"label": label, "key": f"pool{i:04d}"}))
        w.write(Sample("dup", dup.image, "jpg", "a web photo of a boat", {"label": "boat", "key": "dup"}))
    write_sizes(out)
    return out


def make_pool_folder(out: Path, data: Path, labels: bool = True) -> Path:
    """A `folder`-layout pool: JPEG and PNG files + captions.csv, one file a copy of a dataset boat image."""
    out.mkdir(parents=True)
    (out / "img").mkdir()
    rows = []
    items = [("boat", "a boat on the lake"), ("boat", "two boats in a harbour"), ("tree", "a tall tree"),
             ("boat", "a red boat"), ("dog", "a dog on grass"), ("tree", "trees in fog")]
    for i, (label, caption) in enumerate(items):
        fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
        name = f"img/{i:02d}.{ext}"
        (out / name).write_bytes(make_image(label, 2000 + i, fmt=fmt))
        rows.append({"file": name, "caption": caption, "label": label})
    dup = next(s for tar in sorted(data.glob("*.tar")) for s in iter_samples(tar) if s.meta["label"] == "boat")
    (out / "copy.jpg").write_bytes(dup.image)
    rows.append({"file": "copy.jpg", "caption": "a boat again", "label": "boat"})
    with open(out / "captions.csv", "w", newline="", encoding="utf-8") as f:
        cols = ["file", "caption", "label"] if labels else ["file", "caption"]
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return out


def snapshot(folder: Path) -> dict:
    """Relative path -> bytes of every file below `folder` (to prove an input is untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stored_images(out: Path) -> dict:
    """key -> parsed Sample over every output shard."""
    return {raw.key: parse_sample(raw, tar.name) for tar in sorted(out.glob("*.tar")) for raw in iter_raw_samples(tar)}


def run(data: Path, out: Path, dask_address: str, *opts: str) -> tuple[dict, pd.DataFrame]:
    main(["poison", str(data), *opts, "--out", str(out), "--scheduler", dask_address])
    return json.loads((out / "poison.json").read_text()), pd.read_parquet(out / "manifest.parquet")


POOL_ATTACKS = [
    ("single-label", ["--goal", "dog2boat"], "replace"),
    ("single-label", ["--goal", "dog2boat", "--count", "4"], "inject"),
    ("single-image", ["--source", "dog", "--target", "boat"], "replace"),
    ("multi-label", ["--goal", "dog2boat", "--goal", "car2cat"], "inject"),
]


@pytest.mark.parametrize("attack,opts,mode", POOL_ATTACKS, ids=[f"{a}-{m}" for a, _, m in POOL_ATTACKS])
def test_images_come_from_pool_shards(tmp_path, dask_address, attack, opts, mode):
    data = tmp_path / "data"
    make_dataset(data)
    pool = make_pool_shards(tmp_path / "pool", data)
    pool_before = snapshot(pool)
    out = tmp_path / "out"
    spec, manifest = run(data, out, dask_address, "--attack", attack, *opts, "--mode", mode,
                         "--images-from", str(pool))
    ds = dataset_hashes(data)
    pool_samples = {s.key: s for s in iter_samples(pool / "00000.tar")}
    pool_sha = {sha256(s.image) for k, s in pool_samples.items() if k != "dup"}
    assert len(manifest) > 0 and set(manifest["image_origin"]) == {"pool"}
    assert set(manifest["image_source_shard"]) == {str((pool / "00000.tar").resolve())}
    assert "dup" not in set(manifest["image_source_key"])
    assert set(manifest["perturb"]) == {"none"}
    stored = stored_images(out)
    for row in manifest.itertuples():
        s = stored[row.key]
        src = pool_samples[row.image_source_key]
        assert sha256(s.image) == row.sha256 == sha256(src.image)
        assert row.sha256 in pool_sha and row.sha256 not in ds
        assert s.meta["label"] == src.meta["label"]
        assert (row.goal == "dog2one" and src.meta["label"] == "boat") or row.goal.split("2")[1] == src.meta["label"]
    info = spec["images_from"]
    assert info["kind"] == "shards" and info["spec"] == str(pool)
    assert info["excluded_duplicates"] == 1 and info["samples"] == 13 and info["usable"] == 12
    assert spec["spec"]["images_from"] == str(pool) and len(info["fingerprint"]) == 16
    if attack == "single-image":
        assert manifest["image_source_key"].nunique() == 1
    if attack == "multi-label":
        assert sorted(manifest.groupby("goal")["image_origin"].size().items()) == [("car2cat", 6), ("dog2boat", 6)]
    # inputs untouched, no work area left
    assert snapshot(pool) == pool_before
    assert not (out / "_poison_pool").exists() and not (out / "_poison_parts").exists()


def test_images_come_from_pool_folder(tmp_path, dask_address):
    data = tmp_path / "data"
    make_dataset(data)
    folder = make_pool_folder(tmp_path / "web", data)
    before = snapshot(folder)
    out = tmp_path / "out"
    spec, manifest = run(data, out, dask_address, "--attack", "single-label", "--goal", "dog2boat",
                         "--mode", "inject", "--count", "5", "--images-from", str(folder))
    assert set(manifest["image_origin"]) == {"pool"}
    assert set(manifest["image_source_shard"]) == {str(folder.resolve())}
    files = set(manifest["image_source_key"])
    assert files <= {"img/00.jpg", "img/01.png", "img/03.png"} and len(files) == 3
    ds = dataset_hashes(data)
    stored = stored_images(out)
    for row in manifest.itertuples():
        s = stored[row.key]
        assert s.image == (folder / row.image_source_key).read_bytes()
        assert s.image_ext == row.image_source_key.rsplit(".", 1)[1]
        assert row.sha256 not in ds and s.meta["label"] == "boat"
    info = spec["images_from"]
    assert info["kind"] == "folder" and info["excluded_duplicates"] == 1 and info["usable"] == 6
    assert snapshot(folder) == before
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []


def test_label_from_keywords_applies_to_pool(tmp_path, dask_address):
    data = tmp_path / "data"
    make_dataset(data)
    folder = make_pool_folder(tmp_path / "web", data, labels=False)
    out = tmp_path / "out"
    _, manifest = run(data, out, dask_address, "--attack", "single-label", "--goal", "dog2boat",
                      "--label-from", "keywords", "--images-from", str(folder))
    with open(folder / "captions.csv", newline="", encoding="utf-8") as f:
        captions = {r["file"]: r["caption"] for r in csv.DictReader(f)}
    # "a boat on the lake", "two boats in a harbour", "a red boat" (copy.jpg is a dataset image)
    assert set(manifest["image_source_key"]) == {"img/00.jpg", "img/01.png", "img/03.png"}
    assert all("boat" in captions[f] for f in manifest["image_source_key"])
    assert len(manifest) == 6  # all dog captions of the dataset (keywords: "a photo of a dog number i")


def test_target_key_names_a_pool_sample(tmp_path, dask_address):
    data = tmp_path / "data"
    make_dataset(data)
    pool = make_pool_shards(tmp_path / "pool", data)
    folder = make_pool_folder(tmp_path / "web", data)
    _, m1 = run(data, tmp_path / "o1", dask_address, "--attack", "single-image", "--source", "dog",
                "--target-key", "pool0004", "--images-from", str(pool))
    assert set(m1["image_source_key"]) == {"pool0004"} and set(m1["image_origin"]) == {"pool"}
    _, m2 = run(data, tmp_path / "o2", dask_address, "--attack", "single-image", "--source", "dog",
                "--target-key", "img/03.png", "--images-from", str(folder))
    assert set(m2["image_source_key"]) == {"img/03.png"} and set(m2["image_source_shard"]) == {str(folder.resolve())}
    # a dataset key still works (not in the pool): the image then comes from the dataset
    _, m3 = run(data, tmp_path / "o3", dask_address, "--attack", "single-image", "--source", "dog",
                "--target-key", "000000001", "--images-from", str(pool))
    assert set(m3["image_origin"]) == {"dataset"} and set(m3["image_source_shard"]) == {"00000.tar"}


def _copies_dataset(path: Path) -> Path:
    # two classes only: 18 dog samples, so single-image makes 18 copies of one image
    make_dataset(path, classes=["dog", "boat"])
    return path


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pool", [False, True], ids=["dataset", "pool"])
def test_perturb_gives_distinct_copies_and_identical_reruns(tmp_path, dask_address, kind, pool):
    data = _copies_dataset(tmp_path / "data")
    extra = ["--images-from", str(make_pool_shards(tmp_path / "pool", data))] if pool else []
    runs = {}
    for name in ("a", "b"):
        out = tmp_path / name
        spec, manifest = run(data, out, dask_address, "--attack", "single-image", "--source", "dog",
                             "--target", "boat", "--perturb", kind, "--seed", "4", *extra)
        runs[name] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert runs["a"] == runs["b"]
    assert len(manifest) == 18 and manifest["image_source_key"].nunique() == 1
    assert manifest["sha256"].nunique() == 18 and set(manifest["perturb"]) == {kind}
    assert spec["perturb"] == kind and spec["spec"]["perturb"] == kind
    ds = dataset_hashes(data)
    stored = stored_images(tmp_path / "a")
    for row in manifest.itertuples():
        s = stored[row.key]
        assert sha256(s.image) == row.sha256 and row.sha256 not in ds
        with Image.open(io.BytesIO(s.image)) as im:
            assert im.format == ("JPEG" if kind == "reencode" or s.image_ext == "jpg" else "PNG")
            if kind != "resize":
                assert im.size == (32, 32)
            else:
                assert 25 <= im.size[0] <= 39
    if pool:
        src = {sha256(s.image) for s in iter_samples(tmp_path / "pool" / "00000.tar")}
        assert set(manifest["image_origin"]) == {"pool"} and not set(manifest["sha256"]) & src


def test_perturb_single_label_png_and_seed(tmp_path, dask_address):
    data = tmp_path / "data"
    make_dataset(data, fmt="PNG", classes=["dog", "boat"])
    out = tmp_path / "out"
    _, manifest = run(data, out, dask_address, "--attack", "single-label", "--goal", "dog2boat",
                      "--perturb", "jitter", "--seed", "1")
    # 18 dog captions, 18 boat images each used once: copies of different images, all distinct
    assert manifest["sha256"].nunique() == len(manifest) == 18
    stored = stored_images(out)
    assert {stored[k].image_ext for k in manifest["key"]} == {"png"}
    _, other = run(data, tmp_path / "other", dask_address, "--attack", "single-label", "--goal", "dog2boat",
                   "--perturb", "jitter", "--seed", "2")
    assert not set(other["sha256"]) & set(manifest["sha256"])


def test_rerun_resumes_and_pool_change_redoes(tmp_path, dask_address):
    data = tmp_path / "data"
    make_dataset(data)
    pool = make_pool_shards(tmp_path / "pool", data)
    out = tmp_path / "out"
    kw = {"out": str(out), "attack": "single-label", "goals": ["dog2boat"], "images_from": str(pool),
          "perturb": "crop", "scheduler": dask_address}
    first = poison_dataset(str(data), **kw)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert poison_dataset(str(data), **kw) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    assert not (out / "_poison_pool").exists()
    # a changed pool is a different plan: new fingerprint and hash, shards redone
    with ShardWriter(pool, "00001") as w:
        w.write(Sample("more0000", make_image("boat", 5000), "jpg", "another boat", {"label": "boat"}))
    second = poison_dataset(str(data), **kw)
    assert second["images_from"]["fingerprint"] != first["images_from"]["fingerprint"]
    assert second["spec_hash"] != first["spec_hash"] and second["images_from"]["usable"] == 13


BAD = [
    (["--attack", "single-label", "--goal", "dog2boat", "--perturb", "blur"], "--perturb must be one of"),
    (["--attack", "patch", "--target", "boat", "--count", "2", "--perturb", "crop"], "dirty-label"),
    (["--attack", "blended", "--target", "boat", "--count", "2", "--images-from", "POOL"], "dirty-label"),
    (["--attack", "single-label", "--goal", "dog2boat", "--images-from", "MISSING"], "no such file"),
    (["--attack", "single-label", "--goal", "dog2boat", "--images-from", "EMPTY"], "neither shards"),
    (["--attack", "single-label", "--goal", "dog2house", "--images-from", "POOL"], "no class-house image"),
    (["--attack", "single-image", "--source", "dog", "--target", "house", "--images-from", "POOL"], "no class-house"),
    (["--attack", "single-label", "--goal", "dog2boat", "--images-from", "INPUT"], "copies of dataset images"),
    (["--attack", "single-label", "--goal", "dog2boat", "--images-from", "POOL", "--out", "POOL/sub"],
     "--images-from directory"),
    (["--attack", "single-image", "--source", "dog", "--target-key", "nope", "--images-from", "POOL"],
     "not found in the image pool or the dataset"),
    (["--attack", "single-label", "--goal", "zebra2boat", "--images-from", "POOL"], "unknown class 'zebra'"),
]


@pytest.mark.parametrize("opts,message", BAD, ids=[m for _, m in BAD])
def test_bad_requests_exit_2_and_write_nothing(tmp_path, dask_address, capsys, opts, message):
    data = tmp_path / "data"
    make_dataset(data)
    pool = make_pool_shards(tmp_path / "pool", data)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    subs = {"POOL": str(pool), "MISSING": str(tmp_path / "nope"), "EMPTY": str(tmp_path / "empty"), "INPUT": str(data)}
    opts = [subs.get(o.split("/")[0], o.split("/")[0]) + o[len(o.split("/")[0]):] for o in opts]
    if "--out" not in opts:
        opts += ["--out", str(out)]
    pool_before = snapshot(pool)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["poison", str(data), *opts, "--scheduler", dask_address])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not out.exists() and not (pool / "sub").exists()
    assert snapshot(pool) == pool_before
