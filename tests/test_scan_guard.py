"""A meaningless scan is refused or warned about: untrained reference models, most pairs flagged."""

from __future__ import annotations

import json

import pytest

from mmsanitize.cli import main
from mmsanitize.untrained import untrained_reason


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


@pytest.mark.parametrize("model", ["offline-b0-minilm", "open_clip:RN50"])
def test_scan_refuses_an_untrained_reference(tiny_dataset, tmp_path, capsys, model):
    out = tmp_path / "scan"
    err = _error(capsys, ["scan", str(tiny_dataset), "--model", model, "--threshold", "auto", "--out", str(out)])
    assert "mmsanitize align" in err and "--allow-untrained" in err and model in err
    assert not out.exists()  # refused before anything is written


def test_scan_without_a_model_says_how_to_get_one(tiny_dataset, tmp_path, capsys):
    err = _error(capsys, ["scan", str(tiny_dataset), "--threshold", "auto", "--out", str(tmp_path / "s")])
    assert "--model" in err and "mmsanitize align SHARDS --out REF" in err


def test_untrained_reason_reads_the_card():
    assert untrained_reason({"base": "offline-b0-minilm", "checkpoint_sha256": None, "training": None})
    assert untrained_reason({"base": "offline-b0-minilm", "checkpoint_sha256": "ab" * 32, "training": {"epochs": 20}}) is None
    assert untrained_reason({"base": "open_clip:ViT-B-32"})
    assert untrained_reason({"base": "open_clip:ViT-B-32/openai"}) is None
    assert untrained_reason({"base": "tiny"}) is None  # the test suite's fixed-seed model


def test_scan_warns_when_it_flags_more_than_half(tiny_dataset, tmp_path, capsys, dask_address):
    out = tmp_path / "scan"
    main(["scan", str(tiny_dataset), "--model", "tiny", "--detectors", "similarity", "--threshold", "1.0",
          "--out", str(out), "--scheduler", dask_address])
    err = capsys.readouterr().err
    assert "warning: flagged 36 of 36 pairs (100.0%), more than half" in err
    assert json.loads((out / "summary.json").read_text())["warnings"]
    # a scan that flags few pairs has no warning
    main(["scan", str(tiny_dataset), "--model", "tiny", "--detectors", "similarity", "--flag-fraction", "0.1",
          "--out", str(tmp_path / "scan2"), "--scheduler", dask_address])
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "scan2" / "summary.json").read_text())["warnings"] == []
