"""Run the unfinished steps of a Plan as Dask tasks: a step starts when the steps it needs are
done, independent steps run side by side on the cluster's workers, and a step whose output
exists is not run again (a rerun after a kill runs only the missing steps; each verb also
resumes its own half-finished output). Every executed step's command and wall time are appended
to WORK/steps.jsonl, its output to WORK/logs/STEP.log.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .plan import Plan, Step


def step_env(work: Path) -> dict:
    """Environment of every step: offline, and every cache (catalogs, backbone features, logs) inside WORK."""
    return dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", MMSANITIZE_PROGRESS="0",
                MMSANITIZE_FEATURE_CACHE=str(work / "cache" / "features"), XDG_CACHE_HOME=str(work / "cache"))


def run_step(step: Step, work: str, *deps: dict) -> dict:
    """Dask task: run one `mmsanitize` step (skipped when a step it needs failed); returns its record."""
    work = Path(work)
    bad = [d["id"] for d in deps if not d["ok"]]
    rec = {"id": step.id, "kind": step.kind, "cmd": "mmsanitize " + " ".join(step.args), "ran": False}
    if bad:
        return {**rec, "ok": False, "why": f"needs {', '.join(bad)}"}
    if step.marker.exists():
        return {**rec, "ok": True, "seconds": 0.0}
    log = work / "logs" / (step.id.replace("/", "__") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["nice", "-n", "10", sys.executable, "-m", "mmsanitize", *step.args]
    t0 = time.time()
    with open(log, "w") as f:
        f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=step_env(work)).returncode
    ok = rc == 0 and step.marker.exists()
    return {**rec, "ran": True, "ok": ok, "rc": rc, "seconds": round(time.time() - t0, 1),
            "why": "" if ok else f"rc {rc}, see {log}"}


def _fmt_t(s: float) -> str:
    s = int(s)
    return f"{s // 60}:{s % 60:02d}"


def select_steps(plan: Plan, only: list[str] | None = None) -> list[Step]:
    """The unfinished steps to run, in plan order; with `only` (fnmatch patterns of step ids) just
    those, minus any whose unfinished dependency is not selected."""
    from fnmatch import fnmatch

    chosen: set[str] = set()
    for s in plan.steps.values():  # plan order is topological, so a left-out step drops its dependents too
        if s.marker.exists() or (only and not any(fnmatch(s.id, pat) for pat in only)):
            continue
        if all(d in chosen or plan.steps[d].marker.exists() for d in s.deps):
            chosen.add(s.id)
    return [s for s in plan.steps.values() if s.id in chosen]


def run_plan(plan: Plan, *, jobs: int = 2, scheduler: str | None = None, on_done=None,
             only: list[str] | None = None) -> list[dict]:
    """Submit the unfinished steps (`select_steps`) to Dask (a local cluster of `jobs` processes, or
    `scheduler`); return the records of the steps that were submitted. `on_done(record)` is called
    as each finishes."""
    from distributed import Client, LocalCluster, as_completed

    steps = plan.steps
    todo = select_steps(plan, only)
    done = sum(s.marker.exists() for s in steps.values())
    print(f"{len(steps)} steps, {done} already done, {len(todo)} to run "
          f"({jobs} at a time); logs in {plan.w / 'logs'}", flush=True)
    if not todo:
        return []
    cluster = None
    if scheduler is None:
        cluster = LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, silence_logs=40)
    records = []
    t0 = time.time()
    with Client(scheduler or cluster) as client:
        futures = {}
        for s in todo:  # plan order is a topological order
            deps = [futures[d] for d in s.deps if d in futures]
            futures[s.id] = client.submit(run_step, s, str(plan.w), *deps, key=f"step-{s.id}", pure=False)
        log_path = plan.w / "steps.jsonl"
        for fut in as_completed(list(futures.values())):
            rec = fut.result()
            records.append(rec)
            if rec.get("ran") and rec["ok"]:
                with open(log_path, "a") as f:
                    f.write(json.dumps({k: rec[k] for k in ("id", "kind", "cmd", "seconds")}) + "\n")
            state = "done" if rec["ok"] else "FAILED" if rec.get("ran") else "skipped"
            print(f"[{len(records)}/{len(todo)}] {state} {rec['id']}"
                  + (f" in {rec['seconds']:.0f} s" if rec.get("ran") else "")
                  + (f" ({rec['why']})" if not rec["ok"] else "") + f" | elapsed {_fmt_t(time.time() - t0)}", flush=True)
            if on_done:
                on_done(rec)
    if cluster is not None:
        cluster.close()
    return records
