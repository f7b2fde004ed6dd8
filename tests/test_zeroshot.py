"""Zero-shot module: templates, the class-embedding recipe (against open_clip's own), softmax/predict."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmsanitize.errors import UsageError
from mmsanitize.zeroshot import (
    DEFAULT_TEMPLATES,
    class_text_embeddings,
    render_prompts,
    zeroshot_predict,
    zeroshot_probs,
)


def test_default_templates_are_open_clips_simple_imagenet_templates():
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    assert [t.format("sea lion") for t in DEFAULT_TEMPLATES] == [t("sea lion") for t in SIMPLE_IMAGENET_TEMPLATES]
    prompts = render_prompts(["dog", "boat"], ["a {}", lambda c: c.upper()])
    assert prompts == ["a dog", "DOG", "a boat", "BOAT"]


class FakeText(torch.nn.Module):
    """Prompt -> a fixed random vector with a prompt-dependent scale (so normalising matters)."""

    def __init__(self, prompts):
        super().__init__()
        rng = np.random.default_rng(0)
        self.index = {p: i for i, p in enumerate(prompts)}
        table = rng.normal(size=(len(prompts), 5)) * rng.uniform(0.1, 10, size=(len(prompts), 1))
        self.table = torch.nn.Parameter(torch.tensor(table, dtype=torch.float32))
        self.calls = []

    def tokenize(self, prompts):
        self.calls.append(len(prompts))
        return torch.tensor([self.index[p] for p in prompts])

    def encode_text(self, tokens):
        return self.table[tokens]


def test_class_embeddings_recipe_known_answer():
    classes, templates = ["dog", "boat", "cat"], ("a {}.", "the {} here", lambda c: f"{c}!")
    prompts = render_prompts(classes, templates)
    model = FakeText(prompts)
    model.train()
    emb = class_text_embeddings(model, classes, templates, batch_size=4)
    assert model.training and model.calls == [4, 4, 1]    # batched, and the mode restored
    t = model.table.detach().numpy()
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    want = t.reshape(3, 3, 5).mean(axis=1)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert emb.dtype == np.float32 and emb.shape == (3, 5)
    assert np.allclose(emb, want, atol=1e-6)
    # a plain mean of un-normalised embeddings would differ (scales differ by up to 100x)
    raw = model.table.detach().numpy().reshape(3, 3, 5).mean(axis=1)
    assert not np.allclose(emb, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-3)
    assert np.allclose(class_text_embeddings(model, classes, templates, batch_size=256), emb, atol=1e-6)
    with pytest.raises(UsageError):
        class_text_embeddings(model, [], templates)


def test_class_embeddings_equal_open_clips_zero_shot_classifier():
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from mmsanitize.models import load_model

    torch.manual_seed(0)
    m = load_model("tiny")
    with torch.no_grad():  # not a fresh init, so the check does not pass by symmetry
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    classes = ["dog", "boat", "cat", "sea lion"]
    ours = class_text_embeddings(m, classes, batch_size=5)
    theirs = build_zero_shot_classifier(m.model, m._tokenizer, classes, DEFAULT_TEMPLATES,
                                        num_classes_per_batch=None).T.numpy()
    assert ours.shape == (4, 64)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    assert np.allclose(ours, theirs, atol=1e-5)
    assert np.array_equal(class_text_embeddings(m, classes, batch_size=5), ours)   # deterministic


def test_zeroshot_probs_and_predict_known_answer():
    cls = np.eye(3, dtype=np.float32) * 4                       # not normalised on purpose
    img = np.array([[1, 0.2, 0], [0, 0.1, 0.9], [0.5, 0.5, 0], [-1, -1, -1]], np.float32)
    p = zeroshot_probs(img, cls, temperature=0.01)
    assert p.shape == (4, 3) and np.allclose(p.sum(axis=1), 1, atol=1e-6)
    cos0 = img[0].astype(np.float64) / np.linalg.norm(img[0])
    want0 = np.exp((cos0 - cos0.max()) / 0.01)
    assert np.allclose(p[0], want0 / want0.sum(), atol=1e-6)
    assert 0 < p[0, 1] < 1e-3                                  # cos 0.196 vs 1 at T=0.01
    pred, conf = zeroshot_predict(img, cls)
    assert pred.tolist() == [0, 2, 0, 0]                        # ties go to the lower index
    assert conf[2] == pytest.approx(0.5) and conf[3] == pytest.approx(1 / 3)
    assert np.allclose(conf, p.max(axis=1))
    # temperature changes confidence, not the decision
    hot = zeroshot_probs(img, cls, temperature=1.0)
    assert np.array_equal(hot.argmax(1), p.argmax(1)) and hot[0, 0] < p[0, 0]
    assert zeroshot_probs(np.zeros((0, 3)), cls).shape == (0, 3)
    with pytest.raises(UsageError, match="dimension"):
        zeroshot_probs(img, np.eye(4))
    with pytest.raises(UsageError, match="temperature"):
        zeroshot_probs(img, cls, temperature=0)
