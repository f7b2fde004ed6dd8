"""The Dask engine: get a client, run one function per shard with progress, resume and retries.

It knows nothing about what a task does. A caller gives a list of tasks (any picklable objects
with a `name`), a top-level function `fn(task) -> dict`, and an `is_done(task)` predicate used to
skip finished shards. A cluster is started only when some task is not done.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from .errors import MmsanitizeError, escape

DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS}


class EngineError(MmsanitizeError):
    """Some shards failed after retries; `failures` maps shard name -> one-line error."""

    def __init__(self, failures: dict[str, str], total: int):
        self.failures = failures
        first = escape(next(iter(failures.values())))
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
    from distributed import Client

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, ValueError, TypeError) as e:
            raise MmsanitizeError(f"cannot reach Dask scheduler {escape(scheduler)}: {escape(e)}") from None
        try:
            yield client
        finally:
            client.close()
        return
    import dask

    # glibc's own malloc tuning, not Dask's MALLOC_TRIM_THRESHOLD_=65536: setting that variable
    # also freezes the mmap threshold at 128 KiB, so every larger buffer (a shard read whole, the
    # numpy temporaries of a search) is mapped, faulted in and unmapped each time. A sanitize
    # worker spent 7.3 s of system time on 200 shards with it and 3.6 s without (22.8 -> 19.3 s).
    # A variable the user exported still reaches the workers, as any environment variable does.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = _local_cluster(workers)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _local_cluster(workers: int | None) -> Any:
    """A LocalCluster of `workers` single-threaded worker processes on 127.0.0.1, logs silenced."""
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers or default_workers(),
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        # CRITICAL, not ERROR: under load a worker's last heartbeat can race the scheduler's
        # shutdown and log a CommClosedError traceback; task failures reach the user as our own
        # one-line errors, never through Dask's log
        silence_logs=logging.CRITICAL,
        # no Dask memory manager: it watches RSS, which counts the pages of the memory-mapped
        # embedding files and inverted lists a worker has read; at 10M pairs it paused a worker at
        # 9.4 GB RSS (9.0 GB of it file pages the kernel can drop) and the scan waited forever
        memory_limit=0,
    )


PROGRESS_TOPIC = "mmsanitize-progress"


class ShardProgress:
    """Inside a Dask task: report samples done while a long shard runs, `ShardProgress(task.name).add(n)`.

    Sent to the client's progress bar as Dask worker events at most every `every` seconds (the
    rest arrives with the task's result `count`); a no-op outside a Dask worker."""

    def __init__(self, task_name: str, every: float = 1.0):
        try:
            from distributed import get_worker

            self.worker = get_worker()
        except (ImportError, ValueError):
            self.worker = None
        self.name, self.every = task_name, every
        self.pending, self.last = 0, time.monotonic()

    def add(self, samples: int) -> None:
        if self.worker is None:
            return
        self.pending += int(samples)
        now = time.monotonic()
        if now - self.last >= self.every and self.pending:
            self.worker.log_event(PROGRESS_TOPIC, {"task": self.name, "n": self.pending})
            self.pending, self.last = 0, now


def disk_error(e: OSError, what: str = "") -> MmsanitizeError | None:
    """A one-line MmsanitizeError for a full/failing disk (ENOSPC, EDQUOT, EIO, EROFS), else None."""
    if e.errno not in DISK_ERRNOS:
        return None
    where = f" writing {e.filename}" if getattr(e, "filename", None) else (f" ({what})" if what else "")
    hint = "free space and rerun" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "check the disk and rerun"
    return MmsanitizeError(f"{os.strerror(e.errno).lower()}{where}; {hint} (finished shards are kept)")


@dataclass
class TaskFailure:
    """What a task returns instead of raising (so Dask logs nothing): the one-line error, and for
    unexpected exceptions the formatted traceback."""

    message: str
    traceback: str | None = None


def run_task(fn: Callable[[Any], Any], task: Any) -> Any:
    """Worker side of `map_shards`: the task's result, or a TaskFailure for any exception.

    The project's errors (bad data, full disk) are deterministic, so they are returned rather than
    raised: Dask neither retries them nor prints `distributed.worker - ERROR` logs. Retries stay
    for what Dask itself sees fail (a killed worker).
    """
    import traceback

    try:
        return fn(task)
    except MmsanitizeError as e:
        return TaskFailure(str(e))
    except OSError as e:
        err = disk_error(e)
        if err is not None:
            return TaskFailure(f"shard {task.name}: {err}")
        return TaskFailure(f"shard {task.name}: {type(e).__name__}: {e}", traceback.format_exc())
    except Exception as e:  # noqa: BLE001 - an internal error: one line + traceback for the log file
        return TaskFailure(f"shard {task.name}: internal error {type(e).__name__}: {e}", traceback.format_exc())


@dataclass(frozen=True)
class Call:
    """A task that is not one shard's (an index's training or merge): `fn(*args)` run through
    `run_task`, so a failure comes back as a TaskFailure naming `name` instead of a worker log."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()


def _call(task: Call) -> Any:
    return task.fn(*task.args)


def submit_call(client: Any, call: Call) -> tuple[str, Any]:
    """Submit `call` to the cluster without waiting: (its name, its future), for `gather_calls`."""
    return call.name, client.submit(run_task, _call, call, key=f"{call.name}-{os.getpid()}-{time.time_ns()}",
                                    pure=False)


def gather_calls(client: Any, submitted: list[tuple[str, Any]]) -> list:
    """The results of `submit_call`'s submissions, in order; EngineError (one line, tracebacks to
    the log file) when any failed."""
    failures, traces, results = {}, {}, []
    for name, res in zip([n for n, _ in submitted], client.gather([f for _, f in submitted])):
        if isinstance(res, TaskFailure):
            failures[name] = res.message
            if res.traceback:
                traces[name] = res.traceback
        results.append(res)
    if traces:
        from .errors import log_traceback

        path = log_traceback("".join(f"{k}:\n{v}\n" for k, v in traces.items()))
        failures = {k: f"{v} (traceback in {path})" if k in traces else v for k, v in failures.items()}
    if failures:
        raise EngineError(failures, len(submitted))
    return results


def task_timeout() -> float | None:
    """The per-task watchdog in seconds (`MMSANITIZE_TASK_TIMEOUT`, default 6 h; 0 = off)."""
    value = float(os.environ.get("MMSANITIZE_TASK_TIMEOUT", 6 * 3600))
    return value if value > 0 else None


class Progress:
    """Shards done / total, samples counted inside running shards, samples/s and ETA on stderr
    (tqdm). Fed by task results' `count` and, while a long shard runs, by `ShardProgress`
    events from the workers (`attach(client)`)."""

    def __init__(self, total: int, desc: str, enabled: bool | None = None):
        from tqdm import tqdm

        if enabled is None:
            enabled = os.environ.get("MMSANITIZE_PROGRESS", "1") != "0"
        self.start = time.monotonic()
        self.samples = 0
        self.partial: dict[str, int] = {}  # samples reported by shards still running
        self.done = 0  # shards finished in this run
        self.client = None
        self.bar = tqdm(total=total, desc=desc, unit="shard", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, mininterval=0.5)

    def attach(self, client: Any, names: Sequence[str] = ()) -> None:
        """Count `ShardProgress` events of the tasks `names` (all tasks when empty)."""
        self.names = set(names)
        try:
            client.subscribe_topic(PROGRESS_TOPIC, self._event)
            self.client = client
        except Exception:  # an old or remote scheduler without topics: per-shard progress only
            self.client = None

    def _event(self, event) -> None:
        msg = event[1] if isinstance(event, tuple) else event
        name = msg.get("task")
        if self.names and name not in self.names:
            return
        n = int(msg.get("n", 0))
        self.partial[name] = self.partial.get(name, 0) + n
        self.samples += n
        self._postfix(refresh=True)

    def _postfix(self, refresh: bool) -> None:
        rate = self.samples / max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.samples:,} samples, {rate:,.0f} samples/s", refresh=refresh)

    def update(self, result: Any, name: str | None = None) -> None:
        """One shard finished with `result` (its `count` minus what it reported while running)."""
        if isinstance(result, dict):
            self.samples += int(result.get("count", 0) or 0) - self.partial.pop(name, 0)
        self.done += 1
        self._postfix(refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.unsubscribe_topic(PROGRESS_TOPIC)
            except Exception:
                pass
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

        progress.attach(client, [t.name for t in pending])
        futures = {}
        for task in pending:
            fut = client.submit(run_task, fn, task, key=f"{desc}-{task.name}-{os.getpid()}-{time.time_ns()}",
                                retries=retries, pure=False)
            futures[fut] = task
        limit = task_timeout()
        deadline = None if limit is None else time.monotonic() + limit * max(1, -(-len(pending) // _slots(client)))
        traces: dict[str, str] = {}
        try:
            ac = as_completed(futures)
            while not ac.is_empty():
                batch = ac.next_batch(block=False)
                if not batch and deadline is not None and time.monotonic() > deadline:
                    for fut, task in futures.items():
                        if not fut.done():
                            failures[task.name] = (f"shard {task.name}: watchdog: no result within {limit:.0f} s "
                                                   "per task (MMSANITIZE_TASK_TIMEOUT); task cancelled")
                            fut.cancel()
                    break
                if not batch:
                    time.sleep(0.02)
                    continue
                for fut in batch:
                    task = futures[fut]
                    try:
                        res = fut.result()
                    except MmsanitizeError as e:
                        res = TaskFailure(str(e))
                    except Exception as e:  # noqa: BLE001 - e.g. KilledWorker after retries: one line per shard
                        res = TaskFailure(f"shard {task.name}: {type(e).__name__}: {e}")
                    if isinstance(res, TaskFailure):
                        failures[task.name] = res.message
                        if res.traceback:
                            traces[task.name] = res.traceback
                        progress.bar.update(1)
                        continue
                    results[task.name] = res
                    progress.update(res, task.name)
        finally:
            progress.close()
            for fut in futures:
                fut.release()
    if traces:
        from .errors import log_traceback

        path = log_traceback("".join(f"shard {k}:\n{v}\n" for k, v in traces.items()))
        failures = {k: f"{v} (traceback in {path})" if k in traces else v for k, v in failures.items()}
    if failures:
        raise EngineError(failures, len(tasks))
    return RunResult(results, skipped, time.monotonic() - t0)



def _slots(client: Any) -> int:
    try:
        return max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))
    except Exception:  # noqa: BLE001 - only sizes the watchdog
        return 1
