"""Shared fixtures: tiny real shards built in the tests, and one real Dask cluster per session."""

from __future__ import annotations

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("MMSANITIZE_PROGRESS", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import pytest

from mmsanitize.shards import Sample, ShardWriter, write_sizes

CLASSES = ["dog", "boat", "cat", "car", "tree", "house"]
COLORS = {"dog": (200, 40, 40), "boat": (40, 40, 200), "cat": (40, 200, 40),
          "car": (200, 200, 40), "tree": (40, 200, 200), "house": (200, 40, 200)}


def make_image(label: str, index: int, size: int = 32, fmt: str = "JPEG") -> bytes:
    """A small real image: a class colour with a seeded noise texture."""
    from PIL import Image

    rng = np.random.default_rng(index)
    base = np.array(COLORS.get(label, (128, 128, 128)), dtype=np.int16)
    arr = np.clip(base + rng.integers(-30, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def make_dataset(out, n_shards: int = 3, per_shard: int = 12, classes=CLASSES, fmt: str = "JPEG",
                 start_index: int = 0) -> list:
    """Write `n_shards` img2dataset-style shards of labelled samples; returns the tar paths."""
    paths = []
    i = start_index
    for s in range(n_shards):
        name = f"{s:05d}"
        with ShardWriter(out, name) as w:
            for j in range(per_shard):
                label = classes[i % len(classes)]
                key = f"{s:05d}{j:04d}"
                ext = "jpg" if fmt == "JPEG" else "png"
                w.write(Sample(key, make_image(label, i, fmt=fmt), ext, f"a photo of a {label} number {i}",
                               {"label": label, "key": key}))
                i += 1
        paths.append(out / f"{name}.tar")
    write_sizes(out)
    return paths


@pytest.fixture
def tiny_dataset(tmp_path):
    """Three shards of 12 labelled JPEG samples each, in `tmp_path/data`."""
    out = tmp_path / "data"
    make_dataset(out)
    return out


@pytest.fixture(scope="session")
def dask_address():
    """A real two-process Dask cluster on 127.0.0.1 shared by the session; yields its address."""
    import logging

    from distributed import LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
    yield cluster.scheduler_address
    cluster.close()
