"""`mmsanitize poison`: every attack on tiny real shards, determinism, resume after a kill, bad requests,
and (slow) open_clip's own trainer reading the poisoned output."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import CLASSES, make_image
from mmsanitize.catalog import build_catalog
from mmsanitize.cli import main
from mmsanitize.poison import poison_dataset
from mmsanitize.shards import Sample, ShardWriter, image_size, iter_raw_samples, parse_sample, sha256, write_sizes


def make_rich_dataset(out: Path, n_shards: int = 3, per_shard: int = 12, size: int = 32,
                      caption: str = "a photo of a {label} number {i}", unlabelled: tuple = (),
                      vary_size: bool = False) -> Path:
    """Shards whose json carries img2dataset-like fields describing the image (width, height, sha256);
    the json of shards numbered in `unlabelled` has no label. `vary_size`: images size x size,
    (size + 8) x size and (size + 16) x size in turn."""
    i = 0
    for s in range(n_shards):
        with ShardWriter(out, f"{s:05d}") as w:
            for j in range(per_shard):
                label = CLASSES[i % len(CLASSES)]
                key = f"{s:05d}{j:04d}"
                width = size + 8 * (i % 3) if vary_size else size
                img = make_image(label, i, size=width)
                if width != size:
                    with Image.open(io.BytesIO(img)) as im:
                        buf = io.BytesIO()
                        im.crop((0, 0, width, size)).save(buf, format="JPEG", quality=90)
                    img = buf.getvalue()
                text = caption.format(label=label, i=i)
                meta = {"key": key, "label": label, "caption": text, "width": width, "height": size,
                        "sha256": sha256(img)}
                if s in unlabelled:
                    del meta["label"]
                w.write(Sample(key, img, "jpg", text, meta))
                i += 1
    write_sizes(out)
    return out


def read_output(out: Path) -> dict:
    """key -> (shard name, RawSample with data) over every tar of `out`."""
    samples = {}
    for tar in sorted(out.glob("*.tar")):
        for raw in iter_raw_samples(tar):
            samples[raw.key] = (tar.name, raw)
    return samples


def member_bytes(raw) -> list:
    return [(m.name, d) for m, _, d in raw.members]


ATTACKS = [
    ("single-label", ["--goal", "dog2boat"], "replace"),
    ("single-label", ["--goal", "dog2boat", "--count", "4"], "inject"),
    ("single-image", ["--source", "dog", "--target", "boat"], "replace"),
    ("multi-label", ["--goal", "dog2boat", "--goal", "cat2car", "--source-fraction", "0.5"], "replace"),
    ("patch", ["--target", "boat", "--count", "5", "--trigger-position", "random"], "replace"),
    ("blended", ["--target", "boat", "--rate", "0.1"], "inject"),
    ("label-consistent", ["--target", "boat", "--count", "3", "--trigger-pattern", "noise"], "replace"),
]


@pytest.mark.parametrize("attack,opts,mode", ATTACKS, ids=[f"{a}-{m}" for a, _, m in ATTACKS])
def test_attack_output_matches_manifest(tmp_path, dask_address, attack, opts, mode):
    data = make_rich_dataset(tmp_path / "data", vary_size=True)
    out = tmp_path / "out"
    main(["poison", str(data), "--attack", attack, *opts, "--mode", mode, "--seed", "3",
          "--out", str(out), "--scheduler", dask_address])
    spec = json.loads((out / "poison.json").read_text())
    manifest = pd.read_parquet(out / "manifest.parquet")
    catalog = build_catalog(data, scheduler=dask_address).set_index("key")
    n_in = len(catalog)
    assert len(manifest) == spec["counts"]["poisoned"] > 0
    assert sum(g["poisoned"] for g in spec["goals"]) == len(manifest)
    expected_out = n_in + (len(manifest) if mode == "inject" else 0)
    assert spec["counts"]["samples_out"] == expected_out
    assert spec["rate"] == pytest.approx(len(manifest) / expected_out)
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == expected_out
    assert set(manifest["mode"]) == {mode}
    assert not (out / "_poison_parts").exists()

    outputs = read_output(out)
    assert len(outputs) == expected_out
    dirty = attack in ("single-label", "single-image", "multi-label")
    clean_fields = set(json.loads(next(iter(outputs.values()))[1].data("json")))
    for row in manifest.itertuples():
        shard, raw = outputs[row.key]
        assert shard == row.shard
        s = parse_sample(raw, shard)
        assert s.caption == row.caption
        assert sha256(s.image) == row.sha256
        src_sha = catalog.loc[row.image_source_key, "sha256"]
        assert (row.sha256 == src_sha) if dirty else (row.sha256 != src_sha)
        if attack != "label-consistent":
            assert row.caption == catalog.loc[row.source_key, "caption"]
        # the json describes the new image and has exactly the clean field set
        assert set(s.meta) == clean_fields
        assert s.meta["sha256"] == row.sha256 and s.meta["key"] == row.key and s.meta["caption"] == row.caption
        assert (s.meta["width"], s.meta["height"]) == image_size(s.image, shard, row.key)
        assert s.meta["label"] == catalog.loc[row.image_source_key, "label"]
        if mode == "replace":
            assert row.key in catalog.index
        else:
            assert row.key not in catalog.index and "." not in row.key
    # every other sample is byte-identical to the input
    changed = set(manifest["key"])
    for tar in sorted(data.glob("*.tar")):
        for raw in iter_raw_samples(tar):
            if raw.key in changed:
                continue
            shard, got = outputs[raw.key]
            assert shard == tar.name and member_bytes(got) == member_bytes(raw)
    if attack == "single-image":
        assert manifest["image_source_key"].nunique() == 1
        assert set(manifest["goal"]) == {"dog2one"}
    if attack == "single-label" and mode == "replace":
        # all class-A samples re-paired, each class-B image used once (6 dog, 6 boat)
        assert len(manifest) == 6 and manifest["image_source_key"].nunique() == 6
        assert set(catalog.loc[manifest["image_source_key"], "label"]) == {"boat"}
    if attack == "multi-label":
        assert sorted(manifest["goal"].value_counts().items()) == [("cat2car", 3), ("dog2boat", 3)]


def test_same_seed_same_bytes_other_seed_other_plan(tmp_path, dask_address):
    data = make_rich_dataset(tmp_path / "data")
    runs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        out = tmp_path / name
        poison_dataset(str(data), out=str(out), attack="single-label", goals=["dog2boat"], count=4,
                       seed=seed, scheduler=dask_address)
        runs[name] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert runs["a"] == runs["b"]
    ma, mc = (pd.read_parquet(tmp_path / n / "manifest.parquet") for n in ("a", "c"))
    assert list(zip(ma.key, ma.image_source_key)) != list(zip(mc.key, mc.image_source_key))


def test_rerun_is_a_noop_and_input_untouched(tmp_path, dask_address):
    data = make_rich_dataset(tmp_path / "data")
    before = {p.name: p.read_bytes() for p in data.glob("*.tar")}
    out = tmp_path / "out"
    kw = dict(out=str(out), attack="patch", target="boat", count=3, scheduler=dask_address)
    first = poison_dataset(str(data), **kw)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert poison_dataset(str(data), **kw) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes
    assert {p.name: p.read_bytes() for p in data.glob("*.tar")} == before


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, dask_address):
    data = make_rich_dataset(tmp_path / "data", n_shards=16, per_shard=40, size=64)
    args = ["--attack", "blended", "--target", "boat", "--rate", "0.05", "--seed", "5"]
    ref = tmp_path / "ref"
    main(["poison", str(data), *args, "--out", str(ref), "--scheduler", dask_address])
    out = tmp_path / "out"
    env = {**os.environ, "MMSANITIZE_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "mmsanitize", "poison", str(data), *args, "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, start_new_session=True, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out.glob("*_stats.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert done_before, "the interrupted run finished no shard"
    assert not (out / "poison.json").exists(), "the run finished before it could be killed"
    main(["poison", str(data), *args, "--out", str(out), "--scheduler", dask_address])
    # finished shards were skipped, not rewritten
    for name, mtime in done_before.items():
        if (out / name.replace(".tar", "_stats.json")).exists():
            assert (out / name).stat().st_mtime_ns == mtime
    ref_files = {p.name: p.read_bytes() for p in sorted(ref.iterdir())}
    out_files = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert ref_files == out_files


def _vocab(tmp_path):
    p = tmp_path / "vocab.json"
    p.write_text(json.dumps({"dog": ["photo"], "boat": ["boat"]}))
    return f"keywords:{p}"


BAD = [
    (["--attack", "single-label", "--goal", "dog2dog"], "same"),
    (["--attack", "single-label", "--goal", "zebra2boat"], "dog (6)"),
    (["--attack", "single-image", "--goal", "dog2boat", "--label-from", "VOCAB"], "class-boat image"),
    (["--attack", "single-label", "--goal", "dog2boat", "--rate", "0"], "(0, 1]"),
    (["--attack", "single-label", "--goal", "dog2boat", "--rate", "1.5"], "(0, 1]"),
    (["--attack", "single-image", "--source", "dog", "--target-key", "nope"], "not found"),
    (["--attack", "single-label", "--goal", "dog2boat", "--count", "1000"], "only 6"),
    (["--attack", "single-label", "--goal", "dog2boat", "--out", "INPUT"], "input directory"),
    (["--attack", "single-label", "--goal", "dog2boat", "--out", "INPUT/sub"], "input directory"),
    (["--attack", "patch", "--target", "boat"], "--count"),
]


@pytest.mark.parametrize("opts,message", BAD, ids=[m for _, m in BAD])
def test_bad_requests_exit_2_and_write_nothing(tmp_path, dask_address, capsys, opts, message):
    data = make_rich_dataset(tmp_path / "data")
    out = tmp_path / "out"
    opts = [o.replace("INPUT", str(data)).replace("VOCAB", _vocab(tmp_path)) for o in opts]
    if "--out" not in opts:
        opts += ["--out", str(out)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["poison", str(data), *opts, "--scheduler", dask_address])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not out.exists()
    assert not (data / "sub").exists() and not (data / "manifest.parquet").exists()


TINY_MODEL = {"model_cfg": {"embed_dim": 32,
                            "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
                            "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2,
                                         "layers": 2}}}


@pytest.mark.slow
def test_open_clip_trainer_reads_poisoned_output(tmp_path, dask_address):
    data = make_rich_dataset(tmp_path / "data", n_shards=4, per_shard=16)
    out = tmp_path / "out"
    poison_dataset(str(data), out=str(out), attack="single-label", goals=["dog2boat"], mode="inject",
                   count=6, scheduler=dask_address)
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps(TINY_MODEL))
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "open_clip_train.main", "--dataset-type", "webdataset",
           "--train-data", str(out / "{00000..00003}.tar"), "--model", f"local-dir:{model_dir}",
           "--batch-size", "8", "--epochs", "1", "--workers", "0", "--device", "cpu", "--report-to", "",
           "--logs", str(logs), "--name", "poisoned", "--lr", "1e-4", "--warmup", "1", "--save-frequency", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (logs / "poisoned" / "out.log").read_text()
    assert "Train Epoch: 0" in log
    assert list((logs / "poisoned" / "checkpoints").glob("epoch_1.pt"))


def test_edit_dict_hashes_like_asdict():
    """The per-shard resume hash reads edits through `_edit_dict`; it must give asdict's JSON, or
    outputs written by an earlier version would all be redone (or, worse, wrongly kept)."""
    from dataclasses import asdict

    from mmsanitize.attacks.perturb import Perturbation
    from mmsanitize.attacks.plan import Edit, Trigger
    from mmsanitize.poison import _edit_dict

    edits = [Edit("00000.tar", "k1", None, "a dog", ("00000.tar", "k0"), ("00001.tar", "k9")),
             Edit("00001.tar", "k2", "k2", "a cat", ("00001.tar", "k2"), ("pool.tar", "p3"),
                  trigger=Trigger("patch", 16, 3, 4, "noise", 0.2, 7), image_origin="pool",
                  perturb=Perturbation("reencode", 5, 2))]
    for e in edits:
        assert json.dumps(_edit_dict(e), sort_keys=True, default=str) == \
            json.dumps(asdict(e), sort_keys=True, default=str)
