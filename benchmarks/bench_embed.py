"""Embedding throughput through shards vs the model's forward pass on pre-decoded tensors.

Builds synthetic JPEG shards, then prints samples/s for:
  - baseline: the same model's encode_image + encode_text on already decoded and preprocessed
    tensors (1 torch thread, batch 64) — the ceiling;
  - `mmsanitize embed` with a 1-worker Dask cluster (target >= 0.7x the baseline);
  - `mmsanitize embed` with 2 workers (scaling).
The model is warmed up in the workers first so the numbers exclude model loading.

Usage: nice python benchmarks/bench_embed.py [--model tiny] [--shards 4] [--per-shard 512] [--size 64]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def make_shards(out: Path, shards: int, per_shard: int, size: int) -> None:
    """Write seeded synthetic JPEG image-text shards."""
    import numpy as np
    from PIL import Image

    from mmsanitize.shards import Sample, ShardWriter, write_sizes

    rng = np.random.default_rng(0)
    words = ["dog", "boat", "cat", "car", "tree", "house", "bird", "chair"]
    for s in range(shards):
        with ShardWriter(out, f"{s:05d}") as w:
            for j in range(per_shard):
                arr = (rng.integers(0, 255, (1, 1, 3)) + rng.integers(-40, 40, (size, size, 3))).clip(0, 255)
                buf = io.BytesIO()
                Image.fromarray(arr.astype("uint8")).save(buf, format="JPEG", quality=90)
                cap = f"a drawing of a {words[j % 8]} next to a {words[(j * 3) % 8]}, item {s}-{j}"
                w.write(Sample(f"{s:05d}{j:04d}", buf.getvalue(), "jpg", cap, {"n": j}))
    write_sizes(out)


def baseline(model_spec: str, data: Path, batch: int) -> float:
    """samples/s of the forward pass alone on pre-decoded, preprocessed tensors (1 thread)."""
    import torch
    from PIL import Image

    from mmsanitize.embed import get_model
    from mmsanitize.shards import expand_shards, iter_samples

    torch.set_num_threads(1)
    model = get_model(model_spec)
    samples = [s for p in expand_shards(data) for s in iter_samples(p)]
    images = torch.stack([model.preprocess(Image.open(io.BytesIO(s.image))) for s in samples])
    tokens = [model.tokenize([s.caption for s in samples[a:a + batch]]) for a in range(0, len(samples), batch)]
    with torch.no_grad():
        model.encode_image(images[:batch]), model.encode_text(tokens[0])  # warm up
        t = time.perf_counter()
        for b, a in enumerate(range(0, len(samples), batch)):
            model.encode_image(images[a:a + batch])
            model.encode_text(tokens[b])
        return len(samples) / (time.perf_counter() - t)


def pipeline(model_spec: str, data: Path, warm: Path, tmp: Path, workers: int, batch: int) -> float:
    """samples/s of `embed` on a `workers`-process LocalCluster (model pre-loaded in each worker)."""
    from distributed import Client, LocalCluster

    from mmsanitize.embed import embed

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("mmsanitize.embed", fromlist=["get_model"]).get_model(model_spec))
        embed(warm, model=model_spec, out=tmp / f"warm{workers}", scheduler=cluster.scheduler_address,
              batch_size=batch)
        t = time.perf_counter()
        res = embed(data, model=model_spec, out=tmp / f"emb{workers}", scheduler=cluster.scheduler_address,
                    batch_size=batch)
        return res["samples"] / (time.perf_counter() - t)


def main() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MMSANITIZE_PROGRESS", "0")
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--per-shard", type=int, default=512)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    try:
        make_shards(tmp / "data", args.shards, args.per_shard, args.size)
        make_shards(tmp / "warm", 2, 16, args.size)
        n = args.shards * args.per_shard
        base = baseline(args.model, tmp / "data", args.batch)
        print(f"model {args.model}, {n} samples ({args.shards} shards), {args.size}px JPEG, batch {args.batch}")
        print(f"baseline forward on pre-decoded tensors (1 thread): {base:,.0f} samples/s")
        one = pipeline(args.model, tmp / "data", tmp / "warm", tmp, 1, args.batch)
        print(f"embed, 1 Dask worker:  {one:,.0f} samples/s = {one / base:.2f}x baseline (target >= 0.7x)")
        two = pipeline(args.model, tmp / "data", tmp / "warm", tmp, 2, args.batch)
        print(f"embed, 2 Dask workers: {two:,.0f} samples/s = {two / one:.2f}x one worker")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
