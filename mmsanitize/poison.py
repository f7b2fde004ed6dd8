"""`poison`: plan an attack once from the catalog, then rewrite every shard in one Dask task each.

Output: shards with the input's names and layout (+ `sizes.json`), `manifest.parquet` (one row
per poisoned sample) and `poison.json` (spec, seed, counts, rate). Per-shard sha256 lists live in
`_poison_parts/` while the run is in progress and are removed once the manifest is written, so
the finished shards carry no mark of what was poisoned. With `images_from`, the image pool's
temporary shards (folder pools) and catalog live in `_poison_pool/`, removed at the end too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path

from .errors import ShardError, UsageError

ATTACKS = ("single-image", "single-label", "multi-label", "patch", "blended", "label-consistent")
JPEG_QUALITY = 95
PARTS = "_poison_parts"
POOL_WORK = "_poison_pool"
LABELS_WORK = "_labels"  # zero-shot labels and their image embeddings, reused by reruns
DIRTY_LABEL = ("single-image", "single-label", "multi-label")
# json fields that describe the image rather than the caption (copied from the image's sample)
IMAGE_FIELDS = ("label", "url", "original_width", "original_height", "exif", "md5")


@dataclass(frozen=True)
class PoisonTask:
    """Rewrite input shard `src` into `out_dir/name.tar` applying `edits`."""

    name: str
    src: str
    out_dir: str
    edits: tuple
    spec_hash: str
    # (origin, shard path, key, offset, end, width, height) of every sample the edits take an image
    # or a json from, as catalogued: read by the task itself, so no sample's bytes pass through
    # the client
    reads: tuple = ()
    catalog: str | None = None  # the dataset's catalog folder: the shard is spliced from its layout there


def image_ref(edit) -> tuple[str, str, str]:
    """(origin, shard, key) of the sample whose image an edit carries (how `sources` are keyed)."""
    return (edit.image_origin, *edit.image_source)


def template_ref(edit) -> tuple[str, str, str]:
    """(origin, shard, key) of the dataset sample whose json an edit's json is based on."""
    return ("dataset", *edit.template)


# --------------------------------------------------------------------------- per-shard work


def _range_members(blob: bytes, key: str, shard: str) -> list:
    """The members of sample `key` in its byte range `blob`, read with the general tar reader;
    [] when the range holds anything else."""
    from .shards import BLOCK, iter_tar, split_name

    members = []
    try:
        for member, data in iter_tar(io.BytesIO(blob + bytes(2 * BLOCK)), shard):
            name, ext = split_name(member.name, shard)
            if name != key:
                return []
            members.append((member, ext, data))
    except ShardError:  # not a sample's members at all: reported with its key by the caller
        return []
    return members


def read_ranges(path: str, keys, ranges) -> dict:
    """Samples `keys` of shard `path` as parsed Samples, each read from its catalogued byte range
    (offset, end) with one positioned read. Raises ShardError when a range does not hold exactly
    that sample (the shard changed since it was catalogued)."""
    from .shards import RawSample, parse_sample, plain_sample_members

    shard = Path(path).name
    out = {}
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ShardError(shard, f"cannot open: {e.strerror}") from None
    try:
        for key, (start, end) in zip(keys, ranges):
            blob = os.pread(fd, end - start, start)
            members = None
            if len(blob) == end - start:  # the usual tar headers parsed directly, else the general reader
                members = plain_sample_members(blob, key) or _range_members(blob, key, shard)
            if not members:
                raise ShardError(shard, "sample named by the poison plan is not where the catalog says (input changed?)",
                                 key=key)
            out[key] = parse_sample(RawSample(key, members), shard)
    finally:
        os.close(fd)
    return out


def _trigger_pixels(trigger, height: int, width: int):
    import numpy as np

    rng = np.random.default_rng([trigger.seed, 7])
    if trigger.kind == "blended":
        return rng.integers(0, 256, size=(height, width, 3)).astype(np.float32)
    s = trigger.size
    if trigger.pattern == "noise":
        return rng.integers(0, 256, size=(s, s, 3)).astype(np.float32)
    cell = max(1, s // 4)
    yy, xx = np.mgrid[0:s, 0:s]
    board = (((yy // cell) + (xx // cell)) % 2 * 255).astype(np.float32)
    return np.repeat(board[:, :, None], 3, axis=2)


def apply_trigger(image: bytes, ext: str, trigger, shard: str = "?", key: str = "?") -> tuple[bytes, str]:
    """Decode an image, stamp (patch) or blend the trigger, re-encode (JPEG quality 95, else PNG).

    Returns (bytes, extension). Deterministic for the same input and trigger.
    """
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32).copy()
    except Exception as e:
        raise ShardError(shard, f"undecodable image ({type(e).__name__}: {e})", key=key) from None
    h, w = arr.shape[:2]
    pix = _trigger_pixels(trigger, h, w)
    if trigger.kind == "blended":
        arr = (1 - trigger.opacity) * arr + trigger.opacity * pix
    else:
        s = min(trigger.size, w, h)
        x, y = min(trigger.x, w - s), min(trigger.y, h - s)
        arr[y:y + s, x:x + s] = pix[:s, :s]
    out = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    if ext in ("jpg", "jpeg"):
        out.save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue(), ext
    out.save(buf, format="PNG")
    return buf.getvalue(), "png"


def rewrite_meta(template: dict | None, image_meta: dict | None, *, key: str, caption: str,
                 image: bytes, width: int, height: int) -> dict | None:
    """The json of a poisoned sample: the template's field set, with every field describing the
    image (size, hash, label, url...) taken from the new image, and key/caption updated."""
    from .shards import sha256

    if template is None:
        return None
    image_meta = image_meta or {}
    meta = dict(template)
    for f in meta:
        if f == "key":
            meta[f] = key
        elif f == "caption":
            meta[f] = caption
        elif f == "sha256":
            meta[f] = sha256(image)
        elif f == "width":
            meta[f] = width
        elif f == "height":
            meta[f] = height
        elif f in ("original_width", "original_height"):
            meta[f] = image_meta.get(f, width if f == "original_width" else height)
        elif f in IMAGE_FIELDS:
            meta[f] = image_meta.get(f)
    return meta


def read_sources(reads) -> dict:
    """The samples named by a PoisonTask's `reads`, keyed (origin, shard file name, key): one
    `read_ranges` per source shard."""
    by_path: dict = {}
    for origin, path, key, start, end, *_ in reads:
        by_path.setdefault((origin, path), []).append((key, (start, end)))
    samples = {}
    for (origin, path), items in by_path.items():
        got = read_ranges(path, [k for k, _ in items], [r for _, r in items])
        samples.update({(origin, Path(path).name, k): s for k, s in got.items()})
    return samples


def poison_shard(task: PoisonTask) -> dict:
    """Dask task: read the samples the shard's edits take images and json from (`task.reads`, at
    their catalogued byte ranges), build the poisoned samples, splice them into a copy of the shard.

    A trigger is stamped (backdoors) or the per-copy perturbation applied (`--perturb`) here.
    Writes `_poison_parts/NAME.json` (key -> sha256 of the stored image) before the shard's stats.
    Returns the shard stats plus `poisoned` and `sha256`.
    """
    from .attacks.perturb import perturb_image
    from .catalog import shard_layout
    from .shards import (Sample, file_fingerprint, image_size, rewrite_from_layout, rewrite_shard, sha256,
                         write_json_atomic)

    samples = read_sources(task.reads)
    sizes = {(origin, Path(path).name, key): (w, h) for origin, path, key, _, _, w, h in task.reads}
    replace, append, hashes = {}, [], {}
    for e in task.edits:
        src = samples[image_ref(e)]
        image, ext = src.image, src.image_ext
        if e.trigger is not None:
            image, ext = apply_trigger(image, ext, e.trigger, e.image_source[0], e.image_source[1])
        if e.perturb is not None:
            image, ext = perturb_image(image, ext, e.perturb, e.image_source[0], e.image_source[1])
        if e.trigger is None and e.perturb is None:  # the stored image, decoded when it was catalogued
            w, h = sizes[image_ref(e)]
        else:
            w, h = image_size(image, e.image_source[0], e.image_source[1])
        tmpl = samples[template_ref(e)]
        meta = rewrite_meta(tmpl.meta, src.meta, key=e.key, caption=e.caption, image=image, width=w, height=h)
        sample = Sample(e.key, image, ext, e.caption, meta, dict(tmpl.extras))
        if e.replaces is not None:
            replace[e.replaces] = sample
        else:
            append.append(sample)
        hashes[e.key] = sha256(image)
    parts = Path(task.out_dir) / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    write_json_atomic(parts / f"{task.name}.json", {"spec": task.spec_hash, "sha256": hashes})
    extra = {"input": file_fingerprint(task.src), "spec": task.spec_hash}
    layout = shard_layout(task.src, task.catalog) if task.catalog is not None else None
    stats = None
    if layout is not None:  # untouched samples copied by byte ranges, the shard not parsed again (same bytes)
        stats = rewrite_from_layout(task.src, task.out_dir, task.name, layout, replace=replace, append=append,
                                    stats_extra=extra)
    if stats is None:
        stats = rewrite_shard(task.src, task.out_dir, task.name, replace=replace, append=append, stats_extra=extra)
    return {**stats, "poisoned": len(task.edits), "sha256": hashes}


def _shard_done(task: PoisonTask) -> dict | None:
    from .shards import file_fingerprint, outputs_done, read_stats

    if read_stats(task.out_dir, task.name) is None:  # not written yet: no need to hash the input
        return None
    stats = outputs_done(task.out_dir, task.name, input=file_fingerprint(task.src), spec=task.spec_hash)
    if stats is None:
        return None
    try:
        part = json.loads((Path(task.out_dir) / PARTS / f"{task.name}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if part.get("spec") != task.spec_hash:
        return None
    return {**stats, "poisoned": len(task.edits), "sha256": part["sha256"]}


# --------------------------------------------------------------------------- planning


def parse_goal(text: str) -> tuple[str, str]:
    """`dog2boat` -> ("dog", "boat"). Raises UsageError for anything else."""
    m = re.fullmatch(r"(.+?)2(.+)", text.strip())
    if not m or not m.group(1) or not m.group(2):
        raise UsageError(f"goal {text!r} is not of the form A2B (e.g. dog2boat)")
    return m.group(1), m.group(2)


def _goals(attack: str, goals, source, target, target_key) -> tuple[tuple[str, str], ...]:
    parsed = [parse_goal(g) for g in goals]
    if source is not None or target is not None:
        if parsed:
            raise UsageError("give goals either as --goal A2B or as --source/--target, not both")
        if attack in ("patch", "blended", "label-consistent"):
            if target is None:
                raise UsageError(f"{attack} needs --target CLASS")
            parsed = [(source or "", target)]
        elif attack == "single-image" and target is None and target_key is not None:
            if source is None:
                raise UsageError("single-image needs --source CLASS")
            parsed = [(source, "")]
        else:
            if source is None or target is None:
                raise UsageError(f"{attack} needs both --source and --target (or --goal A2B)")
            parsed = [(source, target)]
    if not parsed:
        raise UsageError("no goal given: use --goal A2B or --source A --target B")
    return tuple(parsed)


def _lenient_masks(catalog, classes, label_from: str) -> dict:
    """class_masks, but a class without samples gets an all-False mask instead of an error."""
    import numpy as np

    from .labels import class_masks

    masks = {}
    for c in classes:
        try:
            masks[c] = class_masks(catalog, [c], label_from)[c]
        except UsageError as e:
            if not str(e).startswith("unknown class"):
                raise
            masks[c] = np.zeros(len(catalog), dtype=bool)
    return masks


def make_plan(catalog, spec, label_from: str = "field", pool_catalog=None):
    """Resolve the classes a spec names and run its attack: returns a PoisonPlan (pure, seeded).

    With `pool_catalog` (dirty-label attacks; the usable rows of the image pool) the class-B
    images come from the pool, labelled by the same `label_from` rule; class B then need not
    exist in the dataset, class A must.
    """
    from .attacks.backdoor import plan_backdoor
    from .attacks.multi_label import plan_multi_label
    from .attacks.plan import ImagePool
    from .attacks.single_image import plan_single_image
    from .attacks.single_label import plan_single_label
    from .labels import class_masks, known_classes

    for a, b in spec.goals:
        if a == b:
            raise UsageError(f"goal {a}2{b}: source and target class are the same")
    classes = list(dict.fromkeys(c for g in spec.goals for c in g if c))
    planner = {"single-image": plan_single_image, "single-label": plan_single_label,
               "multi-label": plan_multi_label, "patch": plan_backdoor, "blended": plan_backdoor,
               "label-consistent": plan_backdoor}[spec.attack]
    if pool_catalog is None:
        return planner(catalog, spec, class_masks(catalog, classes, label_from))
    sources = list(dict.fromkeys(a for a, _ in spec.goals if a))
    masks = {**_lenient_masks(catalog, classes, label_from), **class_masks(catalog, sources, label_from)}
    pool_masks = _lenient_masks(pool_catalog, classes, label_from)
    for a, b in spec.goals:
        if b and not pool_masks[b].any() and not (spec.attack == "single-image" and spec.target_key):
            known = known_classes(pool_catalog, label_from)
            listing = ", ".join(f"{k} ({v})" for k, v in list(known.items())[:30]) or "none"
            raise UsageError(f"the image pool has no class-{b} image (labels from {label_from}); "
                             f"pool classes: {listing}")
    return planner(catalog, spec, masks, pool=ImagePool(pool_catalog, pool_masks))


def _source_rows(catalog, refs: set) -> dict:
    """(shard, key) -> (offset, end, width, height) from the catalog, for the samples `refs` only."""
    import numpy as np

    keys = {k for _, k in refs}  # set lookups: ~3x faster than Series.isin over millions of keys
    sub = catalog.iloc[np.flatnonzero(np.fromiter(map(keys.__contains__, catalog["key"].to_numpy()), bool,
                                                  len(catalog)))]
    return {(s, k): (int(o), int(e), int(w), int(h))
            for s, k, o, e, w, h in sub[["shard", "key", "offset", "end", "width", "height"]].itertuples(index=False)
            if (s, k) in refs}


def _edit_dict(edit) -> dict:
    """`dataclasses.asdict(edit)` for an Edit (its fields are strings, numbers, tuples of them and
    small dataclasses), without asdict's deep copy of every value: seconds at 100,000s of edits."""
    return {f.name: asdict(v) if is_dataclass(v := getattr(edit, f.name)) else v for f in fields(edit)}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_columns(attack: str, label_from: str, *, need_sha256: bool) -> list[str] | None:
    """The catalog columns planning reads (None: all of them, for `column:NAME` naming a column
    the catalog may not have, so that the error lists the columns)."""
    from .catalog import COLUMNS

    # label: `field`, and `keywords`' class list; width/height: trigger positions, and the sizes of
    # the images that move unchanged (the tasks then need not decode them again)
    columns = ["key", "shard", "caption", "label", "offset", "end", "width", "height"]
    if need_sha256:
        columns.append("sha256")
    if label_from.startswith("column:"):
        name = label_from.split(":", 1)[1]
        if name not in COLUMNS:
            return None
        columns.append(name)
    return list(dict.fromkeys(columns))


def _remove_pool_work(out_dir: Path, remove_out: bool) -> None:
    """Remove the image pool's work area (and `out_dir` itself when this run created it and it is empty)."""
    shutil.rmtree(out_dir / POOL_WORK, ignore_errors=True)
    if remove_out:
        try:
            out_dir.rmdir()
        except OSError:
            pass


def _check_distinct(rows: list[dict], edits: list, catalog, pool, perturb: str) -> None:
    """Raise ShardError when two perturbed copies, or a copy and its source, share bytes."""
    seen: dict[str, str] = {}
    source_sha = {}
    for origin, cat in (("dataset", catalog), ("pool", pool.catalog if pool is not None else None)):
        keys = {e.image_source[1] for e in edits if e.image_origin == origin}
        if cat is not None and keys:
            sub = cat[cat["key"].isin(keys)]
            source_sha.update({(origin, s, k): h for s, k, h in sub[["shard", "key", "sha256"]].itertuples(index=False)})
    for r, e in zip(rows, edits):
        if r["sha256"] == source_sha.get(image_ref(e)):
            raise ShardError(r["shard"], f"--perturb {perturb}: the copy equals its source image", key=r["key"])
        if r["sha256"] in seen:
            raise ShardError(r["shard"], f"--perturb {perturb}: two copies came out byte-identical "
                             f"(with {seen[r['sha256']]}); the image is too small to mark", key=r["key"])
        seen[r["sha256"]] = r["key"]


def _check_out(out: Path, in_root: Path, input_names: set[str]) -> None:
    out_r, in_r = out.resolve(), in_root.resolve()
    if out_r == in_r or in_r in out_r.parents:
        raise UsageError(f"output directory {out} is the input directory or inside it")
    if out_r.exists() and not out_r.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    if out_r.is_dir():
        foreign = sorted(p.name for p in out_r.glob("*.tar") if p.name not in input_names)
        if foreign:
            raise UsageError(f"output directory {out} holds shards of another dataset ({foreign[0]}); "
                             "choose an empty or previous poison output directory")


def poison_dataset(
    shards: str,
    *,
    out: str,
    attack: str,
    goals: list[str] | tuple = (),
    source: str | None = None,
    target: str | None = None,
    target_key: str | None = None,
    source_fraction: float | None = None,
    count: int | None = None,
    rate: float | None = None,
    mode: str = "replace",
    label_from: str = "field",
    label_model: str | None = None,
    label_margin: float = 0.05,
    seed: int = 0,
    trigger_size: int = 16,
    trigger_position: str = "bottom-right",
    trigger_pattern: str = "checkerboard",
    opacity: float = 0.1,
    caption_only: bool = False,
    images_from: str | None = None,
    perturb: str | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    retries: int = 1,
    overwrite: bool = False,
) -> dict:
    """Write a poisoned copy of the dataset `shards` to `out`; returns the poison.json content.

    `attack` is one of ATTACKS; goals are `["dog2boat", ...]` or `source`/`target`. The amount is
    `count` (per goal), `rate` (pairs over the output dataset) or `source_fraction` (of class A;
    default 1.0 for dirty-label attacks). `mode` is `replace` (same size, keys kept) or `inject`
    (new pairs appended with new keys). `caption_only` (internal; dirty-label attacks) makes the
    pairs by giving class-B samples class-A captions, so no image moves.
    `images_from` (dirty-label attacks): shards or a `folder`-layout folder whose images are the
    class-B images instead of the dataset's (samples bytes-equal to a dataset image excluded);
    `perturb` (dirty-label attacks): `reencode`, `resize`, `crop` or `jitter`, applied to every
    poison copy with its own seed so no two copies share bytes (see `attacks/perturb.py`).
    `label_from` `zeroshot[:CLASSES]` labels the images with `label_model` (see `labels.py`,
    `unknown` under `label_margin`), cached in `out/_labels/`; poison.json records the coverage.
    A rerun resumes: shards whose stats match the input fingerprint and the plan are skipped
    (`overwrite` redoes all). Raises UsageError for bad requests before anything is written.
    """
    from .attacks.perturb import Perturbation, check_kind
    from .attacks.plan import MODES, AttackSpec
    from .catalog import catalog_parts, content_hash, read_catalog
    from .engine import map_shards
    from .shards import expand_shards, shard_stem, write_json_atomic, write_parquet_atomic, write_sizes

    if attack not in ATTACKS:
        raise UsageError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    if mode not in MODES:
        raise UsageError(f"--mode must be replace or inject, not {mode!r}")
    if sum(x is not None for x in (count, rate)) + (source_fraction is not None) > 1:
        raise UsageError("give only one of --source-fraction, --count, --rate")
    if rate is not None and not 0 < rate <= 1:
        raise UsageError(f"--rate must be in (0, 1], got {rate}")
    if source_fraction is not None and not 0 < source_fraction <= 1:
        raise UsageError(f"--source-fraction must be in (0, 1], got {source_fraction}")
    if count is not None and count < 1:
        raise UsageError(f"--count must be at least 1, got {count}")
    if caption_only and (attack not in ("single-label", "multi-label") or mode != "replace"):
        raise UsageError("caption-only plans exist for single-label/multi-label in replace mode only")
    check_kind(perturb)
    for name, value in (("--images-from", images_from), ("--perturb", perturb)):
        if value is not None and attack not in DIRTY_LABEL:
            raise UsageError(f"{name} applies to the dirty-label attacks ({', '.join(DIRTY_LABEL)}), not {attack}")
        if value is not None and caption_only:
            raise UsageError(f"{name} cannot be combined with caption-only plans (no image moves)")
    if images_from is not None and not str(images_from).strip():
        raise UsageError("--images-from needs a folder or shard spec")
    from .labels import _check_label_from, is_zeroshot

    _check_label_from(label_from)
    if is_zeroshot(label_from) and images_from is not None:
        raise UsageError("--label-from zeroshot labels the dataset only, not an --images-from pool; "
                         "label the pool by field, keywords or column")
    paths = expand_shards(shards)
    in_root = paths[0].parent
    names = [shard_stem(p) for p in paths]
    out_dir = Path(out)
    _check_out(out_dir, in_root, {p.name for p in paths})
    from .outputs import check_seed, claim_out, input_bytes, mark_out

    check_seed(seed)
    claim_out(out_dir, "poison", paths, overwrite=overwrite, need_bytes=input_bytes(paths) * 11 // 10,
              mark=False, scratch=(POOL_WORK,))
    if images_from is not None:
        from .attacks.pool import pool_roots

        for root in pool_roots(str(images_from)):
            out_r, root_r = out_dir.resolve(), root.resolve()
            if out_r == root_r or root_r in out_r.parents:
                raise UsageError(f"output directory {out} is the --images-from directory or inside it")
            if out_r in root_r.parents:
                raise UsageError(f"--images-from {images_from} is inside the output directory {out}")
    goal_pairs = _goals(attack, goals, source, target, target_key)
    spec = AttackSpec(attack=attack, goals=goal_pairs, mode=mode, seed=int(seed),
                      source_fraction=source_fraction, count=count, rate=rate, target_key=target_key,
                      trigger_size=int(trigger_size), trigger_position=trigger_position,
                      trigger_pattern=trigger_pattern, opacity=float(opacity), caption_only=caption_only)
    parts = catalog_parts(paths, scheduler=scheduler, workers=workers, retries=retries)
    # the plan reads the captions of the poisoned rows only, unless the labels come from captions
    captions_label = label_from.startswith("keywords") or label_from == "column:caption"
    catalog = read_catalog(parts, plan_columns(attack, label_from, need_sha256=bool(
        images_from is not None or perturb is not None or is_zeroshot(label_from))),
        arrow_strings=() if captions_label else ("caption",))
    labelling = None
    if is_zeroshot(label_from):
        from .labels import attach_zeroshot, label_summary

        catalog = attach_zeroshot(catalog, paths, label_from, label_model=label_model, cache_dir=out_dir / LABELS_WORK,
                                  margin=label_margin, scheduler=scheduler, workers=workers, retries=retries)
        labelling = {"model": label_model, "margin": label_margin, "cache": LABELS_WORK,
                     **label_summary(catalog["zeroshot_label"])}
    pool = None
    pool_work = out_dir / POOL_WORK
    created_out = not out_dir.exists()
    try:
        if images_from is not None:
            from .attacks.pool import load_pool

            pool = load_pool(str(images_from), work_dir=pool_work, dataset_sha256=catalog["sha256"],
                             scheduler=scheduler, workers=workers, retries=retries)
        plan = make_plan(catalog, spec, label_from, pool_catalog=pool.catalog if pool else None)
    except BaseException:
        _remove_pool_work(out_dir, created_out)
        raise
    if perturb is not None:
        plan.edits = [replace(e, perturb=Perturbation(perturb, int(seed), i)) for i, e in enumerate(plan.edits)]

    spec_dict = {**asdict(spec), "goals": [f"{a or 'any'}2{b or 'one'}" for a, b in spec.goals],
                 "label_from": label_from, "images_from": images_from, "perturb": perturb}
    if labelling is not None:
        spec_dict["labels"] = {"model": label_model, "margin": label_margin}
    fingerprint = content_hash(parts)  # = _hash of the (key, shard, sha256, caption) rows
    full_hash = _hash({"spec": spec_dict, "catalog": fingerprint,
                       "pool": pool.info["fingerprint"] if pool else None})
    by_shard = plan.by_shard()
    shard_paths = {p.name: str(p) for p in paths}
    tasks = []
    for name, p in zip(names, paths):
        edits = tuple(by_shard.get(p.name, ()))
        tasks.append(PoisonTask(name, str(p), str(out_dir), edits,
                                _hash({"plan": full_hash, "edits": [_edit_dict(e) for e in edits]}),
                                catalog=str(parts.paths[0].parent)))
    done_file = out_dir / "poison.json"
    if not overwrite and done_file.exists():
        try:
            prev = json.loads(done_file.read_text())
        except json.JSONDecodeError:
            prev = None
        from .shards import file_fingerprint, outputs_done
        if prev and prev.get("spec_hash") == full_hash and all(
                outputs_done(out_dir, t.name, input=file_fingerprint(t.src), spec=t.spec_hash) for t in tasks):
            _remove_pool_work(out_dir, False)
            return prev
    mark_out(out_dir, "poison", paths)
    for stale in ("poison.json", "manifest.parquet", "sizes.json"):
        (out_dir / stale).unlink(missing_ok=True)
    results = {} if overwrite else {t.name: r for t in tasks if (r := _shard_done(t))}
    pending = [t for t in tasks if t.name not in results]
    if pending:
        # each shard's task reads the samples its edits need at their catalogued byte ranges
        refs = {ref for t in pending for e in t.edits for ref in (template_ref(e), image_ref(e))}
        ranges = {o: _source_rows(cat, {(n, k) for o2, n, k in refs if o2 == o})
                  for o, cat in (("dataset", catalog), ("pool", pool.catalog if pool else None)) if cat is not None}
        src_paths = {"dataset": shard_paths, "pool": pool.paths if pool else {}}
        pending = [replace(t, reads=tuple(sorted({(o, src_paths[o][n], k, *ranges[o][(n, k)])
                                                  for e in t.edits for o, n, k in (template_ref(e), image_ref(e))})))
                   for t in pending]
        run = map_shards(poison_shard, pending, scheduler=scheduler, workers=workers, retries=retries, desc="poison")
        results.update(run.results)

    import pandas as pd

    hashes = {}
    for t in tasks:
        hashes.update(results[t.name]["sha256"])
    rows = [{**r, "sha256": hashes[r["key"]], "perturb": perturb or "none"} for r in plan.rows]
    if pool is not None:  # name pool images as the user knows them: pool shard path / folder file
        names_of = {(s, k): (os_, ok) for s, k, os_, ok in
                    pool.catalog[["shard", "key", "origin_shard", "origin_key"]].itertuples(index=False)}
        for r in rows:
            if r["image_origin"] == "pool":
                r["image_source_shard"], r["image_source_key"] = names_of[(r["image_source_shard"], r["image_source_key"])]
    if perturb is not None:
        _check_distinct(rows, plan.edits, catalog, pool, perturb)
    columns = ["key", "shard", "attack", "goal", "source_shard", "source_key", "image_source_shard",
               "image_source_key", "image_origin", "caption", "mode", "perturb", "sha256"]
    columns += [c for c in dict.fromkeys(k for r in rows for k in r) if c.startswith("trigger_")]
    sizes = write_sizes(out_dir)
    total_out = sum(sizes[p.name] for p in paths)
    write_parquet_atomic(pd.DataFrame(rows, columns=columns), out_dir / "manifest.parquet")
    per_goal = {}
    for r in rows:
        per_goal[r["goal"]] = per_goal.get(r["goal"], 0) + 1
    result = {
        "attack": attack,
        "spec": spec_dict,
        "seed": int(seed),
        "mode": mode,
        "input": str(in_root.resolve()),
        "shards": [p.name for p in paths],
        "counts": {"samples_in": parts.count, "samples_out": int(total_out),
                   "poisoned": len(rows), "per_shard": {t.name + ".tar": len(t.edits) for t in tasks}},
        "goals": [{"goal": g, "poisoned": n, "rate": n / total_out} for g, n in per_goal.items()],
        "images_from": pool.info if pool else None,
        "perturb": perturb,
        "labels": labelling,
        "rate": len(rows) / total_out,
        "rate_unit": "poisoned pairs / pairs in the output dataset (one caption per sample)",
        "manifest": "manifest.parquet",
        "spec_hash": full_hash,
    }
    write_json_atomic(done_file, result)
    shutil.rmtree(out_dir / PARTS, ignore_errors=True)
    _remove_pool_work(out_dir, False)
    return result
