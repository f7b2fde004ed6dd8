"""Shards -> embeddings in clip-retrieval's layout, one Dask task per shard, resumable.

Output folder:
  img_emb/img_emb_NNNNN.npy     float16, L2-normalised, one row per sample (shard order)
  text_emb/text_emb_NNNNN.npy   float16, L2-normalised
  metadata/metadata_NNNNN.parquet   key, caption, row (position in the shard), shard, image_path
                                    (= key, as clip-retrieval writes it), url (when the shard has one)
  model.json                    the encoder's card
  embed_NNNNN_stats.json        done marker: count, input fingerprint, model hash
Each worker process loads the model once (module-level cache keyed by spec) with torch limited
to one thread; images are decoded and preprocessed in a background thread while the model runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine import ShardProgress, map_shards
from .errors import ShardError, UsageError
from .shards import (atomic_path, expand_shards, file_fingerprint, iter_samples, json_bytes, read_stats, shard_stem,
                     write_json_atomic, write_parquet_atomic)

EMBED_VERSION = 1
_MODELS: dict[str, object] = {}


@dataclass(frozen=True)
class EmbedTask:
    """Embed shard `path` with model `spec` into `out` (`model_hash` identifies the model)."""

    name: str
    path: str
    out: str
    spec: str
    model_hash: str
    batch_size: int = 64


@dataclass
class Embeddings:
    """Loaded embeddings: float32 `img`, `txt` (N, D) and `meta` (key, caption, row, shard), in shard order."""

    img: np.ndarray
    txt: np.ndarray
    meta: "object"
    card: dict


def model_hash(card: dict) -> str:
    """A short stable hash of a model card (its name, config and checkpoint hash)."""
    return hashlib.sha256(json_bytes(card)).hexdigest()[:16]


def get_model(spec: str):
    """The model for `spec`, loaded once per process (torch limited to one thread)."""
    import torch

    if spec not in _MODELS:
        torch.set_num_threads(1)
        from .models import load_model

        _MODELS[spec] = load_model(spec)
    return _MODELS[spec]


def _decode_batch(model, samples, shard: str):
    import torch
    from PIL import Image

    tensors = []
    for s in samples:
        try:
            with Image.open(io.BytesIO(s.image)) as im:
                tensors.append(model.preprocess(im, train=False))
        except Exception as e:
            raise ShardError(shard, f"undecodable image ({type(e).__name__}: {e})", key=s.key) from None
    return torch.stack(tensors), model.tokenize([s.caption for s in samples])


def _batches(path, size):
    batch = []
    for s in iter_samples(path):
        batch.append(s)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _normalise(x) -> np.ndarray:
    x = x.float().numpy()
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float16)


def _embed_cached(model, path: str, shard: str):
    """Offline models with pretrained (untrained) backbones: backbone features from the shared
    feature cache (batches.backbone_features, keyed by image/caption sha256), then the projections.
    A scan of a poisoned copy of a dataset then computes backbone features only for new images."""
    import torch

    from .batches import backbone_features

    with torch.no_grad():
        meta, fi, ft = backbone_features(model, path)
        img = _normalise(model.image_proj(fi))
        txt = _normalise(model.text_proj(ft))
    urls = _sidecar_urls(path)
    rows = [{"key": k, "caption": c, "row": i, "shard": shard, "url": urls.get(k)}
            for i, (k, c) in enumerate(zip(meta["key"], meta["caption"]))]
    return img, txt, rows


def _sidecar_urls(path: str) -> dict:
    """key -> url from the shard's img2dataset parquet beside the tar ({} when it has none)."""
    import pyarrow.parquet as pq

    side = Path(path).with_suffix(".parquet")
    try:
        if "url" not in pq.read_schema(side).names:
            return {}
        t = pq.read_table(side, columns=["key", "url"])
    except Exception:
        return {}
    return dict(zip(t.column("key").to_pylist(), t.column("url").to_pylist()))


def embed_shard(task: EmbedTask) -> dict:
    """Dask task: embed one shard and write its three files, then its done marker; returns stats."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    model = get_model(task.spec)
    shard = Path(task.path).name
    out = Path(task.out)
    if getattr(model, "family", "") == "offline" and not getattr(model, "backbones_trained", True):
        img, txt, rows = _embed_cached(model, task.path, shard)
        return _write_shard(task, out, img, txt, rows)
    img_parts, txt_parts, rows = [], [], []
    progress = ShardProgress(task.name)
    with ThreadPoolExecutor(1) as pool, torch.no_grad():
        batches = _batches(task.path, task.batch_size)
        first = next(batches, None)
        fut = pool.submit(_decode_batch, model, first, shard) if first else None
        samples = first
        while fut is not None:
            images, tokens = fut.result()
            nxt = next(batches, None)
            fut_next = pool.submit(_decode_batch, model, nxt, shard) if nxt else None
            img_parts.append(_normalise(model.encode_image(images)))
            txt_parts.append(_normalise(model.encode_text(tokens)))
            for s in samples:
                url = s.meta.get("url") if isinstance(s.meta, dict) else None
                rows.append({"key": s.key, "caption": s.caption, "row": len(rows), "shard": shard,
                             "url": None if url is None else str(url)})
            progress.add(len(samples))
            fut, samples = fut_next, nxt
    return _write_shard(task, out, np.concatenate(img_parts), np.concatenate(txt_parts), rows)


def _write_shard(task: EmbedTask, out: Path, img: np.ndarray, txt: np.ndarray, rows: list[dict]) -> dict:
    import pandas as pd

    for sub, arr in (("img_emb", img), ("text_emb", txt)):
        with atomic_path(out / sub / f"{sub}_{task.name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
    df = pd.DataFrame(rows, columns=["key", "caption", "row", "shard", "url"])
    df.insert(4, "image_path", df["key"])  # clip-retrieval's name for the webdataset key
    if df["url"].isna().all():
        df = df.drop(columns="url")
    write_parquet_atomic(df, out / "metadata" / f"metadata_{task.name}.parquet")
    stats = {"count": len(rows), "input": file_fingerprint(task.path), "model": task.model_hash,
             "version": EMBED_VERSION}
    write_json_atomic(out / f"embed_{task.name}_stats.json", stats)
    return stats


def _done(task: EmbedTask) -> dict | None:
    out = Path(task.out)
    stats = read_stats(out, f"embed_{task.name}")
    if not stats or stats.get("version") != EMBED_VERSION or stats.get("model") != task.model_hash \
            or stats.get("input") != file_fingerprint(task.path):
        return None
    files = [out / "img_emb" / f"img_emb_{task.name}.npy", out / "text_emb" / f"text_emb_{task.name}.npy",
             out / "metadata" / f"metadata_{task.name}.parquet"]
    return stats if all(f.exists() for f in files) else None


def embed(
    shards: str | os.PathLike | list,
    *,
    model: str,
    out: str | os.PathLike,
    scheduler: str | None = None,
    workers: int | None = None,
    batch_size: int = 64,
    overwrite: bool = False,
    retries: int = 1,
) -> dict:
    """Embed every shard with `model` into `out` (clip-retrieval layout); finished shards are skipped.

    Returns {"samples", "shards", "skipped", "seconds", "model"}. Raises UsageError when `out`
    already holds embeddings of a different model (unless `overwrite`), EngineError on failures.
    """
    paths = expand_shards(shards)
    names = [shard_stem(p) for p in paths]
    if len(set(names)) != len(names):
        raise UsageError("two shards share a name; shard names must be unique")
    card = get_model(model).card()
    mhash = model_hash(card)
    out = Path(out)
    from .outputs import claim_out

    claim_out(out, "embed", paths, overwrite=overwrite)
    card_path = out / "model.json"
    if card_path.exists() and not overwrite:
        old = json.loads(card_path.read_text())
        if model_hash(old) != mhash:
            raise UsageError(f"{out} holds embeddings of model {old.get('name')!r}, not {card.get('name')!r}; "
                             "use another --out or --overwrite")
    for sub in ("img_emb", "text_emb", "metadata"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    write_json_atomic(card_path, card)
    tasks = [EmbedTask(n, str(p.resolve()), str(out.resolve()), model, mhash, batch_size)
             for n, p in zip(names, paths)]
    res = map_shards(embed_shard, tasks, is_done=None if overwrite else _done, scheduler=scheduler,
                     workers=workers, retries=retries, desc="embed")
    return {"samples": sum(int(r["count"]) for r in res.results.values()), "shards": len(tasks),
            "skipped": res.skipped, "seconds": res.seconds, "model": card.get("name")}


def load_embeddings(emb_dir: str | os.PathLike, names: list[str] | None = None) -> Embeddings:
    """Load embeddings of shards `names` (default: all, sorted) as float32 arrays + metadata.

    Raises UsageError when the folder is not an embeddings folder or a shard's files are missing
    or inconsistent (row counts of img/text/metadata differ).
    """
    import pandas as pd

    emb_dir = Path(emb_dir)
    card_path = emb_dir / "model.json"
    if not card_path.exists():
        raise UsageError(f"{emb_dir} is not an embeddings folder (no model.json)")
    from .models import read_card

    card = read_card(card_path, need_base=False)
    if names is None:
        names = sorted(p.stem[len("metadata_"):] for p in (emb_dir / "metadata").glob("metadata_*.parquet"))
    imgs, txts, metas = [], [], []
    for n in names:
        files = (emb_dir / "img_emb" / f"img_emb_{n}.npy", emb_dir / "text_emb" / f"text_emb_{n}.npy",
                 emb_dir / "metadata" / f"metadata_{n}.parquet")
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ShardError(f"{n}.tar", f"no embeddings in {emb_dir} (missing {missing[0]})")
        try:
            i, t, m = np.load(files[0]), np.load(files[1]), pd.read_parquet(files[2])
            if i.dtype.kind != "f" or t.dtype.kind != "f" or i.ndim != 2 or t.ndim != 2:
                raise ValueError(f"arrays of {i.dtype}{i.shape} and {t.dtype}{t.shape}, not float matrices")
        except Exception as e:  # noqa: BLE001 - object arrays (pickles), junk bytes, bad parquet
            raise ShardError(f"{n}.tar", f"unreadable embeddings in {emb_dir} ({type(e).__name__}: "
                                         f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
        if not (len(i) == len(t) == len(m)):
            raise ShardError(f"{n}.tar", f"embedding files disagree: {len(i)} image rows, {len(t)} text rows, "
                                         f"{len(m)} metadata rows")
        imgs.append(i)
        txts.append(t)
        m = m.copy()
        m["shard"] = f"{n}.tar"
        metas.append(m)
    if not imgs:
        raise UsageError(f"{emb_dir} holds no embeddings")
    img = np.concatenate(imgs).astype(np.float32)
    txt = np.concatenate(txts).astype(np.float32)
    return Embeddings(img, txt, pd.concat(metas, ignore_index=True), card)
