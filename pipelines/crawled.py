"""A crawled, unlabeled corpus end to end: zero-shot labelled poison -> scan, measured from nothing.

    python pipelines/crawled.py --work runs/crawled [--goal computer2flag] [--source-fraction 1] [--epochs 5]

Everything is built under --work. Real Open Clip Art drawings (Debian `openclipart-png`, via
`mmsanitize datasets build openclipart`) are split into `ref` (the curator's own clean data, used
only to align the reference encoder), `train` (served as the crawl) and `test`. The `train`
images are served from 127.0.0.1 with their captions and NO labels; `mmsanitize ingest` downloads
them (twice: half the list, then the grown list, which fetches only the new URLs). Then:
`align` a reference on `ref`; `poison` the ingested shards with `--label-from zeroshot
--label-model REF` (the attacker's classes come from zero-shot labels of the images); `scan` with
the same reference and the poison manifest; fine-tune a model on the clean and on the poisoned
crawl and `evaluate` both on `test`.

Printed (and written to WORK/crawled.json): the zero-shot label accuracy against the builder's
known labels of the served images, how many poisoned pairs really pair a class-A caption with a
class-B image (by the known labels), the attack's Hit@K / MinRank on the test split for the clean
and poisoned models, and the scan's detection AUROC / precision / recall. Each step is one CLI call
under `nice`, skipped when its output exists (a rerun resumes).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def run(args: list, log: Path, marker: Path | None = None) -> None:
    """One `python -m mmsanitize` call under nice; skipped when `marker` exists."""
    if marker is not None and marker.exists():
        print(f"skip   mmsanitize {' '.join(map(str, args[:2]))} ({marker} exists)", flush=True)
        return
    cmd = ["nice", "-n", "10", sys.executable, "-m", "mmsanitize", *map(str, args)]
    t0 = time.monotonic()
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", MMSANITIZE_PROGRESS="0")
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    print(f"{time.monotonic() - t0:6.0f}s mmsanitize {' '.join(map(str, args))}", flush=True)
    if rc:
        raise SystemExit(f"step failed (exit {rc}); see {log}")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(www: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve `www` on 127.0.0.1 (ephemeral port) from a daemon thread; returns (server, base URL)."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def export_crawl(train: Path, www: Path) -> "object":
    """Write every `train` image to `www/KEY.EXT`; returns a table key, file, caption, label (the truth)."""
    import pandas as pd

    from mmsanitize.shards import expand_shards, iter_samples

    www.mkdir(parents=True, exist_ok=True)
    rows = []
    for tar in expand_shards(train):
        for s in iter_samples(tar):
            name = f"{s.key}.{s.image_ext}"
            if not (www / name).exists():
                (www / name).write_bytes(s.image)
            rows.append({"key": s.key, "file": name, "caption": s.caption, "label": s.meta.get("label")})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--goal", default="computer2flag", help="Attack II goal A2B (classes of the openclipart vocabulary).")
    ap.add_argument("--source-fraction", type=float, default=1.0,
                    help="Fraction of the (zero-shot) class-A samples whose captions are injected with class-B images.")
    ap.add_argument("--epochs", type=int, default=5, help="Fine-tuning epochs of the clean and poisoned models.")
    ap.add_argument("--align-epochs", type=int, default=20)
    ap.add_argument("--align-image-size", type=int, default=160)
    ap.add_argument("--label-margin", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=1, help="Dask workers of each step.")
    a = ap.parse_args()

    import pandas as pd

    w = a.work.resolve()
    w.mkdir(parents=True, exist_ok=True)
    log = w / "steps.log"
    dask = ["--workers", a.workers]
    t_start = time.monotonic()
    data = w / "data"
    run(["datasets", "build", "openclipart", "--out", data, *dask], log, data / "build_report.json")

    truth = export_crawl(data / "train", w / "www")
    httpd, base = serve(w / "www")
    try:
        truth["url"] = base + "/" + truth["file"]
        half = w / "urls_first_half.csv"
        full = w / "urls.csv"
        truth[["url", "caption"]].iloc[: len(truth) // 2].to_csv(half, index=False)  # no labels: a crawl
        truth[["url", "caption"]].to_csv(full, index=False)
        web = w / "web"
        ingest_opts = ["--image-size", 128, "--resize-mode", "keep_ratio", "--processes", 1, "--shard-size", 500]
        if not (web / "sizes.json").exists():
            run(["ingest", half, "--out", web, *ingest_opts], log)
            run(["ingest", full, "--out", web, *ingest_opts], log)
    finally:
        httpd.shutdown()
        httpd.server_close()
    run(["info", web, "--json", *dask], log)

    ref = w / "ref"
    run(["align", data / "ref", "--out", ref, "--image-size", a.align_image_size, "--epochs", a.align_epochs],
        log, ref / "model.json")
    poisoned = w / "poisoned"
    run(["poison", web, "--attack", "single-label", "--goal", a.goal, "--mode", "inject", "--source-fraction", a.source_fraction,
         "--label-from", "zeroshot", "--label-model", ref, "--label-margin", a.label_margin,
         "--out", poisoned, *dask], log, poisoned / "poison.json")
    manifest = poisoned / "manifest.parquet"
    scan_dir = w / "scan"
    run(["scan", poisoned, "--model", ref, "--threshold", "auto", "--classes", "openclipart",
         "--manifest", manifest, "--out", scan_dir, *dask], log, scan_dir / "summary.json")
    models = {}
    for name, shards in (("clean", web), ("poisoned", poisoned)):
        m = w / f"model-{name}"
        run(["train", shards, "--init", ref, "--lock", "backbones", "--epochs", a.epochs, "--seed", 0,
             "--loader-workers", 0, "--out", m], log, m / "model.json")
        run(["evaluate", m, "--test", data / "test", "--manifest", manifest, "--out", w / f"metrics-{name}.json"],
            log, w / f"metrics-{name}.json")
        models[name] = json.loads((w / f"metrics-{name}.json").read_text())

    # ---- figures, from the outputs only
    src, dst = a.goal.split("2")
    ingested = pd.concat([pd.read_parquet(p, columns=["key", "url", "status"]) for p in sorted(web.glob("0*.parquet"))])
    ingested = ingested[ingested["status"] == "success"].copy()
    ingested["file"] = ingested["url"].str.rsplit("/", n=1).str[1]  # a resumed run serves on another port
    ingested = ingested.merge(truth[["file", "label"]], on="file", validate="one_to_one")
    labels = pd.read_parquet(next((poisoned / "_labels").glob("zeroshot-*.parquet")))
    lab = labels.merge(ingested[["key", "label"]], on="key", validate="one_to_one")
    from mmsanitize.labels import zeroshot_class_names

    vocab = set(zeroshot_class_names("zeroshot"))
    in_vocab = lab["label"].isin(vocab)
    known = lab["zeroshot_label"] != "unknown"
    correct = lab["zeroshot_label"] == lab["label"]
    per_class = {}
    for c in (src, dst):
        t, p = lab["label"] == c, lab["zeroshot_label"] == c
        per_class[c] = {"true": int(t.sum()), "predicted": int(p.sum()), "correct": int((t & p).sum()),
                        "precision": float((t & p).sum() / max(p.sum(), 1)), "recall": float((t & p).sum() / max(t.sum(), 1))}
    man = pd.read_parquet(manifest)
    true_of = dict(zip(ingested["key"], ingested["label"]))
    pj = json.loads((poisoned / "poison.json").read_text())
    poison_true = {"pairs": int(len(man)), "rate": pj["rate"],
                   "caption_truly_A": int(sum(true_of.get(k) == src for k in man["source_key"])),
                   "image_truly_B": int(sum(true_of.get(k) == dst for k in man["image_source_key"]))}
    scan = json.loads((scan_dir / "summary.json").read_text())
    attack = {n: m.get("attacks", {}).get(a.goal, {}).get("t2i", {}) for n, m in models.items()}
    attack["random-caption baseline"] = models["poisoned"].get("attacks", {}).get(a.goal, {}).get("baseline_random_t2i", {})
    result = {
        "served": int(len(truth)), "ingested": int(len(ingested)),
        "labels": {"samples": int(len(lab)), "classes": len(vocab),
                   "in_vocabulary": int(in_vocab.sum()),
                   "accuracy_in_vocabulary": float(correct[in_vocab].mean()),
                   "accuracy_in_vocabulary_known": float(correct[in_vocab & known].mean()),
                   "unknown": int((~known).sum()), "margin": a.label_margin,
                   "chance": 1 / len(vocab), "per_class": per_class},
        "poison": poison_true,
        "attack": {n: {k: r.get(k) for k in ("hit@1", "hit@10", "min_rank_mean", "queries")} for n, r in attack.items()},
        "utility": {n: {k: m.get("utility", {}).get(k) for k in ("t2i_r@10", "i2t_r@10")} for n, m in models.items()},
        "detection": scan.get("detection", {}),
        "seconds": round(time.monotonic() - t_start),
    }
    (w / "crawled.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    L = result["labels"]
    print(f"\nserved {result['served']} Open Clip Art drawings with captions, no labels; ingested {result['ingested']}")
    print(f"zero-shot labels ({L['classes']} classes, open_clip templates, margin {L['margin']}): "
          f"accuracy {L['accuracy_in_vocabulary']:.3f} on the {L['in_vocabulary']} images whose known label is a "
          f"vocabulary class (chance {L['chance']:.3f}); {L['accuracy_in_vocabulary_known']:.3f} without the "
          f"{L['unknown']} 'unknown'")
    for c, r in per_class.items():
        print(f"  {c}: {r['true']} true, {r['predicted']} predicted, precision {r['precision']:.3f}, recall {r['recall']:.3f}")
    p = result["poison"]
    print(f"poison {a.goal} (zero-shot classes): {p['pairs']} pairs injected (rate {p['rate']:.4f}); "
          f"caption truly {src}: {p['caption_truly_A']}, "
          f"image truly {dst}: {p['image_truly_B']}")
    for n, r in result["attack"].items():
        u = result["utility"].get(n)
        print(f"{n}: {a.goal} test t2i Hit@1 {r['hit@1']:.3f}  Hit@10 {r['hit@10']:.3f}  MinRank {r['min_rank_mean']:.1f} "
              f"({r['queries']} class-A test captions)"
              + (f"; utility t2i R@10 {u['t2i_r@10']:.3f}  i2t R@10 {u['i2t_r@10']:.3f}" if u else ""))
    for name, d in result["detection"].items():
        if not isinstance(d, dict):
            continue
        f3 = {k: "n/a" if d.get(k) is None else f"{d[k]:.3f}" for k in ("auroc", "precision", "recall")}
        print(f"scan {name}: AUROC {f3['auroc']}  precision {f3['precision']}  recall {f3['recall']}  "
              f"flagged {d.get('flagged')} (of {result['detection'].get('poisoned')} poisoned)")
    print(f"total {result['seconds']} s; figures in {w / 'crawled.json'}")


if __name__ == "__main__":
    main()
