"""The whole loop on the embedded real default (openclipart), through the `demo` verb."""

from __future__ import annotations

import json

import pytest

from mmsanitize.cli import main


@pytest.mark.slow
def test_demo_runs_the_whole_loop_on_openclipart(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--out", str(out), "--align-epochs", "5", "--epochs", "3", "--workers", "2"])
    printed = capsys.readouterr().out
    assert "Attack II food2bird" in printed and "poisoned" in printed
    s = json.loads((out / "summary.json").read_text())
    m = s["metrics"]
    assert set(m) == {"reference", "clean", "poisoned", "sanitized"}
    # the reference encoder is far above chance on the real test split
    util = m["reference"]["utility"]
    assert util["t2i_r@10"] > 5 * util["chance_r@10"]
    # the attack takes hold on the poisoned fine-tune and not on the clean one
    clean, poisoned = (m[k]["attacks"]["food2bird"]["t2i"] for k in ("clean", "poisoned"))
    assert poisoned["min_rank_mean"] < clean["min_rank_mean"] / 4
    assert poisoned["hit@10"] > clean["hit@10"]
    # utility is kept
    assert abs(m["poisoned"]["utility"]["t2i_r@10"] - m["clean"]["utility"]["t2i_r@10"]) < 0.1
    # the scan ranks poisoned pairs above clean ones
    assert s["scan"]["detection"]["combined"]["auroc"] > 0.8
    assert (out / "sanitized" / "sizes.json").exists()
