"""embed: clip-retrieval layout, normalised float16, resume after lost markers and a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmsanitize.cli import main


def _embed(data, out, dask_address, *extra):
    main(["embed", str(data), "--model", "tiny", "--out", str(out), "--scheduler", dask_address, *extra])


def _snapshot(out: Path) -> dict:
    files = sorted(p for p in out.rglob("*") if p.is_file() and not p.name.endswith("_stats.json"))
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


def test_layout_loads_with_numpy_and_pandas(tiny_dataset, tmp_path, dask_address, capsys):
    out = tmp_path / "emb"
    _embed(tiny_dataset, out, dask_address)
    assert "36 samples in 3 shard(s)" in capsys.readouterr().out
    for name in ("00000", "00001", "00002"):
        img = np.load(out / "img_emb" / f"img_emb_{name}.npy")
        txt = np.load(out / "text_emb" / f"text_emb_{name}.npy")
        meta = pd.read_parquet(out / "metadata" / f"metadata_{name}.parquet")
        assert img.dtype == np.float16 and txt.dtype == np.float16
        assert img.shape == txt.shape == (12, img.shape[1])
        np.testing.assert_allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1.0, atol=2e-3)
        np.testing.assert_allclose(np.linalg.norm(txt.astype(np.float32), axis=1), 1.0, atol=2e-3)
        assert list(meta.columns[:3]) == ["key", "caption", "row"]
        assert list(meta["row"]) == list(range(12))
        assert meta["key"].iloc[0] == f"{name}0000" and meta["caption"].iloc[0].startswith("a photo of a")
    card = json.loads((out / "model.json").read_text())
    from mmsanitize.models import load_model

    assert card == json.loads(json.dumps(load_model("tiny").card()))
    # the text embedding of a pair agrees with the model run directly
    from mmsanitize.embed import load_embeddings

    emb = load_embeddings(out)
    assert emb.img.dtype == np.float32 and len(emb.meta) == 36


def test_resume_after_lost_markers_is_identical(tiny_dataset, tmp_path, dask_address, capsys):
    out = tmp_path / "emb"
    _embed(tiny_dataset, out, dask_address)
    before = _snapshot(out)
    kept = out / "img_emb" / "img_emb_00000.npy"
    mtime = kept.stat().st_mtime_ns
    (out / "embed_00001_stats.json").unlink()
    (out / "img_emb" / "img_emb_00002.npy").unlink()  # a half-finished shard
    capsys.readouterr()
    _embed(tiny_dataset, out, dask_address)
    assert "(1 already done)" in capsys.readouterr().out
    assert _snapshot(out) == before
    assert kept.stat().st_mtime_ns == mtime


def test_killed_run_resumes_to_same_bytes(tiny_dataset, tmp_path, dask_address):
    ref = tmp_path / "ref"
    _embed(tiny_dataset, ref, dask_address)
    out = tmp_path / "emb"
    env = dict(os.environ, MMSANITIZE_PROGRESS="0")
    proc = subprocess.Popen([sys.executable, "-m", "mmsanitize", "embed", str(tiny_dataset), "--model", "tiny",
                             "--out", str(out), "--scheduler", dask_address, "--batch-size", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(out.glob("embed_*_stats.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(out.glob("embed_*_stats.json")), "the run never finished a shard"
    _embed(tiny_dataset, out, dask_address)
    assert not list(out.rglob("*.tmp"))
    assert _snapshot(out) == _snapshot(ref)


def test_other_model_in_out_folder_is_refused(tiny_dataset, tmp_path, dask_address, capsys):
    out = tmp_path / "emb"
    out.mkdir()
    (out / "model.json").write_text(json.dumps({"name": "other", "checkpoint_sha256": "x"}))
    with pytest.raises(SystemExit) as e:
        _embed(tiny_dataset, out, dask_address)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "other" in err and "\n" not in err
