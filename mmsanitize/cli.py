"""The `mmsanitize` command line: a thin click layer that parses, calls a library function, prints.

Heavy libraries (torch, faiss, open_clip, dask) are imported inside the library functions so
`mmsanitize --help` stays instant. Every MmsanitizeError becomes one line on stderr and exit 2.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from .errors import MmsanitizeError


def dask_options(f):
    """`--scheduler` and `--workers` for every verb that touches shards."""
    f = click.option("--workers", type=int, default=None,
                     help="Worker processes of the local Dask cluster (default: cores).")(f)
    f = click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="Address of an existing Dask scheduler (tcp://host:8786); default: start a local cluster.")(f)
    return f


def resolve_out(out: str | None, positional: str | None, usage: str) -> str:
    """The output folder from `--out`, or from the deprecated positional OUT (with a warning line)."""
    if out and positional and out != positional:
        raise click.UsageError(f"give the output once: --out {out} or the positional {positional}, not both")
    if positional and not out:
        click.echo(f"warning: the positional OUT is deprecated; use --out {positional} ({usage})", err=True)
        return positional
    if not out:
        raise click.UsageError(f"missing --out DIR ({usage})")
    return out


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print rows as an aligned plain-text table."""
    if not rows:
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmsanitize")
def cli():
    """Red-team and clean image-text datasets stored as WebDataset shards.

    \b
    Typical loop:
      mmsanitize datasets build openclipart --out data/oca/
      mmsanitize align data/oca/ref/ --out runs/ref/
      mmsanitize poison data/oca/train/ --attack single-label --goal dog2boat --out runs/p/
      mmsanitize scan runs/p/ --model runs/ref/ --threshold auto --out runs/p-scan/
      mmsanitize sanitize runs/p/ --scan runs/p-scan/ --out runs/p-clean/
    Crawled, unlabeled corpora:
      mmsanitize ingest urls.parquet --out data/web/
      mmsanitize verify data/web/ --out runs/web-verify/
      mmsanitize poison data/web/ --attack single-label --goal dog2boat \\
        --label-from zeroshot --label-model runs/ref/ --out runs/pw/

    \b
    Every verb writes into its --out; --workers/--scheduler size the Dask cluster,
    --loader-workers the DataLoader of train/align/defend.
    Environment variables read:
      MMSANITIZE_PROGRESS=0     no progress bars on stderr
      MMSANITIZE_EXACT          exact nearest-neighbour backend: faiss (default) or numpy
      MMSANITIZE_FEATURE_CACHE  align's backbone-feature cache (default XDG_CACHE_HOME/mmsanitize/features)
      MMSANITIZE_TASK_TIMEOUT   per-task watchdog in seconds (default 21600; 0 = off)
      MMSANITIZE_LOG_DIR        where internal-error tracebacks go (default XDG_CACHE_HOME/mmsanitize/logs)
      XDG_CACHE_HOME            cache root (default ~/.cache): catalogs, file fingerprints, features, logs
      HF_HUB_OFFLINE=1          never contact the Hugging Face hub (models load from local files)
      NO_ALBUMENTATIONS_UPDATE  set to 1 by ingest (img2dataset's albumentations would query PyPI)
    """


# ----------------------------------------------------------------------------- foundation


@cli.command()
@click.argument("shards")
@dask_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(shards, scheduler, workers, as_json):
    """Samples, shards, bytes, class counts, caption lengths and problems of a dataset.

    Example: mmsanitize info data/oca/train/
    """
    from .info import dataset_info

    summary = dataset_info(shards, scheduler=scheduler, workers=workers)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"samples {summary['samples']:,}  shards {summary['shards']}  "
               f"bytes {summary['bytes']:,}  image bytes {summary['image_bytes']:,}")
    cw = summary["caption_words"]
    click.echo(f"caption words: min {cw['min']}  mean {cw['mean']}  median {cw['median']}  max {cw['max']}")
    lab = summary["labels"]
    click.echo(f"labels: {lab['labelled']:,} of {summary['samples']:,} samples carry a json label "
               f"({lab['coverage']:.1%} coverage)")
    if lab["labelled"]:
        print_table([{"class": k, "samples": v} for k, v in summary["classes"].items()])
    if lab["hint"]:
        click.echo(f"note: {lab['hint']}")
    for p in summary["problems"]:
        click.echo(f"problem: {p}")


@cli.command()
@click.argument("shards")
@dask_options
def catalog(shards, scheduler, workers):
    """Build (or refresh) the per-sample catalog of a dataset and print where it is.

    Example: mmsanitize catalog data/oca/train/
    """
    from .catalog import catalog_parts

    parts = catalog_parts(shards, scheduler=scheduler, workers=workers)
    click.echo(f"{parts.count:,} samples catalogued in {parts.joined}")


@cli.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for every output of the loop.")
@click.option("--dataset", default="openclipart", type=click.Choice(["openclipart", "fashion-mnist"]),
              show_default=True)
@click.option("--goal", default=None, help="Attack II goal A2B (default: food2bird on openclipart, sneaker2bag on fashion-mnist).")
@click.option("--epochs", default=5, show_default=True, help="Fine-tuning epochs of each model.")
@click.option("--align-epochs", default=20, show_default=True, help="Epochs of the reference encoder's alignment.")
@click.option("--limit", type=int, default=None, help="Build only this many samples (quick runs).")
@click.option("--seed", default=0, show_default=True)
@dask_options
def demo(out, dataset, goal, epochs, align_epochs, limit, seed, scheduler, workers):
    """The whole loop on the embedded default data: build, align, poison, scan, sanitize, train, evaluate.

    Example: mmsanitize demo --out runs/demo
    """
    from .demo import run_demo

    goal = goal or ("food2bird" if dataset == "openclipart" else "sneaker2bag")
    s = run_demo(out=out, dataset=dataset, goal=goal, epochs=epochs, align_epochs=align_epochs, limit=limit,
                 seed=seed, scheduler=scheduler, workers=workers)
    click.echo(f"\n{dataset}: Attack II {goal}")
    rows = []
    for name, m in s["metrics"].items():
        util = m.get("utility", {})
        att = m.get("attacks", {}).get(goal, {}).get("t2i", {})
        rows.append({"model": name, "t2i R@10": util.get("t2i_r@10"), "i2t R@10": util.get("i2t_r@10"),
                     "Hit@1": att.get("hit@1"), "Hit@10": att.get("hit@10"), "MinRank": att.get("min_rank_mean"),
                     "queries": att.get("queries")})
    print_table(rows)
    det = s["scan"].get("detection", {}).get("combined", {})
    if det:
        click.echo(f"scan (combined): AUROC {det['auroc']:.3f}  precision {det['precision']:.3f}  "
                   f"recall {det['recall']:.3f}  flagged {det['flagged']}")
    click.echo(f"outputs and summary.json in {out}")
    click.echo(f"report: {s['report']}")


# ----------------------------------------------------------------------------- datasets / ingest


@cli.group()
def datasets():
    """Build the embedded real datasets (openclipart, fashion-mnist) or a local folder into shards."""


@datasets.command("build")
@click.argument("name", type=click.Choice(["openclipart", "fashion-mnist", "folder"]))
@click.argument("out_positional", metavar="[OUT]", required=False)
@click.option("--out", default=None, help="Output folder (OUT/<split>/ shards); the positional OUT is a deprecated alias.")
@click.option("--splits", default="ref=0.4,train=0.4,test=0.2", show_default=True,
              help="Named splits and fractions; a sample's split is a hash of its source id.")
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Samples per shard.")
@click.option("--image-size", type=int, default=None,
              help="Longest side of stored images (default: openclipart 128, fashion-mnist 64, folder 256).")
@click.option("--source", default=None, metavar="DIR", help="Input folder (default: the Debian package's).")
@click.option("--limit", type=int, default=None, help="Keep a seeded subset of N samples overall.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and subset hashes.")
@dask_options
def datasets_build(name, out_positional, out, splits, shard_size, image_size, source, limit, seed, scheduler, workers):
    """Build dataset NAME into OUT/<split>/ shards, sizes.json and OUT/build_report.json.

    Example: mmsanitize datasets build openclipart --out data/oca/
    """
    out = resolve_out(out, out_positional, "mmsanitize datasets build NAME --out DIR")
    from .datasets import build_dataset

    report = build_dataset(name, out, splits=splits, shard_size=shard_size, image_size=image_size,
                           source=source, limit=limit, seed=seed, scheduler=scheduler, workers=workers)
    splits_ = list(report["counts"])
    classes = sorted({c for s in splits_ for c in report["counts"][s]},
                     key=lambda c: (-sum(report["counts"][s].get(c, 0) for s in splits_), c))
    rows = [{"class": c, **{s: report["counts"][s].get(c, 0) for s in splits_}} for c in classes]
    rows.append({"class": "TOTAL", **report["samples"]})
    print_table(rows, ["class"] + splits_)
    click.echo(f"skipped {len(report['skipped'])} file(s); filtered {sum(report['filtered'].values())}; "
               f"report in {out}/build_report.json")
    for s in report["skipped"][:10]:
        click.echo(f"skipped: {s['source']}: {s['reason']}")


@cli.command()
@click.argument("urls")
@click.argument("out_positional", metavar="[OUT]", required=False)
@click.option("--out", default=None, help="Output folder of the shards (resumable; the positional OUT is a deprecated alias).")
@click.option("--image-size", type=int, default=256, show_default=True)
@click.option("--resize-mode", default="border", show_default=True,
              type=click.Choice(["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"]))
@click.option("--processes", type=int, default=2, show_default=True, help="img2dataset download processes.")
@click.option("--caption-col", default="caption", show_default=True)
@click.option("--url-col", default="url", show_default=True)
@click.option("--keep-columns", default=None, metavar="A,B",
              help="Columns of the list to carry into each sample's json (default: every other column).")
@click.option("--shard-size", type=int, default=10000, show_default=True)
def ingest(urls, out_positional, out, image_size, resize_mode, processes, caption_col, url_col, keep_columns,
           shard_size):
    """Download a URL list (csv/tsv/parquet/txt) into webdataset shards with img2dataset.

    Rerunning into the same --out downloads only URLs not attempted yet (a grown list, or the
    rest of a killed run) into new shards.

    Example: mmsanitize ingest urls.parquet --out data/web/ --image-size 256
    """
    from .ingest import ingest as run_ingest

    out = resolve_out(out, out_positional, "mmsanitize ingest URLS --out DIR")
    keep = None if keep_columns is None else [c.strip() for c in keep_columns.split(",") if c.strip()]
    summary = run_ingest(urls, out, image_size=image_size, resize_mode=resize_mode, processes=processes,
                         caption_col=caption_col, url_col=url_col, keep_columns=keep, shard_size=shard_size)
    print_table([{"shard": k, **v} for k, v in summary["shards"].items()])
    click.echo(f"{summary['successes']} of {summary['attempted']} downloaded; {len(summary['failures'])} failed; "
               f"{summary['new_urls']} new URL(s) this run")
    for f in summary["failures"][:20]:
        click.echo(f"failed: {f['url']}: {f['error']}")
# ----------------------------------------------------------------------------- poison

@cli.command()
@click.argument("shards")
@click.option("--attack", required=True,
              type=click.Choice(["single-image", "single-label", "multi-label", "patch", "blended", "label-consistent"]),
              help="Attack I (single-image), II (single-label), III (multi-label) or a backdoor.")
@click.option("--goal", "goals", multiple=True, metavar="A2B", help="Goal such as dog2boat (repeatable for multi-label).")
@click.option("--source", default=None, help="Class A (whose captions are used); alternative to --goal.")
@click.option("--target", default=None, help="Class B (whose images are used / the backdoor's target class).")
@click.option("--target-key", default=None, help="single-image: key of the target image (default: a random class-B image); with "
                   "--images-from also a pool key (or a folder pool's file path), looked up in the pool first.")
@click.option("--source-fraction", type=float, default=None, help="Fraction of class-A samples to poison (paper's knob; default 1.0).")
@click.option("--count", type=int, default=None, help="Poisoned samples per goal.")
@click.option("--rate", type=float, default=None, help="Poisoned pairs over the whole output dataset, in (0, 1].")
@click.option("--mode", type=click.Choice(["replace", "inject"]), default="replace", show_default=True,
              help="replace: chosen samples carry the new pair (size unchanged); inject: new pairs appended with new keys.")
@click.option("--label-from", default="field", show_default=True,
              help="Who is class A/B: field (json label), keywords[:VOCAB_FILE], column:NAME, or "
                   "zeroshot[:CLASSES] (the image's zero-shot class under --label-model; CLASSES = a vocabulary "
                   "file, openclipart (default) or a comma list; labels cached in OUT/_labels/).")
@click.option("--label-model", default=None, metavar="REF",
              help="Encoder for --label-from zeroshot: a reference checkpoint (mmsanitize align ... --out REF) "
                   "or open_clip:NAME/PRETRAINED.")
@click.option("--label-margin", type=float, default=0.05, show_default=True,
              help="--label-from zeroshot: label 'unknown' when the top class's probability beats the "
                   "runner-up by less than this.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--trigger-size", type=int, default=16, show_default=True, help="Backdoor patch size in px.")
@click.option("--trigger-position", default="bottom-right", show_default=True,
              help="Patch position: bottom-right, bottom-left, top-right, top-left, center or random.")
@click.option("--trigger-pattern", default="checkerboard", show_default=True, help="Patch pattern: checkerboard or noise.")
@click.option("--opacity", type=float, default=0.1, show_default=True, help="Blended backdoor: weight of the noise pattern.")
@click.option("--caption-only", is_flag=True, hidden=True)
@click.option("--images-from", default=None, metavar="SPEC",
              help="Dirty-label attacks: take the class-B (target) images from this pool outside the dataset: "
                   "shards (dir, .tar or {..} pattern) or a folder with captions.csv/.jsonl (file, caption[, label]); "
                   "labelled by --label-from; pool images bytes-equal to a dataset image are excluded. "
                   "Example: --images-from data/web_pool/")
@click.option("--perturb", default=None, metavar="KIND",
              help="Dirty-label attacks: transform every poison copy (seeded per copy) so no two share bytes: "
                   "reencode (JPEG q75-95), resize (x0.8-1.2), crop (80-95%, resized back) or jitter "
                   "(brightness/contrast +-10%, noise). Example: --perturb reencode")
@click.option("--out", required=True, help="Output directory for the poisoned shards, manifest.parquet and poison.json.")
@click.option("--overwrite", is_flag=True, help="Redo every shard even when a previous run finished it.")
@dask_options
def poison(shards, attack, goals, source, target, target_key, source_fraction, count, rate, mode, label_from,
           label_model, label_margin, seed, trigger_size, trigger_position, trigger_pattern, opacity, caption_only, images_from, perturb,
           out, overwrite, scheduler, workers):
    """Write a poisoned copy of a dataset (shards + manifest.parquet + poison.json).

    \b
    Example: mmsanitize poison data/oca/train/ --attack single-label --goal dog2boat --seed 0 --out runs/p/
    Attacker's own, re-encoded images:
      mmsanitize poison data/oca/train/ --attack single-label --goal dog2boat \\
        --images-from data/web_pool/ --perturb reencode --out runs/p-web/
    """
    from .poison import poison_dataset

    res = poison_dataset(shards, out=out, attack=attack, goals=list(goals), source=source, target=target,
                         target_key=target_key, source_fraction=source_fraction, count=count, rate=rate,
                         mode=mode, label_from=label_from, label_model=label_model, label_margin=label_margin,
                         seed=seed, trigger_size=trigger_size,
                         trigger_position=trigger_position, trigger_pattern=trigger_pattern, opacity=opacity,
                         caption_only=caption_only, images_from=images_from, perturb=perturb,
                         scheduler=scheduler, workers=workers, overwrite=overwrite)
    print_table([{"goal": g["goal"], "poisoned samples": g["poisoned"], "rate": f"{g['rate']:.4%}"}
                 for g in res["goals"]])
    c = res["counts"]
    click.echo(f"{c['poisoned']:,} of {c['samples_out']:,} samples poisoned (rate {res['rate']:.4%}, mode {res['mode']})")
    pool = res.get("images_from")
    if pool:
        click.echo(f"images from {pool['spec']}: {pool['usable']:,} usable pool images "
                   f"({pool['excluded_duplicates']:,} copies of dataset images excluded)")
    if res.get("perturb"):
        click.echo(f"every poison copy perturbed: {res['perturb']}")
    lab = res.get("labels")
    if lab:
        click.echo(f"zero-shot labels ({lab['model']}): {lab['labelled']:,} labelled, {lab['unlabelled']:,} unknown "
                   f"(margin {lab['margin']}) -> {out}/{lab['cache']}/")
    click.echo(f"shards: {out}  manifest: {out}/manifest.parquet  spec: {out}/poison.json")


# ----------------------------------------------------------------------------- models / train / evaluate


def train_options(f):
    """Options shared by train, align and defend finetune (`--workers` is a deprecated alias of
    `--loader-workers`: on these verbs it always meant DataLoader workers, not Dask)."""

    @functools.wraps(f)
    def command(*args, **kw):
        alias = kw.pop("workers_alias", None)
        if alias is not None:
            click.echo("warning: --workers on train/align/defend is deprecated; use --loader-workers "
                       "(DataLoader processes; --workers means Dask workers elsewhere)", err=True)
            kw["workers"] = alias
        return f(*args, **kw)

    for opt in reversed([
        click.option("--epochs", type=int, default=10, show_default=True),
        click.option("--batch-size", type=int, default=128, show_default=True),
        click.option("--lr", type=float, default=None,
                     help="Peak learning rate (default 1e-5, the paper's; 1e-3 when only projections train)."),
        click.option("--min-lr", type=float, default=None, help="Cosine floor (default lr/10)."),
        click.option("--wd", "weight_decay", type=float, default=0.2, show_default=True),
        click.option("--warmup", type=int, default=None, help="Warm-up steps (default 10%% of steps, at most 100)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--loader-workers", "workers", type=int, default=1, show_default=True,
                     help="DataLoader worker processes (not Dask)."),
        click.option("--workers", "workers_alias", type=int, default=None, hidden=True),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda (AMP on cuda)."),
        click.option("--resume", is_flag=True, help="Continue after the last finished epoch in --out."),
        click.option("--eval", "eval_test", default=None, metavar="TEST", help="Evaluate on these shards each epoch."),
        click.option("--manifest", default=None, help="Poison manifest for per-epoch attack metrics."),
        click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps (the schedule is unchanged; --resume continues)."),
    ]):
        command = opt(command)
    return command


def _print_train(result):
    for h in result["history"]:
        line = f"epoch {h['epoch']}: loss {h['loss']:.4f}  {h['samples_per_s']:,.0f} samples/s"
        u = (h.get("eval") or {}).get("utility")
        if u:
            line += f"  t2i R@10 {u['t2i_r@10']:.3f}  i2t R@10 {u['i2t_r@10']:.3f}"
        click.echo(line)
    click.echo(f"checkpoint: {result['out']}")


@cli.command("train")
@click.argument("shards")
@click.option("--model", default="tiny", show_default=True,
              help="open_clip:NAME[/PRETRAINED], offline-b0-minilm, tiny, or a checkpoint dir.")
@click.option("--init", default=None, help="Start from this checkpoint directory (overrides --model).")
@click.option("--lock", type=click.Choice(["image", "text", "backbones"]), default=None,
              help="Freeze a whole tower (embeddings and projection included) or all but the projections.")
@click.option("--head-lr", type=float, default=None,
              help="Peak learning rate of the projection layers (default: --lr), e.g. 1e-3 beside a 1e-5 backbone.")
@click.option("--out", required=True, help="Output directory (checkpoints, history.jsonl).")
@train_options
def train_cmd(shards, model, init, lock, out, **kw):
    """Contrastive (InfoNCE) fine-tuning on shards; one checkpoint per epoch.

    Example: mmsanitize train runs/p/ --init runs/ref/ --lock backbones --epochs 10 --out runs/p-model/
    """
    from .train import train

    _print_train(train(shards, out=out, model=model, init=init, lock=lock, **kw))


@cli.command("align")
@click.argument("shards")
@click.option("--out", required=True, help="Output checkpoint directory (the reference model).")
@click.option("--dim", type=int, default=256, show_default=True, help="Shared embedding dimension.")
@click.option("--image-size", type=int, default=96, show_default=True)
@train_options
def align_cmd(shards, out, dim, image_size, lr, **kw):
    """Train the projections of offline-b0-minilm on clean shards (backbones frozen, features cached).

    Example: mmsanitize align data/oca/ref/ --out runs/ref/
    """
    from .train import align

    _print_train(align(shards, out=out, dim=dim, image_size=image_size, lr=lr or 1e-3, **kw))


@cli.group("defend")
def defend():
    """Post-training defenses."""


@defend.command("finetune")
@click.argument("poisoned_ckpt")
@click.option("--clean", required=True, help="Clean shards to keep fine-tuning on.")
@click.option("--lock", type=click.Choice(["image", "text", "backbones"]), default=None)
@click.option("--out", required=True)
@train_options
def defend_finetune_cmd(poisoned_ckpt, clean, lock, out, **kw):
    """Sterilising fine-tune (paper 5.2): train the poisoned checkpoint further on clean data.

    Example: mmsanitize defend finetune runs/p-model/ --clean data/fm/train/ --epochs 2 --eval data/oca/test/ --manifest runs/p/manifest.parquet --out runs/p-def/
    """
    from .train import defend_finetune

    _print_train(defend_finetune(poisoned_ckpt, clean=clean, out=out, lock=lock, **kw))


@cli.command("evaluate")
@click.argument("checkpoint")
@click.option("--test", required=True, help="Test shards.")
@click.option("--manifest", default=None,
              help="Poison manifest.parquet: adds attack success per goal (backdoors: ASR with the trigger "
                   "of the poison.json beside it).")
@click.option("--out", default=None, help="Write metrics.json here.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random-caption baseline.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate_cmd(checkpoint, test, manifest, out, device, seed, as_json):
    """Retrieval Recall@K, attack MinRank / Hit@K and backdoor success rate of a checkpoint on test shards.

    Example: mmsanitize evaluate runs/p-model/ --test data/oca/test/ --manifest runs/p/manifest.parquet --out metrics.json
    """
    from .evaluate import evaluate, metrics_rows

    result = evaluate(checkpoint, test=test, manifest=manifest, out=out, device=device, seed=seed)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    u = result["utility"]
    click.echo(f"{result['model']}: {u['images']} test images, {u['captions']} captions "
               f"(chance R@10 {u['chance_r@10']:.3f})")
    rows = metrics_rows(result)
    print_table(rows, list(dict.fromkeys(c for r in rows for c in r)))
    for goal, r in (result.get("attacks") or {}).items():
        if r.get("error"):
            click.echo(f"{goal}: {r['error']}")
        elif r.get("target_in_gallery") is False:
            click.echo(f"{goal}: target image not in the test gallery; it was embedded and added to it")
    for goal, r in (result.get("backdoor") or {}).items():
        if r.get("error"):
            click.echo(f"{goal}: backdoor not measured: {r['error']}")
            continue
        t, c = r["triggered"], r["untriggered"]
        click.echo(f"{goal}: backdoor ({r['attack']} -> {r['target_class']}) on {r['images']} test images: "
                   f"ASR i2t@10 {t['i2t_asr@10']:.3f} (untriggered {c['i2t_asr@10']:.3f}), "
                   f"zero-shot {t['zeroshot_asr']:.3f} (untriggered {c['zeroshot_asr']:.3f}, "
                   f"chance {r['chance_zeroshot']:.3f})")
    if out:
        click.echo(f"wrote {out}")


# ----------------------------------------------------------------------------- embed / scan / sanitize


@cli.command()
@click.argument("shards")
@click.option("--model", required=True, help="Encoder: tiny, offline-b0-minilm, open_clip:NAME[/PRETRAINED] or a checkpoint dir.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (clip-retrieval layout).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--overwrite", is_flag=True, help="Recompute shards that are already done.")
@dask_options
def embed(shards, model, out, batch_size, overwrite, scheduler, workers):
    """Embed image-text pairs into img_emb/, text_emb/, metadata/ (float16, L2-normalised).

    Example: mmsanitize embed runs/p/ --model runs/ref/ --out runs/p-emb/
    """
    from .embed import embed as run

    s = run(shards, model=model, out=out, batch_size=batch_size, overwrite=overwrite,
            scheduler=scheduler, workers=workers)
    click.echo(f"{s['samples']:,} samples in {s['shards']} shard(s) embedded with {s['model']} "
               f"({len(s['skipped'])} already done) -> {out}")


@cli.command()
@click.argument("shards")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Scan output folder.")
@click.option("--threshold", default=None, metavar="T|auto",
              help="Flag pairs with image-text cosine below T (in [-1, 1]); 'auto' fits a 2-component mixture "
                   "and also flags pairs whose image confidently shows another class than the caption names.")
@click.option("--flag-fraction", type=float, default=None, help="Flag the worst fraction by combined score.")
@click.option("--embeddings", default=None, type=click.Path(file_okay=False), help="Precomputed embeddings: mmsanitize embed output or a clip-retrieval folder (img_emb/, text_emb/, metadata/ with image_path), joined to the shards by key.")
@click.option("--model", default=None, help="Reference encoder (computes embeddings when --embeddings is absent).")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False), help="Poison manifest: report precision/recall/AUROC.")
@click.option("--detectors", default="similarity,class_consistency,image_reuse", show_default=True,
              help="Comma list of similarity, class_consistency, image_reuse, caption_neighbours, density, kdistance "
                   "(density, kdistance: scan with the suspect model, Huang et al.).")
@click.option("--classes", default="auto", show_default=True,
              help="Class vocabulary for class_consistency: auto (the dataset's label names as caption keywords), "
                   "openclipart, a vocabulary file (`class: word, word` lines or JSON) or a comma list.")
@click.option("--combine", type=click.Choice(["stouffer", "zsum", "mean", "max"]), default="stouffer",
              show_default=True,
              help="stouffer: sum of the normal quantiles of each detector's empirical p-value; zsum: sum of "
                   "robust z-scores; mean/max: of ranks.")
@click.option("--reuse-min", default="auto", show_default=True,
              help="Flag pairs whose image is shared with at least this many other captions and whose "
                   "caption fits it worse than the median pair; auto = 1 + the median count (0 = off).")
@click.option("-k", "--neighbours", "k", type=int, default=10, show_default=True)
@click.option("--index", "index_kind", type=click.Choice(["auto", "exact", "ivf", "hnsw"]), default="auto", show_default=True)
@click.option("--knn-reference", type=int, default=200_000, show_default=True,
              help="caption_neighbours, density and kdistance look for neighbours among a seeded sample of this "
                   "many pairs when the dataset is larger (Huang et al.'s reference set); 0 = among all pairs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
@click.option("--allow-untrained", is_flag=True,
              help="Scan with a model whose weights were never trained (its cosines are noise).")
@dask_options
def scan(shards, out, threshold, flag_fraction, embeddings, model, manifest, detectors, classes, combine, reuse_min,
         k, index_kind, knn_reference, seed, overwrite, scheduler, workers, allow_untrained):
    """Score every pair with the detectors and flag suspicious ones.

    Example: mmsanitize scan runs/p/ --model runs/ref/ --threshold auto --manifest runs/p/manifest.parquet --out runs/p-scan/
    """
    from .scan import scan as run

    s = run(shards, out=out, threshold=threshold, flag_fraction=flag_fraction, embeddings=embeddings, model=model,
            manifest=manifest, detectors=tuple(d.strip() for d in detectors.split(",") if d.strip()),
            combine=combine, classes=classes, reuse_min=reuse_min, k=k, index_kind=index_kind,
            knn_reference=knn_reference, seed=seed, overwrite=overwrite, scheduler=scheduler, workers=workers,
            allow_untrained=allow_untrained)
    for line in s.get("warnings", []):
        click.echo(f"warning: {line}", err=True)
    thr = s["thresholds"].get("similarity")
    click.echo(f"flagged {s['flagged']:,} of {s['samples']:,} pairs ({s['fraction_flagged']:.2%})"
               + (f"; cosine threshold {thr:.4f}" if thr is not None else "") + f" -> {out}")
    for name, why in s.get("detector_state", {}).get("skipped", {}).items():
        click.echo(f"{name} skipped: {why}")
    det = s.get("detection")
    if det:
        print_table([{"detector": name, **{m: v for m, v in det[name].items()}}
                     for name in [*s["detectors"], "combined"]])


@cli.command()
@click.argument("shards")
@click.option("--scan", "scan_dir", default=None, type=click.Path(file_okay=False),
              help="Folder written by mmsanitize scan: drop its flagged pairs.")
@click.option("--verify", "verify_dir", default=None, type=click.Path(file_okay=False),
              help="Folder written by mmsanitize verify: drop samples whose URL now serves other bytes.")
@click.option("--drop", default="changed", show_default=True, metavar="STATUS[,STATUS]",
              help="With --verify: the statuses to drop (changed, gone, error, unverifiable).")
@click.option("--drop-label", "drop_labels", multiple=True, metavar="LABEL",
              help="Drop every sample whose json `label` is LABEL (repeatable), e.g. a clean split without "
                   "the attacked class.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the cleaned shards.")
@dask_options
def sanitize(shards, scan_dir, verify_dir, drop, drop_labels, out, scheduler, workers):
    """Copy the shards without the pairs a scan flagged, a verify found changed and/or of a label
    (raw bytes, resumable) + removed.parquet.

    \b
    Example: mmsanitize sanitize runs/p/ --scan runs/p-scan/ --out runs/p-clean/
    Split-view check: mmsanitize sanitize data/web/ --verify runs/web-verify/ --drop changed,gone --out data/web-ok/
    Without a class: mmsanitize sanitize data/oca/ref/ --drop-label food --out data/oca/ref_nofood/
    """
    from .sanitize import sanitize as run

    s = run(shards, scan=scan_dir, verify=verify_dir, drop=tuple(d.strip() for d in drop.split(",") if d.strip()),
            drop_labels=drop_labels, out=out, scheduler=scheduler, workers=workers)
    by = [f"{s[k]:,} by {what}" for k, what in (("removed_by_verify", "verify"), ("removed_by_label", "label"))
          if k in s]
    by_what = f" ({', '.join(by)})" if by else ""
    click.echo(f"kept {s['kept']:,}, removed {s['removed']:,} pairs{by_what} in {s['shards']} shard(s) -> {out}"
               + (f"; dropped {s['invalid']:,} invalid sample(s) (undecodable image or no caption)"
                  if s.get("invalid") else ""))


@cli.command()
@click.argument("shards")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for verify.parquet and summary.json.")
@click.option("--concurrency", type=int, default=8, show_default=True, help="Connections at once per Dask worker.")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds per request.")
@click.option("--retries", type=int, default=2, show_default=True, help="Retries of timeouts, refused connections, 5xx/429.")
@click.option("--overwrite", is_flag=True, help="Fetch again shards an earlier run verified.")
@dask_options
def verify(shards, out, concurrency, timeout, retries, overwrite, scheduler, workers):
    """Split-view check: re-fetch every sample's URL and compare with the sha256 recorded at download.

    Reports unchanged, changed (other bytes now), gone (404/410), error and unverifiable samples in
    OUT/verify.parquet and OUT/summary.json (Carlini et al. 2023).

    Example: mmsanitize verify data/web/ --out runs/web-verify/
    """
    from .verify import verify as run

    s = run(shards, out=out, concurrency=concurrency, timeout=timeout, retries=retries, overwrite=overwrite,
            scheduler=scheduler, workers=workers)
    print_table([{"status": k, "samples": v} for k, v in s["counts"].items()])
    click.echo(f"{s['samples']:,} samples in {s['shards']} shard(s) checked -> {out}/verify.parquet")
    if s["counts"]["changed"]:
        click.echo(f"{s['counts']['changed']} URL(s) now serve other bytes: "
                   f"mmsanitize sanitize {shards} --verify {out} --drop changed --out CLEAN")


EXIT_USAGE = 2  # bad input or request: MmsanitizeError, click usage errors
EXIT_INTERNAL = 3  # a bug: one line + the path of a log file holding the traceback


@cli.command()
@click.argument("scan_dir", type=click.Path(file_okay=False))
@click.argument("runs", nargs=-1, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The HTML file to write (a CSV of every flagged pair goes beside it).")
@click.option("--shards", default=None, help="The scanned shards (thumbnails, URLs, shared-image groups).")
@click.option("--manifest", default=None, type=click.Path(dir_okay=False), help="Poison manifest: ROC curves and a poisoned mark.")
@click.option("--top", type=int, default=100, show_default=True, help="Flagged pairs shown in the gallery.")
@click.option("--verify", "verify_dir", default=None, type=click.Path(file_okay=False),
              help="A mmsanitize verify folder: adds the split-view section (changed and gone URLs).")
def report(scan_dir, runs, out, shards, manifest, top, verify_dir):
    """One self-contained HTML page of a scan and of evaluate runs (RUNS: metrics .json files or folders).

    Example: mmsanitize report runs/p-scan/ runs/p-metrics.json --shards runs/p/ --manifest runs/p/manifest.parquet --out report.html
    """
    from .report import build_report

    r = build_report(scan_dir, runs, out=out, shards=shards, manifest=manifest, top=top, verify=verify_dir)
    click.echo(f"{r['shown']} of {r['flagged']:,} flagged pairs on the page ({r['images']} thumbnails, "
               f"{r['groups']} shared-image groups, {r['runs']} runs) -> {r['html']}; all flagged: {r['csv']}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: every failure ends as one line on stderr.

    MmsanitizeError (and a full disk) -> `error: ...`, exit 2; an unexpected exception ->
    `internal error: ... (traceback in LOG)`, exit 3. Control characters are escaped.
    """
    import errno as errno_

    from .errors import escape, log_traceback

    try:
        cli.main(args=argv, prog_name="mmsanitize", standalone_mode=False)
    except MmsanitizeError as e:
        click.echo(f"error: {escape(e)}", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as e:
        if e.errno in (errno_.ENOSPC, errno_.EDQUOT, errno_.EIO, errno_.EROFS):
            from .engine import disk_error

            click.echo(f"error: {escape(disk_error(e))}", err=True)
            sys.exit(EXIT_USAGE)
        _internal(e, log_traceback)
    except Exception as e:  # noqa: BLE001 - a bug: one line, the traceback goes to a log file
        _internal(e, log_traceback)


def _internal(e: BaseException, log_traceback) -> None:
    import traceback

    from .errors import escape

    path = log_traceback("".join(traceback.format_exception(e)))
    first = escape(str(e).splitlines()[0] if str(e) else "")[:300]
    click.echo(f"internal error: {type(e).__name__}: {first} (traceback in {path})", err=True)
    sys.exit(EXIT_INTERNAL)
