"""SIGKILL midway through poison / embed / scan / sanitize, then rerun: outputs byte-identical to an
uninterrupted run. A full disk (a small tmpfs): one line, no temp files, a rerun after freeing
space completes with the same bytes."""

from __future__ import annotations

import contextlib
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
def test_sigkill_then_rerun_is_byte_identical(verb, data, tmp_path, monkeypatch, dask_address):
    """The killed run is a real process (local cluster, process group SIGKILLed once 2 shards are
    done); the reference and the rerun run in-process on the shared cluster (same code, faster)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache"), "MMSANITIZE_PROGRESS": "0"}
    scan = _scan(tmp_path / "scan", data)
    before = tree_digest(data)
    ref, out = tmp_path / "ref", tmp_path / "out"
    sched = ["--scheduler", dask_address]
    first = run_cli(_argv(verb, data, ref, scan)[:-2] + sched)
    assert first.outcome == "ok", first.stderr
    proc = subprocess.Popen([sys.executable, "-m", "mmsanitize", *map(str, _argv(verb, data, out, scan))], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob(DONE[verb]))) < 2:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(out.glob(DONE[verb])))
    rerun = run_cli(_argv(verb, data, out, scan)[:-2] + sched)
    assert rerun.outcome == "ok", rerun.stderr
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
            "train": ["train", data, "--model", "tiny", "--epochs", "1", "--batch-size", "8", "--loader-workers", "0",
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


def _children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(p.name))
    return out


@pytest.mark.slow
def test_killed_train_leaves_no_dataloader_workers(tmp_path):
    """SIGKILL of `train` (its main process only): the DataLoader worker processes exit too."""
    d = tmp_path / "data"
    make_dataset(d, n_shards=4, per_shard=40, classes=["dog", "boat"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache"), "MMSANITIZE_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "mmsanitize", "train", str(d), "--model", "tiny", "--epochs", "50",
                             "--batch-size", "8", "--loader-workers", "2", "--out", str(tmp_path / "out")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(_children(proc.pid)) < 2:
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) >= 2, "the DataLoader workers never started"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        alive = workers
        while time.monotonic() < deadline and alive:
            time.sleep(0.2)
            alive = [w for w in workers if Path(f"/proc/{w}").exists()
                     and "Z" not in (Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[:1] or ["Z"])]
        MATRIX.add("SIGKILL of train's main process", "train",
                   _result("ok" if not alive else "orphans", []))
        assert not alive, f"orphaned DataLoader workers: {alive}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
