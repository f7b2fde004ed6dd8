"""Issue 13's targets measured from nothing: detection of web-style poisons and backdoors end to end.

    python pipelines/detection.py --work runs/detection [--datasets oca,fm] [--goals one|all] [--quick] [--report-only]

Everything lives under --work: the datasets are built there (with a `pool` split of images the
attacker brings), the reference encoders are aligned there, every model is trained there. Each
step is one `mmsanitize` CLI call (`python -m mmsanitize ...` under `nice -n 10`, seed 0) whose
output file is its done-marker, so a rerun skips finished steps; every executed step's command and
wall time go to WORK/steps.jsonl and its output to WORK/logs/STEP.log. Independent steps run two
at a time. The report (docs/results_detection.md + docs/img/detection_*.png; with --quick
WORK/results_detection.md + WORK/img/) is rendered by pipelines/detection_report.py from the JSON
and parquet outputs only; --report-only re-renders it without running anything.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mmsanitize.catalog import catalog_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))

# --------------------------------------------------------------------------- configuration

SPLITS = "ref=0.3,pool=0.1,train=0.4,test=0.2"  # pool = the attacker's own images, never in ref/train/test
BUILD = {"oca": ["openclipart"], "fm": ["fashion-mnist", "--limit", 9000]}
# reference encoder per dataset: extra `mmsanitize align` arguments (change freely)
# oca at 160 px: on development goals class_consistency AUROC rose from 0.86-0.87 (96 px, the
# REF of pipelines/paper) to 0.90-0.92; 224 px was no better on average and 3x slower to embed.
ALIGN = {"oca": ["--image-size", 160, "--epochs", 20], "fm": ["--image-size", 64, "--epochs", 20]}
# class vocabulary of scan's class_consistency detector (fm: its label names, the default `auto`)
CLASSES = {"oca": ["--classes", "openclipart"], "fm": []}
TRAIN = ["--lock", "backbones"]  # the pipelines/paper recipe: init REF, projections only, lr 1e-3 default
EPOCHS, QUICK_EPOCHS = 10, 3
# held-out goals (not used in the docs' measurements, nor in the development of the detectors, which
# used fm trouser2sneaker and oca computer2flag): the first is used for Attack II, the second for
# Attack I (--goals all: both for both). Attack I at 5% injected needs 74 class-A captions in oca
# train: flag has 216 (map, 42, does not qualify).
GOALS = {"fm": ["coat2sandal", "pullover2bag"], "oca": ["person2fruit", "flag2house"]}
RATES = [0.01, 0.05]
IMAGE_KINDS = {"fresh": [], "reencode": ["--perturb", "reencode"]}  # both with --images-from POOL
EXTRA_DIRTY = [("I", "crop", 0.05)]  # (attack, perturb, rate): extra rows
# (dataset, attack, goal, kind, rate): sets whose pool is large enough that no poison image repeats.
# oca's pool holds only 11 fruit images, so person2fruit's "fresh" poisons repeat pool images and
# image_reuse sees them; person2flag at 1% draws 14 of the pool's 36 flags, each once.
NO_REPEAT = [("oca", "II", "person2flag", "fresh", 0.01)]
SHIPPED_RATE = 0.05
BACKDOOR_TARGET = {"fm": "bag", "oca": "fruit"}
BACKDOOR_ATTACKS = ["patch", "blended"]
BACKDOOR_RATES = [0.001, 0.01]
# a rate asking for fewer poisoned pairs than this uses --count BACKDOOR_MIN_COUNT instead
# (oca at 0.1% would be 1 pair); the report shows the asked and the real rate.
BACKDOOR_MIN_COUNT = 4
ATTACK_FLAG = {"I": "single-image", "II": "single-label", "III": "multi-label"}
DASK = ["--workers", 1]  # two steps run at once on 2 cores: one Dask worker each
# rough seconds per step kind before any was measured (ETA only)
DEFAULT_SECONDS = {"build": 40, "catalog": 8, "align": 40, "evaluate": 12, "train": 45, "poison": 15,
                   "scan": 90, "scan_emb": 10, "sanitize": 12}


def done_epoch(out: Path, epochs: int) -> Path:
    """A finished train/align: the checkpoint folder of its last epoch."""
    return Path(out) / "epochs" / f"{epochs:03d}"


def all_detectors() -> list[str]:
    """Detector names listed by `mmsanitize scan --help` (they change while the code does)."""
    txt = subprocess.run([sys.executable, "-m", "mmsanitize", "scan", "--help"], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1")).stdout
    txt = " ".join(txt.split())
    m = re.search(r"--detectors TEXT\s+Comma list of (.*?)(?:\(|\[default|\.\s)", txt)
    if not m:
        raise SystemExit("could not read the detector names from `mmsanitize scan --help`")
    names = re.findall(r"[a-z][a-z_]+", m.group(1).replace(" or ", " , ").replace(" and ", " , "))
    return [n for n in names if n not in ("use", "the", "suspect", "model")]


# --------------------------------------------------------------------------- plan


@dataclass
class Step:
    id: str
    args: list | Callable[[], list]  # mmsanitize arguments (callable: resolved when the step runs)
    marker: Path
    deps: list[str]
    kind: str

    def resolved(self) -> list:
        return self.args() if callable(self.args) else self.args


@dataclass(eq=False)
class SetInfo:
    """One poisoned set and where its outputs live (read by the report)."""
    ds: str
    name: str
    family: str  # dirty | shipped | backdoor
    attack: str  # I / II / III / patch / blended
    images: str  # fresh / reencode / crop / same-dataset / trigger
    rate: float
    goals: list[str]
    dir: Path
    extra: dict = field(default_factory=dict)


class Plan:
    def __init__(self, work: Path, datasets: list[str], epochs: int, goals_all: bool, quick: bool):
        self.w, self.datasets, self.epochs, self.quick = work, datasets, epochs, quick
        self.goals_all = goals_all
        self.steps: dict[str, Step] = {}
        self.sets: list[SetInfo] = []
        self._detectors: list[str] | None = None
        for ds in datasets:
            self.dataset_steps(ds)
        for ds in datasets:
            self.dirty_sets(ds)
        for ds in datasets:
            self.shipped_sets(ds)
            self.backdoor_sets(ds)

    # paths
    def data(self, ds, split=""):
        return self.w / "data" / ds / split

    def ref(self, ds):
        return self.w / "ref" / ds

    def clean_model(self, ds):
        return self.w / ds / "clean_model"

    def detectors(self) -> str:
        if self._detectors is None:
            self._detectors = all_detectors()
        return ",".join(self._detectors)

    def add(self, id, args, marker, deps, kind):
        self.steps[id] = Step(id, args, Path(marker), list(deps), kind)
        return id

    def dataset_steps(self, ds):
        d = self.data(ds)
        b = self.add(f"{ds}/build", ["datasets", "build", BUILD[ds][0], "--out", d, *BUILD[ds][1:], "--splits", SPLITS, *DASK],
                     d / "build_report.json", [], "build")
        for split in ("train", "pool"):  # catalogs first, so parallel poison steps only read them
            self.add(f"{ds}/catalog_{split}", ["catalog", self.data(ds, split), *DASK],
                     catalog_dir([self.data(ds, split) / "00000.tar"], self.w / "cache") / "catalog.parquet", [b], "catalog")
        ep = int(ALIGN[ds][ALIGN[ds].index("--epochs") + 1]) if "--epochs" in ALIGN[ds] else 10
        a = self.add(f"{ds}/align", ["align", self.data(ds, "ref"), *ALIGN[ds], "--seed", 0, "--resume", "--out", self.ref(ds)],
                     done_epoch(self.ref(ds), ep), [b], "align")
        self.add(f"{ds}/ref_eval", ["evaluate", self.ref(ds), "--test", self.data(ds, "test"),
                                    "--out", self.w / ds / "ref_metrics.json"], self.w / ds / "ref_metrics.json", [a], "evaluate")
        c = self.add(f"{ds}/clean_train", ["train", self.data(ds, "train"), "--init", self.ref(ds), *TRAIN, "--epochs", self.epochs,
                                           "--seed", 0, "--resume", "--out", self.clean_model(ds)],
                     done_epoch(self.clean_model(ds), self.epochs), [a], "train")
        self.add(f"{ds}/clean_eval", ["evaluate", self.clean_model(ds), "--test", self.data(ds, "test"),
                                      "--out", self.w / ds / "clean_metrics.json"], self.w / ds / "clean_metrics.json",
                 [c, f"{ds}/ref_eval"], "evaluate")

    def poison_step(self, s: SetInfo, args: list | Callable[[], list]) -> str:
        def full():
            return ["poison", self.data(s.ds, "train"), *(args() if callable(args) else args), "--seed", 0, *DASK,
                    "--out", s.dir / "poison"]
        return self.add(f"{s.ds}/{s.name}/poison", full if callable(args) else full(),
                        s.dir / "poison" / "poison.json", [f"{s.ds}/catalog_train", f"{s.ds}/catalog_pool"], "poison")

    def train_eval(self, s: SetInfo, shards: Path, tag: str, after: str) -> str:
        """train from REF (same recipe as clean) + evaluate with the set's manifest; returns the train step id."""
        ds, man, out = s.ds, s.dir / "poison" / "manifest.parquet", s.dir / f"{tag}model"
        t = self.add(f"{ds}/{s.name}/{tag}train", ["train", shards, "--init", self.ref(ds), *TRAIN, "--epochs", self.epochs,
                                                   "--seed", 0, "--resume", "--out", out],
                     done_epoch(out, self.epochs), [after, f"{ds}/align"], "train")
        self.add(f"{ds}/{s.name}/{tag}eval", ["evaluate", out, "--test", self.data(ds, "test"), "--manifest", man,
                                              "--out", s.dir / f"{tag}metrics.json"], s.dir / f"{tag}metrics.json",
                 [t, f"{ds}/ref_eval"], "evaluate")
        return t

    def clean_on(self, s: SetInfo, p: str):
        """The clean model scored on the same queries / triggered images."""
        self.add(f"{s.ds}/{s.name}/clean_eval", ["evaluate", self.clean_model(s.ds), "--test", self.data(s.ds, "test"),
                                                 "--manifest", s.dir / "poison" / "manifest.parquet",
                                                 "--out", s.dir / "clean_metrics.json"], s.dir / "clean_metrics.json",
                 [p, f"{s.ds}/clean_train", f"{s.ds}/ref_eval"], "evaluate")

    def scans(self, s: SetInfo, p: str, sanitize: bool):
        """Default scan with REF at --threshold auto, a second scan of its embeddings with every detector,
        and (dirty-label sets) sanitize + retrain + evaluate."""
        ds, man = s.ds, s.dir / "poison" / "manifest.parquet"
        sc = self.add(f"{ds}/{s.name}/scan", ["scan", s.dir / "poison", "--model", self.ref(ds), "--threshold", "auto",
                                              *CLASSES[ds], "--manifest", man, "--seed", 0, *DASK,
                                              "--out", s.dir / "scan"],
                      s.dir / "scan" / "summary.json", [p, f"{ds}/align"], "scan")
        self.add(f"{ds}/{s.name}/scan_all", lambda: ["scan", s.dir / "poison", "--embeddings", s.dir / "scan" / "embeddings",
                                                     "--model", self.ref(ds), "--detectors", self.detectors(),
                                                     "--threshold", "auto", *CLASSES[ds], "--manifest", man,
                                                     "--seed", 0, *DASK, "--out", s.dir / "scan_all"],
                 s.dir / "scan_all" / "summary.json", [sc], "scan_emb")
        if sanitize:
            z = self.add(f"{ds}/{s.name}/sanitize", ["sanitize", s.dir / "poison", "--scan", s.dir / "scan", *DASK,
                                                     "--out", s.dir / "sanitized"], s.dir / "sanitized" / "removed.parquet",
                         [sc], "sanitize")
            self.train_eval(s, s.dir / "sanitized", "sanitized_", z)

    def goals_for(self, ds, attack):
        g = GOALS[ds]
        if self.goals_all:
            return g
        return [g[0]] if attack == "II" else [g[1]]

    def dirty_sets(self, ds):
        pool = self.data(ds, "pool")
        cells = []
        if self.quick:
            cells = [("II", "fresh", 0.05)]
        else:
            for attack in ("II", "I"):
                for kind in IMAGE_KINDS:
                    for r in RATES:
                        cells.append((attack, kind, r))
            cells += EXTRA_DIRTY
        sets = [(attack, kind, r, goal) for attack, kind, r in cells for goal in self.goals_for(ds, attack)]
        if not self.quick:
            sets += [(attack, kind, r, goal) for d, attack, goal, kind, r in NO_REPEAT if d == ds]
        for attack, kind, r, goal in sets:
            s = SetInfo(ds, f"{attack}_{goal}_{kind}_{r}", "dirty", attack, kind, r, [goal], self.w / ds / f"{attack}_{goal}_{kind}_{r}")
            perturb = IMAGE_KINDS.get(kind, ["--perturb", kind])
            p = self.poison_step(s, ["--attack", ATTACK_FLAG[attack], "--goal", goal, "--images-from", pool, *perturb,
                                     "--mode", "inject", "--rate", r])
            self.sets.append(s)
            self.train_eval(s, s.dir / "poison", "", p)
            self.clean_on(s, p)
            self.scans(s, p, sanitize=True)

    def shipped_sets(self, ds):
        if self.quick:
            return
        g = GOALS[ds]
        for attack, goals in (("I", self.goals_for(ds, "I")), ("II", self.goals_for(ds, "II")), ("III", [g[0], g[1]])):
            for gs in ([goals] if attack == "III" else [[x] for x in goals]):
                name = f"{attack}_{'+'.join(gs)}_same_{SHIPPED_RATE}"
                s = SetInfo(ds, name, "shipped", attack, "same-dataset", SHIPPED_RATE, gs, self.w / ds / name)
                args = ["--attack", ATTACK_FLAG[attack]]
                for x in gs:
                    args += ["--goal", x]
                p = self.poison_step(s, args + ["--mode", "inject", "--rate", SHIPPED_RATE])
                self.sets.append(s)
                self.scans(s, p, sanitize=False)

    def backdoor_sets(self, ds):
        cells = [("patch", 0.01)] if self.quick else [(a, r) for a in BACKDOOR_ATTACKS for r in BACKDOOR_RATES]
        target = BACKDOOR_TARGET[ds]
        for attack, r in cells:
            name = f"{attack}_{target}_{r}"
            s = SetInfo(ds, name, "backdoor", attack, "trigger", r, [f"any2{target}"], self.w / ds / name)
            p = self.poison_step(s, lambda r=r, attack=attack: ["--attack", attack, "--target", target, "--mode", "inject",
                                                 *self.backdoor_amount(ds, r)])
            self.sets.append(s)
            t = self.train_eval(s, s.dir / "poison", "", p)
            self.clean_on(s, p)
            self.add(f"{ds}/{name}/density_scan", ["scan", s.dir / "poison", "--model", s.dir / "model",
                                                   "--detectors", "kdistance,density",
                                                   "--flag-fraction", 0.01, "--manifest", s.dir / "poison" / "manifest.parquet",
                                                   "--seed", 0, *DASK, "--out", s.dir / "density_scan"],
                     s.dir / "density_scan" / "summary.json", [t], "scan")
            # a backdoor with a caption of another class is also a dirty-label pair: the default scan with REF
            self.add(f"{ds}/{name}/ref_scan", ["scan", s.dir / "poison", "--model", self.ref(ds), "--threshold", "auto",
                                               *CLASSES[ds], "--manifest", s.dir / "poison" / "manifest.parquet",
                                               "--seed", 0, *DASK, "--out", s.dir / "ref_scan"],
                     s.dir / "ref_scan" / "summary.json", [p, f"{ds}/align"], "scan")

    def backdoor_amount(self, ds, rate) -> list:
        """--rate R, or --count BACKDOOR_MIN_COUNT when R asks for fewer pairs (inject: R·N/(1−R))."""
        n = sum(json.loads((self.data(ds, "train") / "sizes.json").read_text()).values())
        return ["--rate", rate] if rate * n / (1 - rate) >= BACKDOOR_MIN_COUNT - 0.5 else ["--count", BACKDOOR_MIN_COUNT]


# --------------------------------------------------------------------------- runner


def fmt_t(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Runner:
    """Runs the plan's steps (DAG, `jobs` at a time), skipping those whose marker exists."""

    def __init__(self, plan: Plan, jobs: int = 2, retry_wait: float = 60.0, on_progress=None):
        self.p, self.jobs, self.retry_wait, self.on_progress = plan, jobs, retry_wait, on_progress
        self.w = plan.w
        self.log_path = self.w / "steps.jsonl"
        self.times = load_times(self.w)
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", MMSANITIZE_PROGRESS="0",
                        MMSANITIZE_FEATURE_CACHE=str(self.w / "cache" / "features"), XDG_CACHE_HOME=str(self.w / "cache"))

    def estimate(self, step: Step) -> float:
        same = sorted(r["seconds"] for r in self.times.values() if r.get("kind") == step.kind)
        return same[len(same) // 2] if same else DEFAULT_SECONDS.get(step.kind, 20)

    def exec(self, step: Step) -> tuple[bool, float]:
        args = [str(a) for a in step.resolved()]
        cmd = ["nice", "-n", "10", sys.executable, "-m", "mmsanitize", *args]
        log = self.w / "logs" / (step.id.replace("/", "__") + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        for attempt in (1, 2):
            with open(log, "w") as f:
                f.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
                f.flush()
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env).returncode
            if rc == 0 and step.marker.exists():
                break
            if attempt == 1:  # e.g. detector code edited under us: wait and retry once
                print(f"  {step.id}: failed (rc {rc}), retrying in {self.retry_wait:.0f} s; log {log}", flush=True)
                time.sleep(self.retry_wait)
        secs = round(time.time() - t0, 1)
        ok = rc == 0 and step.marker.exists()
        rec = {"id": step.id, "marker": str(step.marker), "kind": step.kind, "cmd": "mmsanitize " + " ".join(args),
               "seconds": secs, "rc": rc, "ok": ok, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        if ok:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            self.times[step.id] = rec
        return ok, secs

    def run(self) -> list[str]:
        steps = self.p.steps
        done = {i for i, s in steps.items() if s.marker.exists()}
        failed: set[str] = set()
        n = len(steps)
        print(f"{n} steps, {len(done)} already done; running {self.jobs} at a time; logs in {self.w / 'logs'}", flush=True)
        t0 = time.time()
        running: dict[cf.Future, Step] = {}
        order = list(steps)
        with cf.ThreadPoolExecutor(self.jobs) as ex:
            while True:
                blocked = {i for i in order if i not in done and i not in failed
                           and any(d in failed for d in steps[i].deps)}
                failed |= blocked  # skipped: a dependency failed
                busy = {s.id for s in running.values()}
                ready = [i for i in order if i not in done and i not in failed and i not in busy
                         and all(d in done for d in steps[i].deps)]
                while ready and len(running) < self.jobs:
                    st = steps[ready.pop(0)]
                    print(f"  start {st.id}", flush=True)
                    running[ex.submit(self.exec, st)] = st
                if not running:
                    break
                fin, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fu in fin:
                    st = running.pop(fu)
                    ok, secs = fu.result()
                    (done if ok else failed).add(st.id)
                    left = [steps[i] for i in order if i not in done and i not in failed]
                    eta = sum(self.estimate(s) for s in left) / self.jobs
                    print(f"[{len(done)}/{n}] {'done' if ok else 'FAILED'} {st.id} in {secs:.0f} s | elapsed "
                          f"{fmt_t(time.time() - t0)} | ETA {fmt_t(eta)}", flush=True)
                    if self.on_progress and ok and st.kind in ("evaluate", "scan", "scan_emb"):
                        self.on_progress()
        if failed:
            print(f"{len(failed)} steps failed or skipped: " + ", ".join(sorted(failed)), flush=True)
        return sorted(failed)


def load_times(work: Path) -> dict[str, dict]:
    """Recorded steps (WORK/steps.jsonl), last record per step id."""
    out = {}
    p = work / "steps.jsonl"
    if p.exists():
        for line in p.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec.get("id", rec["marker"])] = rec
    return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path, help="every input, model and output goes here")
    ap.add_argument("--datasets", default="oca,fm", help="comma list of oca, fm (--quick: fm)")
    ap.add_argument("--goals", choices=["one", "all"], default="one",
                    help="one: first goal for Attack II, second for Attack I; all: both goals for both")
    ap.add_argument("--quick", action="store_true", help="smoke run: fm only, Attack II fresh 5%% + one backdoor, 3 epochs")
    ap.add_argument("--jobs", type=int, default=2, help="steps run at once")
    ap.add_argument("--out", type=Path, help="report (default docs/results_detection.md; --quick: WORK/results_detection.md)")
    ap.add_argument("--report-only", action="store_true", help="re-render the report from existing outputs")
    a = ap.parse_args(argv)
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    datasets = ["fm"] if a.quick else [d.strip() for d in a.datasets.split(",") if d.strip()]
    for d in datasets:
        if d not in BUILD:
            ap.error(f"unknown dataset {d!r} (oca, fm)")
    plan = Plan(work, datasets, QUICK_EPOCHS if a.quick else EPOCHS, a.goals == "all", a.quick)
    out = a.out or (work / "results_detection.md" if a.quick else Path(__file__).resolve().parent.parent / "docs" / "results_detection.md")

    from detection_report import render

    def report():
        try:
            render(plan, load_times(work), out, out.parent / "img")
            return True
        except Exception as e:  # a report bug must not stop the experiment
            print(f"  (report not written: {type(e).__name__}: {e})", flush=True)
            return False

    if a.report_only:
        render(plan, load_times(work), out, out.parent / "img")
        print(f"wrote {out}")
        return 0
    (work / "plan.json").write_text(json.dumps({"argv": sys.argv[1:], "datasets": datasets, "epochs": plan.epochs,
                                                "quick": a.quick, "goals": a.goals}, indent=1))
    last = [0.0]

    def progress():
        if time.time() - last[0] > 120:
            last[0] = time.time()
            report()

    failed = Runner(plan, a.jobs, on_progress=progress).run()
    if report():
        print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
