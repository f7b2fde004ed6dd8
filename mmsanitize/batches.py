"""Reading pairs from shards in batches, and frozen-backbone features with their on-disk cache.

Shared by `train`, `evaluate` and `embed` (arrows point one way: those import this module, never
each other for it). `backbone_features` caches per image/caption sha256 + backbone config under
`~/.cache/mmsanitize/features` (or `MMSANITIZE_FEATURE_CACHE`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from .errors import ShardError
from .shards import expand_shards, iter_samples, sha256

_FEATURE_MEMO: dict = {}


# --------------------------------------------------------------------------- reading pairs


def _label(meta) -> str | None:
    if isinstance(meta, dict) and meta.get("label") is not None:
        return str(meta["label"])
    return None


def _pairs_dataset(paths: list[str], preprocess, *, train: bool, seed: int, epoch: int,
                   shuffle_buffer: int, skip_images: frozenset = frozenset()):
    """An IterableDataset of dicts (key, shard, sha256, label, caption, image tensor or None).

    Shards are split across DataLoader workers; with `shuffle_buffer` > 0 shard order and a
    buffer of samples are shuffled with seeds derived from (seed, epoch, worker).
    """
    import torch
    from PIL import Image

    class Pairs(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            wid, nw = (info.id, info.num_workers) if info else (0, 1)
            order = list(paths)
            if shuffle_buffer:
                np.random.default_rng([seed, epoch]).shuffle(order)
            rng = np.random.default_rng([seed, epoch, wid, 1])
            buf = []
            for path in order[wid::nw]:
                shard = Path(path).name
                for s in iter_samples(path):
                    digest = sha256(s.image)
                    img = None
                    if digest not in skip_images:
                        try:
                            with Image.open(io.BytesIO(s.image)) as im:
                                img = preprocess(im, train=train)
                        except Exception as e:  # noqa: BLE001 - any decoder failure is bad data
                            raise ShardError(shard, f"cannot decode image ({e})", key=s.key) from None
                    item = {"key": s.key, "shard": shard, "sha256": digest, "label": _label(s.meta),
                            "caption": s.caption, "image": img}
                    if not shuffle_buffer:
                        yield item
                        continue
                    buf.append(item)
                    if len(buf) >= shuffle_buffer:
                        yield buf.pop(int(rng.integers(len(buf))))
            while buf:
                yield buf.pop(int(rng.integers(len(buf))))

    return Pairs()


def _collate(items):
    import torch

    out = {k: [it[k] for it in items] for k in ("key", "shard", "sha256", "label", "caption")}
    imgs = [it["image"] for it in items]
    out["image"] = torch.stack(imgs) if imgs and all(i is not None for i in imgs) else imgs
    return out


def iter_batches(shards, preprocess, *, batch_size: int, train: bool = False, seed: int = 0, epoch: int = 0,
                 shuffle_buffer: int = 0, workers: int = 0, skip_images: frozenset = frozenset()):
    """Yield collated batches (dict of lists; `image` a stacked tensor) from shards via a DataLoader."""
    import torch

    paths = [str(p) for p in expand_shards(shards)]
    ds = _pairs_dataset(paths, preprocess, train=train, seed=seed, epoch=epoch,
                        shuffle_buffer=shuffle_buffer, skip_images=skip_images)
    workers = min(workers, len(paths))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                         generator=torch.Generator().manual_seed(seed * 1000 + epoch),
                                         persistent_workers=False)
    yield from loader


# --------------------------------------------------------------------------- feature cache


class FeatureCache:
    """sha256 -> backbone feature vector, persisted as one .npz per backbone configuration."""

    def __init__(self, ident: str, directory: str | os.PathLike | None = None):
        base = Path(directory or os.environ.get("MMSANITIZE_FEATURE_CACHE")
                    or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mmsanitize" / "features")
        self.path = base / (hashlib.sha256(ident.encode()).hexdigest()[:20] + ".npz")
        self.data: dict[str, np.ndarray] = {}
        self.dirty = False
        if self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as z:
                    self.data = dict(zip(z["keys"].tolist(), z["feats"]))
            except (OSError, ValueError, KeyError):
                self.data = {}

    def add(self, keys, feats) -> None:
        for k, f in zip(keys, feats):
            self.data[k] = f
        self.dirty = True

    def save(self) -> None:
        if not self.dirty or not self.data:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp.npz")
        keys = list(self.data)
        np.savez(tmp, keys=np.array(keys), feats=np.stack([self.data[k] for k in keys]).astype(np.float32))
        os.replace(tmp, self.path)
        self.dirty = False


def backbone_features(model, shards, *, batch_size: int = 64, workers: int = 0, cache_dir=None,
                      use_disk_cache: bool = True):
    """Frozen-backbone features of every pair in shard order, using the feature cache.

    Works for offline models (`image_features`/`text_features`). Returns (meta dict of lists,
    image features (N, 1280) float32 tensor, text features (N, 384) float32 tensor).
    """
    import torch

    from .shards import file_fingerprint

    cfg = model.config
    ident = f"{model.family}|{cfg.get('image_backbone')}|{cfg.get('image_size')}"
    tident = f"{model.family}|{cfg.get('text_backbone')}|{cfg.get('max_tokens')}"
    memo_key = (ident, tident, tuple((str(p), json.dumps(file_fingerprint(p), sort_keys=True))
                                     for p in expand_shards(shards)))
    if memo_key in _FEATURE_MEMO:  # e.g. the per-epoch evaluation of the same test split
        return _FEATURE_MEMO[memo_key]
    icache = FeatureCache("img|" + ident, cache_dir) if use_disk_cache else FeatureCache.__new__(FeatureCache)
    tcache = FeatureCache("txt|" + tident, cache_dir) if use_disk_cache else FeatureCache.__new__(FeatureCache)
    if not use_disk_cache:
        for c in (icache, tcache):
            c.data, c.dirty, c.path = {}, False, None
    meta = {k: [] for k in ("key", "shard", "sha256", "label", "caption")}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in iter_batches(shards, model.preprocess, batch_size=batch_size, workers=workers,
                                  skip_images=frozenset(icache.data)):
            for k in meta:
                meta[k].extend(batch[k])
            todo = [i for i, d in enumerate(batch["sha256"]) if d not in icache.data]
            if todo:
                imgs = torch.stack([batch["image"][i] for i in todo]) if isinstance(batch["image"], list) \
                    else batch["image"][todo]
                feats = model.image_features(imgs.to(_device(model))).float().cpu().numpy()
                icache.add([batch["sha256"][i] for i in todo], feats)
            tkeys = [sha256(c.encode("utf-8")) for c in batch["caption"]]
            ttodo = [i for i, d in enumerate(tkeys) if d not in tcache.data]
            if ttodo:
                toks = model.tokenize([batch["caption"][i] for i in ttodo])
                toks = {k: v.to(_device(model)) for k, v in toks.items()}
                tcache.add([tkeys[i] for i in ttodo], model.text_features(toks).float().cpu().numpy())
    model.train(was_training)
    if use_disk_cache:
        icache.save()
        tcache.save()
    img = torch.from_numpy(np.stack([icache.data[d] for d in meta["sha256"]]))
    txt = torch.from_numpy(np.stack([tcache.data[sha256(c.encode("utf-8"))] for c in meta["caption"]]))
    _FEATURE_MEMO.clear()  # keep one split in memory at a time
    _FEATURE_MEMO[memo_key] = (meta, img, txt)
    return meta, img, txt


def _device(model) -> str:
    return next(model.parameters()).device.type


# --------------------------------------------------------------------------- training
