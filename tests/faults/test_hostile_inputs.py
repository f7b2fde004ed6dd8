"""Hostile model files, options and output folders: one `error:` line, exit 2, nothing written
outside --out (ownership), and the inputs never change. Prints its part of the fault matrix."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest

from conftest import make_dataset
from harness import Matrix, report, run_cli

MATRIX = Matrix()


class Exploit:
    """Unpickling this would create a marker file: the test checks it never appears."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def world(tmp_path_factory, dask_address):
    """Good data, a checkpoint, embeddings and a finished train run, built once."""
    from mmsanitize.embed import embed
    from mmsanitize.models import load_model, save_checkpoint

    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    make_dataset(data, n_shards=2, per_shard=8, classes=["dog", "boat"])
    other = root / "other"
    make_dataset(other, n_shards=2, per_shard=8, classes=["dog", "boat"], start_index=500)
    ckpt = root / "ckpt"
    save_checkpoint(load_model("tiny"), ckpt, spec={})
    emb = root / "emb"
    embed(data, model="tiny", out=emb, scheduler=dask_address)
    emb_other = root / "emb_other"
    embed(other, model="tiny", out=emb_other, scheduler=dask_address)
    return {"sched": dask_address, "root": root, "data": data, "other": other, "ckpt": ckpt, "emb": emb, "emb_other": emb_other}


@pytest.fixture(scope="module", autouse=True)
def print_matrix(pytestconfig):
    yield
    if MATRIX.cells:
        report(pytestconfig, MATRIX.markdown("hostile model files, options, outputs (tests/faults/test_hostile_inputs.py)"))


def _ckpt_with_card(world, tmp_path, card_bytes: bytes):
    d = tmp_path / "bad_ckpt"
    shutil.copytree(world["ckpt"], d)
    (d / "model.json").write_bytes(card_bytes)
    return d


def _emb_copy(world, tmp_path, mutate):
    d = tmp_path / "bad_emb"
    shutil.copytree(world["emb"], d)
    mutate(d)
    return d


def _object_npy(d):
    np.save(d / "img_emb" / "img_emb_00000.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)


def _pickled_state(world, tmp_path, flag):
    out = tmp_path / "train_out"
    rc = run_cli(["train", world["data"], "--model", "tiny", "--epochs", "1", "--batch-size", "4",
                  "--loader-workers", "0", "--out", out])
    assert rc.outcome == "ok", rc.stderr
    with open(out / "train_state.pt", "wb") as f:
        pickle.dump({"epoch": 1, "step": 1, "x": Exploit(str(flag))}, f)
    return out


CASES = {
    # name: (verb, builder(world, tmp_path, flag) -> argv)
    "model.json not UTF-8": ("evaluate", lambda w, t, f: ["evaluate", _ckpt_with_card(w, t, b"\xff\xfe{"), "--test", w["data"]]),
    "model.json a list": ("evaluate", lambda w, t, f: ["evaluate", _ckpt_with_card(w, t, b"[1, 2]"), "--test", w["data"]]),
    "model.json base not a string": ("embed", lambda w, t, f: ["embed", w["data"], "--model", _ckpt_with_card(w, t, b'{"base": 5}'), "--out", t / "o", "--scheduler", w["sched"]]),
    "model.json config not an object": ("evaluate", lambda w, t, f: ["evaluate", _ckpt_with_card(w, t, b'{"base": "tiny", "config": "x"}'), "--test", w["data"]]),
    "extension-less pickle as open_clip checkpoint": ("evaluate", lambda w, t, f: (
        (t / "ckpt").write_bytes(pickle.dumps(Exploit(str(f)))), ["evaluate", f"open_clip:RN50/{t / 'ckpt'}", "--test", w["data"]])[1]),
    "pickled train_state.pt with --resume": ("train", lambda w, t, f: ["train", w["data"], "--model", "tiny", "--epochs", "2", "--batch-size", "4", "--loader-workers", "0", "--resume", "--out", _pickled_state(w, t, f)]),
    "object .npy as --embeddings": ("scan", lambda w, t, f: ["scan", w["data"], "--embeddings", _emb_copy(w, t, _object_npy), "--threshold", "0.1", "--out", t / "o", "--scheduler", w["sched"]]),
    "junk model.json in --embeddings": ("scan", lambda w, t, f: ["scan", w["data"], "--embeddings", _emb_copy(w, t, lambda d: (d / "model.json").write_bytes(b"\x00junk")), "--threshold", "0.1", "--out", t / "o", "--scheduler", w["sched"]]),
    "--embeddings of another dataset": ("scan", lambda w, t, f: ["scan", w["data"], "--embeddings", w["emb_other"], "--threshold", "0.1", "--out", t / "o", "--scheduler", w["sched"]]),
    "junk --manifest": ("evaluate", lambda w, t, f: ((t / "m.parquet").write_bytes(b"PAR1junk"), ["evaluate", "tiny", "--test", w["data"], "--manifest", t / "m.parquet"])[1]),
    "--seed -1 (poison)": ("poison", lambda w, t, f: ["poison", w["data"], "--attack", "single-label", "--goal", "dog2boat", "--seed", "-1", "--out", t / "o", "--scheduler", w["sched"]]),
    "--seed -1 (train)": ("train", lambda w, t, f: ["train", w["data"], "--seed", "-1", "--out", t / "o"]),
    "--seed -1 (evaluate)": ("evaluate", lambda w, t, f: ["evaluate", "tiny", "--test", w["data"], "--seed", "-1"]),
    "--scheduler not-an-address": ("catalog", lambda w, t, f: ["catalog", w["data"], "--scheduler", "not-an-address"]),
    "train --out FILE": ("train", lambda w, t, f: ((t / "file").write_text("x"), ["train", w["data"], "--out", t / "file"])[1]),
    "evaluate --out DIR": ("evaluate", lambda w, t, f: ((t / "d").mkdir(), ["evaluate", "tiny", "--test", w["data"], "--out", t / "d"])[1]),
    # ownership: an --out that the verb does not own is refused before any work
    "poison --out unrelated dataset": ("poison", lambda w, t, f: ["poison", w["data"], "--attack", "single-label", "--goal", "dog2boat", "--out", _unrelated(w, t), "--scheduler", w["sched"]]),
    "sanitize --out non-empty folder": ("sanitize", lambda w, t, f: ["sanitize", w["data"], "--scan", _scan(w, t), "--out", _nonempty(t), "--scheduler", w["sched"]]),
    "embed --out another verb's output": ("embed", lambda w, t, f: ["embed", w["data"], "--model", "tiny", "--out", _scan(w, t), "--scheduler", w["sched"]]),
    "embed --out inside the input": ("embed", lambda w, t, f: ["embed", w["data"], "--model", "tiny", "--out", w["data"] / "emb", "--scheduler", w["sched"]]),
    "verify --out non-empty folder": ("verify", lambda w, t, f: ["verify", w["data"], "--out", _nonempty(t), "--scheduler", w["sched"]]),
    "sanitize --scan of another dataset": ("sanitize", lambda w, t, f: ["sanitize", w["data"], "--scan", _scan(w, t, w["other"], "00000.tar"), "--out", t / "o", "--scheduler", w["sched"]]),
}


def _unrelated(w, t):
    d = t / "unrelated"
    make_dataset(d, n_shards=2, per_shard=4)
    return d


def _nonempty(t):
    d = t / "nonempty"
    d.mkdir()
    (d / "sizes.json").write_text('{"keep": 1}')
    return d


def _scan(w, t, data=None, swap=None):
    """A real scan of `data` (default: the good data) in t/scan; with `swap`, `data` is a copy of
    the good data whose shard `swap` was replaced by another dataset's shard under the same name
    (same names, other content)."""
    out = t / "scan"
    if data is not None:
        mixed = t / "mixed"
        shutil.copytree(w["data"], mixed)
        shutil.copy(data / swap, mixed / swap)
        data = mixed
    rc = run_cli(["scan", data or w["data"], "--model", "tiny", "--threshold", "0.1", "--out", out, "--scheduler", w["sched"]])
    assert rc.outcome == "ok", rc.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_one_line(case, world, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    verb, build = CASES[case]
    flag = tmp_path / "EXPLOITED"
    argv = build(world, tmp_path, flag)
    before_unrelated = _digest_if(tmp_path / "unrelated")
    before_nonempty = _digest_if(tmp_path / "nonempty")
    run = run_cli(argv, watch=world["root"], outs=())
    MATRIX.add(case, verb, run)
    assert run.outcome == "error", (run.outcome, run.stderr[-600:])
    assert not run.changed, run.changed
    assert not flag.exists(), "a pickle was executed"
    assert _digest_if(tmp_path / "unrelated") == before_unrelated
    assert _digest_if(tmp_path / "nonempty") == before_nonempty
    assert not (tmp_path / "o").exists() or not any(p.suffix == ".tar" for p in (tmp_path / "o").iterdir())


def _digest_if(p):
    from harness import tree_digest

    return tree_digest(p) if p.exists() else None
