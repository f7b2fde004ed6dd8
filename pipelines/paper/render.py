"""Render the results markdown and its plots from the run folders under WORK (nothing else):
every number is read from a JSON file a verb wrote, and every table names its run folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mmsanitize.report import (
    Run,
    attack_rows,
    epoch_figure,
    markdown_table,
    rate_figure,
    save_figure,
    utility_rows,
)

from .config import Config, Experiment
from .plan import Plan


def _load(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _rel(path: Path, work: Path) -> str:
    return f"`WORK/{Path(path).relative_to(work)}`"


def _history(folder: Path) -> list[dict]:
    p = folder / "history.jsonl"
    if not p.exists():
        return []
    return [r for r in (json.loads(x) for x in p.read_text().splitlines() if x.strip()) if "eval" in r]


class Renderer:
    """Builds the markdown of one Plan's outputs; `write(out, img_dir)` writes it."""

    def __init__(self, plan: Plan, times: dict[str, dict], config_path: str):
        self.p, self.cfg, self.w, self.times, self.config_path = plan, plan.cfg, plan.w, times, config_path
        self.figures: dict[str, object] = {}

    def run(self, label: str, path: Path) -> Run | None:
        m = _load(path)
        return Run(label, m, str(path)) if m else None

    def header(self) -> list[str]:
        c = self.cfg
        return [f"# {c.title}", "",
                f"Written by `python -m pipelines.paper --config {self.config_path} --work WORK` from the run folders "
                "under WORK (every number below is read from a JSON file a `mmsanitize` verb wrote there; each table "
                "names its folder); do not edit by hand. Every model starts from its dataset's reference encoder (REF, "
                f"`mmsanitize align` on the `ref` split) and trains `{' '.join(map(str, c.train_args))}` for {c.epochs} "
                f"epochs, seed {c.seed}. Baseline = the clean-trained model scored on the poisoned set's queries; "
                "'random caption' = the poisoned model queried with random test captions not of class A. Hit@K / "
                "MinRank are text→image over the test images (MinRank = mean 0-based rank of the best class-B image).",
                "", *([c.notes.strip(), ""] if c.notes else [])]

    def sec_utility(self) -> list[str]:
        L = ["## Reference encoders and clean models", ""]
        runs, src = [], []
        for ds in self.cfg.datasets:
            for label, folder in ((f"{ds} REF", self.p.ref(ds)), (f"{ds} clean-trained", self.p.run_dir(ds, "clean"))):
                path = folder / "metrics.json"
                r = self.run(label, path)
                if r:
                    runs.append(r)
                    src.append(_rel(path, self.w))
        if not runs:
            return L + ["Not run yet.", ""]
        rows = utility_rows(runs)
        for row, s in zip(rows, src):
            row["from"] = s
        return L + markdown_table(rows) + [""]

    def experiment(self, e: Experiment) -> list[str]:
        r = self.p.run_dir(e.dataset, e.name)
        pj = _load(r / "poison" / "poison.json") or {}
        counts = pj.get("counts", {})
        head = f"### {e.dataset} Attack {e.attack} {'+'.join(e.goals)}: " + (
            f"injected at rate {e.amount:g}" if e.mode == "inject" else f"source fraction {e.amount:g}")
        if counts:
            head += f" ({counts.get('poisoned', 0):,} poisoned pairs of {counts.get('samples_out', 0):,}"
            head += f", rate {pj['rate']:.4f})" if "rate" in pj else ")"
        runs = [x for x in (self.run("clean model (Baseline)", r / "clean_metrics.json"),
                            self.run("poisoned model", r / "metrics.json"),
                            self.run("sanitized + retrained", r / "sanitized_metrics.json")) if x]
        L = [head, ""]
        if not runs:
            return L + ["Not run yet.", ""]
        for goal, rows in attack_rows(runs).items():
            rows = [x for x in rows if not x["model"].endswith("random caption") or x["model"].startswith("poisoned")]
            L += [f"Goal {goal}:", ""] + markdown_table(rows) + [""]
        return L + [f"From {_rel(r, self.w)}.", ""]

    def sec_attacks(self) -> list[str]:
        L = ["## Attacks (Tables 2-5)", ""]
        for e in self.cfg.experiments:
            L += self.experiment(e)
        return L

    def sec_sweeps(self, img_dir: Path, out: Path) -> list[str]:
        series: dict[str, list[Experiment]] = {}
        for e in self.cfg.experiments:
            series.setdefault(e.series, []).append(e)
        L = ["## Hit@10 against the poisoning rate (Fig. 2)", ""]
        points = {}
        for name, exps in series.items():
            if len(exps) < 2:
                continue
            rows = []
            for e in exps:
                r = self.p.run_dir(e.dataset, e.name)
                m, pj = _load(r / "metrics.json"), _load(r / "poison" / "poison.json")
                if not (m and pj):
                    continue
                for goal, a in (m.get("attacks") or {}).items():
                    t = a.get("t2i") or {}
                    rows.append({"set": e.name, "goal": goal, "rate": pj.get("rate"), "Hit@1": t.get("hit@1"),
                                 "Hit@10": t.get("hit@10"), "MinRank": t.get("min_rank_mean"), "from": _rel(r, self.w)})
                    if pj.get("rate"):
                        points.setdefault(f"{name} {goal}", []).append((pj["rate"], t.get("hit@10")))
            L += [f"### {name}", ""] + (markdown_table(rows) if rows else ["Not run yet."]) + [""]
        if points:
            img = img_dir / f"{self.cfg.name}_rate_sweep.png"
            save_figure(rate_figure(points), img)
            L += [f"![Hit@10 against the poisoning rate]({os.path.relpath(img, out.parent)})", ""]
        return L if len(L) > 2 else []

    def sec_scans(self) -> list[str]:
        L = ["## Pre-training defense: scan with REF, sanitize, retrain", ""]
        any_ = False
        for e in self.cfg.experiments:
            if not e.scan:
                continue
            r = self.p.run_dir(e.dataset, e.name)
            sm = _load(r / "scan" / "summary.json")
            L += [f"### {e.dataset} {e.name}", ""]
            if not sm or not sm.get("detection"):
                L += ["Not run yet.", ""]
                continue
            any_ = True
            det = sm["detection"]
            rows = [{"detector": n, **{k: det[n].get(k) for k in ("auroc", "precision", "recall", "flagged")}}
                    for n in [*sm.get("detectors", []), "combined"] if n in det]
            left = det["poisoned"] - round(det["combined"]["recall"] * det["poisoned"])
            L += markdown_table(rows)
            L += ["", f"{sm['flagged']:,} of {sm['samples']:,} pairs flagged; {left} of {det['poisoned']} poisoned pairs "
                  f"left after sanitizing. Page with the flagged pairs: {_rel(r / 'report.html', self.w)}. "
                  f"From {_rel(r / 'scan', self.w)}.", ""]
        return L if any_ or len(L) > 2 else []

    def sec_defense(self, img_dir: Path, out: Path) -> list[str]:
        if not self.cfg.defenses:
            return []
        L = ["## Post-training defense: fine-tune the poisoned model on clean pairs (Fig. 5b)", ""]
        runs = []
        for d in self.cfg.defenses:
            folder = self.p.run_dir(d.dataset, d.experiment) / f"defend_{d.clean_split}"
            hist = _history(folder)
            base = _load(self.p.run_dir(d.dataset, d.experiment) / "metrics.json")
            if not hist or not base:
                L += [f"{d.dataset} {d.experiment} on `{d.clean_split}`: not run yet.", ""]
                continue
            run = Run(f"{d.dataset} {d.experiment} on {d.clean_split}", hist[-1]["eval"], str(folder), hist)
            runs.append(run)
            rows = []
            for goal, a in (base.get("attacks") or {}).items():
                rows.append({"epoch": 0, "goal": goal, "Hit@10": a["t2i"]["hit@10"], "MinRank": a["t2i"]["min_rank_mean"]})
                for i, h in enumerate(hist):
                    t = h["eval"]["attacks"][goal]["t2i"]
                    rows.append({"epoch": h.get("epoch", i + 1), "goal": goal, "Hit@10": t["hit@10"], "MinRank": t["min_rank_mean"]})
            L += [f"{run.label} (epoch 0 = the poisoned model), from {_rel(folder, self.w)}:", ""] + markdown_table(rows) + [""]
        fig = epoch_figure(runs) if runs else None
        if fig is not None:
            img = img_dir / f"{self.cfg.name}_defense.png"
            save_figure(fig, img)
            L += [f"![Hit@10 per defense epoch]({os.path.relpath(img, out.parent)})", ""]
        return L

    def sec_times(self) -> list[str]:
        L = ["## Steps and wall times", "", "Every command as the pipeline issued it (paths under WORK), with its wall "
             "time in the recorded run (`WORK/steps.jsonl`).", ""]
        rows, missing = [], []
        for s in self.p.steps.values():
            rec = self.times.get(s.id)
            if not s.marker.exists():
                missing.append(s.id)
            cmd = " ".join(a.replace(str(self.w), "WORK") for a in s.args)
            rows.append({"step": s.id, "seconds": f"{rec['seconds']:.0f}" if rec else None, "command": f"`mmsanitize {cmd}`"})
        L += markdown_table(rows) + [""]
        if missing:
            L += [f"Not finished ({len(missing)} steps): " + ", ".join(missing) + ".", ""]
        return L

    def write(self, out: Path, img_dir: Path) -> None:
        """Write the markdown to `out` (atomically) and its plots into `img_dir`."""
        L = self.header() + self.sec_utility() + self.sec_attacks() + self.sec_sweeps(img_dir, out) + self.sec_scans() \
            + self.sec_defense(img_dir, out) + self.sec_times()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("\n".join(L).rstrip() + "\n")
        tmp.replace(out)


def load_times(work: Path) -> dict[str, dict]:
    """Recorded steps (WORK/steps.jsonl), the last record per step id."""
    p = Path(work) / "steps.jsonl"
    out = {}
    if p.exists():
        for line in p.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["id"]] = rec
    return out


def render(cfg: Config, plan: Plan, out: Path, img_dir: Path, config_path: str) -> None:
    """Render the results of `plan` into `out` and `img_dir`."""
    Renderer(plan, load_times(plan.w), config_path).write(out, img_dir)
