"""Models: specs, offline encoders, safe checkpoints (round trip, pickles with code refused)."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image
from mmsanitize.errors import UsageError
from mmsanitize.models import checkpoint_hash, load_model, read_weights, save_checkpoint


def _images(model, n=4):
    return torch.stack([model.preprocess(Image.open(io.BytesIO(make_image("dog", i)))) for i in range(n)])


def test_tiny_round_trip(tmp_path):
    m = load_model("tiny")
    assert m.name == "tiny" and 2_000_000 < sum(p.numel() for p in m.parameters()) < 5_000_000
    with torch.no_grad():  # perturb so the test does not pass on a fresh init by luck
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, tok = _images(m), m.tokenize(["a dog", "a boat", "a cat", "a tree"])
    with torch.no_grad():
        img, txt = m.encode_image(x), m.encode_text(tok)
    assert img.shape == (4, 64) and txt.shape == (4, 64)
    digest = save_checkpoint(m, tmp_path / "ck", spec={"note": "test"})
    assert digest == checkpoint_hash(tmp_path / "ck")
    card = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert card["name"] == "tiny" and card["dim"] == 64 and card["checkpoint_sha256"] == digest
    assert card["training"] == {"note": "test"}
    m2 = load_model(str(tmp_path / "ck"))
    with torch.no_grad():
        assert torch.equal(m2.encode_image(x), img) and torch.equal(m2.encode_text(tok), txt)
    assert m2.checkpoint_sha256 == digest


class Evil:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_pickle_with_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    with pytest.raises(UsageError, match="refusing checkpoint"):
        read_weights(bad)
    with pytest.raises(UsageError, match="refusing checkpoint"):
        load_model(f"open_clip:ViT-B-32/{bad}")
    good = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(read_weights(good)["w"], torch.ones(2))


def test_unknown_spec_and_bad_dir(tmp_path):
    with pytest.raises(UsageError, match="unknown model"):
        load_model("resnet-9000")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a checkpoint directory"):
        load_model(str(tmp_path / "empty"))


def test_offline_model_embeds_and_saves_projections_only(tmp_path):
    m = load_model("offline-b0-minilm", image_size=64, dim=32)
    assert m.name == "offline-b0-minilm"
    assert float(m.logit_scale.detach().exp()) == pytest.approx(1 / 0.07, rel=1e-5)
    x = _images(m)
    assert x.shape == (4, 3, 64, 64)
    tok = m.tokenize(["a photo of a dog", "a photo of a boat", "sailing boat at sea", "a dog"])
    with torch.no_grad():
        img, txt = m.encode_image(x), m.encode_text(tok)
        feats = m.text_features(tok)
    assert img.shape == (4, 32) and txt.shape == (4, 32)
    # MiniLM is a real sentence encoder: the two dog captions are closer than dog vs sailing
    f = torch.nn.functional.normalize(feats, dim=-1)
    assert f[0] @ f[3] > f[0] @ f[2]
    save_checkpoint(m, tmp_path / "ref", spec={})
    assert (tmp_path / "ref" / "model.safetensors").stat().st_size < 300_000  # projections only (backbones ~ 100 MB)
    m2 = load_model(str(tmp_path / "ref"))
    assert m2.config["image_size"] == 64 and m2.dim == 32
    with torch.no_grad():
        assert torch.allclose(m2.encode_image(x), img) and torch.allclose(m2.encode_text(tok), txt)


def test_open_clip_spec_with_local_checkpoint(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    from mmsanitize.models import TINY_CONFIG

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mmsanitize-test-tiny.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(tmp_path / "cfg")
    src = load_model("tiny")
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(weights))
    m = load_model(f"open_clip:mmsanitize-test-tiny/{weights}")
    assert m.name == "open_clip:mmsanitize-test-tiny"
    tok = m.tokenize(["a dog"])
    with torch.no_grad():
        assert torch.equal(m.encode_text(tok), src.encode_text(src.tokenize(["a dog"])))
    with pytest.raises(UsageError, match="open_clip cannot build"):
        load_model("open_clip:no-such-config")
    with pytest.raises(UsageError, match="does not exist"):
        load_model(f"open_clip:mmsanitize-test-tiny/{tmp_path / 'missing.safetensors'}")


def test_evaluate_uses_cached_backbone_features_only_for_pretrained_backbones(tmp_path, monkeypatch):
    """A model whose backbones were trained must be embedded by its own backbones, never by the
    cache of pretrained features (that silently evaluated the modality study's models wrongly)."""
    import torch

    from conftest import make_dataset
    from mmsanitize.evaluate import embed_split

    monkeypatch.setenv("MMSANITIZE_FEATURE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    make_dataset(data, n_shards=1, per_shard=8)
    m = load_model("offline-b0-minilm", image_size=64, dim=32)
    _, cached_img, _ = embed_split(m, str(data))          # fills the cache with pretrained features
    with torch.no_grad():
        for p in m.image_backbone.parameters():
            p.mul_(0.5)                                    # "trained" backbone
    m.backbones_trained = True
    _, own_img, _ = embed_split(m, str(data))
    assert not np.allclose(own_img, cached_img, atol=1e-3)
    m.backbones_trained = False                            # a pretrained backbone may use the cache
    _, again, _ = embed_split(m, str(data))
    assert np.allclose(again, cached_img, atol=1e-6)
