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


def test_a_second_run_on_the_same_work_is_refused(tmp_path):
    """Two runs on one WORK would train the same step into the same folder at once."""
    import fcntl

    work = tmp_path / "w"
    work.mkdir()
    with open(work / ".pipeline.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = subprocess.run([sys.executable, "-m", "pipelines.paper", "--config", str(QUICK), "--work", str(work)],
                           cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                           timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "in use by another" in r.stderr
    assert not (work / "steps.jsonl").exists() and not (work / "data").exists()


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


SMALL = """
name: small
title: small
seed: 0
train: {epochs: 2, args: [--lock, backbones]}
datasets:
  fm: {build: {name: fashion-mnist, args: [--limit, 500]}, align: [--epochs, 2]}
experiments:
  - {dataset: fm, attack: II, goals: [sneaker2bag], fractions: [1.0], scan: true}
defenses:
  - {dataset: fm, experiment: II_sneaker2bag, clean: ref, epochs: 2}
  - {dataset: fm, experiment: II_sneaker2bag, clean: ref, drop_label: sneaker, epochs: 2}
modality:
  dataset: fm
  experiment: II_sneaker2bag
  runs:
    - {name: text, label: "text tower", paper: M_p^t, args: [--lock, image]}
    - {name: image, label: "image tower", paper: M_p^i, args: [--lock, text]}
paper:
  II:
    source: "Table 4"
    rows: [{model: "FP Ours", Hit@1: 0.280, Hit@5: 0.864, Hit@10: 0.936, MinRank: 2.192}]
  modality:
    rows:
      - {model: M_p^i, Hit@1: 0.200, Hit@10: 0.920, MinRank: 3.016}
      - {model: M_p^t, Hit@1: 0.256, Hit@10: 0.912, MinRank: 3.472}
"""


def _small(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text(SMALL)
    return cfg, _plan(cfg, tmp_path / "w")


def test_label_dropped_defense_and_modality_steps(tmp_path):
    _, plan = _small(tmp_path)
    s = plan.steps
    assert s["fm/ref_nosneaker"].args[:4] == ["sanitize", str(tmp_path / "w/data/fm/ref"), "--drop-label", "sneaker"]
    nofood = s["fm/II_sneaker2bag/defend_ref_nosneaker"]
    assert "fm/ref_nosneaker" in nofood.deps and str(tmp_path / "w/data/fm/ref_nosneaker") in nofood.args
    assert str(tmp_path / "w/data/fm/ref") in s["fm/II_sneaker2bag/defend_ref"].args  # the full split, unchanged
    train = s["fm/II_sneaker2bag/modality/text/train"].args
    assert train[train.index("--init") + 2:train.index("--epochs")] == ["--lock", "image"]
    assert "--manifest" in s["fm/II_sneaker2bag/ref_eval"].args  # M^0: REF on the poisoned set's queries


@pytest.mark.parametrize("bad,field", [("paper: {IV: {rows: []}}", "paper.IV"),
                                       ("paper: {II: {rows: [{Hit@1: 0.1}]}}", "paper.II"),
                                       ("modality: {dataset: fm, experiment: nope, runs: []}", "modality names no experiment")])
def test_bad_paper_or_modality_config_names_the_field(tmp_path, bad, field):
    sys.path.insert(0, str(ROOT))
    from pipelines.paper.config import ConfigError, load_config

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(SMALL.split("modality:")[0] + bad + "\n")
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(cfg)


def _metrics(goal, hit1, hit10, min_rank, r10):
    t = {"hit@1": hit1, "hit@5": hit10, "hit@10": hit10, "hit@20": 1.0, "hit@50": 1.0, "min_rank_mean": min_rank,
         "queries": 20}
    return {"attacks": {goal: {"t2i": t, "baseline_random_t2i": t}},
            "utility": {"t2i_r@10": r10, "i2t_r@10": r10, "t2i_r@1": 0.1, "i2t_r@1": 0.1}}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_render_puts_the_paper_beside_ours_and_computes_the_differences(tmp_path):
    """Run folders written by hand in the verbs' formats: every rendered figure must come from them."""
    sys.path.insert(0, str(ROOT))
    from pipelines.paper.render import render

    cfg_path, plan = _small(tmp_path)
    r = plan.run_dir("fm", "II_sneaker2bag")
    g = "sneaker2bag"
    _write(r / "poison/poison.json", {"counts": {"poisoned": 40, "samples_out": 400}, "rate": 0.1})
    _write(r / "metrics.json", _metrics(g, 0.5, 0.9, 3.0, 0.30))
    _write(r / "clean_metrics.json", _metrics(g, 0.0, 0.1, 60.0, 0.31))
    _write(r / "sanitized_metrics.json", _metrics(g, 0.0, 0.4, 20.0, 0.31))
    _write(r / "ref_metrics.json", _metrics(g, 0.0, 0.05, 80.0, 0.20))
    _write(r / "scan/summary.json", {"detectors": ["similarity"], "flagged": 50, "samples": 400, "detection": {
        "poisoned": 40, "similarity": {"auroc": 0.9}, "combined": {"auroc": 0.95, "recall": 0.9, "precision": 0.7,
                                                                   "flagged": 50}}})
    _write(plan.modality_dir(plan.cfg.modality, "text") / "metrics.json", _metrics(g, 0.3, 0.7, 9.5, 0.29))
    _write(plan.modality_dir(plan.cfg.modality, "image") / "metrics.json", _metrics(g, 0.1, 0.6, 7.25, 0.25))
    for clean, after in (("ref", 0.2), ("ref_nosneaker", 0.8)):
        (r / f"defend_{clean}").mkdir(parents=True)
        (r / f"defend_{clean}/history.jsonl").write_text("".join(
            json.dumps({"epoch": e, "eval": _metrics(g, 0.0, after, 30.0, 0.3)}) + "\n" for e in (1, 2)))
    out = tmp_path / "out" / "results.md"
    render(plan.cfg, plan, out, out.parent / "img", str(cfg_path))
    md = out.read_text()
    assert "| poisoned model | 0.500 | 0.900 | 0.900 | 1.000 | 1.000 | 3.000 | 20 |" in md
    assert "| paper: FP Ours | 0.280 | 0.864 | 0.936 | – | – | 2.192 | – |" in md  # beside ours, same columns
    assert "| text tower | 0.300 |" in md and "| paper: M_p^t | 0.256 |" in md
    diff = md.split("## Where ours differ from the paper, and why")[1].split("## Steps")[0]
    assert "4 of 40 left" in diff and "0.900 → 0.400 (clean model 0.100)" in diff
    assert "MinRank 7.2 (M_p^i) vs 9.5 (M_p^t) — agrees" in diff and "0.300 (M_p^t) vs 0.100 (M_p^i) — agrees" in diff
    assert "Without the sneaker pairs the attack stays higher after one epoch (0.800 vs 0.200)" in diff
    assert (out.parent / "img" / "small_defense.png").exists()
    # the same folders render the same bytes; a changed run folder changes the sentence
    before = out.read_bytes()
    render(plan.cfg, plan, out, out.parent / "img", str(cfg_path))
    assert out.read_bytes() == before
    _write(plan.modality_dir(plan.cfg.modality, "image") / "metrics.json", _metrics(g, 0.1, 0.6, 12.0, 0.25))
    render(plan.cfg, plan, out, out.parent / "img", str(cfg_path))
    assert "MinRank 12.0 (M_p^i) vs 9.5 (M_p^t) — does not agree" in out.read_text()


def test_steps_pattern_selects_steps_and_leaves_out_those_whose_needs_are_not_met(tmp_path):
    sys.path.insert(0, str(ROOT))
    from pipelines.paper.run import select_steps

    _, plan = _small(tmp_path)
    assert [s.id for s in select_steps(plan)] == list(plan.steps)  # nothing done yet: everything
    assert select_steps(plan, ["fm/II_sneaker2bag/modality/*"]) == []  # needs poison and align, not selected
    for id in ("fm/build", "fm/align", "fm/II_sneaker2bag/poison"):
        m = plan.steps[id].marker
        m.mkdir(parents=True) if m.suffix == "" else (m.parent.mkdir(parents=True, exist_ok=True), m.write_text("{}"))
    got = [s.id for s in select_steps(plan, ["fm/II_sneaker2bag/modality/text/*"])]
    assert got == ["fm/II_sneaker2bag/modality/text/train", "fm/II_sneaker2bag/modality/text/eval"]
