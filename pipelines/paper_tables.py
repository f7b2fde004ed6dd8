"""Re-run the paper's experiments (Tables 2-8) on the embedded real datasets and write docs/results.md.

    python pipelines/paper_tables.py --work runs/paper --out docs/results.md [--datasets oca,fm] [--quick]

Every step is one `mmsanitize` CLI call (run under `nice`, seed 0) whose output folder/file is its
"done" marker: re-running the script skips finished steps, so it can be stopped and resumed. After
each step results.md is rewritten from the outputs under --work; a section whose outputs do not
exist yet says "not run yet" and shows the commands that would produce it. Numbers in results.md
come only from the JSON files the verbs wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

DATA = {"oca": "/tmp/oca", "fm": "/tmp/fm"}
OCA_REF = "/tmp/mt_exp/ref"  # offline-b0-minilm aligned on /tmp/oca/ref for 20 epochs (same align command)
OCA_II = ["food2bird", "insect2boat", "tools2fruit"]
FM_II = ["sneaker2bag"]
FM_RATES = [0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
# Attack I and III per dataset: (name, --attack, goals)
ATTACKS_13 = {"oca": [("I_food2bird", "single-image", ["food2bird"]),
                      ("III_food2bird+insect2boat", "multi-label", ["food2bird", "insect2boat"])],
              "fm": [("I_sneaker2bag", "single-image", ["sneaker2bag"]),
                     ("III_sneaker2bag+shirt2trouser", "multi-label", ["sneaker2bag", "shirt2trouser"])]}
# low-rate study: Attack II injected (--mode inject --rate R) beside every clean class-A pair
INJECT = {"oca": ("food2bird", [0.005, 0.01, 0.02, 0.05]), "fm": ("sneaker2bag", [0.0025, 0.005, 0.01, 0.02, 0.05])}
# (dataset, poisoned set) for the pre-training defense: scan with REF, sanitize, retrain
SCANS = [("oca", "II_food2bird"), ("oca", "I_food2bird"), ("oca", "III_food2bird+insect2boat"),
         ("oca", "inj_food2bird_0.05"), ("fm", "II_sneaker2bag"), ("fm", "I_sneaker2bag"),
         ("fm", "III_sneaker2bag+shirt2trouser"), ("fm", "inj_sneaker2bag_0.05")]
ALL_DETECTORS = "similarity,image_reuse,caption_neighbours,density"
# (row label, name tag, --lock value): whole-tower training for the modality study
MODALITY = [("M_p^t: text tower trained (--lock image)", "lockimage", "image", None, None),
            ("M_p^t: text tower trained (--lock image --lr 1e-4)", "lockimage_lr1e-4", "image", 1e-4, None),
            ("M_p^t: text tower trained (--lock image --head-lr 1e-3)", "lockimage_h1e-3", "image", None, 1e-3),
            ("M_p^i: image tower trained (--lock text --head-lr 1e-3)", "locktext_h1e-3", "text", None, 1e-3),
            ("M_p: both towers trained (no lock, --head-lr 1e-3)", "nolock_h1e-3", None, None, 1e-3)]


def done_epoch(out: Path, epochs: int) -> Path:
    """Marker of a finished training run: the checkpoint of its last epoch (model.safetensors is
    rewritten after every epoch, so it does not mean 'finished')."""
    return out / "epochs" / f"{epochs:03d}"


class Runner:
    """Runs CLI steps once (skip when the marker exists) and logs command + wall time."""

    def __init__(self, work: Path, results, dry: bool = False):
        self.work, self.results, self.dry = work, results, dry
        self.log_path = work / "steps.jsonl"
        self.times: dict[str, dict] = {}
        if self.log_path.exists():
            for line in self.log_path.read_text().splitlines():
                rec = json.loads(line)
                self.times[rec["marker"]] = rec

    def run(self, args: list[str], marker: Path) -> bool:
        """Run `mmsanitize ARGS` unless `marker` exists; returns True when the output is there."""
        cmd = ["nice", "-n", "10", sys.executable, "-m", "mmsanitize", *map(str, args)]
        if marker.exists():
            return True
        if self.dry:
            return False
        print("$ " + " ".join(shlex.quote(c) for c in cmd[3:]).replace(sys.executable, "python"), flush=True)
        t0 = time.time()
        env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", MMSANITIZE_PROGRESS="0")
        log = self.work / "logs" / (str(marker.relative_to(self.work)).replace("/", "_") + ".log")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0:
            print(f"  FAILED (rc {rc}), see {log}", flush=True)
            return False
        rec = {"marker": str(marker), "cmd": "mmsanitize " + " ".join(map(str, args)), "seconds": round(time.time() - t0, 1)}
        self.times[str(marker)] = rec
        with open(self.log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"  done in {rec['seconds']} s", flush=True)
        self.results()
        return marker.exists()


def load(path: Path) -> dict | None:
    """JSON at `path` or None."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def f3(x) -> str:
    return "–" if x is None else f"{x:.3f}"


# --------------------------------------------------------------------------- experiment plan


class Plan:
    """Folder layout and the commands of every experiment."""

    def __init__(self, work: Path, epochs: int, align_epochs: int):
        self.w, self.epochs, self.align_epochs = work, epochs, align_epochs

    def ref(self, ds):
        return self.w / ds / "ref"

    def steps_utility(self, ds):
        d = DATA[ds]
        steps = []
        if ds == "fm":
            steps.append((["align", f"{d}/ref", "--image-size", 64, "--epochs", self.align_epochs, "--seed", 0,
                           "--resume", "--out", self.ref(ds)], done_epoch(self.ref(ds), self.align_epochs)))
        steps.append((["evaluate", self.ref(ds), "--test", f"{d}/test", "--out", self.w / ds / "ref_metrics.json"],
                      self.w / ds / "ref_metrics.json"))
        return steps

    def train_steps(self, ds, shards, name, manifest=None, extra=()):
        """train (init REF, backbones locked) + evaluate; metrics at WORK/ds/NAME_metrics.json."""
        d, out = DATA[ds], self.w / ds / f"{name}_model"
        ev = ["evaluate", out, "--test", f"{d}/test", "--out", self.w / ds / f"{name}_metrics.json"]
        if manifest:
            ev += ["--manifest", manifest]
        return [(["train", shards, "--init", self.ref(ds), *extra, "--epochs", self.epochs, "--seed", 0,
                  "--resume", "--out", out], done_epoch(out, self.epochs)),
                (ev, self.w / ds / f"{name}_metrics.json")]

    def clean_train(self, ds):
        return [(["train", f"{DATA[ds]}/train", "--init", self.ref(ds), "--lock", "backbones", "--epochs", self.epochs,
                  "--seed", 0, "--resume", "--out", self.w / ds / "clean_model"], done_epoch(self.w / ds / "clean_model", self.epochs))]

    def clean_eval(self, ds, name):
        """Clean model evaluated against poisoned set NAME's manifest (the paper's Baseline row)."""
        return [(["evaluate", self.w / ds / "clean_model", "--test", f"{DATA[ds]}/test", "--manifest",
                  self.w / ds / name / "manifest.parquet", "--out", self.w / ds / f"clean_on_{name}_metrics.json"],
                 self.w / ds / f"clean_on_{name}_metrics.json")]

    def poison_steps(self, ds, name, attack, goals, fraction=1.0, inject_rate=None):
        p = self.w / ds / name
        args = ["poison", f"{DATA[ds]}/train", "--attack", attack]
        for g in goals:
            args += ["--goal", g]
        args += (["--mode", "inject", "--rate", inject_rate] if inject_rate else ["--source-fraction", fraction])
        args += ["--seed", 0, "--out", p]
        return [(args, p / "poison.json")] + self.train_steps(ds, p, name, p / "manifest.parquet", ("--lock", "backbones")) \
            + self.clean_eval(ds, name)

    def inject_steps(self, ds):
        goal, rates = INJECT[ds]
        return [st for r in rates for st in self.poison_steps(ds, f"inj_{goal}_{r}", "single-label", [goal], inject_rate=r)]

    def scan_steps(self, ds, name):
        """scan with REF (default detectors, --threshold auto), a second scan of the same embeddings
        with every detector (per-detector report), sanitize, retrain from REF, evaluate."""
        p, s, c = self.w / ds / name, self.w / ds / f"{name}_scan", self.w / ds / f"{name}_sanitized"
        sa, man = self.w / ds / f"{name}_scan_all", p / "manifest.parquet"
        return [(["scan", p, "--model", self.ref(ds), "--threshold", "auto", "--manifest", man, "--seed", 0, "--out", s],
                 s / "summary.json"),
                (["scan", p, "--embeddings", s / "embeddings", "--detectors", ALL_DETECTORS, "--threshold", "auto",
                  "--manifest", man, "--seed", 0, "--out", sa], sa / "summary.json"),
                (["sanitize", p, "--scan", s, "--out", c], c / "removed.parquet")] \
            + self.train_steps(ds, c, f"{name}_sanitized", man, ("--lock", "backbones"))

    def modality_steps(self):
        """Attack II food2bird trained with whole towers unfrozen (--lock image / text / none)."""
        p = self.w / "oca" / "II_food2bird"
        steps = []
        for _, tag, lock, lr, head_lr in MODALITY:
            extra = (("--lock", lock) if lock else ()) + (("--lr", lr) if lr else ()) \
                + (("--head-lr", head_lr) if head_lr else ())
            steps += self.train_steps("oca", p, f"II_food2bird_{tag}", p / "manifest.parquet", extra)
        return steps

    def defense_steps(self, ds, name, clean_name, clean_dir):
        out = self.w / ds / f"{name}_defend_{clean_name}"
        return [(["defend", "finetune", self.w / ds / f"{name}_model", "--clean", clean_dir, "--lock", "backbones",
                  "--epochs", 3, "--seed", 0, "--eval", f"{DATA[ds]}/test", "--manifest",
                  self.w / ds / name / "manifest.parquet", "--resume", "--out", out], done_epoch(out, 3))]


def ref_without(src: str, out: Path, label: str) -> None:
    """Copy of clean split `src` without the samples labelled `label` (the 'general' clean set)."""
    import pandas as pd

    from mmsanitize.shards import rewrite_shard, write_sizes
    if (out / "sizes.json").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    for tar in sorted(Path(src).glob("*.tar")):
        meta = pd.read_parquet(tar.with_suffix(".parquet"))
        rewrite_shard(tar, out, tar.stem, drop=meta.loc[meta["label"] == label, "key"].tolist())
    write_sizes(out)


# --------------------------------------------------------------------------- results.md


PAPER = {
    "t2": "Flickr-PASCAL clean TR/IR Hit@10 0.984/0.971; Attack I 0.980/0.973; II 0.980/0.968; III 0.958/0.954. "
          "COCO clean 0.911/0.836; I 0.934/0.860; II 0.935/0.866; III 0.939/0.859.",
    "t3": [("FP Baseline", 0.000, 0.032, 0.032, 79.168), ("FP Ours", 0.320, 0.928, 0.968, 2.184),
           ("COCO Baseline", 0.000, 0.020, 0.036, 153.852), ("COCO Ours", 0.016, 0.472, 0.784, 12.688)],
    "t4": [("FP Baseline", 0.024, 0.088, 0.200, 51.048), ("FP Ours", 0.280, 0.864, 0.936, 2.192),
           ("COCO Baseline", 0.024, 0.072, 0.116, 123.076), ("COCO Ours", 0.012, 0.212, 0.516, 15.280)],
    "t5": [("FP Baseline-1", 0.048, 0.120, 0.216, 46.576), ("FP Ours-1", 0.352, 0.864, 0.976, 2.224),
           ("FP Baseline-2", 0.048, 0.152, 0.208, 33.888), ("FP Ours-2", 0.008, 0.248, 0.552, 12.792),
           ("COCO Ours-1", 0.016, 0.272, 0.604, 13.940), ("COCO Ours-2", 0.012, 0.180, 0.516, 12.788)],
    "t7": [("Attack II", 0.280, 0.864, 0.936, 2.192), ("Defense", 0.000, 0.008, 0.016, 49.576),
           ("Clean", 0.024, 0.088, 0.200, 51.048)],
}


def hit_row(label: str, m: dict | None) -> str:
    if not m:
        return f"| {label} | not run yet | | | | |"
    return f"| {label} | {f3(m.get('hit@1'))} | {f3(m.get('hit@5'))} | {f3(m.get('hit@10'))} | {f3(m.get('min_rank_mean'))} | {m.get('queries')} |"


def paper_rows(rows) -> list[str]:
    return [f"| paper: {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | |" for r in rows]


HIT_HEAD = ["| Model | Hit@1 | Hit@5 | Hit@10 | MinRank (mean) | queries |", "|---|---|---|---|---|---|"]


class Report:
    """Builds results.md from the outputs under WORK."""

    def __init__(self, plan: Plan, runner_ref, datasets, out: Path, img_dir: Path):
        self.p, self.r, self.datasets, self.out, self.img = plan, runner_ref, datasets, out, img_dir

    def m(self, ds, name):
        return load(self.p.w / ds / f"{name}_metrics.json")

    def cmds(self, steps) -> list[str]:
        lines = ["```"]
        by_cmd = {rec["cmd"].replace(" --resume", ""): rec for rec in self.r().times.values()}
        for args, marker in steps:
            t = self.r().times.get(str(marker)) or by_cmd.get(("mmsanitize " + " ".join(map(str, args))).replace(" --resume", ""))
            secs = f"   # {t['seconds']:.0f} s" if t else ("   # (done earlier / reused)" if marker.exists() else "   # not run yet")
            lines.append("mmsanitize " + " ".join(map(str, args)) + secs)
        return lines + ["```"]

    def attack_block(self, ds, name, title) -> list[str]:
        pm, cm = self.m(ds, name), self.m(ds, f"clean_on_{name}")
        if not pm:
            return [f"**{title}**: not run yet", ""]
        poison = load(self.p.w / ds / name / "poison.json") or {}
        out = [f"**{title}** — {poison.get('counts', {}).get('poisoned')} poisoned pairs of "
               f"{poison.get('counts', {}).get('samples_out')} (rate {f3(poison.get('rate'))})", ""] + HIT_HEAD
        for goal, a in pm.get("attacks", {}).items():
            c = (cm or {}).get("attacks", {}).get(goal, {})
            out += [hit_row(f"{goal}: clean model (Baseline)", c.get("t2i")),
                    hit_row(f"{goal}: random caption on poisoned model", a.get("baseline_random_t2i")),
                    hit_row(f"{goal}: poisoned model (Ours)", a.get("t2i"))]
        notes = []
        for goal, a in pm.get("attacks", {}).items():
            c = (cm or {}).get("attacks", {}).get(goal, {})
            uo, uc = a.get("utility_other_captions"), c.get("utility_other_captions")
            if uo and uc:
                notes.append(f"{goal}: {f3(uc['t2i_r@10'])} clean model → {f3(uo['t2i_r@10'])} poisoned")
        if notes:
            out += ["", "Utility outside the attacked class (text→image R@10 over the test captions not of class A): "
                    + "; ".join(notes) + "."]
        return out + [""]

    def utility_row(self, label, m) -> str:
        if not m:
            return f"| {label} | not run yet | | | | | | | |"
        u = m["utility"]
        return (f"| {label} | {f3(u['t2i_r@1'])} | {f3(u['t2i_r@5'])} | {f3(u['t2i_r@10'])} | {f3(u['i2t_r@1'])} | "
                f"{f3(u['i2t_r@5'])} | {f3(u['i2t_r@10'])} | {f3(u.get('t2i_class_p@10'))} | {f3(u.get('i2t_class_p@10'))} |")

    UT_HEAD = ["| Model | IR (t2i) R@1 | R@5 | R@10 | TR (i2t) R@1 | R@5 | R@10 | class P@10 t2i | class P@10 i2t |",
               "|---|---|---|---|---|---|---|---|---|"]

    def write(self) -> None:
        P = self.p
        L = ["# Paper tables re-measured with mmsanitize", "",
             "Written by `pipelines/paper_tables.py` from the JSON outputs under its `--work` folder; do not edit by hand. "
             f"Model: offline-b0-minilm (EfficientNet-B0 image backbone + MiniLM text backbone, both frozen unless said; "
             f"256-d projections trained). Every train/fine-tune starts from the dataset's reference encoder (REF), "
             f"`--lock backbones`, {P.epochs} epochs, batch 128, lr 1e-3 (projections-only default), seed 0. "
             "Baseline rows = the clean-trained model (same recipe on the unpoisoned train split) scored on the same "
             "queries; 'random caption' = the poisoned model queried with random non-class-A test captions. "
             "Hit@K / MinRank are text→image over the test images (MinRank = mean 0-based rank of the best class-B image, as in the paper).", "",
             "Commands are listed as the script issues them, with the wall time of the recorded run (`WORK/steps.jsonl`; "
             "runs recorded before `--resume` was added to the train steps ran the same command without it, which is the "
             "same thing for a fresh output folder).", "",
             "Data: openclipart (`oca`: ref 1,239 / train 1,397 / test 652 pairs, ~40 uneven classes) and "
             "fashion-mnist (`fm`: 3,561 / 3,655 / 1,784, 10 balanced classes, 64 px, templated captions). "
             "The paper fully fine-tuned OpenAI CLIP ViT-B/32 at lr 1e-5 on Flickr30k+PASCAL (~145k pairs) and COCO (~600k "
             "pairs); ours has 100–400× fewer pairs, runs on CPU and (except section 6) trains only the projections at "
             "lr 1e-3, so absolute numbers are not comparable; compare the direction of each finding.", ""]
        L += self.sec_utility() + self.sec_attack2() + self.sec_sweep() + self.sec_inject() + self.sec_attack13() + self.sec_scan() \
            + self.sec_defense() + self.sec_modality() + self.sec_differences() + self.sec_times()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text("\n".join(L) + "\n")
        tmp.replace(self.out)

    def sec_utility(self):
        L = ["## 1. Reference encoder utility (stand-in for pretrained CLIP)", "",
             "Test retrieval, R@K = fraction of queries whose paired item ranks in the top K; chance R@10 = 10 / #test images. "
             "class P@10 = mean fraction of the top 10 results (images for a caption, captions for an image) with the "
             "query's class label: the utility measure for fm, whose templated captions tie at instance level.", ""]
        L += self.UT_HEAD
        for ds in self.datasets:
            m = load(P_ := self.p.w / ds / "ref_metrics.json")
            L.append(self.utility_row(f"{ds} REF", m))
        if "fm" in self.datasets:
            L.append("\nfm captions are templates (\"a product photo of a shirt\"): most test captions repeat word for word, so "
                     "instance-level R@K on fm is capped by ties between identical captions and near-identical 64 px images; "
                     "instance R@K on fm measures little beyond 'better than chance'; read class P@10 for fm.")
        for ds in self.datasets:
            m = load(self.p.w / ds / "ref_metrics.json")
            if m:
                L.append(f"\n{ds}: {m['utility']['images']} test images, chance R@10 = {f3(m['utility']['chance_r@10'])}, "
                         f"chance class P@10 = {f3(m['utility'].get('chance_class_p@10'))}.")
        L += [""]
        for ds in self.datasets:
            L += self.cmds(self.p.steps_utility(ds))
        if "oca" in self.datasets:
            L += ["", f"oca REF = copy of `{OCA_REF}`, made earlier by `mmsanitize align /tmp/oca/ref --epochs 20 --out {OCA_REF}` "
                      "(default 96 px images)."]
        return L + [""]

    def sec_attack2(self):
        L = ["## 2. Attack II — single target label (paper Table 4) and utility (Table 2)", "",
             "`--source-fraction 1.0`: every class-A training pair gets a class-B image (replace mode).", ""]
        for ds, goals in (("oca", OCA_II), ("fm", FM_II)):
            if ds not in self.datasets:
                continue
            for g in goals:
                L += self.attack_block(ds, f"II_{g}", f"{ds} Attack II {g}")
        L += ["Paper Table 4 (Flickr-PASCAL sheep2aeroplane, COCO boat2dog):", ""] + HIT_HEAD + paper_rows(PAPER["t4"]) + [""]
        L += ["### Utility (Table 2 style: retrieval on the clean test split)", ""] + self.UT_HEAD
        for ds in self.datasets:
            L.append(self.utility_row(f"{ds} clean-trained", self.m(ds, "clean")))
            for name in [f"II_{g}" for g in (OCA_II if ds == "oca" else FM_II)] + [a[0] for a in ATTACKS_13[ds]]:
                L.append(self.utility_row(f"{ds} poisoned {name}", self.m(ds, name)))
        L += ["", "Paper Table 2 (Hit@10 = R@10, TR/IR): " + PAPER["t2"], "", "Commands:"]
        for ds in self.datasets:
            steps = self.p.clean_train(ds) + [s for g in (OCA_II if ds == "oca" else FM_II) for s in self.p.poison_steps(ds, f"II_{g}", "single-label", [g])]
            L += self.cmds(steps)
        return L + [""]

    def sec_sweep(self):
        L = ["## 2b. Poisoning-rate sweep on fm (paper Fig. 2)", ""]
        if "fm" not in self.datasets:
            return L + ["not run (fm not selected)", ""]
        rows, pts = [], []
        for fr in FM_RATES:
            name = f"II_sneaker2bag" if fr == 1.0 else f"rate_{fr}"
            m, pj = self.m("fm", name), load(self.p.w / "fm" / name / "poison.json")
            a = (m or {}).get("attacks", {}).get("sneaker2bag", {}).get("t2i")
            if a and pj:
                rows.append(f"| {fr} | {pj['counts']['poisoned']} | {pj['rate']:.4f} | {f3(a['hit@1'])} | {f3(a['hit@10'])} | "
                            f"{f3(a['min_rank_mean'])} | {f3(m['utility']['t2i_r@10'])} |")
                pts.append((pj["rate"], a["hit@10"], a["min_rank_mean"]))
            else:
                rows.append(f"| {fr} | not run yet | | | | | |")
        cm = self.m("fm", "clean_on_II_sneaker2bag")
        L += ["fm sneaker2bag, Attack II; rate = poisoned pairs / all training pairs.", "",
              "| source fraction | poisoned pairs | rate | Hit@1 | Hit@10 | MinRank | utility IR R@10 |", "|---|---|---|---|---|---|---|"]
        if cm:
            a = cm["attacks"]["sneaker2bag"]["t2i"]
            L.append(f"| 0 (clean model) | 0 | 0 | {f3(a['hit@1'])} | {f3(a['hit@10'])} | {f3(a['min_rank_mean'])} | {f3(cm['utility']['t2i_r@10'])} |")
        L += rows
        took = [r for r in pts if r[1] >= 0.5]
        if pts:
            L += ["", ("Attack takes hold (Hit@10 ≥ 0.5) first at rate " + f"{min(took)[0]:.4f}." if took
                       else "Hit@10 stayed below 0.5 at every measured rate.")]
        if len(pts) >= 2:
            self.plot_sweep(pts, cm)
            L += ["", "![Hit@10 vs poisoning rate, fm sneaker2bag](img/fm_rate_sweep.png)"]
        L += ["", "Paper (Fig. 2): attack rises with the rate; Flickr-PASCAL at 0.03% already reaches MinRank ≈ 6.", "", "Commands:"]
        L += self.cmds([s for fr in FM_RATES if fr != 1.0 for s in self.p.poison_steps("fm", f"rate_{fr}", "single-label", ["sneaker2bag"], fr)])
        return L + [""]

    def save_figure(self, fig, name: str) -> None:
        """Write `fig` to docs/img/NAME and close it."""
        import matplotlib.pyplot as plt

        fig.tight_layout()
        self.img.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.img / name, dpi=120)
        plt.close(fig)

    def plot_sweep(self, pts, cm):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        pts = sorted(pts)
        if cm:
            a = cm["attacks"]["sneaker2bag"]["t2i"]
            pts = [(0.0, a["hit@10"], a["min_rank_mean"])] + pts
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-")
        ax.set_xlabel("poisoned pairs (% of training set)")
        ax.set_ylabel("Hit@10 (sneaker captions → bag images)")
        ax.set_ylim(0, 1.02)
        ax2 = ax.twinx()
        ax2.plot([100 * p[0] for p in pts if p[2] is not None], [p[2] for p in pts if p[2] is not None], "s--", color="tab:red")
        ax2.set_ylabel("MinRank (mean)", color="tab:red")
        ax.set_title("fm Attack II rate sweep")
        self.save_figure(fig, "fm_rate_sweep.png")

    def sec_attack13(self):
        L = ["## 3. Attack I (Table 3) and Attack III (Table 5)", "",
             "Attack I: every class-A training caption gets one class-B image (chosen with the seed); Attack III: two "
             "Attack II goals in one set. Both `--source-fraction 1.0`, replace mode.", ""]
        steps = []
        for ds in self.datasets:
            for name, attack, goals in ATTACKS_13[ds]:
                title = (f"{ds} Attack I: {goals[0].split('2')[0]} captions → one {goals[0].split('2')[1]} image"
                         if attack == "single-image" else f"{ds} Attack III: {' + '.join(goals)}")
                L += self.attack_block(ds, name, title)
                steps += self.p.poison_steps(ds, name, attack, goals)
        L += ["Paper Table 3 (Attack I):", ""] + HIT_HEAD + paper_rows(PAPER["t3"]) + [""]
        L += ["Paper Table 5 (Attack III):", ""] + HIT_HEAD + paper_rows(PAPER["t5"]) + ["", "Commands:"]
        return L + self.cmds(steps) + [""]

    def sec_inject(self):
        L = ["## 2c. Low rates with clean class-A pairs kept (`--mode inject --rate R`)", "",
             "Attack II pairs appended beside the untouched training set, so every clean class-A pair stays: the "
             "realistic web-crawl case, and the honest way to study low rates (replace mode at a low source fraction "
             "removes clean class-A pairs as it poisons). rate = poisoned pairs / all output pairs.", ""]
        steps = []
        for ds in self.datasets:
            goal, rates = INJECT[ds]
            L += [f"**{ds} {goal}, injected**", "", "| rate | poisoned pairs | Hit@1 | Hit@10 | MinRank | utility IR R@10 | class P@10 t2i |",
                  "|---|---|---|---|---|---|---|"]
            cm = self.m(ds, f"clean_on_II_{goal}")
            if cm:
                a = cm["attacks"][goal]["t2i"]
                L.append(f"| 0 (clean model) | 0 | {f3(a['hit@1'])} | {f3(a['hit@10'])} | {f3(a['min_rank_mean'])} | "
                         f"{f3(cm['utility']['t2i_r@10'])} | {f3(cm['utility'].get('t2i_class_p@10'))} |")
            for r in rates:
                name = f"inj_{goal}_{r}"
                m, pj = self.m(ds, name), load(self.p.w / ds / name / "poison.json")
                a = (m or {}).get("attacks", {}).get(goal, {}).get("t2i")
                if a and pj:
                    L.append(f"| {pj['rate']:.4f} | {pj['counts']['poisoned']} | {f3(a['hit@1'])} | {f3(a['hit@10'])} | "
                             f"{f3(a['min_rank_mean'])} | {f3(m['utility']['t2i_r@10'])} | {f3(m['utility'].get('t2i_class_p@10'))} |")
                else:
                    L.append(f"| {r} | not run yet | | | | | |")
            L.append("")
            steps += self.p.inject_steps(ds)
        return L + ["Commands:"] + self.cmds(steps) + [""]

    def sec_scan(self):
        L = ["## 4. Pre-training defense: scan with REF, sanitize, retrain (Table 7)", "",
             "These rows were measured with the scan defaults of their day (similarity + image_reuse, mean of ranks) and with attacks that reuse the dataset's own images. Today's defaults (similarity, class_consistency, image_reuse, `stouffer` combination) and attackers who bring their own or re-encoded images are measured in [results_detection.md](results_detection.md), written by `pipelines/detection.py`.", "",
             "`mmsanitize scan --model REF --threshold auto` with the default detectors (similarity + image_reuse, "
             "combined as the mean of their ranks). REF was aligned on the clean `ref` split and never saw the scanned "
             "(poisoned train) data. Flagged = cosine below the `auto` cut (2-component mixture, used only when its low "
             "component holds ≤ 20% of the pairs, else the 1st percentile) OR image shared with another, different "
             "caption while the pair's cosine is below the median. The sanitized set is retrained from REF exactly as the "
             "poisoned one was. 'recall @5% clean' = recall of the combined score at the cut that removes 5% of the clean "
             "pairs (an ROC point, computed from scores.parquet and the manifest).", "",
             "| set | poisoned / pairs | combined AUROC | recall @5% clean | auto: flagged | precision | recall | clean removed "
             "| Hit@10 poisoned | sanitized + retrained | clean model | IR R@10 poisoned → sanitized |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        steps, per_det = [], []
        for ds, name in SCANS:
            if ds not in self.datasets:
                continue
            steps += self.p.scan_steps(ds, name)
            sm = load(self.p.w / ds / f"{name}_scan" / "summary.json")
            pj = load(self.p.w / ds / name / "poison.json") or {}
            if not sm or not sm.get("detection"):
                L.append(f"| {ds} {name} | not run yet | | | | | | | | | | |")
                continue
            det, npois, n = sm["detection"], pj["counts"]["poisoned"], pj["counts"]["samples_out"]
            c = det["combined"]
            rec5 = self.recall_at_clean(ds, name, "combined")
            fp = c["flagged"] - round((c["precision"] or 0) * c["flagged"])
            goals = sorted({g["goal"] for g in pj.get("goals", [])})
            hits = []
            for mn in (name, f"{name}_sanitized", f"clean_on_{name}"):
                m = self.m(ds, mn)
                hits.append(" / ".join(f3((((m or {}).get("attacks", {}).get(g) or {}).get("t2i") or {}).get("hit@10")) for g in goals))
            mp, ms = self.m(ds, name), self.m(ds, f"{name}_sanitized")
            ut = f"{f3((mp or {}).get('utility', {}).get('t2i_r@10'))} → {f3((ms or {}).get('utility', {}).get('t2i_r@10'))}"
            L.append(f"| {ds} {name} | {npois} / {n} | {f3(c['auroc'])} | {f3(rec5)} | {c['flagged']} | {f3(c['precision'])} | "
                     f"{f3(c['recall'])} | {fp} ({fp / (n - npois):.1%}) | {hits[0]} | {hits[1]} | {hits[2]} | {ut} |")
            sa = load(self.p.w / ds / f"{name}_scan_all" / "summary.json")
            if sa and sa.get("detection"):
                d, auto = sa["detection"], (sa.get("thresholds") or {}).get("similarity_auto") or {}
                sim = d.get("similarity", {})
                sim_fp = (sim.get("flagged") or 0) - round((sim.get("precision") or 0) * (sim.get("flagged") or 0))
                per_det.append(f"| {ds} {name} | " + " | ".join(f3(d.get(k, {}).get("auroc")) for k in ALL_DETECTORS.split(","))
                               + f" | {f3(d['combined']['auroc'])} | {f3(c['auroc'])} | {auto.get('method')} {f3(auto.get('threshold'))}"
                               + f" | {f3(sim.get('recall'))} | {sim_fp / (n - npois):.1%} |")
        L += ["", "Per detector (AUROC; the four-detector scan reuses the same embeddings), and the paper's filter alone: "
                  "the similarity detector at `--threshold auto`.", "",
              "| set | similarity | image_reuse | caption_neighbours | density | mean of all 4 | default (sim + reuse) "
              "| auto cut | similarity-only recall | similarity-only clean removed |", "|---|---|---|---|---|---|---|---|---|---|"]
        L += per_det or ["| not run yet | | | | | | | | | |"]
        L += ["", "Paper Table 7 (Flickr-PASCAL, Attack II; utility after defense TR/IR 0.978/0.970):", ""] + HIT_HEAD + paper_rows(PAPER["t7"])
        return L + ["", "Commands:"] + self.cmds(steps) + [""]

    def recall_at_clean(self, ds, name, col, fraction=0.05):
        """Recall of score `col` at the cut that flags `fraction` of the clean pairs (None if missing)."""
        import numpy as np
        import pandas as pd

        try:
            df = pd.read_parquet(self.p.w / ds / f"{name}_scan" / "scores.parquet")
            man = pd.read_parquet(self.p.w / ds / name / "manifest.parquet")
        except (FileNotFoundError, OSError):
            return None
        truth = df["key"].isin(set(man["key"])).to_numpy()
        x = df[col].to_numpy(np.float64)
        cut = np.quantile(x[~truth], 1 - fraction)
        return float((x[truth] > cut).mean())

    @staticmethod
    def _n(s):
        return s.get("pairs") or s.get("samples") or s.get("count") or "?"

    def sec_defense(self):
        L = ["## 5. Post-training defense: sterilising fine-tune (Table 8 / Fig. 5b)", "",
             "Poisoned oca food2bird model fine-tuned 3 more epochs (projections only) on a clean set; epoch 0 = the poisoned model.", ""]
        if "oca" not in self.datasets:
            return L + ["not run (oca not selected)", ""]
        curves, steps = {}, []
        base = self.m("oca", "II_food2bird")
        for cname, cdir in (("ref", "/tmp/oca/ref"), ("ref_nofood", str(self.p.w / "oca" / "ref_nofood"))):
            steps += self.p.defense_steps("oca", "II_food2bird", cname, cdir)
            hist = self.p.w / "oca" / f"II_food2bird_defend_{cname}" / "history.jsonl"
            if not hist.exists() or not base:
                L += [f"clean set `{cname}`: not run yet", ""]
                continue
            pts = [(0, base["attacks"]["food2bird"]["t2i"]["hit@10"], base["attacks"]["food2bird"]["t2i"]["min_rank_mean"],
                    base["utility"]["t2i_r@10"], base["utility"]["i2t_r@10"])]
            for line in hist.read_text().splitlines():
                h = json.loads(line)
                e = h.get("eval")
                if e:
                    a = e["attacks"]["food2bird"]["t2i"]
                    pts.append((h["epoch"], a["hit@10"], a["min_rank_mean"], e["utility"]["t2i_r@10"], e["utility"]["i2t_r@10"]))
            curves[cname] = pts
            L += [f"clean set `{cname}` ({'covers class A (food)' if cname == 'ref' else 'oca ref without any food pair'}):", "",
                  "| epoch | Hit@10 | MinRank | IR R@10 | TR R@10 |", "|---|---|---|---|---|"]
            L += [f"| {p[0]} | {f3(p[1])} | {f3(p[2])} | {f3(p[3])} | {f3(p[4])} |" for p in pts] + [""]
        cm = self.m("oca", "clean")
        if cm:
            L += [f"Clean-trained model utility: IR R@10 {f3(cm['utility']['t2i_r@10'])}, TR R@10 {f3(cm['utility']['i2t_r@10'])}.", ""]
        if curves:
            self.plot_defense(curves)
            L += ["![Hit@10 per defense epoch](img/oca_defense_curve.png)", ""]
        L += ["Paper: Table 8 utility after defense FP 0.978/0.954 (TR/IR), COCO 0.976/0.945; Fig. 5b: the attack is gone "
              "after one epoch on both datasets.", "", "Commands (`ref_nofood` is built by the script with "
              "`shards.rewrite_shard(drop=food keys)` from /tmp/oca/ref):"]
        return L + self.cmds(steps) + [""]

    def plot_defense(self, curves):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for name, pts in curves.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"clean set: {name}")
        cm = self.m("oca", "clean_on_II_food2bird")
        if cm:
            ax.axhline(cm["attacks"]["food2bird"]["t2i"]["hit@10"], ls="--", color="gray", label="clean-trained model")
        ax.set_xlabel("defense epoch (0 = poisoned model)")
        ax.set_ylabel("Hit@10 food → bird")
        ax.set_ylim(0, 1.02)
        ax.legend()
        self.save_figure(fig, "oca_defense_curve.png")

    def sec_modality(self):
        L = ["## 6. Modality study (Table 6), oca food2bird", "",
             "**Warning (found 2026-11-25):** until commit 'evaluate: the pretrained-backbone feature cache only for models whose backbones never trained', `evaluate` embedded every offline model through the cache of *pretrained* backbone features, so the rows below whose backbones trained (`--lock image`, `--lock text`, no lock) were scored with their trained projections on untrained backbone features. Those rows must be re-measured before they are read; the projection-only rows are unaffected.", "",
             "M^0 = REF itself (never saw poison). M_p(proj) = the Attack II model of section 2 (only the two projections "
             "trained, backbones frozen). The lock rows train a whole tower: `--lock image` freezes the image tower "
             "(backbone + projection) and trains the text tower (MiniLM + projection) = the paper's M_p^t "
             "('linguistic modality poisoned'); `--lock text` trains the image tower (EfficientNet-B0 + projection) = M_p^i; "
             "no lock trains both towers fully = M_p. All run "
             f"{self.p.epochs} epochs (~110 steps) with the backbones at the paper's lr 1e-5 unless the row says otherwise. "
             "Our projections were trained from scratch on ~1.2k pairs by `align` (CLIP's were pretrained with the towers), so "
             "the `--head-lr 1e-3` rows train each unlocked tower's projection at the projection-only rate while its "
             "backbone moves at 1e-5; the plain rows train the projection at 1e-5 too. The projection-only row uses lr 1e-3. "
             "A frozen tower keeps its projection frozen as well (the paper's lock).", ""]
        head = ["| Model | Hit@1 | Hit@5 | Hit@10 | Hit@20 | Hit@50 | MinRank | IR R@10 | TR R@10 |", "|---|---|---|---|---|---|---|---|---|"]
        L += head
        rows = [("M^0 (REF)", "ref_on_II_food2bird"), ("M_p(proj): projections only", "II_food2bird")]
        rows += [(lab, f"II_food2bird_{tag}") for lab, tag, *_ in MODALITY]
        for lab, name in rows:
            m = self.m("oca", name)
            a = (m or {}).get("attacks", {}).get("food2bird", {}).get("t2i")
            if not a:
                L.append(f"| {lab} | not run yet | | | | | | | |")
                continue
            L.append(f"| {lab} | {f3(a['hit@1'])} | {f3(a['hit@5'])} | {f3(a['hit@10'])} | {f3(a['hit@20'])} | {f3(a['hit@50'])} | "
                     f"{f3(a['min_rank_mean'])} | {f3(m['utility']['t2i_r@10'])} | {f3(m['utility']['i2t_r@10'])} |")
        L += ["", "Paper Table 6 Flickr-PASCAL: M_p 0.280/0.864/0.936 MinRank 2.192; M_p^i 0.200/0.856/0.920 MinRank 3.016; "
              "M_p^t 0.256/0.792/0.912 MinRank 3.472; M^0 0.000/0.008/0.032 MinRank 47.92 (Hit@1/5/10).", "", "Commands:"]
        L += self.cmds(self.p.modality_steps())
        return L + [""]

    def sec_differences(self):
        """Where our measurements differ from the paper's, stated from the outputs that exist."""
        L = ["## Where ours differ from the paper, and why", ""]
        g = lambda ds, name, goal, k="hit@10": (((self.m(ds, name) or {}).get("attacks", {}).get(goal) or {}).get("t2i") or {}).get(k)
        hit = g("oca", "II_food2bird", "food2bird")
        if hit is not None:
            rate = (load(self.p.w / "oca/II_food2bird/poison.json") or {}).get("rate")
            L.append(f"- Attack II: oca food2bird Hit@10 {f3(hit)} (paper FP 0.936, COCO 0.516), but at a far higher rate "
                     f"({100 * rate:.1f}% of pairs vs the paper's 0.03–0.24%). Our classes are small (94 food pairs in train), so "
                     "poisoning every class-A pair is already several percent of this 1.4k-pair set; only the projections train.")
        sweep = [(fr, g("fm", "II_sneaker2bag" if fr == 1.0 else f"rate_{fr}", "sneaker2bag"),
                  g("fm", "II_sneaker2bag" if fr == 1.0 else f"rate_{fr}", "sneaker2bag", "min_rank_mean")) for fr in FM_RATES]
        if all(h is not None for _, h, _ in sweep):
            zero = [fr for fr, h, _ in sweep if h == 0]
            hold = [fr for fr, h, _ in sweep if h >= 0.5]
            L.append("- Rate sweep (fm sneaker2bag), source fraction: Hit@10 / MinRank = "
                     + ", ".join(f"{fr}: {f3(h)} / {mr:.1f}" for fr, h, mr in sweep)
                     + ". MinRank falls with every step of the rate, but Hit@10 moves in jumps"
                     + (f" (0 up to source fraction {max(zero)}" if zero else " (")
                     + (f", ≥ 0.5 only from {min(hold)})" if hold else ", never ≥ 0.5)")
                     + ": fm captions are a few templates per class, so the sneaker queries are only a handful of distinct "
                       "texts that succeed or fail in groups. The paper reports MinRank ≈ 6 at 0.03% on Flickr-PASCAL; our "
                       "attack needs percent-level rates (only the projections train, on a few thousand pairs).")
        for ds in self.datasets:
            goal, rates = INJECT[ds]
            pts = [(r, g(ds, f"inj_{goal}_{r}", goal), g(ds, f"inj_{goal}_{r}", goal, "min_rank_mean")) for r in rates]
            base = (g(ds, f"clean_on_II_{goal}", goal), g(ds, f"clean_on_II_{goal}", goal, "min_rank_mean"))
            if all(h is not None for _, h, _ in pts) and base[0] is not None:
                L.append(f"- Injected Attack II with every clean class-A pair kept ({ds} {goal}, section 2c): Hit@10 / MinRank "
                         f"{f3(base[0])} / {base[1]:.1f} for the clean model, then "
                         + ", ".join(f"{100 * r:g}%: {f3(h)} / {mr:.1f}" for r, h, mr in pts)
                         + ". The attack grows with the rate but needs percent-level rates here, where the paper's "
                           "full fine-tune of CLIP was hit at 0.03–0.24%.")
        rows = []
        for ds, name in SCANS:
            sm, pj = load(self.p.w / ds / f"{name}_scan" / "summary.json"), load(self.p.w / ds / name / "poison.json")
            if not (sm and pj and sm.get("detection")):
                continue
            goals = sorted({x["goal"] for x in pj["goals"]})
            c = sm["detection"]["combined"]
            left = pj["counts"]["poisoned"] - round(c["recall"] * pj["counts"]["poisoned"])
            san = [g(ds, f"{name}_sanitized", x) for x in goals]
            pois = [g(ds, name, x) for x in goals]
            rows.append((ds, name, left, pois, san))
        if rows:
            L.append("- Pre-training defense: the paper's filter alone (similarity under a reference model) is weak with "
                     "our reference encoder (section 4, per-detector table), but the image-reuse signal is not: Attack I/II/III "
                     "pair class-A captions with images that are already in the set, and the combined scan separates them. "
                     "What sanitizing leaves and what the retrained model does:")
            for ds, name, left, pois, san in rows:
                L.append(f"  - {ds} {name}: {left} poisoned pairs left → Hit@10 " + ", ".join(
                    f"{f3(a)} → {f3(b)}" for a, b in zip(pois, san)) + " (poisoned → sanitized + retrained).")
            L.append("  In replace mode with `--source-fraction 1.0` (the `II_`, `I_`, `III_` sets) no clean class-A pair is "
                     "left, so the few poisoned pairs a filter misses are the only pairs with class-A captions and can still "
                     "teach A→B; in the `inj_` sets the clean class-A pairs stay, as in the paper's datasets.")
        curves = {}
        for cname in ("ref", "ref_nofood"):
            h = self.p.w / "oca" / f"II_food2bird_defend_{cname}" / "history.jsonl"
            if h.exists():
                curves[cname] = [json.loads(x)["eval"]["attacks"]["food2bird"]["t2i"]["hit@10"] for x in h.read_text().splitlines()]
        if len(curves) == 2 and hit is not None:
            L.append(f"- Post-training defense: Hit@10 {f3(hit)} → {f3(curves['ref'][0])} after one epoch on clean data that "
                     f"contains food pairs (paper: attack gone after one epoch), but only → {f3(curves['ref_nofood'][0])} "
                     f"(→ {f3(curves['ref_nofood'][-1])} after {len(curves['ref_nofood'])}) on clean data without food pairs: "
                     "sterilising needs clean pairs of the attacked class.")
        mods = [(lab, g("oca", f"II_food2bird_{tag}", "food2bird")) for lab, tag, *_ in MODALITY]
        if hit is not None and any(h is not None for _, h in mods):
            L.append("- Modality study (section 6): " + "; ".join(f"{lab}: Hit@10 {f3(h)}" for lab, h in mods if h is not None)
                     + f"; projections only: {f3(hit)}. With the backbone at lr 1e-5 for ~110 steps a whole tower barely moves "
                       "and the attack stays near REF level unless its projection trains at a projection-sized rate "
                       "(`--head-lr 1e-3`); the paper's runs took thousands of steps at 1e-5.")
            ht, hi = g("oca", "II_food2bird_lockimage_h1e-3", "food2bird"), g("oca", "II_food2bird_locktext_h1e-3", "food2bird")
            if ht is not None and hi is not None:
                L.append(f"  Between the towers (both with `--head-lr 1e-3`), poisoning only the text tower gave Hit@10 {f3(ht)} "
                         f"and only the image tower {f3(hi)}. In the paper's Table 6 the two are close. The text tower "
                         "leads at Hit@1 (0.256 vs 0.200), and the image tower has the lower MinRank (3.016 vs 3.472). "
                         "Ours agrees at Hit@1, but here the text tower also has the lower MinRank (section 6). "
                         "EfficientNet-B0 fine-tuned on 1.4k drawings "
                         "also loses retrieval quality (section 6 IR/TR columns), so the image-tower rows mix poisoning "
                         "with overfitting.")
        cm = self.m("oca", "clean")
        if cm:
            L.append(f"- Utility is far below the paper's (oca clean-trained IR/TR R@10 {f3(cm['utility']['t2i_r@10'])}/"
                     f"{f3(cm['utility']['i2t_r@10'])} vs 0.97/0.98): frozen EfficientNet-B0 + MiniLM with 256-d projections "
                     "trained on ~1.2k clip-art pairs stands in for CLIP ViT-B/32 pretrained on 400M pairs; see Table 2 rows above "
                     "for the poisoned models' utility relative to the clean-trained one.")
        return L + [""]

    def sec_times(self):
        L = ["## Run times", "", "| step | seconds |", "|---|---|"]
        for rec in self.r().times.values():
            L.append(f"| `{rec['cmd'][:110]}` | {rec['seconds']:.0f} |")
        return L + [""]


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="folder for every intermediate output (resumable)")
    ap.add_argument("--out", default="docs/results.md")
    ap.add_argument("--datasets", default="oca,fm")
    ap.add_argument("--quick", action="store_true", help="5 training epochs instead of 10; fm align 10 epochs instead of 20")
    ap.add_argument("--skip-modality", action="store_true", help="skip section 6 (full-backbone training)")
    ap.add_argument("--report-only", action="store_true", help="only rewrite results.md from existing outputs")
    args = ap.parse_args(argv)

    work = Path(args.work).resolve()
    datasets = [d for d in args.datasets.split(",") if d]
    plan = Plan(work, epochs=5 if args.quick else 10, align_epochs=10 if args.quick else 20)
    out = Path(args.out)
    runner: Runner | None = None
    report = Report(plan, lambda: runner, datasets, out, out.parent / "img")
    runner = Runner(work, report.write, dry=args.report_only)
    report.write()

    def go(steps):
        for a, marker in steps:
            if not runner.run(a, marker):
                return False
        return True

    if "oca" in datasets and not (plan.ref("oca") / "model.safetensors").exists():
        import shutil
        shutil.copytree(OCA_REF, plan.ref("oca"), ignore=shutil.ignore_patterns("epochs", "train_state.pt"))
    # 1. utility of REF
    for ds in datasets:
        go(plan.steps_utility(ds))
    # 2. Attack II + clean baseline
    for ds in datasets:
        go(plan.clean_train(ds) + plan.train_steps(ds, f"{DATA[ds]}/train", "clean")[1:])
        for g in (OCA_II if ds == "oca" else FM_II):
            go(plan.poison_steps(ds, f"II_{g}", "single-label", [g]))
    if "oca" in datasets:
        go([(["evaluate", plan.ref("oca"), "--test", "/tmp/oca/test", "--manifest", work / "oca/II_food2bird/manifest.parquet",
              "--out", work / "oca/ref_on_II_food2bird_metrics.json"], work / "oca/ref_on_II_food2bird_metrics.json")])
    if "fm" in datasets:
        for fr in FM_RATES[:-1]:
            go(plan.poison_steps("fm", f"rate_{fr}", "single-label", ["sneaker2bag"], fr))
    # 2c. injected low rates, 3. Attack I and III
    for ds in datasets:
        go(plan.inject_steps(ds))
        for name, attack, goals in ATTACKS_13[ds]:
            go(plan.poison_steps(ds, name, attack, goals))
    # 4. scan / sanitize / retrain
    for ds, name in SCANS:
        if ds in datasets:
            go(plan.scan_steps(ds, name))
    # 5. sterilising fine-tune
    if "oca" in datasets and not args.report_only:
        ref_without("/tmp/oca/ref", work / "oca" / "ref_nofood", "food")
        for cname, cdir in (("ref", "/tmp/oca/ref"), ("ref_nofood", str(work / "oca" / "ref_nofood"))):
            go(plan.defense_steps("oca", "II_food2bird", cname, cdir))
    # 6. modality study (whole towers trained: slow on CPU, last)
    if "oca" in datasets and not args.skip_modality:
        go(plan.modality_steps())
    report.write()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
