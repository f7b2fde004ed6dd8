"""The Dask engine on real clusters: an external scheduler + workers, resume after a kill, failures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_dataset
from mmsanitize.catalog import build_catalog
from mmsanitize.engine import EngineError, map_shards
from mmsanitize.errors import ShardError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dask_cli() -> str:
    """The `dask` command installed beside this interpreter."""
    exe = Path(sys.executable).with_name("dask")
    return str(exe) if exe.exists() else "dask"


def wait_for_workers(address: str, n: int, timeout: float = 60) -> None:
    from distributed import Client

    with Client(address, timeout="30s") as c:
        c.wait_for_workers(n, timeout=timeout)


def test_external_scheduler_and_workers_give_the_same_catalog(tmp_path, dask_address):
    data = tmp_path / "data"
    make_dataset(data, n_shards=4, per_shard=8)
    local = build_catalog(data, scheduler=dask_address, cache_dir=tmp_path / "c1")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    procs = [subprocess.Popen([dask_cli(), "scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--dashboard-address", "127.0.0.1:0"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(2):
            procs.append(subprocess.Popen([dask_cli(), "worker", address,
                                           "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_workers(address, 2)
        remote = build_catalog(data, scheduler=address, cache_dir=tmp_path / "c2")
        from distributed import Client

        with Client(address) as c:
            assert len(c.scheduler_info()["workers"]) == 2
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    pd.testing.assert_frame_equal(local, remote)
    assert len(local) == 32 and local["key"].is_unique


def test_catalog_resume_after_kill_equals_uninterrupted(tmp_path, monkeypatch):
    from mmsanitize.catalog import catalog_dir
    from mmsanitize.shards import expand_shards

    data = tmp_path / "data"
    make_dataset(data, n_shards=24, per_shard=40)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = catalog_dir(expand_shards(data))
    proc = subprocess.Popen([sys.executable, "-m", "mmsanitize", "catalog", str(data), "--workers", "1"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(cache.glob("*_stats.json"))) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*_stats.json")}
    assert 3 <= len(done_before) < 24, "the kill should land midway"
    assert not (cache / "catalog.parquet").exists()
    resumed = subprocess.run([sys.executable, "-m", "mmsanitize", "catalog", str(data), "--workers", "1"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    for name, mtime in done_before.items():  # finished shards were skipped, not redone
        assert (cache / name).stat().st_mtime_ns == mtime
    full = build_catalog(data, workers=1, cache_dir=tmp_path / "fresh")
    pd.testing.assert_frame_equal(pd.read_parquet(cache / "catalog.parquet"), full)
    assert not list(data.rglob("*.tmp"))


class Task:
    def __init__(self, name):
        self.name = name


def flaky(task):
    if task.name.startswith("bad"):
        raise ShardError(task.name, "broken on purpose", key="k1")
    return {"count": 1, "name": task.name}


def test_failures_are_listed_after_the_others_finish(dask_address):
    tasks = [Task("a"), Task("bad1"), Task("b"), Task("bad2")]
    with pytest.raises(EngineError) as exc:
        map_shards(flaky, tasks, scheduler=dask_address, retries=0)
    assert set(exc.value.failures) == {"bad1", "bad2"}
    assert "2 of 4 shard(s) failed" in str(exc.value)
    assert "shard bad1, key k1: broken on purpose" in str(exc.value) or "shard bad2" in str(exc.value)
    res = map_shards(flaky, [Task("a"), Task("b")], scheduler=dask_address,
                     is_done=lambda t: {"count": 0} if t.name == "a" else None)
    assert res.skipped == ["a"] and res.results["b"]["name"] == "b"


def test_local_workers_are_not_paused_for_memory_mapped_pages(monkeypatch):
    """The local cluster runs without Dask's memory manager: it judges a worker by RSS, which
    counts the memory-mapped embedding files and inverted lists it has read (a 10M-pair scan hung
    on a worker paused at 9.4 GB RSS, 9.0 GB of it file pages). Its workers keep glibc's malloc
    tuning: Dask's MALLOC_TRIM_THRESHOLD_ would freeze the mmap threshold (twice the system time
    in a sanitize task), and it does not leak into the client's environment either."""
    from mmsanitize.engine import dask_client

    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with dask_client(None, 1) as client:
        assert list(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == [None]
        assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
        workers = client.scheduler_info()["workers"].values()
        assert [w["memory_limit"] for w in workers] == [0]
        status = client.run(lambda dask_worker: (dask_worker.memory_manager.memory_pause_fraction,
                                                 dask_worker.memory_manager.memory_limit))
        assert all(limit is None or limit == 0 for _, limit in status.values())
