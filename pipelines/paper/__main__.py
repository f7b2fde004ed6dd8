"""python -m pipelines.paper --config pipelines/configs/NAME.yaml --work DIR [--jobs 2] [--out FILE] [--report-only] [--steps PATTERN]"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .plan import Plan
from .render import render
from .run import run_plan


LOCK_NAME = ".pipeline.lock"


def _lock_work(work: Path):
    """An exclusive lock on WORK held for the life of this process (None when another run holds it):
    two runs on one WORK would train the same step into the same folder at once."""
    import fcntl

    f = open(work / LOCK_NAME, "a")  # noqa: SIM115 - kept open: closing it releases the lock
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.paper", description=__doc__)
    ap.add_argument("--config", required=True, help="YAML: datasets, goals, rates, models, epochs, defenses")
    ap.add_argument("--work", required=True, type=Path, help="every dataset, model and output goes here")
    ap.add_argument("--jobs", type=int, default=2, help="steps run at once (Dask workers of the local cluster)")
    ap.add_argument("--scheduler", default=None, help="an existing Dask scheduler to run the steps on")
    ap.add_argument("--out", type=Path, default=None, help="results markdown (default WORK/results.md; plots beside it in img/)")
    ap.add_argument("--report-only", action="store_true", help="only render the results from existing run folders")
    ap.add_argument("--steps", action="append", metavar="PATTERN",
                    help="run only the steps whose id matches (fnmatch, repeatable), e.g. 'oca/*/modality/*'")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    plan = Plan(cfg, work)
    out = (a.out or work / "results.md").resolve()
    img = out.parent / "img"
    failed = []
    if not a.report_only:
        lock = _lock_work(work)
        if lock is None:
            print(f"error: {work} is in use by another `python -m pipelines.paper` run (lock {work / LOCK_NAME}); "
                  "wait for it or stop it", file=sys.stderr)
            return 2
        failed = [r for r in run_plan(plan, jobs=a.jobs, scheduler=a.scheduler, only=a.steps) if not r["ok"]]
    render(cfg, plan, out, img, a.config)
    print(f"wrote {out}")
    if failed:
        print(f"{len(failed)} steps failed or were skipped: " + ", ".join(r["id"] for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
