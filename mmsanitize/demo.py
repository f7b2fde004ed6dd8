"""`mmsanitize demo`: the whole loop on the embedded default data, composed from the library verbs.

build -> align (reference encoder on `ref`) -> poison `train` (Attack II) -> fine-tune on clean
and poisoned `train` -> scan the poisoned set with the reference -> sanitize -> fine-tune on the
sanitized set -> evaluate every model on `test` -> `OUT/report.html` (the scan's gallery and every
model's tables, `mmsanitize report`). Every step resumes from its outputs in OUT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def run_demo(
    *,
    out: str | os.PathLike,
    dataset: str = "openclipart",
    goal: str = "food2bird",
    epochs: int = 5,
    align_epochs: int = 20,
    seed: int = 0,
    limit: int | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
) -> dict:
    """Run the loop into `out` and return a summary dict (also written to `out/summary.json`):
    per model (reference, clean, poisoned, sanitized) the utility and attack metrics, and the
    scan's detection quality against the poison manifest, and `report`: the path of
    `out/report.html`."""
    from .datasets import build_dataset
    from .evaluate import evaluate
    from .poison import poison_dataset
    from .report import build_report
    from .sanitize import sanitize
    from .scan import scan
    from .train import align, train

    out = Path(out)
    data = out / "data"
    dask = {"scheduler": scheduler, "workers": workers}
    build = build_dataset(dataset, str(data), limit=limit, seed=seed, **dask)
    ref = out / "ref"
    if not (ref / "model.json").exists():
        align(str(data / "ref"), out=str(ref), epochs=align_epochs, seed=seed)
    poisoned = out / "poisoned"
    poison = poison_dataset(str(data / "train"), out=str(poisoned), attack="single-label", goals=[goal],
                            seed=seed, **dask)
    manifest = str(poisoned / "manifest.parquet")
    scan_dir = out / "scan"
    classes = "openclipart" if dataset == "openclipart" else "auto"  # the packaged vocabulary with synonyms
    scanned = scan(str(poisoned), out=str(scan_dir), model=str(ref), threshold="auto", manifest=manifest,
                   classes=classes, **dask)
    clean_dir = out / "sanitized"
    sanitized = sanitize(str(poisoned), scan=str(scan_dir), out=str(clean_dir), **dask)
    models = {"reference": ref}
    for name, shards in (("clean", data / "train"), ("poisoned", poisoned), ("sanitized", clean_dir)):
        model_dir = out / f"model-{name}"
        if not (model_dir / "model.json").exists():
            train(str(shards), out=str(model_dir), init=str(ref), lock="backbones", epochs=epochs, seed=seed)
        models[name] = model_dir
    metrics = {name: evaluate(str(path), test=str(data / "test"), manifest=manifest, seed=seed)
               for name, path in models.items()}
    summary = {"dataset": dataset, "goal": goal, "build": build, "poison": poison,
               "scan": scanned, "sanitize": sanitized, "metrics": metrics}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    report = build_report(scan_dir, [out], out=out / "report.html", shards=str(poisoned), manifest=manifest,
                          title=f"mmsanitize demo: {dataset} Attack II {goal}")
    summary["report"] = report["html"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
