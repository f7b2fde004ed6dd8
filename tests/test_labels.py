"""Labels for unlabeled shards: zero-shot labels (cached under the verb's --out), vocabularies,
the --label-from error messages, and `info`'s label coverage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmsanitize.cli import main
from mmsanitize.errors import UsageError
from mmsanitize.labels import (OPENCLIPART_VOCABULARY, attach_zeroshot, class_masks, known_classes,
                               load_vocabulary, zeroshot_class_names)
from mmsanitize.shards import Sample, ShardWriter, iter_samples, write_sizes
from mmsanitize.zeroshot import zeroshot_assign, zeroshot_probs

CLASSES = "dog,boat,cat,car,tree,house"


def _unlabelled(src: Path, out: Path) -> Path:
    """Copy of shards `src` whose json has no label (as img2dataset output has none)."""
    for tar in sorted(src.glob("*.tar")):
        with ShardWriter(out, tar.stem) as w:
            for s in iter_samples(tar):
                meta = {k: v for k, v in s.meta.items() if k != "label"}
                w.write(Sample(s.key, s.image, s.image_ext, s.caption, meta))
    write_sizes(out)
    return out


def test_project_vocabulary_keeps_class_names():
    vocab = load_vocabulary(str(OPENCLIPART_VOCABULARY))
    assert all(cls in words for cls, words in vocab.items())
    assert vocab["flag"][0] == "flag" and "banner" in vocab["flag"]
    names = zeroshot_class_names("zeroshot")
    assert names == list(vocab) and "unknown" not in names
    assert zeroshot_class_names("zeroshot:boat, dog ,boat") == ["boat", "dog"]
    with pytest.raises(UsageError, match="at least two classes"):
        zeroshot_class_names("zeroshot:dog,")
    with pytest.raises(UsageError, match="neither a vocabulary file"):
        zeroshot_class_names("zeroshot:nofile.txt")


def test_zeroshot_assign_margin_and_confidence():
    cls = np.eye(3, dtype=np.float32)
    img = np.array([[1, 0, 0], [1, 1, 0], [0, 0.2, 1]], dtype=np.float32)
    idx, conf, gap = zeroshot_assign(img, cls, margin=0.1)
    p = zeroshot_probs(img, cls)
    assert list(idx) == [0, -1, 2]  # the second image ties classes 0 and 1
    assert np.allclose(conf, p.max(axis=1)) and np.all(gap >= 0) and gap[1] < 1e-6
    idx0, _, _ = zeroshot_assign(img, cls, margin=0.0)
    assert list(idx0) == [0, 0, 2]
    with pytest.raises(UsageError, match="margin"):
        zeroshot_assign(img, cls, margin=1.5)


def test_attach_zeroshot_matches_direct_computation_and_is_cached(tiny_dataset, tmp_path, dask_address):
    from mmsanitize.catalog import build_catalog
    from mmsanitize.embed import get_model, load_embeddings
    from mmsanitize.zeroshot import class_text_embeddings

    data = _unlabelled(tiny_dataset, tmp_path / "unlab")
    cat = build_catalog(data, scheduler=dask_address)
    assert cat["label"].isna().all()
    cache = tmp_path / "out" / "_labels"
    got = attach_zeroshot(cat, data, f"zeroshot:{CLASSES}", label_model="tiny", cache_dir=cache,
                          margin=0.0, scheduler=dask_address)
    assert list(got["key"]) == list(cat["key"])
    emb = load_embeddings(cache / "embeddings")
    idx, conf, _ = zeroshot_assign(emb.img, class_text_embeddings(get_model("tiny"), CLASSES.split(",")))
    names = CLASSES.split(",")
    assert list(got["zeroshot_label"]) == [names[i] for i in idx]
    assert np.allclose(got["zeroshot_confidence"], conf)
    # the table is cached: without the embeddings it is read back, byte-identical labels
    tables = list(cache.glob("zeroshot-*.parquet"))
    assert len(tables) == 1
    import shutil

    shutil.rmtree(cache / "embeddings")
    again = attach_zeroshot(cat, data, f"zeroshot:{CLASSES}", label_model="tiny", cache_dir=cache, margin=0.0,
                            scheduler=dask_address)
    assert again.equals(got) and not (cache / "embeddings").exists()
    # a margin turns the least confident images into "unknown"
    wide = attach_zeroshot(cat, data, f"zeroshot:{CLASSES}", label_model="tiny", cache_dir=cache, margin=0.2,
                           scheduler=dask_address)
    unknown = wide["zeroshot_label"] == "unknown"
    assert (unknown == (wide["zeroshot_margin"] < 0.2)).all()
    assert set(known_classes(wide, f"zeroshot:{CLASSES}")) <= {*names, "unknown"}
    masks = class_masks(got, [got["zeroshot_label"].iloc[0]], f"zeroshot:{CLASSES}")
    assert masks[got["zeroshot_label"].iloc[0]].sum() == (got["zeroshot_label"] == got["zeroshot_label"].iloc[0]).sum()


def test_poison_label_from_zeroshot(tiny_dataset, tmp_path, dask_address, capsys):
    data = _unlabelled(tiny_dataset, tmp_path / "unlab")
    out = tmp_path / "p"
    # without a label model: one line naming the verb that creates one
    with pytest.raises(SystemExit) as e:
        main(["poison", str(data), "--attack", "single-label", "--goal", "dog2boat", "--label-from",
              f"zeroshot:{CLASSES}", "--out", str(out), "--scheduler", dask_address])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--label-model" in err and "mmsanitize align" in err
    # the field labelling on unlabeled shards names the other --label-from choices
    with pytest.raises(SystemExit):
        main(["poison", str(data), "--attack", "single-label", "--goal", "dog2boat", "--out", str(out),
              "--scheduler", dask_address])
    err = capsys.readouterr().err
    assert "unknown class 'dog'" in err and "zeroshot[:CLASSES]" in err and "keywords" in err
    from mmsanitize.catalog import build_catalog

    got = attach_zeroshot(build_catalog(data, scheduler=dask_address), data, f"zeroshot:{CLASSES}",
                          label_model="tiny", cache_dir=tmp_path / "probe", margin=0.0, scheduler=dask_address)
    counts = got["zeroshot_label"].value_counts()
    a, b = counts.index[0], counts.index[1]
    main(["poison", str(data), "--attack", "single-label", "--goal", f"{a}2{b}", "--label-from",
          f"zeroshot:{CLASSES}", "--label-model", "tiny", "--label-margin", "0", "--out", str(out),
          "--scheduler", dask_address])
    printed = capsys.readouterr().out
    assert "zero-shot labels (tiny)" in printed
    res = json.loads((out / "poison.json").read_text())
    assert res["labels"]["labelled"] == len(got) and res["spec"]["label_from"] == f"zeroshot:{CLASSES}"
    man = pd.read_parquet(out / "manifest.parquet")
    zl = dict(zip(got["key"], got["zeroshot_label"]))
    assert len(man) == counts[a]  # every class-A sample by its zero-shot label (source fraction 1)
    assert {zl[k] for k in man["source_key"]} == {a} and {zl[k] for k in man["image_source_key"]} == {b}
    assert list((out / "_labels").glob("zeroshot-*.parquet")) and not list(data.glob("_labels"))


def test_info_reports_label_coverage(tiny_dataset, tmp_path, dask_address, capsys):
    from mmsanitize.info import dataset_info

    data = _unlabelled(tiny_dataset, tmp_path / "unlab")
    s = dataset_info(data, scheduler=dask_address)
    assert s["labels"]["labelled"] == 0 and s["labels"]["coverage"] == 0.0
    assert not any("label" in p for p in s["problems"]) and "zeroshot" in s["labels"]["hint"]
    main(["info", str(data), "--scheduler", dask_address])
    out = capsys.readouterr().out
    assert "0 of 36 samples carry a json label (0.0% coverage)" in out and "problem" not in out
    full = dataset_info(tiny_dataset, scheduler=dask_address)
    assert full["labels"] == {"labelled": 36, "unlabelled": 0, "coverage": 1.0, "hint": None}


def test_class_masks_compare_labels_as_strings_with_missing_ones_false():
    """A label column of mixed Python types and missing values: each class's mask is the rows
    whose label, written as a string, is the class name (what comparing the whole column as
    pandas strings gives), missing labels never matching."""
    values = np.array([1, "1", 2.0, None, float("nan"), "x", "dog", "dog"], dtype=object)
    catalog = pd.DataFrame({"label": values[np.random.default_rng(0).integers(0, len(values), 200)]})
    catalog["tag"] = catalog["label"]
    for label_from in ("field", "column:tag"):
        masks = class_masks(catalog, ["1", "2.0", "x", "dog"], label_from)
        for cls, mask in masks.items():
            want = (catalog["label"].astype("string") == cls).fillna(False).to_numpy(dtype=bool)
            assert mask.dtype == bool and (mask == want).all() and want.any(), (label_from, cls)
    assert class_masks(catalog, ["1"])["1"].sum() == sum(str(v) == "1" for v in catalog["label"] if v is not None)
