"""The Dask engine: get a client, run one function per shard with progress, resume and retries.

It knows nothing about what a task does. A caller gives a list of tasks (any picklable objects
with a `name`), a top-level function `fn(task) -> dict`, and an `is_done(task)` predicate used to
skip finished shards. A cluster is started only when some task is not done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from .errors import MmsanitizeError


class EngineError(MmsanitizeError):
    """Some shards failed after retries; `failures` maps shard name -> one-line error."""

    def __init__(self, failures: dict[str, str], total: int):
        self.failures = failures
        first = next(iter(failures.values()))
        more = f" (and {len(failures) - 1} more: {', '.join(list(failures)[1:6])})" if len(failures) > 1 else ""
        super().__init__(f"{len(failures)} of {total} shard(s) failed: {first}{more}")


@dataclass
class RunResult:
    """What `map_shards` returns: results by task name (done earlier or now) and what was skipped."""

    results: dict[str, Any]
    skipped: list[str]
    seconds: float


def default_workers() -> int:
    """Worker processes for a local cluster: the machine's cores."""
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None) -> Iterator[Any]:
    """Yield a `distributed.Client`.

    `scheduler` is an address (`tcp://host:8786`) of an existing cluster, used unchanged; without
    it a `LocalCluster` of `workers` processes (one thread each) is started on 127.0.0.1 and torn
    down on exit.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except OSError as e:
            raise MmsanitizeError(f"cannot reach Dask scheduler {scheduler}: {e}") from None
        try:
            yield client
        finally:
            client.close()
        return
    cluster = LocalCluster(
        n_workers=workers or default_workers(),
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


class Progress:
    """Shards done / total, samples/s and ETA on stderr (tqdm), fed by task results' `count`."""

    def __init__(self, total: int, desc: str, enabled: bool | None = None):
        from tqdm import tqdm

        if enabled is None:
            enabled = os.environ.get("MMSANITIZE_PROGRESS", "1") != "0"
        self.start = time.monotonic()
        self.samples = 0
        self.bar = tqdm(total=total, desc=desc, unit="shard", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, mininterval=0.5)

    def update(self, result: Any) -> None:
        if isinstance(result, dict):
            self.samples += int(result.get("count", 0) or 0)
        rate = self.samples / max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} samples/s", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def map_shards(
    fn: Callable[[Any], Any],
    tasks: Sequence[Any],
    *,
    is_done: Callable[[Any], Any] | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 1,
    desc: str = "shards",
    client: Any = None,
) -> RunResult:
    """Run `fn(task)` for each task not already done, one Dask task per shard.

    `is_done(task)` returns a truthy previous result (reused as the task's result) or falsy.
    Failed tasks are retried `retries` times; when some still fail, the others finish first and
    then EngineError lists every failed shard. Returns a RunResult keyed by `task.name`.
    """
    t0 = time.monotonic()
    results: dict[str, Any] = {}
    skipped: list[str] = []
    pending = []
    for task in tasks:
        prev = is_done(task) if is_done else None
        if prev:
            results[task.name] = prev
            skipped.append(task.name)
        else:
            pending.append(task)
    if not pending:
        return RunResult(results, skipped, time.monotonic() - t0)

    failures: dict[str, str] = {}
    progress = Progress(len(tasks), desc)
    for _ in skipped:
        progress.bar.update(1)
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(dask_client(scheduler, workers))
        from distributed import as_completed

        futures = {}
        for task in pending:
            fut = client.submit(fn, task, key=f"{desc}-{task.name}-{os.getpid()}-{time.time_ns()}",
                                retries=retries, pure=False)
            futures[fut] = task
        try:
            for fut in as_completed(futures):
                task = futures[fut]
                try:
                    res = fut.result()
                except MmsanitizeError as e:
                    failures[task.name] = str(e)
                    progress.bar.update(1)
                    continue
                except Exception as e:  # unexpected worker failure: still one line per shard
                    failures[task.name] = f"shard {task.name}: {type(e).__name__}: {e}"
                    progress.bar.update(1)
                    continue
                results[task.name] = res
                progress.update(res)
        finally:
            progress.close()
            for fut in futures:
                fut.release()
    if failures:
        raise EngineError(failures, len(tasks))
    return RunResult(results, skipped, time.monotonic() - t0)
