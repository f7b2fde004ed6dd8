"""SIGKILL midway through poison / embed / scan / sanitize, then rerun: outputs byte-identical to an
uninterrupted run. A full disk (a small tmpfs): one line, no temp files, a rerun after freeing
space completes with the same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_dataset
from harness import Matrix, report, run_cli, tree_digest

MATRIX = Matrix()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def print_matrix(pytestconfig):
    yield
    if MATRIX.cells:
        report(pytestconfig, MATRIX.markdown("interruption and full disk (tests/faults/test_interrupt_disk.py)"))


def _scan(folder, data):
    from mmsanitize.shards import iter_samples

    rows = []
    for tar in sorted(data.glob("*.tar")):
        for i, s in enumerate(iter_samples(tar)):
            rows.append({"key": s.key, "shard": tar.name, "combined": float(i), "flagged": i % 5 == 0,
                         "reason": "test" if i % 5 == 0 else ""})
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(folder / "scores.parquet", index=False)
    return folder


def _argv(verb, data, out, scan):
    return {"poison": ["poison", data, "--attack", "single-label", "--goal", "dog2boat", "--count", "6", "--out", out],
            "embed": ["embed", data, "--model", "tiny", "--out", out],
            "scan": ["scan", data, "--model", "tiny", "--threshold", "auto", "--out", out],
            "sanitize": ["sanitize", data, "--scan", scan, "--out", out]}[verb] + ["--workers", "1"]


DONE = {"poison": "0000*_stats.json", "embed": "embed_*_stats.json", "sanitize": "0000*_stats.json",
        "scan": "embeddings/embed_*_stats.json"}


def _outputs(folder):
    """Tree digest of an output folder; summary.json compared without its own folder's path."""
    import hashlib
    import json

    d = tree_digest(folder)
    summary = folder / "summary.json"
    if summary.is_file():
        js = json.loads(summary.read_text())
        js.pop("embeddings", None)
        d["./summary.json"] = hashlib.sha256(json.dumps(js, sort_keys=True).encode()).hexdigest()
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    d = root / "data"
    make_dataset(d, n_shards=8, per_shard=24, classes=["dog", "boat", "cat"])
    return d


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["poison", "embed", "scan", "sanitize"])
def test_sigkill_then_rerun_is_byte_identical(verb, data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache"), "MMSANITIZE_PROGRESS": "0"}
    scan = _scan(tmp_path / "scan", data)
    before = tree_digest(data)
    ref, out = tmp_path / "ref", tmp_path / "out"
    cmd = [sys.executable, "-m", "mmsanitize"]
    subprocess.run(cmd + [str(a) for a in _argv(verb, data, ref, scan)], env=env, check=True,
                   capture_output=True, timeout=600)
    proc = subprocess.Popen(cmd + [str(a) for a in _argv(verb, data, out, scan)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob(DONE[verb]))) < 2:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(out.glob(DONE[verb])))
    rerun = subprocess.run(cmd + [str(a) for a in _argv(verb, data, out, scan)], env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    a, b = _outputs(ref), _outputs(out)
    same = a == b
    MATRIX.add(f"SIGKILL after {done_at_kill} of 8 shards, rerun", verb,
               _result("ok" if same else "differs", [] if tree_digest(data) == before else ["input changed"]))
    assert same, sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[:5]
    assert tree_digest(data) == before
    assert not list(out.rglob("*.tmp"))


def _result(outcome, changed):
    from harness import Run

    return Run(outcome, 0, "", changed)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (root only; skipped elsewhere)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt, leave: int):
    """Fill the tmpfs leaving about `leave` bytes free; returns the filler file."""
    import shutil

    filler = mnt / "filler"
    free = shutil.disk_usage(mnt).free
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
        except OSError:
            pass
    return filler


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["poison", "sanitize", "embed", "train"])
def test_full_disk_is_one_line_and_leaves_no_temp_files(verb, data, tiny_disk, tmp_path, monkeypatch, dask_address):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    scan = _scan(tmp_path / "scan", data)
    before = tree_digest(data)
    out = tiny_disk / "out"
    argv = {"poison": ["poison", data, "--attack", "single-label", "--goal", "dog2boat", "--count", "6", "--out", out],
            "sanitize": ["sanitize", data, "--scan", scan, "--out", out],
            "embed": ["embed", data, "--model", "tiny", "--out", out],
            "train": ["train", data, "--model", "tiny", "--epochs", "1", "--batch-size", "8", "--workers", "0",
                      "--out", out]}[verb]
    if verb != "train":
        argv += ["--scheduler", dask_address]
    filler = _fill(tiny_disk, 12 << 10)
    run = run_cli(argv)
    MATRIX.add("full disk (1 MiB tmpfs, ~12 KiB free)", verb, run)
    assert run.outcome == "error", run.stderr[-800:]
    assert "space" in run.stderr
    assert not [p for p in tiny_disk.rglob("*") if ".tmp" in p.name]
    assert tree_digest(data) == before
    filler.unlink()
    if verb in ("embed", "sanitize"):  # the rerun after freeing space completes, same bytes as a fresh run
        again = run_cli(argv)
        ref = tmp_path / "ref"
        fresh = run_cli([ref if a == out else a for a in argv])
        assert again.outcome == fresh.outcome == "ok", again.stderr + fresh.stderr
        assert tree_digest(out) == tree_digest(ref)
