"""Zero-shot classification with an mmsanitize encoder (open_clip's zero-shot classifier recipe).

A class's text embedding is the L2-normalised mean of the L2-normalised embeddings of its prompts
(one prompt per template); an image is classified by the softmax of its cosine to every class
embedding divided by a temperature (CLIP's logit scale 100 = temperature 0.01). Used by
`evaluate` (backdoor success) and available to detectors (the image's zero-shot class against
its caption's class).

Templates are `str.format` strings with one `{}` for the class name, or callables
`class_name -> prompt`; both kinds may be mixed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import UsageError

Template = str | Callable[[str], str]

# open_clip.zero_shot_metadata.SIMPLE_IMAGENET_TEMPLATES (the 7 templates of the CLIP paper's
# ImageNet ensemble selection), as format strings, wording unchanged.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


def render_prompts(classes: Sequence[str], templates: Sequence[Template] = DEFAULT_TEMPLATES) -> list[str]:
    """Every prompt, class-major: `[t(c) for c in classes for t in templates]` (str templates via format)."""
    return [t.format(c) if isinstance(t, str) else t(c) for c in classes for t in templates]


def class_text_embeddings(model, classes: list[str], templates: Sequence[Template] = DEFAULT_TEMPLATES,
                          batch_size: int = 256) -> np.ndarray:
    """Zero-shot class embeddings: float32 (C, D), row c = normalise(mean_t normalise(text_emb(t(c)))).

    `model` is an mmsanitize encoder (`models.load_model`): it has `.tokenize(list[str])` (a tensor
    or a dict of tensors) and `.encode_text(tokens)`. Prompts are encoded `batch_size` at a time
    under `torch.no_grad()` with the model in eval mode (its previous mode is restored).
    Raises UsageError for an empty class list or template list.
    """
    import torch

    classes, templates = list(classes), list(templates)
    if not classes:
        raise UsageError("zero-shot classification needs at least one class name")
    if not templates:
        raise UsageError("zero-shot classification needs at least one prompt template")
    prompts = render_prompts(classes, templates)
    try:
        dev = next(model.parameters()).device
    except (AttributeError, StopIteration):
        dev = torch.device("cpu")
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()
    out = []
    try:
        with torch.no_grad():
            for s in range(0, len(prompts), max(1, int(batch_size))):
                toks = model.tokenize(prompts[s:s + batch_size])
                toks = {k: v.to(dev) for k, v in toks.items()} if isinstance(toks, dict) else toks.to(dev)
                out.append(model.encode_text(toks).float().cpu().numpy())
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    emb = _normalize(np.concatenate(out).astype(np.float32))
    emb = emb.reshape(len(classes), len(templates), -1).mean(axis=1)
    return _normalize(emb)


def zeroshot_probs(img_emb: np.ndarray, class_emb: np.ndarray, temperature: float = 0.01) -> np.ndarray:
    """Class probabilities (N, C): softmax over classes of cosine(image, class) / `temperature`.

    Both inputs are L2-normalised here (rows), so un-normalised embeddings are fine."""
    if temperature <= 0:
        raise UsageError(f"temperature must be positive, got {temperature}")
    img, cls = _normalize(img_emb), _normalize(class_emb)
    if img.shape[1] != cls.shape[1]:
        raise UsageError(f"image embeddings have dimension {img.shape[1]}, class embeddings {cls.shape[1]}")
    if len(cls) == 0:
        raise UsageError("zero-shot classification needs at least one class embedding")
    return class_softmax(img, cls, temperature).astype(np.float32)


def class_softmax(emb: np.ndarray, class_emb: np.ndarray, temperature: float,
                  present: np.ndarray | None = None) -> np.ndarray:
    """softmax over classes of (emb · class_embᵀ) / `temperature`, (N, C) float64: the zero-shot
    classifier shared by labelling (`zeroshot_probs`) and the class_consistency detector.

    Inputs are used as given (callers pass unit vectors); classes where `present` is False get
    probability 0."""
    return softmax_of_sims(np.asarray(emb, np.float32) @ np.asarray(class_emb, np.float32).T, temperature, present)


def softmax_of_sims(sims: np.ndarray, temperature: float, present: np.ndarray | None = None) -> np.ndarray:
    """`class_softmax` from the float32 similarities `emb · class_embᵀ` already computed (the same
    values: a temperature search computes them once instead of once per temperature)."""
    logits = (sims / np.float32(temperature)).astype(np.float64)
    if present is not None:
        logits = np.where(np.asarray(present, bool)[None, :], logits, -np.inf)
    logits -= logits.max(axis=1, keepdims=True, initial=-np.inf)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def zeroshot_predict(img_emb: np.ndarray, class_emb: np.ndarray,
                     temperature: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class index (N,) int64, its probability (N,) float32) from `zeroshot_probs`.

    Ties go to the lower class index (numpy argmax)."""
    p = zeroshot_probs(img_emb, class_emb, temperature)
    idx = p.argmax(axis=1).astype(np.int64)
    return idx, p[np.arange(len(p)), idx]


def _normalize(x) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


UNKNOWN = "unknown"


def zeroshot_assign(img_emb: np.ndarray, class_emb: np.ndarray, *, margin: float = 0.0,
                    temperature: float = 0.01) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-shot class per image with an "unknown" answer under a margin.

    Returns (class index (N,) int64, -1 where the top-1 probability beats the runner-up by less
    than `margin`; top-1 probability (N,) float32, the confidence; top-1 minus top-2 probability
    (N,) float32). With one class the gap is the top-1 probability. One implementation for
    labelling unlabeled shards (`--label-from zeroshot`) and for detectors that compare an image's
    zero-shot class with its caption's class.
    """
    if not 0.0 <= margin < 1.0:
        raise UsageError(f"the zero-shot margin must be in [0, 1), got {margin}")
    p = zeroshot_probs(img_emb, class_emb, temperature)
    if p.shape[1] >= 2:
        top2 = np.partition(p, p.shape[1] - 2, axis=1)[:, -2:]
        second, first = top2[:, 0], top2[:, 1]
    else:
        first, second = p[:, 0], np.zeros(len(p), dtype=np.float32)
    idx = p.argmax(axis=1).astype(np.int64)
    gap = (first - second).astype(np.float32)
    idx[gap < margin] = -1
    return idx, first.astype(np.float32), gap
