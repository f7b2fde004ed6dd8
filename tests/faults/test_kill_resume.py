"""`train` SIGKILLed after its first epoch then `--resume`d, a shard verb SIGTERMed, and a Dask
worker process SIGKILLed mid-task: the final outputs equal an uninterrupted run's, byte for byte."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_dataset
from harness import Matrix, Run, report, run_cli, tree_digest

MATRIX = Matrix()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def print_matrix(pytestconfig):
    yield
    if MATRIX.cells:
        report(pytestconfig, MATRIX.markdown("kill, resume, killed Dask worker (tests/faults/test_kill_resume.py)"))


def _env(tmp_path) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "MMSANITIZE_PROGRESS": "0"}


def _start(argv, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mmsanitize", *map(str, argv)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(cond, proc, limit=120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None and not cond():
        time.sleep(0.01)


def _diff(a: dict, b: dict) -> list:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _train_outputs(folder: Path) -> dict:
    """Digest of a train --out; history.jsonl without `samples_per_s` (a wall-clock speed), and
    train_state.pt by content: torch.save writes a random `.data/serialization_id` into every file,
    so its bytes differ even between two uninterrupted runs."""
    import hashlib

    import torch

    d = tree_digest(folder)
    hist = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    for h in hist:
        h.pop("samples_per_s")
    d["./history.jsonl"] = hashlib.sha256(json.dumps(hist, sort_keys=True).encode()).hexdigest()
    state = torch.load(folder / "train_state.pt", map_location="cpu", weights_only=True)
    digest = hashlib.sha256()

    def feed(obj):
        if isinstance(obj, torch.Tensor):
            digest.update(str(obj.dtype).encode() + obj.contiguous().numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                digest.update(repr(k).encode())
                feed(obj[k])
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                feed(v)
        else:
            digest.update(repr(obj).encode())

    feed(state)
    d["./train_state.pt"] = digest.hexdigest()
    return d


@pytest.mark.slow
def test_train_sigkill_after_first_epoch_then_resume_is_byte_identical(tmp_path, monkeypatch):
    """A real `train` process is SIGKILLed once its epoch-1 checkpoint exists; `--resume` then gives
    the same weights, model.json and per-epoch checkpoints (bytes), history.jsonl (bytes but for the
    measured samples/s) and train_state.pt (content) as a straight run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = tmp_path / "data"
    make_dataset(d, n_shards=1, per_shard=12, classes=["dog", "boat", "cat"])
    before = tree_digest(d)
    args = ["--model", "tiny", "--epochs", "3", "--batch-size", "8", "--loader-workers", "0", "--seed", "5"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run_cli(["train", d, *args, "--out", ref]).outcome == "ok"
    proc = _start(["train", d, *args, "--out", out], _env(tmp_path))
    try:
        _wait_for(lambda: (out / "train_state.pt").is_file(), proc)
        assert proc.poll() is None, "train finished before it could be killed: " + proc.stderr.read()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    epochs_at_kill = len(list((out / "epochs").glob("0*")))
    assert epochs_at_kill < 3
    rerun = run_cli(["train", d, *args, "--resume", "--out", out])
    assert rerun.outcome == "ok", rerun.stderr
    a, b = _train_outputs(ref), _train_outputs(out)
    MATRIX.add(f"SIGKILL after epoch {epochs_at_kill} of 3, --resume", "train",
               Run("ok" if a == b else "differs", 0, "", [] if tree_digest(d) == before else ["input changed"]))
    assert a == b, _diff(a, b)[:5]
    assert (out / "history.jsonl").read_text().count("\n") == 3
    assert tree_digest(d) == before and not list(out.rglob("*.tmp"))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, dask_address):
    """Five shards and their uninterrupted `embed` output; yields (data, ref, input tree digest)."""
    root = tmp_path_factory.mktemp("embedded")
    d, ref = root / "data", root / "ref"
    make_dataset(d, n_shards=5, per_shard=16, classes=["dog", "boat", "cat"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        assert run_cli(["embed", d, "--model", "tiny", "--scheduler", dask_address, "--out", ref]).outcome == "ok"
    return d, ref, tree_digest(d)


def _descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                kids.setdefault(int(fields[1]), []).append(int(p.name))
    out, todo = set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_sigterm_of_embed_exits_promptly_and_rerun_is_byte_identical(embedded, tmp_path, monkeypatch, dask_address):
    """SIGTERM to `embed`'s main process (its own local Dask cluster) mid-run: it ends within 15 s,
    leaves no process behind, and a rerun into the same --out equals an uninterrupted run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d, ref, before = embedded
    out = tmp_path / "out"
    proc = _start(["embed", d, "--model", "tiny", "--workers", "1", "--out", out], _env(tmp_path))
    try:
        _wait_for(lambda: len(list(out.glob("embed_*_stats.json"))) >= 1, proc, limit=300)
        assert proc.poll() is None, "embed finished before it could be stopped: " + proc.stderr.read()
        done_at_term = len(list(out.glob("embed_*_stats.json")))
        family = _descendants(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        took = time.monotonic() - t0
        exited = proc.poll() is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in family):
            time.sleep(0.1)
        left = [p for p in family if _alive(p)]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stderr = proc.stderr.read()
    rerun = run_cli(["embed", d, "--model", "tiny", "--scheduler", dask_address, "--out", out])
    assert rerun.outcome == "ok", rerun.stderr
    a, b = tree_digest(ref), tree_digest(out)
    good = exited and not left and a == b and "Traceback" not in stderr
    MATRIX.add(f"SIGTERM after {done_at_term} of 5 shards (exit in {took:.1f} s), rerun", "embed",
               Run("ok" if good else ("hang" if not exited else "orphans" if left else "differs"), 0, stderr,
                   [] if tree_digest(d) == before else ["input changed"]))
    assert exited, "embed did not exit within 15 s of SIGTERM"
    assert not left, f"processes left after SIGTERM: {left}"
    assert "Traceback" not in stderr, stderr[-1500:]
    assert a == b, _diff(a, b)[:5]
    assert tree_digest(d) == before and not list(out.rglob("*.tmp"))


@pytest.fixture
def two_worker_cluster():
    """A fresh two-process Dask cluster (nannies restart a killed worker); yields (address, client)."""
    import logging

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster) as client:
        yield cluster.scheduler_address, client


@pytest.mark.slow
def test_killed_dask_worker_mid_task_is_rescheduled(embedded, tmp_path, monkeypatch, two_worker_cluster):
    """`embed --scheduler` on a two-worker cluster; the worker process running a shard is SIGKILLed
    after the first shards are done. Dask reschedules its task (the nanny starts a new worker): the
    run ends `ok` with outputs byte-identical to an uninterrupted run (on the session's cluster)."""
    address, client = two_worker_cluster
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d, ref, before = embedded
    out = tmp_path / "out"
    argv = ["embed", d, "--model", "tiny", "--scheduler", address]
    pids = client.run(os.getpid)
    proc = _start([*argv, "--out", out], _env(tmp_path))
    victim = None
    try:
        def busy():
            nonlocal victim
            if len(list(out.glob("embed_*_stats.json"))) < 1:
                return False
            working = [w for w, keys in client.processing().items() if keys]
            victim = working[0] if working else None
            return victim is not None

        _wait_for(busy, proc, limit=300)
        assert proc.poll() is None and victim, "embed finished before a worker could be killed"
        done_at_kill = len(list(out.glob("embed_*_stats.json")))
        os.kill(pids[victim], signal.SIGKILL)
        try:
            code = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stderr = proc.stderr.read()
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    a, b = tree_digest(ref), tree_digest(out)
    if code == 0:
        outcome = "ok" if a == b else "differs"
    elif code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
        outcome = "error"
    else:
        outcome = "hang" if code is None else "traceback" if "Traceback" in stderr else "noisy"
    MATRIX.add(f"worker SIGKILLed mid-task after {done_at_kill} of 5 shards", "embed --scheduler",
               Run(outcome, code, stderr, [] if tree_digest(d) == before else ["input changed"]))
    assert outcome == "ok", (outcome, stderr[-1500:], _diff(a, b)[:5])
    assert tree_digest(d) == before and not list(out.rglob("*.tmp"))
    assert pids[victim] not in client.run(os.getpid).values()  # the worker really died and was replaced


@pytest.mark.slow
def test_train_killed_between_its_checkpoint_and_its_state_resumes_from_the_state(tmp_path, monkeypatch):
    """A SIGKILL can land after `train` replaced `--out`'s model files with epoch N+1 but before it
    wrote `train_state.pt` for epoch N+1 (same as the state's epoch N). `--resume` must continue from
    the epoch the state names (`epochs/00N/`), not from the newer weights: the result equals a straight run."""
    import shutil

    from mmsanitize.train import train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = tmp_path / "data"
    make_dataset(d, n_shards=1, per_shard=12, classes=["dog", "boat", "cat"])
    kw = dict(model="tiny", epochs=3, batch_size=6, seed=5, workers=0, progress=False)
    train(d, out=tmp_path / "ref", **kw)
    out = tmp_path / "out"
    train(d, out=out, max_steps=2, **kw)  # state and checkpoints of epoch 1 (2 steps an epoch)
    for name in ("model.safetensors", "model.json"):  # the window: epoch 2's weights, epoch 1's state
        shutil.copyfile(tmp_path / "ref" / "epochs" / "002" / name, out / name)
    train(d, out=out, resume=True, **kw)
    a, b = _train_outputs(tmp_path / "ref"), _train_outputs(out)
    MATRIX.add("SIGKILL between epoch 2's checkpoint and its train_state, --resume", "train",
               Run("ok" if a == b else "differs", 0, "", []))
    assert a == b, _diff(a, b)[:5]
