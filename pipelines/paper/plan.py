"""Turn a Config into `mmsanitize` CLI steps: arguments, the output that marks a step done, and
the steps it needs. Every path is under WORK:

    WORK/data/DS/{ref,train,test}        datasets build
    WORK/data/DS/SPLIT_noLABEL           sanitize --drop-label (a clean split without a class)
    WORK/ref/DS                          align (the reference encoder, REF) + metrics.json
    WORK/runs/DS/clean/                  model/ + metrics.json (clean-trained baseline)
    WORK/runs/DS/NAME/                   poison/ model/ metrics.json clean_metrics.json
                                         [scan/ report.html sanitized/ sanitized_model/ sanitized_metrics.json]
                                         [defend_CLEAN/ (history.jsonl: one evaluation per epoch)]
                                         [ref_metrics.json (REF on this manifest) modality/RUN/{model/,metrics.json}]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmsanitize.catalog import catalog_dir

from .config import Config, Defense, Experiment, Modality

DASK = ["--workers", 1]  # each step's own Dask cluster: steps run side by side on the pipeline's cluster


@dataclass
class Step:
    id: str
    args: list  # arguments of `mmsanitize`
    marker: Path  # exists only when the step finished
    deps: list[str]
    kind: str


def done_epoch(out: Path, epochs: int) -> Path:
    """A finished train/align/defend: the checkpoint folder of its last epoch."""
    return Path(out) / "epochs" / f"{epochs:03d}"


def _epochs_in(args: list, default: int) -> int:
    return int(args[args.index("--epochs") + 1]) if "--epochs" in args else default


class Plan:
    """Every step of a Config, in an order that respects dependencies."""

    def __init__(self, cfg: Config, work: Path):
        self.cfg, self.w = cfg, Path(work)
        self.steps: dict[str, Step] = {}
        for ds in cfg.datasets:
            self._dataset(ds)
        for e in cfg.experiments:
            self._experiment(e)
        for d in cfg.defenses:
            self._defense(d)
        if cfg.modality:
            self._modality(cfg.modality)

    # paths
    def data(self, ds: str, split: str = "") -> Path:
        return self.w / "data" / ds / split

    def ref(self, ds: str) -> Path:
        return self.w / "ref" / ds

    def run_dir(self, ds: str, name: str) -> Path:
        return self.w / "runs" / ds / name

    def _add(self, id: str, args: list, marker: Path, deps: list[str], kind: str) -> str:
        self.steps[id] = Step(id, [str(a) for a in args], Path(marker), deps, kind)
        return id

    def _train(self, id: str, ds: str, shards: Path, out: Path, deps: list[str], args: list | None = None) -> str:
        c = self.cfg
        args = c.train_args if args is None else args
        return self._add(id, ["train", shards, "--init", self.ref(ds), *args, "--epochs", c.epochs,
                              "--seed", c.seed, "--resume", "--out", out], done_epoch(out, c.epochs), deps, "train")

    def _evaluate(self, id: str, ds: str, model: Path, out: Path, deps: list[str], manifest: Path | None = None) -> str:
        args = ["evaluate", model, "--test", self.data(ds, "test"), "--seed", self.cfg.seed, "--out", out]
        if manifest:
            args += ["--manifest", manifest]
        return self._add(id, args, out, deps, "evaluate")

    def _dataset(self, ds: str) -> None:
        d, c = self.cfg.datasets[ds], self.cfg
        build = self._add(f"{ds}/build", ["datasets", "build", d["build"]["name"], "--out", self.data(ds), *d["build"].get("args", []),
                                          "--seed", c.seed, *DASK], self.data(ds) / "build_report.json", [], "build")
        cat = self._add(f"{ds}/catalog", ["catalog", self.data(ds, "train"), *DASK],
                        catalog_dir([self.data(ds, "train") / "00000.tar"], self.w / "cache") / "catalog.parquet",
                        [build], "catalog")
        align = d.get("align", [])
        a = self._add(f"{ds}/align", ["align", self.data(ds, "ref"), *align, "--seed", c.seed, "--resume", "--out", self.ref(ds)],
                      done_epoch(self.ref(ds), _epochs_in(align, 10)), [build], "align")
        self._evaluate(f"{ds}/ref_eval", ds, self.ref(ds), self.ref(ds) / "metrics.json", [a])  # evaluate makes no folders
        clean = self.run_dir(ds, "clean")
        t = self._train(f"{ds}/clean/train", ds, self.data(ds, "train"), clean / "model", [a, cat])
        self._evaluate(f"{ds}/clean/eval", ds, clean / "model", clean / "metrics.json", [t])

    def _experiment(self, e: Experiment) -> None:
        ds, r = e.dataset, self.run_dir(e.dataset, e.name)
        c = self.cfg
        man = r / "poison" / "manifest.parquet"
        p = self._add(f"{ds}/{e.name}/poison", ["poison", self.data(ds, "train"), *e.poison_args(), "--seed", c.seed,
                                                *DASK, "--out", r / "poison"], r / "poison" / "poison.json",
                      [f"{ds}/catalog"], "poison")
        t = self._train(f"{ds}/{e.name}/train", ds, r / "poison", r / "model", [p, f"{ds}/align"])
        self._evaluate(f"{ds}/{e.name}/eval", ds, r / "model", r / "metrics.json", [t], man)
        self._evaluate(f"{ds}/{e.name}/clean_eval", ds, self.run_dir(ds, "clean") / "model", r / "clean_metrics.json",
                       [p, f"{ds}/clean/train"], man)
        if not e.scan:
            return
        classes = self.cfg.datasets[ds].get("classes", [])
        sc = self._add(f"{ds}/{e.name}/scan", ["scan", r / "poison", "--model", self.ref(ds), "--threshold", "auto",
                                               *classes, "--manifest", man, "--seed", c.seed, *DASK, "--out", r / "scan"],
                       r / "scan" / "summary.json", [p, f"{ds}/align"], "scan")
        z = self._add(f"{ds}/{e.name}/sanitize", ["sanitize", r / "poison", "--scan", r / "scan", *DASK,
                                                  "--out", r / "sanitized"], r / "sanitized" / "removed.parquet", [sc],
                      "sanitize")
        t2 = self._train(f"{ds}/{e.name}/sanitized_train", ds, r / "sanitized", r / "sanitized_model", [z, f"{ds}/align"])
        ev = self._evaluate(f"{ds}/{e.name}/sanitized_eval", ds, r / "sanitized_model", r / "sanitized_metrics.json",
                            [t2], man)
        runs = [r / "clean_metrics.json", r / "metrics.json", r / "sanitized_metrics.json"]
        self._add(f"{ds}/{e.name}/report", ["report", r / "scan", *runs, "--shards", r / "poison", "--manifest", man,
                                            "--out", r / "report.html"], r / "report.html",
                  [ev, f"{ds}/{e.name}/eval", f"{ds}/{e.name}/clean_eval"], "report")

    def defense_dir(self, d: Defense) -> Path:
        """The output folder of a sterilising fine-tune."""
        return self.run_dir(d.dataset, d.experiment) / f"defend_{d.clean_name}"

    def _clean_set(self, d: Defense) -> tuple[Path, list[str]]:
        """The clean shards of a defense and the steps that make them (a label-dropped copy of the split)."""
        split = self.data(d.dataset, d.clean_split)
        if not d.drop_label:
            return split, [f"{d.dataset}/build"]
        out = self.data(d.dataset, d.clean_name)
        id = f"{d.dataset}/{d.clean_name}"
        if id not in self.steps:
            self._add(id, ["sanitize", split, "--drop-label", d.drop_label, *DASK, "--out", out], out / "removed.parquet",
                      [f"{d.dataset}/build"], "sanitize")
        return out, [id]

    def _defense(self, d: Defense) -> None:
        r = self.run_dir(d.dataset, d.experiment)
        out = self.defense_dir(d)
        clean, deps = self._clean_set(d)
        c = self.cfg
        self._add(f"{d.dataset}/{d.experiment}/defend_{d.clean_name}",
                  ["defend", "finetune", r / "model", "--clean", clean, *c.train_args,
                   "--epochs", d.epochs, "--seed", c.seed, "--eval", self.data(d.dataset, "test"),
                   "--manifest", r / "poison" / "manifest.parquet", "--resume", "--out", out],
                  done_epoch(out, d.epochs), [f"{d.dataset}/{d.experiment}/train", *deps], "defend")

    def modality_dir(self, m: Modality, name: str) -> Path:
        """The folder of one modality run (model/ and metrics.json)."""
        return self.run_dir(m.dataset, m.experiment) / "modality" / name

    def _modality(self, m: Modality) -> None:
        ds, r = m.dataset, self.run_dir(m.dataset, m.experiment)
        man, poison = r / "poison" / "manifest.parquet", f"{ds}/{m.experiment}/poison"
        self._evaluate(f"{ds}/{m.experiment}/ref_eval", ds, self.ref(ds), r / "ref_metrics.json",
                       [poison, f"{ds}/align"], man)
        for run in m.runs:
            d = self.modality_dir(m, run.name)
            t = self._train(f"{ds}/{m.experiment}/modality/{run.name}/train", ds, r / "poison", d / "model",
                            [poison, f"{ds}/align"], run.args)
            self._evaluate(f"{ds}/{m.experiment}/modality/{run.name}/eval", ds, d / "model", d / "metrics.json", [t], man)
