"""Does the image belong to the class its caption talks about? (the signature of Attacks I–III)

A dirty-label poison pairs a class-A caption with a class-B image. Even a reference model too weak
to match a caption to *its* image usually knows which class an image shows, so this detector only
needs class-level alignment:

  - class prototypes P (C, D): one unit vector per class in the shared space, either the mean
    text embedding of the dataset's own captions of that class (`caption_prototypes`; poisoned
    captions are genuine class-A captions, so poison cannot move them) or prompt embeddings from
    `mmsanitize.zeroshot`;
  - the caption's class: a keyword/label class when one is known (`caption_class` >= 0), else the
    nearest prototype of its text embedding (a soft distribution at `text_temperature`);
  - the image's class distribution: softmax(image · Pᵀ / temperature), the zero-shot classifier;
  - score = −log p(image shows the caption's class), i.e. the cross-entropy between the two.

Everything here is a function of one shard's embeddings plus the small global state
(prototypes, temperatures), so it runs per shard.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6


def caption_prototypes(txt: np.ndarray, caption_class: np.ndarray, n_classes: int, *,
                       min_count: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Unit mean text embedding per class over the captions of that class.

    Returns (prototypes (C, D) float32, present (C,) bool); classes with fewer than `min_count`
    captions are absent (their row is zero).
    """
    txt = np.asarray(txt, np.float32)
    cls = np.asarray(caption_class)
    protos = np.zeros((n_classes, txt.shape[1]), np.float32)
    counts = np.bincount(cls[cls >= 0], minlength=n_classes)
    np.add.at(protos, cls[cls >= 0], txt[cls >= 0])
    present = counts >= min_count
    norms = np.linalg.norm(protos, axis=1, keepdims=True)
    protos = np.where(present[:, None], protos / np.maximum(norms, EPS), 0.0).astype(np.float32)
    return protos, present


def image_class_probs(img: np.ndarray, prototypes: np.ndarray, present: np.ndarray,
                      temperature: float) -> np.ndarray:
    """Zero-shot class distribution of each image over the present classes, (N, C) float64."""
    from ..zeroshot import class_softmax

    return class_softmax(img, prototypes, temperature, present)


def caption_class_probs(txt: np.ndarray, caption_class: np.ndarray, prototypes: np.ndarray,
                        present: np.ndarray, text_temperature: float) -> np.ndarray:
    """Class distribution of each caption: one-hot for a known class, else soft nearest prototype."""
    q = image_class_probs(txt, prototypes, present, text_temperature)
    cls = np.asarray(caption_class)
    known = caption_named(cls, present)
    q[known] = 0.0
    q[np.nonzero(known)[0], cls[known]] = 1.0
    return q


def fit_temperature(img: np.ndarray, caption_class: np.ndarray, prototypes: np.ndarray,
                    present: np.ndarray, *, grid=None, max_samples: int = 50_000, seed: int = 0) -> float:
    """The zero-shot temperature that maximises the mean log-likelihood of the caption classes.

    Fitted on (a seeded sample of) pairs with a known caption class, so the image's class
    distribution is calibrated: a near-zero temperature (a hard argmax) would give every
    misclassified clean image the same extreme score as a poison. (Measured on Fashion-MNIST with
    the median log-likelihood instead: it picked the hardest temperature and AUROC fell 0.99 -> 0.96.)
    """
    cls = np.asarray(caption_class)
    rows = np.nonzero((cls >= 0) & present[np.clip(cls, 0, None)])[0]
    if len(rows) == 0:
        return 0.05
    if len(rows) > max_samples:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_samples, replace=False))
    from ..zeroshot import softmax_of_sims

    grid = np.geomspace(0.005, 0.5, 25) if grid is None else np.asarray(grid)
    best, best_t = -np.inf, float(grid[0])
    sims = np.asarray(img[rows], np.float32) @ np.asarray(prototypes, np.float32).T
    for t in grid:
        p = softmax_of_sims(sims, float(t), present)
        ll = float(np.mean(np.log(p[np.arange(len(rows)), cls[rows]] + EPS)))
        if ll > best:
            best, best_t = ll, float(t)
    return best_t


def caption_named(caption_class: np.ndarray, present: np.ndarray) -> np.ndarray:
    """True where the caption's keyword class is known and has a prototype."""
    cls = np.asarray(caption_class)
    return (cls >= 0) & present[np.clip(cls, 0, None)]


def assess(img: np.ndarray, txt: np.ndarray, *, prototypes: np.ndarray, present: np.ndarray,
           caption_class: np.ndarray, temperature: float,
           text_temperature: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(score float32 (N,), image class distribution (N, C)): the score is −log Σ_c p_image(c) ·
    p_caption(c), high when the image shows another class than the one its caption names."""
    p = image_class_probs(img, prototypes, present, temperature)
    q = caption_class_probs(txt, caption_class, prototypes, present, text_temperature)
    agree = np.einsum("nc,nc->n", p, q)
    return (-np.log(agree + EPS)).astype(np.float32), p


def score(img: np.ndarray, txt: np.ndarray, *, prototypes: np.ndarray, present: np.ndarray,
          caption_class: np.ndarray, temperature: float, text_temperature: float = 0.05) -> np.ndarray:
    """The `assess` score alone, float32 (N,)."""
    return assess(img, txt, prototypes=prototypes, present=present, caption_class=caption_class,
                  temperature=temperature, text_temperature=text_temperature)[0]
