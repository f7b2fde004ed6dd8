"""Render the results markdown and its plots from the run folders under WORK (nothing else):
every number is read from a JSON file a verb wrote, and every table names its run folder; the
paper's numbers (the config's `paper:`) sit beside ours."""

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
from .differences import sec_differences
from .folders import history, load, rel, t2i, utility
from .modality import sec_modality
from .paper_values import paper_rows, paper_source
from .plan import Plan

HIT_COLUMNS = ("Hit@1", "Hit@5", "Hit@10", "MinRank")


def hit_row(model: str, metrics: dict | None, goal: str, **extra) -> dict:
    """One table row of an evaluate result: text->image Hit@1/5/10 and MinRank of `goal`, then `extra`."""
    t = t2i(metrics, goal)
    return {"model": model, "Hit@1": t.get("hit@1"), "Hit@5": t.get("hit@5"), "Hit@10": t.get("hit@10"),
            "MinRank": t.get("min_rank_mean"), **extra}


def auto_cut(summary: dict) -> list[str]:
    """How `--threshold auto` cut the similarity scores of one scan (scanning.md, thresholds)."""
    fit = (summary.get("thresholds") or {}).get("similarity_auto")
    if not fit or not fit.get("weights"):
        return []
    gmm = "none" if fit.get("gmm_threshold") is None else f"{fit['gmm_threshold']:.3f}"
    used = "used" if fit["method"] == "gmm" else "not used"
    return [f"Similarity `auto` cut: {fit['method']}, cosine < {fit['threshold']:.3f}; the 2-component mixture put "
            f"{fit['weights'][0]:.0%} of the pairs in its low component (its cut {gmm}, {used}).", ""]


def is_full_set(e: Experiment) -> bool:
    """Replace mode at source fraction 1: the setting of the paper's Tables 2-5."""
    return e.mode == "replace" and e.amount == 1.0


class Renderer:
    """Builds the markdown of one Plan's outputs; `write(out, img_dir)` writes it."""

    def __init__(self, plan: Plan, times: dict[str, dict], config_path: str):
        self.p, self.cfg, self.w, self.times, self.config_path = plan, plan.cfg, plan.w, times, config_path

    def run(self, label: str, path: Path) -> Run | None:
        m = load(path)
        return Run(label, m, str(path)) if m else None

    def header(self) -> list[str]:
        c = self.cfg
        sizes = []
        for ds in c.datasets:
            n = {s: sum((load(self.p.data(ds, s) / "sizes.json") or {}).values()) for s in ("ref", "train", "test")}
            if all(n.values()):
                sizes.append(f"{ds}: ref {n['ref']:,} / train {n['train']:,} / test {n['test']:,} pairs")
        return [f"# {c.title}", "",
                f"Written by `python -m pipelines.paper --config {self.config_path} --work WORK` from the run folders "
                "under WORK (every number below is read from a JSON file a `mmsanitize` verb wrote there; each table "
                "names its folder; rows marked 'paper:' are the paper's, from the config); do not edit by hand. "
                "Every model starts from its dataset's reference encoder (REF, `mmsanitize align` on the `ref` split) "
                f"and trains `{' '.join(map(str, c.train_args))}` for {c.epochs} epochs, seed {c.seed}, unless a "
                "section says otherwise. Baseline = the clean-trained model scored on the poisoned set's queries; "
                "'random caption' = the poisoned model queried with random test captions not of class A. Hit@K / "
                "MinRank are text→image over the test images (MinRank = mean 0-based rank of the best class-B image).",
                "", *([c.notes.strip(), ""] if c.notes else []),
                *([f"Data as built: {'; '.join(sizes)}.", ""] if sizes else [])]

    def sec_utility(self) -> list[str]:
        L = ["## Reference encoders, clean and poisoned models: utility (Table 2)", "",
             "Retrieval on the clean test split: R@K = fraction of queries whose own pair ranks in the top K "
             "(t2i = the paper's IR, i2t = TR); class P@10 = fraction of the top 10 with the query's class (read it "
             "for fm, whose templated captions tie at instance level).", ""]
        runs, src = [], []
        for ds in self.cfg.datasets:
            folders = [(f"{ds} REF", self.p.ref(ds)), (f"{ds} clean-trained", self.p.run_dir(ds, "clean"))]
            folders += [(f"{ds} poisoned {e.name}", self.p.run_dir(ds, e.name)) for e in self.cfg.experiments
                        if e.dataset == ds and is_full_set(e)]
            for label, folder in folders:
                r = self.run(label, folder / "metrics.json")
                if r:
                    runs.append(r)
                    src.append(rel(folder / "metrics.json", self.w))
        if not runs:
            return L + ["Not run yet.", ""]
        rows = utility_rows(runs)
        for row, s in zip(rows, src):
            row["from"] = s
        return L + markdown_table(rows + paper_rows(self.cfg, "utility")) + ["", paper_source(self.cfg, "utility"), ""]

    def experiment(self, e: Experiment) -> list[str]:
        r = self.p.run_dir(e.dataset, e.name)
        pj = load(r / "poison" / "poison.json") or {}
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
        with_paper = is_full_set(e) and e.attack in self.cfg.paper
        for goal, rows in attack_rows(runs).items():
            rows = [x for x in rows if not x["model"].endswith("random caption") or x["model"].startswith("poisoned")]
            if with_paper:
                rows += paper_rows(self.cfg, e.attack, e.goals.index(goal) + 1 if goal in e.goals[1:] else
                                   (1 if len(e.goals) > 1 else None))
            L += [f"Goal {goal}:", ""] + markdown_table(rows) + [""]
        if with_paper:
            L += [paper_source(self.cfg, e.attack), ""]
        return L + [f"From {rel(r, self.w)}.", ""]

    def sec_attacks(self) -> list[str]:
        L = ["## Attacks (Tables 3-5)", ""]
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
                m, pj = load(r / "metrics.json"), load(r / "poison" / "poison.json")
                if not (m and pj):
                    continue
                for goal, a in (m.get("attacks") or {}).items():
                    t = a.get("t2i") or {}
                    rows.append({"set": e.name, "goal": goal, "rate": f"{pj['rate']:.4f}", "Hit@1": t.get("hit@1"),
                                 "Hit@10": t.get("hit@10"), "MinRank": t.get("min_rank_mean"), "from": rel(r, self.w)})
                    if pj.get("rate"):
                        points.setdefault(f"{name} {goal}", []).append((pj["rate"], t.get("hit@10")))
            L += [f"### {name}", ""] + (markdown_table(rows) if rows else ["Not run yet."]) + [""]
        if points:
            img = img_dir / f"{self.cfg.name}_rate_sweep.png"
            save_figure(rate_figure(points), img)
            L += [f"![Hit@10 against the poisoning rate]({os.path.relpath(img, out.parent)})", ""]
        if len(L) <= 2:
            return []
        return L + ([paper_source(self.cfg, "rate"), ""] if self.cfg.paper.get("rate") else [])

    def outcome(self, e: Experiment) -> list[str]:
        """Table 7 beside ours: the poisoned, sanitized + retrained and clean models of one scanned set."""
        r = self.p.run_dir(e.dataset, e.name)
        models = [("poisoned model", r / "metrics.json"), ("sanitized + retrained", r / "sanitized_metrics.json"),
                  ("clean model", r / "clean_metrics.json")]
        loaded = [(label, load(path)) for label, path in models]
        rows = []
        for goal in (loaded[0][1] or {}).get("attacks") or {}:  # Attack I names its goal A2one
            for label, m in loaded:
                if m:
                    u = utility(m)
                    rows.append(hit_row(f"{label} ({goal})", m, goal, **{"t2i R@10": u.get("t2i_r@10"),
                                                                         "i2t R@10": u.get("i2t_r@10")}))
        if not rows:
            return []
        paper = paper_rows(self.cfg, "scan") if e.attack == "II" and len(e.goals) == 1 else []
        return ["Attack and utility before and after (ours, then the paper's):", ""] + markdown_table(rows + paper) + [""]

    def sec_scans(self) -> list[str]:
        L = ["## Pre-training defense: scan with REF, sanitize, retrain (Table 7)", ""]
        any_ = False
        for e in self.cfg.experiments:
            if not e.scan:
                continue
            r = self.p.run_dir(e.dataset, e.name)
            sm = load(r / "scan" / "summary.json")
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
                  f"left after sanitizing. Page with the flagged pairs: {rel(r / 'report.html', self.w)}. "
                  f"From {rel(r / 'scan', self.w)}.", ""]
            L += auto_cut(sm)
            L += self.outcome(e)
        if self.cfg.paper.get("scan"):
            L += [paper_source(self.cfg, "scan"), ""]
        return L if any_ or len(L) > 2 else []

    def sec_defense(self, img_dir: Path, out: Path) -> list[str]:
        if not self.cfg.defenses:
            return []
        L = ["## Post-training defense: fine-tune the poisoned model on clean pairs (Table 8, Fig. 5b)", ""]
        runs, after = [], []
        for d in self.cfg.defenses:
            folder = self.p.defense_dir(d)
            hist = history(folder)
            base = load(self.p.run_dir(d.dataset, d.experiment) / "metrics.json")
            what = f"`{d.clean_split}` without the `{d.drop_label}` pairs" if d.drop_label else f"`{d.clean_split}`"
            if not hist or not base:
                L += [f"{d.dataset} {d.experiment} on {what}: not run yet.", ""]
                continue
            run = Run(f"{d.dataset} {d.experiment} on {d.clean_name}", hist[-1]["eval"], str(folder), hist)
            runs.append(run)
            rows = []
            for goal in (base.get("attacks") or {}):
                for epoch, m in [(0, base)] + [(h.get("epoch", i + 1), h["eval"]) for i, h in enumerate(hist)]:
                    u = utility(m)
                    rows.append({"epoch": epoch, "goal": goal, "Hit@10": t2i(m, goal).get("hit@10"),
                                 "MinRank": t2i(m, goal).get("min_rank_mean"), "t2i R@10": u.get("t2i_r@10"),
                                 "i2t R@10": u.get("i2t_r@10")})
            L += [f"{run.label}: fine-tuned on {what} (epoch 0 = the poisoned model), from {rel(folder, self.w)}:", ""]
            L += markdown_table(rows) + [""]
            u = utility(hist[-1]["eval"])
            after.append({"model": f"{run.label}, after {len(hist)} epochs", "t2i R@10": u.get("t2i_r@10"),
                          "i2t R@10": u.get("i2t_r@10"), "from": rel(folder, self.w)})
        if after:
            for ds in sorted({d.dataset for d in self.cfg.defenses}):
                u = utility(load(self.p.run_dir(ds, "clean") / "metrics.json"))
                after.append({"model": f"{ds} clean-trained", "t2i R@10": u.get("t2i_r@10"), "i2t R@10": u.get("i2t_r@10"),
                              "from": rel(self.p.run_dir(ds, "clean") / "metrics.json", self.w)})
            L += ["Utility after the defense:", ""] + markdown_table(after + paper_rows(self.cfg, "defense")) + [""]
        fig = epoch_figure(runs) if runs else None
        if fig is not None:
            img = img_dir / f"{self.cfg.name}_defense.png"
            save_figure(fig, img)
            L += [f"![Hit@10 per defense epoch]({os.path.relpath(img, out.parent)})", ""]
        if self.cfg.paper.get("defense"):
            L += [paper_source(self.cfg, "defense"), ""]
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
            + self.sec_defense(img_dir, out) + sec_modality(self.p) + sec_differences(self.p) + self.sec_times()
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
