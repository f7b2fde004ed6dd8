"""pipelines.paper: the quick configuration from nothing, killed and resumed, rendered from run folders."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "pipelines" / "configs" / "quick.yaml"
FULL = ROOT / "pipelines" / "configs" / "full.yaml"


def _plan(config: Path, work: Path):
    sys.path.insert(0, str(ROOT))
    from pipelines.paper.config import load_config
    from pipelines.paper.plan import Plan

    return Plan(load_config(config), work)


@pytest.mark.parametrize("config", [QUICK, FULL], ids=["quick", "full"])
def test_plan_keeps_every_path_inside_work(tmp_path, config):
    plan = _plan(config, tmp_path / "w")
    ids = list(plan.steps)
    for i, s in enumerate(plan.steps.values()):
        assert s.marker.is_relative_to(tmp_path / "w")
        for a in s.args:
            if a.startswith("/"):
                assert Path(a).is_relative_to(tmp_path / "w"), (s.id, a)
        assert all(ids.index(d) < i for d in s.deps), s.id  # plan order is a topological order


def test_a_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: {fm: {build: {name: fashion-mnist}}}\nexperiments: [{dataset: fm, attack: IV, goals: [a2b]}]\n")
    r = subprocess.run([sys.executable, "-m", "pipelines.paper", "--config", str(bad), "--work", str(tmp_path / "w")],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "experiments[0].attack" in r.stderr


def _start(work: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.paper", "--config", str(QUICK), "--work", str(work)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _recorded(work: Path) -> list[str]:
    p = work / "steps.jsonl"
    return [json.loads(x)["id"] for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


@pytest.mark.slow
def test_quick_pipeline_from_nothing_resumes_after_a_kill(tmp_path):
    work = tmp_path / "work"
    cache = tmp_path / "xdg_cache"
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(cache), HF_HUB_OFFLINE="1",
               MMSANITIZE_FEATURE_CACHE="")  # the pipeline must set its own, inside WORK
    env.pop("MMSANITIZE_FEATURE_CACHE")
    plan = _plan(QUICK, work.resolve())
    n = len(plan.steps)

    # 1. start from nothing and kill the whole process group once a third of the steps are done
    proc = _start(work, env)
    deadline = time.time() + 900
    while len(_recorded(work)) < n // 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(1)
    assert proc.poll() is None, "the quick pipeline ended before it could be killed:\n" + proc.stdout.read()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {s.id for s in plan.steps.values() if s.marker.exists()}
    assert n // 3 <= len(done_before) < n
    recorded_before = len(_recorded(work))

    # 2. rerun: only the missing steps run
    proc = _start(work, env)
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out
    assert f"{n} steps, {len(done_before)} already done, {n - len(done_before)} to run" in out
    rerun = _recorded(work)[recorded_before:]
    assert sorted(rerun) == sorted(set(plan.steps) - done_before)

    # 3. the results are rendered from the run folders, every section filled
    results = (work / "results.md").read_text()
    assert "Not run yet" not in results and "Not finished" not in results
    table = re.search(r"\| poisoned model \| ([0-9.]+) \|", results)
    assert table, results
    for img in ("quick_rate_sweep.png", "quick_defense.png"):
        assert (work / "img" / img).stat().st_size > 5000
    assert (work / "runs" / "fm" / "II_sneaker2bag" / "report.html").exists()
    # the numbers come from the verbs' JSON: the sanitized model's Hit@10 is the one evaluate wrote
    m = json.loads((work / "runs/fm/II_sneaker2bag/sanitized_metrics.json").read_text())
    hit10 = m["attacks"]["sneaker2bag"]["t2i"]["hit@10"]
    assert re.search(rf"\| sanitized \+ retrained \| [0-9.]+ \| [0-9.]+ \| {hit10:.3f} \|", results)

    # 4. nothing outside WORK: the backbone-feature cache and the catalogs live in WORK
    assert any((work / "cache" / "features").iterdir())
    assert not (cache / "mmsanitize").exists()

    # 5. a finished run reruns nothing and renders the same bytes
    before = (work / "results.md").read_bytes()
    r = subprocess.run([sys.executable, "-m", "pipelines.paper", "--config", str(QUICK), "--work", str(work)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"{n} steps, {n} already done, 0 to run" in r.stdout
    assert (work / "results.md").read_bytes() == before
