"""Read and check a pipeline configuration (YAML)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ATTACKS = {"I": "single-image", "II": "single-label", "III": "multi-label"}
BUILDERS = {"openclipart", "fashion-mnist"}


@dataclass
class Experiment:
    """One poisoned training set: attack family, goals, and one point of its rate axis."""

    dataset: str
    attack: str  # I / II / III
    goals: list[str]
    mode: str  # replace (--source-fraction) | inject (--rate)
    amount: float  # the source fraction or the injected rate
    scan: bool = False

    @property
    def name(self) -> str:
        base = f"{self.attack}_{'+'.join(self.goals)}"
        if self.mode == "inject":
            return f"{base}_inject{self.amount:g}"
        return base if self.amount == 1.0 else f"{base}_frac{self.amount:g}"

    @property
    def series(self) -> str:
        """Experiments of one series differ only in their rate (the rate-sweep plots)."""
        return f"{self.dataset} {self.attack} {'+'.join(self.goals)} ({self.mode})"

    def poison_args(self) -> list:
        args = ["--attack", ATTACKS[self.attack]]
        for g in self.goals:
            args += ["--goal", g]
        if self.mode == "inject":
            return args + ["--mode", "inject", "--rate", self.amount]
        return args + ["--source-fraction", self.amount]


@dataclass
class Defense:
    """A sterilising fine-tune of a poisoned model on a clean split (minus the pairs labelled
    `drop_label`, when given), evaluated every epoch."""

    dataset: str
    experiment: str
    clean_split: str
    epochs: int
    drop_label: str | None = None

    @property
    def clean_name(self) -> str:
        """The clean set's name: the split, or SPLIT_noLABEL for the copy without a class."""
        return self.clean_split if not self.drop_label else f"{self.clean_split}_no{self.drop_label}"


@dataclass
class ModalityRun:
    """One training of a poisoned set with other towers/learning rates unfrozen (the paper's Table 6)."""

    name: str
    label: str
    args: list
    paper: str | None = None  # the paper's row this one stands for (M_p, M_p^i, M_p^t)


@dataclass
class Modality:
    """The modality study: one experiment's poisoned set trained by each of `runs`."""

    dataset: str
    experiment: str
    runs: list[ModalityRun]
    goal: str  # the attack goal the table reports (the experiment's first)
    notes: str = ""


@dataclass
class Config:
    name: str
    title: str
    seed: int
    epochs: int
    train_args: list
    datasets: dict[str, dict]
    experiments: list[Experiment]
    defenses: list[Defense] = field(default_factory=list)
    modality: Modality | None = None
    paper: dict = field(default_factory=dict)  # section -> {source, rows, notes}: the paper's numbers
    notes: str = ""


class ConfigError(ValueError):
    """A configuration that cannot be run (the message names the field)."""


def load_config(path: str | Path) -> Config:
    """Parse a YAML config; raises ConfigError naming the bad field."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping")
    datasets = raw.get("datasets") or {}
    for ds, d in datasets.items():
        if d.get("build", {}).get("name") not in BUILDERS:
            raise ConfigError(f"{path}: datasets.{ds}.build.name must be one of {sorted(BUILDERS)}")
    exps = []
    for i, e in enumerate(raw.get("experiments") or []):
        where = f"{path}: experiments[{i}]"
        if e.get("dataset") not in datasets:
            raise ConfigError(f"{where}.dataset must be one of {sorted(datasets)}")
        if e.get("attack") not in ATTACKS:
            raise ConfigError(f"{where}.attack must be one of {sorted(ATTACKS)}")
        mode = e.get("mode", "replace")
        if mode not in ("replace", "inject"):
            raise ConfigError(f"{where}.mode must be replace or inject")
        amounts = e.get("rates") if mode == "inject" else e.get("fractions", [1.0])
        if not amounts:
            raise ConfigError(f"{where}: inject needs rates")
        scan_at = e.get("scan", [])
        scan_at = amounts if scan_at is True else ([] if scan_at is False else list(scan_at))
        for a in amounts:
            exps.append(Experiment(e["dataset"], e["attack"], list(e["goals"]), mode, float(a), float(a) in map(float, scan_at)))
    names = [(x.dataset, x.name) for x in exps]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: two experiments share a name")
    defenses = []
    for i, d in enumerate(raw.get("defenses") or []):
        if (d.get("dataset"), d.get("experiment")) not in names:
            raise ConfigError(f"{path}: defenses[{i}] names no experiment ({d.get('dataset')}, {d.get('experiment')})")
        defenses.append(Defense(d["dataset"], d["experiment"], d.get("clean", "ref"), int(d.get("epochs", 3)),
                                d.get("drop_label")))
    if len({(d.dataset, d.experiment, d.clean_name) for d in defenses}) != len(defenses):
        raise ConfigError(f"{path}: two defenses share an experiment and clean set")
    train = raw.get("train") or {}
    return Config(name=raw.get("name", path.stem), title=raw.get("title", path.stem), seed=int(raw.get("seed", 0)),
                  epochs=int(train.get("epochs", 10)), train_args=list(train.get("args", ["--lock", "backbones"])),
                  datasets=datasets, experiments=exps, defenses=defenses,
                  modality=_modality(raw.get("modality"), exps, path), paper=_paper(raw.get("paper"), path),
                  notes=raw.get("notes", ""))


def _modality(raw, exps: list[Experiment], path: Path) -> Modality | None:
    if not raw:
        return None
    if (raw.get("dataset"), raw.get("experiment")) not in [(e.dataset, e.name) for e in exps]:
        raise ConfigError(f"{path}: modality names no experiment ({raw.get('dataset')}, {raw.get('experiment')})")
    runs = []
    for i, r in enumerate(raw.get("runs") or []):
        if not r.get("name") or not r.get("label"):
            raise ConfigError(f"{path}: modality.runs[{i}] needs a name and a label")
        runs.append(ModalityRun(str(r["name"]), str(r["label"]), [str(a) for a in r.get("args", [])], r.get("paper")))
    if len({r.name for r in runs}) != len(runs):
        raise ConfigError(f"{path}: two modality runs share a name")
    goal = raw.get("goal") or next(e.goals[0] for e in exps if (e.dataset, e.name) == (raw["dataset"], raw["experiment"]))
    return Modality(raw["dataset"], raw["experiment"], runs, goal, raw.get("notes", ""))


PAPER_SECTIONS = {"utility", "I", "II", "III", "rate", "scan", "defense", "modality"}


def _paper(raw, path: Path) -> dict:
    raw = raw or {}
    for sec, v in raw.items():
        if sec not in PAPER_SECTIONS:
            raise ConfigError(f"{path}: paper.{sec} is not one of {sorted(PAPER_SECTIONS)}")
        if not isinstance(v, dict) or not all(isinstance(r, dict) and "model" in r for r in v.get("rows", [])):
            raise ConfigError(f"{path}: paper.{sec} needs a mapping with rows of {{model: ..., METRIC: value}}")
    return raw
