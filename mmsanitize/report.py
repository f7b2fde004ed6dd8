"""`mmsanitize report`: one static, self-contained HTML page of a scan and of evaluate runs.

reader (scan folder, catalog, shards, run folders) -> figures and rows (matplotlib, pandas) ->
writer (the jinja2 template `templates/report.html.j2`). Thumbnails and plots are inlined as data
URIs, so the page opens from disk with no network. Only the top `top` flagged pairs are on the
page; every flagged pair is in `<name>_flagged.csv` beside it, so the page stays readable at
100k+ flagged pairs.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UsageError
from .metrics import HIT_KS
from .shards import _atomic_write_bytes, expand_shards, iter_samples

THUMB_PX = 128
GROUP_MEMBERS = 12  # pairs listed per shared-image group (the group's size is shown)
SCORE_COLUMNS_SKIP = {"key", "shard", "flagged", "reason", "caption", "url", "cosine", "combined"}


# --------------------------------------------------------------------------- reading


def read_scan(scan_dir: str | os.PathLike):
    """(summary dict, scores DataFrame) of a scan folder; UsageError when it is not one."""
    import pandas as pd

    scan_dir = Path(scan_dir)
    try:
        summary = json.loads((scan_dir / "summary.json").read_text())
        scores = pd.read_parquet(scan_dir / "scores.parquet")
    except FileNotFoundError as e:
        raise UsageError(f"{scan_dir} is not a finished scan folder (missing {Path(e.filename).name})") from None
    except (json.JSONDecodeError, OSError, ValueError) as e:
        raise UsageError(f"{scan_dir}: cannot read the scan ({e})") from None
    return summary, scores


def _catalog(paths: list[Path]):
    """The dataset's catalog (key, shard, caption, sha256, ...): the cached one if complete."""
    import pandas as pd

    from .catalog import build_catalog, catalog_dir

    cached = catalog_dir(paths) / "catalog.parquet"
    if cached.exists():
        df = pd.read_parquet(cached)
        if set(df["shard"]) == {p.name for p in paths}:
            return df
    return build_catalog(paths, workers=1)


def attach_text(scores, summary: dict, shards: list[Path] | None):
    """`scores` with `caption`, `url` and `sha256` columns: from scores.parquet when the scan wrote
    them, else from the catalog (captions, image hashes) or the embeddings' metadata."""
    import pandas as pd

    df = scores.copy()
    if shards:
        cat = _catalog(shards)[["key", "shard", "caption", "sha256"]]
        cat = cat.rename(columns={"caption": "_caption"})
        df = df.merge(cat, on=["key", "shard"], how="left")
        if "caption" not in df.columns:
            df["caption"] = df["_caption"]
        df = df.drop(columns="_caption")
    elif "caption" not in df.columns:
        emb = Path(summary.get("embeddings") or "")
        parts = sorted((emb / "metadata").glob("metadata_*.parquet"))
        if parts:
            meta = pd.concat([pd.read_parquet(p, columns=["key", "caption"]) for p in parts], ignore_index=True)
            df = df.merge(meta.drop_duplicates("key"), on="key", how="left")
    for col in ("caption", "url", "sha256"):
        if col not in df.columns:
            df[col] = None
    return df


def read_samples(shards: list[Path], wanted) -> dict[tuple[str, str], dict]:
    """(shard, key) -> {"image": bytes, "url": str|None} for the wanted pairs, reading only the
    shards that hold them and stopping at each shard's last wanted key."""
    by_shard: dict[str, set[str]] = {}
    for shard, key in wanted:
        by_shard.setdefault(shard, set()).add(key)
    paths = {p.name: p for p in shards}
    found = {}
    for shard, keys in sorted(by_shard.items()):
        if shard not in paths:
            continue
        left = set(keys)
        for s in iter_samples(paths[shard]):
            if s.key in left:
                url = s.meta.get("url") if isinstance(s.meta, dict) else None
                found[(shard, s.key)] = {"image": s.image, "url": url}
                left.discard(s.key)
                if not left:
                    break
    return found


def thumbnail_uri(image: bytes, px: int = THUMB_PX) -> str | None:
    """A JPEG data URI of the image shrunk to fit px×px (transparency on white), None if undecodable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as im:
            im.thumbnail((px, px))
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, "white")
                bg.paste(im, mask=im.getchannel("A"))
                im = bg
            buf = io.BytesIO()
            im.convert("RGB").save(buf, "JPEG", quality=82)
    except Exception:  # noqa: BLE001 - any decoder failure: the page shows "no image"
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_uri(fig) -> str:
    """A PNG data URI of a matplotlib figure (closed afterwards; no timestamp, so byte-stable)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib figure to a PNG file atomically (byte-stable) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(Path(path), buf.getvalue())


def cosine_histogram(cos: np.ndarray, cut: float | None, truth: np.ndarray | None):
    """Histogram of image–text cosine (poisoned pairs apart when known) with the cut drawn (Fig. 5a)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    bins = np.linspace(float(np.min(cos)), float(np.max(cos)), 60) if len(cos) else 10
    if truth is not None and truth.any():
        ax.hist(cos[~truth], bins=bins, alpha=0.7, label=f"clean ({int((~truth).sum()):,})")
        ax.hist(cos[truth], bins=bins, alpha=0.7, label=f"poisoned ({int(truth.sum()):,})", color="C3")
    else:
        ax.hist(cos, bins=bins, alpha=0.8, label=f"all pairs ({len(cos):,})")
    if cut is not None:
        ax.axvline(cut, color="k", ls="--", label=f"cut {cut:.3f}")
    ax.set_xlabel("image–text cosine under the reference model")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    return fig


def detector_histograms(scores, names: list[str], truth: np.ndarray | None):
    """One small histogram per detector score (higher = more suspicious)."""
    plt = _plt()
    cols = min(3, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.5 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        x = scores[name].to_numpy(dtype=np.float64)
        x = x[np.isfinite(x)]
        if truth is not None and truth.any():
            t = truth[np.isfinite(scores[name].to_numpy(dtype=np.float64))]
            bins = np.histogram_bin_edges(x, 40)
            ax.hist(x[~t], bins=bins, alpha=0.7, label="clean")
            ax.hist(x[t], bins=bins, alpha=0.7, label="poisoned", color="C3")
            ax.legend(fontsize=7)
        else:
            ax.hist(x, bins=40)
        ax.set_title(name, fontsize=9)
        ax.set_yscale("log")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def roc_figure(scores, names: list[str], truth: np.ndarray):
    """ROC curve per detector score against the manifest's truth."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    for name in names:
        s = np.nan_to_num(scores[name].to_numpy(dtype=np.float64), nan=-np.inf, neginf=-1e300, posinf=1e300)
        fpr, tpr, _ = roc_curve(truth, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(truth, s):.3f})")
    ax.plot([0, 1], [0, 1], color="gray", ls=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    return fig


# --------------------------------------------------------------------------- runs (evaluate outputs)


@dataclass
class Run:
    """One evaluated model: a label, its evaluate() result and, when trained here, its per-epoch history."""

    label: str
    metrics: dict
    source: str
    history: list[dict] = field(default_factory=list)


def _history(folder: Path) -> list[dict]:
    path = folder / "history.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip()) if "eval" in r]


def load_runs(paths) -> list[Run]:
    """Evaluate results from each path: a metrics JSON file (evaluate --out), a folder of them
    (`*metrics*.json`), a demo folder (summary.json with per-model metrics) or a model folder
    with per-epoch evaluations in history.jsonl. UsageError for a path that holds none."""
    runs: list[Run] = []
    for p in map(Path, paths):
        found: list[Run] = []
        files = [p] if p.is_file() else sorted(p.glob("*metrics*.json")) + [p / "summary.json"] if p.is_dir() else []
        for f in files:
            try:
                d = json.loads(f.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue
            if isinstance(d.get("metrics"), dict):  # demo summary: one run per model
                found += [Run(name, m, str(f), _history(p / f"model-{name}")) for name, m in d["metrics"].items()]
            elif "utility" in d:
                label = f.stem.removesuffix("_metrics").removesuffix("metrics").strip("_-") or f.parent.name
                found.append(Run(label, d, str(f)))
        if p.is_dir() and not found:
            hist = _history(p)
            if hist:
                found.append(Run(p.name, hist[-1]["eval"], str(p / "history.jsonl"), hist))
        if not found:
            raise UsageError(f"{p}: no evaluate results (a metrics .json, a folder of them, a demo folder "
                             "or a model folder with history.jsonl)")
        runs += found
    return runs


def utility_rows(runs: list[Run]) -> list[dict]:
    """Retrieval utility per run: R@1/5/10 both ways and class precision@10."""
    rows = []
    for r in runs:
        u = r.metrics.get("utility", {})
        rows.append({"model": r.label, **{f"t2i R@{k}": u.get(f"t2i_r@{k}") for k in (1, 5, 10)},
                     **{f"i2t R@{k}": u.get(f"i2t_r@{k}") for k in (1, 5, 10)},
                     "class P@10 t2i": u.get("t2i_class_p@10"), "class P@10 i2t": u.get("i2t_class_p@10"),
                     "test pairs": r.metrics.get("test_pairs")})
    return rows


def attack_rows(runs: list[Run]) -> dict[str, list[dict]]:
    """Per attack goal, one row per run (Hit@K and MinRank of text->image queries), with the
    random-caption baseline of each run beside it: clean vs poisoned vs sanitized side by side."""
    goals: dict[str, list[dict]] = {}
    for r in runs:
        for goal, a in (r.metrics.get("attacks") or {}).items():
            for part, what in (("t2i", r.label), ("baseline_random_t2i", f"{r.label}: random caption")):
                s = a.get(part)
                if s:
                    goals.setdefault(goal, []).append(
                        {"model": what, **{f"Hit@{k}": s.get(f"hit@{k}") for k in HIT_KS},
                         "MinRank": s.get("min_rank_mean"), "queries": s.get("queries")})
    return goals


def backdoor_rows(runs: list[Run]) -> list[dict]:
    """Backdoor success per run and goal (triggered vs untriggered test images)."""
    rows = []
    for r in runs:
        for goal, b in (r.metrics.get("backdoor") or {}).items():
            for part in ("triggered", "untriggered"):
                s = b.get(part)
                if s:
                    rows.append({"model": r.label, "goal": goal, "images": part,
                                 **{f"ASR i2t@{k}": s.get(f"i2t_asr@{k}") for k in (1, 5, 10)},
                                 "ASR zero-shot": s.get("zeroshot_asr")})
    return rows


def epoch_figure(runs: list[Run]):
    """Hit@10 per training/defense epoch of every run that recorded per-epoch evaluations, or None."""
    curves = []
    for r in runs:
        for goal in sorted({g for h in r.history for g in (h["eval"].get("attacks") or {})}):
            pts = [(h.get("epoch", i + 1), h["eval"]["attacks"][goal]["t2i"]["hit@10"])
                   for i, h in enumerate(r.history) if goal in (h["eval"].get("attacks") or {})]
            if pts:
                curves.append((f"{r.label} {goal}", pts))
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, pts in curves:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Hit@10")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    return fig


def rate_points(runs: list[Run]) -> dict[str, list[tuple[float, float]]]:
    """{goal: [(poisoning rate, Hit@10)]} of runs evaluated against a manifest whose poison.json
    (beside it, written by `poison`) gives the rate; only goals seen at two or more rates."""
    pts: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        man = r.metrics.get("manifest")
        if not man:
            continue
        try:
            rate = json.loads((Path(man).parent / "poison.json").read_text())["rate"]
        except (OSError, ValueError, KeyError):
            continue
        for goal, a in (r.metrics.get("attacks") or {}).items():
            if a.get("t2i") and rate:
                pts.setdefault(goal, []).append((float(rate), a["t2i"]["hit@10"]))
    return {g: sorted(set(p)) for g, p in pts.items() if len({x for x, _ in p}) >= 2}


def rate_figure(points: dict[str, list[tuple[float, float]]], xlabel: str = "poisoning rate"):
    """Hit@10 against poisoning rate, one line per series; `points` = {label: [(rate, hit@10)]}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, pts in points.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Hit@10")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    return fig


# --------------------------------------------------------------------------- the page


def format_value(v) -> str:
    """A table cell: floats to 3 decimals, ints with thousands separators, None as a dash."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, (float, np.floating)):
        return f"{v:.3f}"
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    return str(v)


def markdown_table(rows: list[dict]) -> list[str]:
    """Rows (dicts) as markdown table lines, columns in first-seen order."""
    t = _table(rows)
    if not t["columns"]:
        return []
    return ["| " + " | ".join(t["columns"]) + " |", "|" + "---|" * len(t["columns"])] + \
        ["| " + " | ".join(r) + " |" for r in t["rows"]]


def _table(rows: list[dict]) -> dict:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    return {"columns": cols, "rows": [[format_value(r.get(c)) for c in cols] for r in rows]}


def _threshold_lines(thr: dict) -> list[str]:
    lines = []
    if "similarity" in thr:
        how = "given"
        fit = thr.get("similarity_auto")
        if fit:
            how = (f"auto: {fit.get('method', 'mixture')} of a 2-component Gaussian mixture of the cosines "
                   f"(mixture cut {fit.get('gmm_threshold', float('nan')):.3f})")
        lines.append(f"similarity: flag cosine < {thr['similarity']:.4f} ({how})")
    cc = thr.get("class_consistency")
    if cc:
        lines.append(f"class_consistency: caption names a class whose probability is < {cc['caption_class_prob_below']} "
                     f"while the image's top class has p ≥ {cc['image_top_class_prob_at_least']}")
    if "image_reuse" in thr:
        below = thr.get("image_reuse_cosine_below")
        lines.append(f"image_reuse: image shared with ≥ {thr['image_reuse']} other captions"
                     + (" (auto: 1 + the median count)" if thr.get("image_reuse_auto") else "")
                     + (f" and cosine < the median pair's {below:.3f}" if below is not None else ""))
    if "flag_fraction" in thr:
        lines.append(f"flag_fraction: the worst {thr['flag_fraction']:.2%} by combined score")
    return lines


def _truth(df, manifest) -> np.ndarray | None:
    import pandas as pd

    if not manifest:
        return None
    try:
        man = pd.read_parquet(manifest, columns=["key"])
    except Exception as e:  # noqa: BLE001 - unreadable user file
        raise UsageError(f"cannot read manifest {manifest}: {e}") from None
    return df["key"].isin(set(man["key"])).to_numpy()


def _shard_paths(shards, summary: dict) -> list[Path] | None:
    spec = shards or summary.get("shards")
    if not spec:
        return None
    return expand_shards(spec)


def build_report(
    scan_dir: str | os.PathLike,
    runs=(),
    *,
    out: str | os.PathLike,
    shards=None,
    manifest: str | os.PathLike | None = None,
    top: int = 100,
    groups: int = 20,
    title: str | None = None,
    verify: str | os.PathLike | None = None,
) -> dict:
    """Write the HTML report of `scan_dir` (and evaluate `runs`) to `out`, and every flagged pair
    to `<out stem>_flagged.csv` beside it; return {"html", "csv", "flagged", "shown", "images"}.

    `shards`: the scanned shards (thumbnails, URLs, image hashes for the shared-image gallery;
    default: `summary["shards"]` when the scan recorded it); `manifest`: poison manifest (truth
    for ROC curves and the "poisoned" column); `top`: pairs in the gallery; `groups`: shared-image
    groups shown; `verify`: a `mmsanitize verify` folder, shown as the split-view section (counts
    by status and the samples whose URL now serves other bytes or is gone).
    """
    import jinja2

    summary, scores = read_scan(scan_dir)
    paths = _shard_paths(shards, summary)
    df = attach_text(scores, summary, paths)
    truth = _truth(df, manifest)
    if truth is not None:
        df["poisoned"] = truth
    det_names = [c for c in summary.get("detectors", []) if c in scores.columns] or \
        [c for c in scores.columns if c not in SCORE_COLUMNS_SKIP and np.issubdtype(scores[c].dtype, np.number)]

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    flagged = df[df["flagged"]].sort_values(["combined", "key"], ascending=[False, True], kind="stable")
    csv_path = out.with_name(out.stem + "_flagged.csv")
    csv_cols = ["key", "shard", "caption", "url", *det_names, "cosine", "combined", "reason"] + \
        (["poisoned"] if truth is not None else [])
    csv_cols = [c for c in dict.fromkeys(csv_cols) if c in flagged.columns]
    tmp = csv_path.with_name(csv_path.name + ".tmp")
    flagged[csv_cols].to_csv(tmp, index=False)
    os.replace(tmp, csv_path)

    gallery = flagged.head(top)
    groups_df = _shared_image_groups(df, groups)
    firsts = groups_df.drop_duplicates("sha256")
    wanted = {(r.shard, r.key) for r in gallery.itertuples()} | {(r.shard, r.key) for r in firsts.itertuples()}
    split_view = read_verify(verify, top) if verify is not None else None
    if split_view is not None:
        wanted |= {(r["shard"], r["key"]) for r in split_view["rows"]}
    samples = read_samples(paths, wanted) if paths else {}
    thumbs = {k: thumbnail_uri(v["image"]) for k, v in samples.items()}

    def card(r) -> dict:
        url = r.url if isinstance(r.url, str) and r.url else samples.get((r.shard, r.key), {}).get("url")
        return {"key": r.key, "shard": r.shard, "caption": r.caption if isinstance(r.caption, str) else "",
                "url": url, "thumb": thumbs.get((r.shard, r.key)), "reason": r.reason or "",
                "scores": [(n, format_value(float(getattr(r, n)))) for n in [*det_names, "cosine", "combined"]
                           if hasattr(r, n)],
                "poisoned": bool(r.poisoned) if truth is not None else None}

    figures = {}
    if "cosine" in df.columns:
        figures["cosine"] = figure_uri(cosine_histogram(df["cosine"].to_numpy(dtype=np.float64),
                                                        summary.get("thresholds", {}).get("similarity"), truth))
    if det_names:
        figures["detectors"] = figure_uri(detector_histograms(df, det_names, truth))
    if truth is not None and truth.any() and (~truth).any():
        figures["roc"] = figure_uri(roc_figure(df, [*det_names, "combined"], truth))

    detection = summary.get("detection") or {}
    det_rows = [{"detector": n, **{k: v for k, v in detection[n].items()}}
                for n in [*summary.get("detectors", []), "combined"] if n in detection]

    run_list = load_runs(runs) if runs else []
    epoch_fig = epoch_figure(run_list) if run_list else None
    rates = rate_points(run_list)
    ctx = {
        "title": title or f"mmsanitize report: {Path(scan_dir).resolve().name}",
        "scan_dir": str(scan_dir),
        "summary": summary,
        "overview": _table([{"pairs scanned": summary.get("samples"), "flagged": summary.get("flagged"),
                             "fraction flagged": f"{summary.get('fraction_flagged', 0):.2%}",
                             "model": summary.get("model"), "detectors": ", ".join(summary.get("detectors", [])),
                             "combine": summary.get("combine"),
                             "index": f"{summary.get('index', {}).get('kind')} (k={summary.get('index', {}).get('k')})"}]),
        "flagged_by": _table([{"rule": k, "flagged": v} for k, v in summary.get("flagged_by", {}).items()]),
        "threshold_lines": _threshold_lines(summary.get("thresholds", {})),
        "warnings": summary.get("warnings", []),
        "detection": _table(det_rows) if det_rows else None,
        "poisoned_known": detection.get("poisoned"),
        "figures": figures,
        "gallery": [card(r) for r in gallery.itertuples()],
        "n_flagged": len(flagged),
        "csv_name": csv_path.name,
        "groups": [{"sha256": sha, "size": int(g["_size"].iloc[0]), "flagged": int(g["flagged"].sum()),
                    "thumb": next((thumbs.get((r.shard, r.key)) for r in g.itertuples() if thumbs.get((r.shard, r.key))), None),
                    "members": [card(r) for r in g.head(GROUP_MEMBERS).itertuples()]}
                   for sha, g in groups_df.groupby("sha256", sort=False)],
        "no_shards": paths is None,
        "utility": _table(utility_rows(run_list)) if run_list else None,
        "attacks": {g: _table(rows) for g, rows in attack_rows(run_list).items()},
        "backdoor": _table(backdoor_rows(run_list)) if backdoor_rows(run_list) else None,
        "epoch_figure": figure_uri(epoch_fig) if epoch_fig is not None else None,
        "rate_figure": figure_uri(rate_figure(rates)) if rates else None,
        "runs": [{"label": r.label, "source": r.source} for r in run_list],
        "split_view": None if split_view is None else {
            "counts": _table([split_view["counts"]]), "total": split_view["total"], "shown": len(split_view["rows"]),
            "rows": [{**r, "thumb": thumbs.get((r["shard"], r["key"]))} for r in split_view["rows"]]},
    }
    env = jinja2.Environment(loader=jinja2.PackageLoader("mmsanitize", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    html = env.get_template("report.html.j2").render(**ctx)
    _atomic_write_bytes(out, html.encode("utf-8"))
    return {"html": str(out), "csv": str(csv_path), "flagged": len(flagged), "shown": len(gallery),
            "images": sum(1 for v in thumbs.values() if v), "groups": len(ctx["groups"]), "runs": len(run_list)}


def read_verify(verify_dir: str | os.PathLike, top: int) -> dict:
    """A verify folder for the report: counts by status, and the first `top` samples that are not
    unchanged (changed first, then gone, error, unverifiable; by shard and key)."""
    import pandas as pd

    from .verify import STATUSES

    path = Path(verify_dir) / "verify.parquet"
    try:
        df = pd.read_parquet(path, columns=["key", "shard", "url", "status", "http_status"])
    except Exception as e:  # noqa: BLE001 - a missing or unreadable file is a bad user folder
        raise UsageError(f"{verify_dir} is not a verify folder ({path.name}: {type(e).__name__}; "
                         "`mmsanitize verify SHARDS --out DIR` creates it)") from None
    counts = {s: int((df["status"] == s).sum()) for s in STATUSES}
    bad = df[df["status"] != "unchanged"].copy()
    bad["_order"] = bad["status"].map({s: i for i, s in enumerate(STATUSES)})
    bad = bad.sort_values(["_order", "shard", "key"], kind="stable").head(top)
    rows = [{"key": r.key, "shard": r.shard, "url": r.url if isinstance(r.url, str) else None, "status": r.status,
             "http": None if pd.isna(r.http_status) else int(r.http_status)} for r in bad.itertuples()]
    return {"counts": counts, "total": int(len(df)), "rows": rows}


def _shared_image_groups(df, limit: int):
    """Rows of the `limit` largest groups of pairs that share one image (by sha256) and hold at
    least one flagged pair: the Attack I signature. Column `_size` = the group's size."""
    d = df[df["sha256"].notna()]
    if d.empty or limit <= 0:
        return df.iloc[:0].assign(_size=0)
    size = d.groupby("sha256")["key"].transform("size")
    any_flag = d.groupby("sha256")["flagged"].transform("any")
    g = d[(size > 1) & any_flag].assign(_size=size[(size > 1) & any_flag])
    if g.empty:
        return g
    order = (g.groupby("sha256").agg(n=("_size", "first"), top=("combined", "max"))
             .sort_values(["n", "top"], ascending=False).head(limit).index)
    g = g[g["sha256"].isin(order)]
    g = g.assign(_rank=g["sha256"].map({s: i for i, s in enumerate(order)}))
    return g.sort_values(["_rank", "flagged", "combined"], ascending=[True, False, False], kind="stable")
