"""Backdoor success in `evaluate`: the test-time trigger is poison's, a stub model with a known
backdoor gives ASR 1 triggered / 0 untriggered, and a real tiny model trained on a patch-poisoned
set gets the fields (and the CLI line) on the same images triggered and untriggered."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLASSES, COLORS, make_dataset

from mmsanitize.cli import main
from mmsanitize.evaluate import (
    ASR_KS,
    backdoor_spec,
    embed_split,
    evaluate_model,
    metrics_rows,
    trigger_for_image,
    triggered_images,
)
from mmsanitize.poison import apply_trigger, poison_dataset
from mmsanitize.shards import image_size, iter_samples, sha256


def _samples(data) -> dict:
    return {s.key: s for tar in sorted(data.glob("*.tar")) for s in iter_samples(tar)}


@pytest.fixture(scope="module")
def sets(tmp_path_factory, dask_address):
    """Input shards, a test split, and patch (bottom-right, replace, any2boat), patch with a source
    class (random position), blended (inject) and label-consistent poisonings of the input."""
    root = tmp_path_factory.mktemp("bd")
    make_dataset(root / "data")
    make_dataset(root / "test", n_shards=1, per_shard=12, start_index=100)
    kw = {"scheduler": dask_address, "seed": 2}
    poison_dataset(str(root / "data"), out=str(root / "patch"), attack="patch", target="boat", count=8, **kw)
    poison_dataset(str(root / "data"), out=str(root / "dogpatch"), attack="patch", source="dog", target="boat",
                   source_fraction=1.0, trigger_position="random", trigger_size=12, **kw)
    poison_dataset(str(root / "data"), out=str(root / "blend"), attack="blended", target="boat", count=4,
                   mode="inject", opacity=0.3, **kw)
    poison_dataset(str(root / "data"), out=str(root / "lc"), attack="label-consistent", target="boat", count=3, **kw)
    return root


@pytest.mark.parametrize("name", ["patch", "dogpatch", "blend", "lc"])
def test_trigger_columns_and_test_time_trigger_equal_what_poison_wrote(sets, name):
    manifest = pd.read_parquet(sets / name / "manifest.parquet")
    spec = backdoor_spec(sets / name / "manifest.parquet")
    inputs = _samples(sets / "data")
    fixed = spec["trigger_position"] != "random"
    for row in manifest.itertuples():
        src = inputs[row.image_source_key]
        trig = {k[len("trigger_"):]: getattr(row, k) for k in manifest.columns if k.startswith("trigger_")}
        assert trig["kind"] == ("blended" if name == "blend" else "patch") and int(trig["seed"]) == 2
        assert (row.attack == "label-consistent") == (row.caption == src.caption)
        from mmsanitize.attacks.plan import Trigger

        recorded = Trigger(trig["kind"], int(trig["size"]), int(trig["x"]), int(trig["y"]), trig["pattern"],
                           float(trig["opacity"]), int(trig["seed"]))
        # the manifest's trigger columns reproduce the stored image bytes exactly
        assert sha256(apply_trigger(src.image, src.image_ext, recorded)[0]) == row.sha256
        w, h = image_size(src.image, "x", "y")
        if fixed:  # evaluate's placement rule gives the same trigger and the same bytes
            assert trigger_for_image(spec, w, h, np.random.default_rng(0)) == recorded
            (_, got), = triggered_images([src], spec)
            assert sha256(got) == row.sha256
        else:
            assert 0 <= recorded.x <= w - recorded.size and 0 <= recorded.y <= h - recorded.size
    # deterministic and really changed, also for random positions
    test = list(_samples(sets / "test").values())
    a = [t for _, t in triggered_images(test, spec)]
    assert a == [t for _, t in triggered_images(test, spec)]
    assert all(t != s.image for t, s in zip(a, test))


class StubBackdooredModel(torch.nn.Module):
    """A model with a known backdoor: an image embeds as its class colour's one-hot, unless its
    bottom-right 16x16 corner is high-contrast (the checkerboard patch): then as `boat`. A text
    embeds as the one-hot of the first class name it contains."""

    name = "stub"
    family = "stub"
    checkpoint_sha256 = None

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.colors = torch.tensor([COLORS[c] for c in CLASSES], dtype=torch.float32)

    def preprocess(self, img, train=False):
        return torch.tensor(np.asarray(img.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)

    def encode_image(self, x):
        mean = x[:, :, :16, :16].mean(dim=(2, 3))
        cls = torch.cdist(mean, self.colors).argmin(dim=1)
        triggered = x[:, :, -16:, -16:].std(dim=(2, 3)).mean(dim=1) > 60
        cls = torch.where(triggered, CLASSES.index("boat"), cls)
        return torch.nn.functional.one_hot(cls, len(CLASSES)).float()

    def tokenize(self, captions):
        return torch.tensor([next((i for i, c in enumerate(CLASSES) if c in t), 0) for t in captions])

    def encode_text(self, tokens):
        return torch.nn.functional.one_hot(tokens, len(CLASSES)).float()


def test_known_backdoor_gives_asr_one_triggered_zero_untriggered(sets):
    for name, goal in (("patch", "any2boat"), ("dogpatch", "dog2boat"), ("lc", "boat2boat")):
        # dogpatch uses a 12 px patch at random positions: give the stub the 16 px corner patch instead
        manifest = sets / name / "manifest.parquet"
        if name == "dogpatch":
            (sets / "dog16").mkdir(exist_ok=True)
            pd.read_parquet(manifest).to_parquet(sets / "dog16" / "manifest.parquet")
            spec = json.loads((sets / name / "poison.json").read_text())
            spec["spec"].update(trigger_position="bottom-right", trigger_size=16)
            (sets / "dog16" / "poison.json").write_text(json.dumps(spec))
            manifest = sets / "dog16" / "manifest.parquet"
        r = evaluate_model(StubBackdooredModel(), test=str(sets / "test"), manifest=str(manifest))
        assert goal not in r["attacks"]                           # backdoors are not Attack I-III goals
        b = r["backdoor"][goal]
        assert b["attack"] == ("label-consistent" if name == "lc" else "patch") and b["target_class"] == "boat"
        assert b["source_class"] == ("dog" if name == "dogpatch" else None)
        assert b["images"] == 10 and b["target_captions"] == 2    # 12 test images, 2 of them boats
        assert b["zeroshot_classes"] == 6 and b["zeroshot_templates"] == 7
        t, u = b["triggered"], b["untriggered"]
        assert t == {"i2t_asr@1": 1.0, "i2t_asr@5": 1.0, "i2t_asr@10": 1.0, "zeroshot_asr": 1.0,
                     "zeroshot_accuracy": 0.0}
        assert u["i2t_asr@1"] == 0.0 and u["zeroshot_asr"] == 0.0 and u["zeroshot_accuracy"] == 1.0
        if goal == "dog2boat":
            assert b["source_class"] == "dog" and b["source"]["images"] == 2
            assert b["source"]["triggered"]["zeroshot_asr"] == 1.0
        rows = [x for x in metrics_rows(r) if x["what"] == goal]
        assert [x["dir"] for x in rows] == ["backdoor triggered", "backdoor untriggered"]
        assert rows[0]["ASR zero-shot"] == 1.0 and rows[1]["ASR i2t@1"] == 0.0 and rows[0]["queries"] == 10


def test_tiny_model_trained_on_backdoor_cli(sets, tmp_path, capsys):
    from mmsanitize.models import load_model
    from mmsanitize.train import train
    from mmsanitize.zeroshot import class_text_embeddings, zeroshot_predict

    train(sets / "patch", out=tmp_path / "m", model="tiny", epochs=1, batch_size=12, lr=2e-3, workers=0)
    manifest = sets / "patch" / "manifest.parquet"
    main(["evaluate", str(tmp_path / "m"), "--test", str(sets / "test"), "--manifest", str(manifest),
          "--out", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert "any2boat: backdoor (patch -> boat) on 10 test images: ASR i2t@10" in out
    assert "backdoor triggered" in out and "backdoor untriggered" in out
    b = json.loads((tmp_path / "m.json").read_text())["backdoor"]["any2boat"]
    assert b["trigger"] == {"kind": "patch", "trigger_size": 16, "trigger_position": "bottom-right",
                            "trigger_pattern": "checkerboard", "opacity": 0.1, "seed": 2}
    for part in ("triggered", "untriggered"):
        assert set(b[part]) == {*(f"i2t_asr@{k}" for k in ASR_KS), "zeroshot_asr", "zeroshot_accuracy"}
        vals = [b[part][f"i2t_asr@{k}"] for k in ASR_KS]
        assert all(0 <= v <= 1 for v in b[part].values()) and vals == sorted(vals)
    # the untriggered numbers are those of the very test images embed_split saw (same images)
    model = load_model(str(tmp_path / "m"))
    meta, img, _ = embed_split(model, str(sets / "test"))
    labels = np.array(meta["label"], dtype=object)
    classes = sorted(set(labels))
    pred, _ = zeroshot_predict(img[labels != "boat"], class_text_embeddings(model, classes))
    assert b["untriggered"]["zeroshot_asr"] == pytest.approx(float((pred == classes.index("boat")).mean()))
    # the same manifest on another model (the clean-model row): same images, trigger and keys
    main(["evaluate", "tiny", "--test", str(sets / "test"), "--manifest", str(manifest), "--json"])
    clean = json.loads(capsys.readouterr().out)["backdoor"]["any2boat"]
    assert clean["images"] == b["images"] and clean["trigger"] == b["trigger"]
    assert set(clean["triggered"]) == set(b["triggered"])


def test_backdoor_manifest_without_poison_json_is_a_usage_error(sets, tmp_path):
    from mmsanitize.errors import UsageError

    pd.read_parquet(sets / "patch" / "manifest.parquet").to_parquet(tmp_path / "manifest.parquet")
    with pytest.raises(UsageError, match="poison.json"):
        evaluate_model(StubBackdooredModel(), test=str(sets / "test"), manifest=str(tmp_path / "manifest.parquet"))
