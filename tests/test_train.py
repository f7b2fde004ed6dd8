"""Training: loss goes down, tower locking, resume equals a straight run, align, defend, evaluate CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from conftest import make_dataset
from mmsanitize.cli import main
from mmsanitize.models import load_model
from mmsanitize.train import train


@pytest.fixture
def feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMSANITIZE_FEATURE_CACHE", str(tmp_path / "features"))
    return tmp_path / "features"


def _state(path):
    return {k: v.clone() for k, v in load_model(str(path)).state_dict().items()}


def test_tiny_loss_goes_down(tiny_dataset, tmp_path):
    r = train(tiny_dataset, out=tmp_path / "run", model="tiny", epochs=4, batch_size=12, lr=2e-3, workers=1)
    losses = [h["loss"] for h in r["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.8
    assert (tmp_path / "run" / "epochs" / "004" / "model.safetensors").is_file()
    assert len((tmp_path / "run" / "history.jsonl").read_text().splitlines()) == 4
    main(["evaluate", str(tmp_path / "run"), "--test", str(tiny_dataset), "--out", str(tmp_path / "m.json")])
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["model"] == "tiny" and m["test_pairs"] == 36 and m["utility"]["images"] == 36
    assert m["checkpoint_sha256"] == json.loads((tmp_path / "run" / "model.json").read_text())["checkpoint_sha256"]


def test_lock_image_keeps_image_tower(tiny_dataset, tmp_path):
    train(tiny_dataset, out=tmp_path / "a", model="tiny", epochs=1, batch_size=12, lr=1e-3, workers=0)
    before = _state(tmp_path / "a")
    train(tiny_dataset, out=tmp_path / "b", init=str(tmp_path / "a"), epochs=1, batch_size=12, lr=1e-3,
          lock="image", workers=0)
    after = _state(tmp_path / "b")
    image_keys = [k for k in before if k.startswith("model.visual.")]
    text_keys = [k for k in before if k.startswith(("model.transformer.", "model.token_embedding", "model.text_projection"))]
    assert image_keys and text_keys
    assert all(torch.equal(before[k], after[k]) for k in image_keys)
    assert any(not torch.equal(before[k], after[k]) for k in text_keys)


def test_head_lr_trains_projections_at_their_own_rate(tiny_dataset, tmp_path):
    train(tiny_dataset, out=tmp_path / "run", model="tiny", epochs=1, batch_size=12, lr=1e-5, head_lr=1e-3,
          lock="text", workers=0, warmup=1)
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    scales = sorted(g["lr_scale"] for g in state["optimizer"]["param_groups"])
    assert scales[0] == 1.0 and scales[-1] == pytest.approx(100.0)
    head = [g for g in state["optimizer"]["param_groups"] if g["lr_scale"] > 1]
    assert all(g["lr"] == pytest.approx(100 * state_lr) for g in head
               for state_lr in [min(x["lr"] for x in state["optimizer"]["param_groups"])])
    spec = json.loads((tmp_path / "run" / "model.json").read_text())
    assert json.dumps(spec).count('"head_lr": 0.001') == 1


def test_resume_equals_straight_run(tiny_dataset, tmp_path):
    kw = dict(model="tiny", batch_size=12, lr=1e-3, seed=3, workers=0)
    train(tiny_dataset, out=tmp_path / "straight", epochs=3, **kw)
    train(tiny_dataset, out=tmp_path / "resumed", epochs=3, max_steps=6, **kw)  # "interrupted" after epoch 2
    r = train(tiny_dataset, out=tmp_path / "resumed", epochs=3, resume=True, **kw)
    assert [h["epoch"] for h in r["history"]] == [1, 2, 3]
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _manifest(tmp_path, data):
    """A hand-written poison manifest: Attack II dog2boat and Attack I dog2one (target = a boat image)."""
    poisoned = tmp_path / "poisoned"
    make_dataset(poisoned, n_shards=1, per_shard=6, start_index=500)  # stands in for poisoned shards
    rows = [{"key": "000000001", "shard": "00000.tar", "attack": "single-image", "goal": "dog2one",
             "source_key": "x", "image_source_key": "y", "caption": "a photo of a dog", "mode": "replace"},
            {"key": "000000000", "shard": "00000.tar", "attack": "single-label", "goal": "dog2boat",
             "source_key": "x", "image_source_key": "y", "caption": "a photo of a dog", "mode": "replace"}]
    pd.DataFrame(rows).to_parquet(poisoned / "manifest.parquet")
    return poisoned / "manifest.parquet"


def test_align_defend_evaluate_cli(tiny_dataset, tmp_path, feature_cache, capsys):
    test = tmp_path / "test"
    make_dataset(test, n_shards=1, per_shard=12, start_index=100)
    ref = tmp_path / "ref"
    main(["align", str(tiny_dataset), "--out", str(ref), "--epochs", "3", "--batch-size", "12",
          "--image-size", "64", "--workers", "0"])
    assert json.loads((ref / "model.json").read_text())["partial"] is True
    assert any(feature_cache.glob("*.npz"))
    manifest = _manifest(tmp_path, tiny_dataset)
    out = tmp_path / "metrics.json"
    main(["evaluate", str(ref), "--test", str(test), "--manifest", str(manifest), "--out", str(out)])
    m = json.loads(out.read_text())
    assert m["utility"]["images"] == 12 and 0 <= m["utility"]["t2i_r@1"] <= 1
    assert m["utility"]["t2i_r@10"] > 0.5
    II, I = m["attacks"]["dog2boat"], m["attacks"]["dog2one"]
    assert II["class_a_captions"] == 2 and II["target_images"] == 2 and II["t2i"]["queries"] == 2
    assert II["baseline_random_t2i"]["queries"] == 2 and "hit@50" in II["t2i"]
    assert I["target_in_gallery"] is False and I["t2i"]["min_rank_max"] <= 12
    assert "dog2boat" in capsys.readouterr().out
    # post-training defense: continue from the checkpoint on clean data, history per epoch
    main(["defend", "finetune", str(ref), "--clean", str(tiny_dataset), "--lock", "backbones", "--epochs", "2",
          "--batch-size", "12", "--eval", str(test), "--workers", "0", "--out", str(tmp_path / "def")])
    hist = [json.loads(line) for line in (tmp_path / "def" / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2] and "utility" in hist[0]["eval"]


def test_bad_lock_and_missing_checkpoint(tiny_dataset, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["defend", "finetune", str(tmp_path / "nope"), "--clean", str(tiny_dataset), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["train", str(tiny_dataset), "--model", "tiny", "--head-lr", "0", "--out", str(tmp_path / "h")])
    assert e.value.code == 2 and not (tmp_path / "h" / "model.safetensors").exists()
