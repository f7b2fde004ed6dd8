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
    """A sterilising fine-tune of a poisoned model on a clean split, evaluated every epoch."""

    dataset: str
    experiment: str
    clean_split: str
    epochs: int


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
        defenses.append(Defense(d["dataset"], d["experiment"], d.get("clean", "ref"), int(d.get("epochs", 3))))
    train = raw.get("train") or {}
    return Config(name=raw.get("name", path.stem), title=raw.get("title", path.stem), seed=int(raw.get("seed", 0)),
                  epochs=int(train.get("epochs", 10)), train_args=list(train.get("args", ["--lock", "backbones"])),
                  datasets=datasets, experiments=exps, defenses=defenses, notes=raw.get("notes", ""))
