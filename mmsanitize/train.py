"""Contrastive fine-tuning on shards (symmetric InfoNCE), `align`, and the post-training defense.

Recipe defaults follow the paper for open_clip models (AdamW lr 1e-5, wd 0.2, cosine to lr/10,
10 epochs, batch 128). For `offline-b0-minilm` with frozen backbones only two linear projections
train, so the default lr is 1e-3. With `lock="backbones"` on the offline model, backbone features
are computed once (cached in memory and on disk under `~/.cache/mmsanitize/features`, keyed by
image/caption sha256 + backbone config) and epochs run on the cached features.

Output directory: `model.safetensors` + `model.json` (latest), `epochs/NNN/` (one checkpoint per
epoch), `train_state.pt` (optimizer/schedule/RNG, plain tensors only), `history.jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .batches import backbone_features, iter_batches
from .errors import UsageError
from .shards import atomic_path, expand_shards

LOCKS = (None, "image", "text", "backbones")


def _apply_lock(model, lock: str | None) -> None:
    """Freeze parameters for `lock` (image/text tower incl. embeddings+projection, or backbones)."""
    if lock not in LOCKS:
        raise UsageError(f"--lock must be one of image, text, backbones (got {lock!r})")
    for n, p in model.named_parameters():
        if lock in ("image", "text"):
            p.requires_grad_(not n.startswith(model.tower_prefixes(lock)))
        elif lock == "backbones":
            p.requires_grad_(n in model.projection_names())
        else:
            p.requires_grad_(True)
    if hasattr(model, "backbones_trained") and lock != "backbones":
        model.backbones_trained = True


def _set_train_mode(model) -> None:
    """Train mode, except modules whose parameters are all frozen (keeps BatchNorm stats fixed)."""
    model.train()
    for m in model.modules():
        params = list(m.parameters(recurse=True))
        if params and not any(p.requires_grad for p in params):
            m.eval()


def _lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def _optimizer(model, lr: float, weight_decay: float, head_lr: float | None = None):
    """AdamW with no weight decay on biases/gains; projections at `head_lr` (each group keeps its
    ratio to `lr` as "lr_scale" so the schedule moves both)."""
    import torch

    heads = model.projection_names() if head_lr is not None else set()
    groups: dict[tuple, list] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if p.ndim == 1 or n.endswith(".bias") else weight_decay
        scale = head_lr / lr if n in heads else 1.0
        groups.setdefault((wd, scale), []).append(p)
    return torch.optim.AdamW([{"params": ps, "weight_decay": wd, "lr": lr * scale, "lr_scale": scale}
                              for (wd, scale), ps in sorted(groups.items(), key=lambda kv: kv[0])], lr=lr)


def _count_samples(paths) -> int | None:
    total = 0
    for p in paths:
        sizes = Path(p).parent / "sizes.json"
        try:
            total += int(json.loads(sizes.read_text())[Path(p).name])
        except (OSError, KeyError, ValueError):
            return None
    return total


def train(
    shards,
    *,
    out: str | os.PathLike,
    model: str = "tiny",
    init: str | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float | None = None,
    min_lr: float | None = None,
    weight_decay: float = 0.2,
    warmup: int | None = None,
    lock: str | None = None,
    head_lr: float | None = None,
    seed: int = 0,
    workers: int = 1,
    device: str = "cpu",
    resume: bool = False,
    eval_test: str | None = None,
    manifest: str | None = None,
    shuffle_buffer: int = 1000,
    max_steps: int | None = None,
    progress: bool | None = None,
    model_options: dict | None = None,
) -> dict:
    """Fine-tune an encoder contrastively on shards; return {"epochs", "steps", "loss", "history", "out"}.

    `init` (a checkpoint dir or model spec) is the starting point, else a fresh `model`. `lock`
    freezes the image or text tower, or all but the projections ("backbones"). Writes one
    checkpoint per epoch under `out/epochs/`, the latest in `out/`, `history.jsonl` (loss, lr,
    samples/s and, with `eval_test`, evaluation metrics per epoch). `resume` continues after the
    last finished epoch. `head_lr` trains the projection layers at their own peak rate (e.g. 1e-3
    while a tower's backbone fine-tunes at 1e-5). Raises UsageError / ShardError on bad input.
    """
    import torch
    from open_clip.loss import ClipLoss
    from tqdm import tqdm

    from .models import load_model, save_checkpoint

    out = Path(out)
    if epochs < 1 or batch_size < 2:
        raise UsageError("need epochs >= 1 and batch size >= 2")
    if (lr is not None and lr <= 0) or (head_lr is not None and head_lr <= 0):
        raise UsageError("--lr and --head-lr must be > 0")
    paths = [str(p) for p in expand_shards(shards)]
    from .outputs import check_seed, claim_out

    check_seed(seed)
    claim_out(out, "train", paths)
    state_path = out / "train_state.pt"
    start_epoch, step = 0, 0
    history: list[dict] = []
    source = init or model
    if resume and state_path.is_file():
        try:
            import warnings

            with warnings.catch_warnings():  # torch warns about a pickle's protocol before refusing it
                warnings.simplefilter("ignore")
                state = torch.load(state_path, map_location="cpu", weights_only=True)
            int(state["epoch"]), int(state["step"])
        except Exception as e:  # noqa: BLE001 - a pickle needing code, junk bytes, wrong content
            raise UsageError(f"cannot --resume from {state_path}: not a plain train state "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
        start_epoch, step = int(state["epoch"]), int(state["step"])
        # the state's own epoch: a kill after the next epoch's checkpoint but before its state leaves newer weights in out/
        epoch_dir = out / "epochs" / f"{start_epoch:03d}"
        source = str(epoch_dir if (epoch_dir / "model.json").is_file() else out)
        hist = out / "history.jsonl"
        if hist.is_file():
            history = [json.loads(line) for line in hist.read_text().splitlines() if line.strip()][:start_epoch]
    else:
        state = None
    torch.manual_seed(seed)
    net = load_model(source, device=device, **(model_options or {}))
    _apply_lock(net, lock)
    cached = lock == "backbones" and net.family == "offline"
    if lr is None:
        lr = 1e-3 if cached or (lock == "backbones") else 1e-5
    min_lr = lr / 10 if min_lr is None else min_lr
    spec = {"shards": [str(p) for p in paths], "init": init, "model": model if not init else None,
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "min_lr": min_lr,
            "weight_decay": weight_decay, "lock": lock, "seed": seed}
    if head_lr is not None:
        spec["head_lr"] = head_lr

    if cached:
        meta, img_feats, txt_feats = backbone_features(net, paths, workers=workers)
        n = len(img_feats)
    else:
        n = _count_samples(paths)
    if n is not None and n < 2:
        raise UsageError(f"{shards}: need at least 2 samples to train")
    steps_per_epoch = (n // batch_size if cached else math.ceil(n / batch_size)) if n else None
    if cached and steps_per_epoch == 0:
        steps_per_epoch = 1
    total_steps = (steps_per_epoch or 100) * epochs  # max_steps stops early without changing the schedule
    warmup = min(100, max(1, total_steps // 10)) if warmup is None else warmup
    opt = _optimizer(net, lr, weight_decay, head_lr)
    use_amp = device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
    loss_fn = ClipLoss()
    enabled = progress if progress is not None else os.environ.get("MMSANITIZE_PROGRESS", "1") != "0"
    last_loss = float("nan")

    def one_step(img_in, txt_in, encode):
        nonlocal step, last_loss
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total_steps, warmup, lr, min_lr) * g.get("lr_scale", 1.0)
        with torch.autocast("cuda", enabled=use_amp):
            fi, ft = encode(img_in, txt_in)
            fi = torch.nn.functional.normalize(fi, dim=-1)
            ft = torch.nn.functional.normalize(ft, dim=-1)
            loss = loss_fn(fi, ft, net.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        with torch.no_grad():
            net.logit_scale.clamp_(0, math.log(100))
        step += 1
        last_loss = float(loss.detach())
        return last_loss

    for epoch in range(start_epoch, epochs):
        _set_train_mode(net)
        t0, seen, losses = time.monotonic(), 0, []
        bar = tqdm(total=steps_per_epoch, desc=f"train epoch {epoch + 1}/{epochs}", unit="step",
                   file=sys.stderr, disable=not enabled, dynamic_ncols=True, mininterval=0.5)
        if cached:
            perm = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
            batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
            if len(batches) > 1 and len(batches[-1]) < batch_size:
                batches = batches[:-1]  # drop_last, as in the paper's code
            for idx in batches:
                if max_steps and step >= max_steps:
                    break
                losses.append(one_step(img_feats[idx].to(device), txt_feats[idx].to(device),
                                       lambda a, b: (net.image_proj(a), net.text_proj(b))))
                seen += len(idx)
                bar.update(1)
                bar.set_postfix_str(f"loss {losses[-1]:.3f} {seen / max(time.monotonic() - t0, 1e-9):,.0f} samples/s",
                                    refresh=False)
        else:
            for batch in iter_batches(paths, net.preprocess, batch_size=batch_size, train=True, seed=seed,
                                      epoch=epoch, shuffle_buffer=shuffle_buffer, workers=workers):
                if max_steps and step >= max_steps:
                    break
                if len(batch["caption"]) < 2:
                    continue
                toks = net.tokenize(batch["caption"])
                toks = {k: v.to(device) for k, v in toks.items()} if isinstance(toks, dict) else toks.to(device)
                losses.append(one_step(batch["image"].to(device), toks,
                                       lambda a, b: (net.encode_image(a), net.encode_text(b))))
                seen += len(batch["caption"])
                bar.update(1)
                bar.set_postfix_str(f"loss {losses[-1]:.3f} {seen / max(time.monotonic() - t0, 1e-9):,.0f} samples/s",
                                    refresh=False)
        bar.close()
        elapsed = time.monotonic() - t0
        net.eval()
        record = {"epoch": epoch + 1, "step": step, "loss": float(np.mean(losses)) if losses else None,
                  "lr": opt.param_groups[0]["lr"], "samples": seen,
                  "samples_per_s": seen / max(elapsed, 1e-9), "logit_scale": float(net.logit_scale.detach().exp())}
        if eval_test:
            from .evaluate import evaluate_model

            record["eval"] = evaluate_model(net, test=eval_test, manifest=manifest, workers=workers)
        history.append(record)
        save_checkpoint(net, out / "epochs" / f"{epoch + 1:03d}", spec={**spec, "epoch": epoch + 1})
        save_checkpoint(net, out, spec={**spec, "epoch": epoch + 1})
        _write_history(out / "history.jsonl", history)
        with atomic_path(state_path) as tmp:
            torch.save({"epoch": torch.tensor(epoch + 1), "step": torch.tensor(step),
                        "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}, tmp)
        if max_steps and step >= max_steps:
            break
    return {"out": str(out), "epochs": len(history), "steps": step,
            "loss": history[-1]["loss"] if history else None, "history": history}


def _write_history(path: Path, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(h, sort_keys=True) + "\n" for h in history))


def align(shards, *, out, epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
          workers: int = 1, device: str = "cpu", dim: int = 256, image_size: int = 96, **kw) -> dict:
    """Train only the projections of `offline-b0-minilm` on clean shards: the stand-in "pretrained CLIP"."""
    return train(shards, out=out, model="offline-b0-minilm", epochs=epochs, batch_size=batch_size, lr=lr,
                 seed=seed, workers=workers, device=device, lock="backbones",
                 model_options={"dim": dim, "image_size": image_size}, **kw)


def defend_finetune(poisoned: str, *, clean, out, epochs: int = 1, **kw) -> dict:
    """Post-training defense: keep fine-tuning a poisoned checkpoint on clean shards; history per epoch."""
    if not Path(poisoned).is_dir():
        raise UsageError(f"{poisoned} is not a checkpoint directory")
    return train(clean, out=out, init=poisoned, epochs=epochs, **kw)
