"""One line, always: no Dask worker log, no DataLoader traceback, internal errors logged to a file;
scan reruns byte-identical even when the shards' mtimes change (content fingerprints)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_dataset
from harness import run_cli, tree_digest
from hostile import HOSTILE

ROOT = Path(__file__).resolve().parents[2]


def _bad_data(tmp_path, fault="pax-negative-size"):
    d = tmp_path / "data"
    make_dataset(d, n_shards=1, per_shard=8, classes=["dog", "boat"])
    (d / "00001.tar").write_bytes(HOSTILE[fault]())
    return d


@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["catalog", "{d}", "--workers", "1"],
    ["embed", "{d}", "--model", "tiny", "--out", "{o}", "--workers", "1"],
    ["train", "{d}", "--model", "tiny", "--epochs", "1", "--batch-size", "4", "--loader-workers", "1", "--out", "{o}"],
], ids=["catalog-local-cluster", "embed-local-cluster", "train-dataloader-worker"])
def test_bad_shard_is_one_line_in_a_real_process(argv, tmp_path):
    """A local Dask cluster / DataLoader worker process: stderr is exactly the one error line."""
    d = _bad_data(tmp_path, "control-chars-in-key")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp_path / "cache"), "MMSANITIZE_PROGRESS": "0"}
    args = [a.format(d=d, o=tmp_path / "out") for a in argv]
    r = subprocess.run([sys.executable, "-m", "mmsanitize", *args], env=env, capture_output=True, text=True,
                       timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "distributed" not in r.stderr and "Traceback" not in r.stderr and "\x1b" not in r.stderr
    assert "\\n" in lines[0] and "\\x1b" in lines[0]  # the key's newline and ESC shown escaped


def test_internal_error_is_one_line_with_a_log_file(tmp_path, monkeypatch):
    import mmsanitize.info

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def broken(*a, **k):
        raise RuntimeError("a bug\nwith a second line")

    monkeypatch.setattr(mmsanitize.info, "dataset_info", broken)
    d = tmp_path / "data"
    make_dataset(d, n_shards=1, per_shard=2)
    run = run_cli(["info", d])
    assert run.outcome == "internal" and run.code == 3
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("internal error: RuntimeError: a bug")
    log = Path(lines[0].rsplit("(traceback in ", 1)[1].rstrip(")"))
    assert log.is_file() and "Traceback" in log.read_text() and "a bug" in log.read_text()
    assert str(tmp_path / "cache") in str(log)


@pytest.mark.slow
def test_scan_rerun_after_touching_shards_is_byte_identical(tmp_path, monkeypatch, dask_address):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = tmp_path / "data"
    make_dataset(d, n_shards=2, per_shard=10, classes=["dog", "boat"])
    args = ["--model", "tiny", "--threshold", "auto", "--scheduler", dask_address]
    assert run_cli(["scan", d, *args, "--out", tmp_path / "a"]).outcome == "ok"
    first = tree_digest(tmp_path / "a")
    for tar in d.glob("*.tar"):  # same bytes, new mtime (a copy, a restore from backup)
        os.utime(tar, ns=(1, 1))
    assert run_cli(["scan", d, *args, "--out", tmp_path / "a"]).outcome == "ok"
    assert run_cli(["scan", d, *args, "--out", tmp_path / "b"]).outcome == "ok"
    assert tree_digest(tmp_path / "a") == first
    b = tree_digest(tmp_path / "b")  # a fresh --out: equal but for the embeddings path in summary.json
    assert {k: v for k, v in b.items() if k != "./summary.json"} == \
        {k: v for k, v in first.items() if k != "./summary.json"}


def test_read_only_input_and_catalog_outside_it(tmp_path, monkeypatch, dask_address):
    """Catalog and poison on a chmod a-w copy: nothing is created or changed in the input folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    d = tmp_path / "ro"
    make_dataset(d, n_shards=2, per_shard=8, classes=["dog", "boat"])
    before = tree_digest(d)
    subprocess.run(["chmod", "-R", "a-w", str(d)], check=True)
    try:
        assert run_cli(["catalog", d, "--scheduler", dask_address]).outcome == "ok"
        run = run_cli(["poison", d, "--attack", "single-label", "--goal", "dog2boat", "--count", "2",
                       "--out", tmp_path / "p", "--scheduler", dask_address])
        assert run.outcome == "ok", run.stderr
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(d)], check=True)
    assert tree_digest(d) == before
    assert list((tmp_path / "cache" / "mmsanitize" / "catalogs").glob("*/catalog.parquet"))


class _Task:
    def __init__(self, name):
        self.name = name


def _slow(task):
    import time

    if task.name == "stuck":
        time.sleep(6)
    return {"count": 1}


@pytest.mark.slow
def test_watchdog_fails_a_stuck_task_instead_of_stalling(dask_address, monkeypatch):
    from mmsanitize.engine import EngineError, map_shards

    monkeypatch.setenv("MMSANITIZE_TASK_TIMEOUT", "1.5")
    with pytest.raises(EngineError) as exc:
        map_shards(_slow, [_Task("fine"), _Task("stuck")], scheduler=dask_address, retries=0)
    assert set(exc.value.failures) == {"stuck"} and "watchdog" in str(exc.value)
