"""The whole loop on the embedded real default (openclipart), through the `demo` verb, and its
report rendered in headless Chromium (the screenshot the README shows)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from browser import render

from mmsanitize.cli import main

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "report.png"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run shared by the tests of this module: (output folder, what it printed)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "demo"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["demo", "--out", str(out), "--align-epochs", "5", "--epochs", "3", "--workers", "2"])
    return out, buf.getvalue()


@pytest.mark.slow
def test_demo_runs_the_whole_loop_on_openclipart(demo_run):
    out, printed = demo_run
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


@pytest.mark.slow
def test_demo_report_renders_in_chromium(demo_run):
    out, printed = demo_run
    page_path = out / "report.html"
    assert f"report: {page_path}" in printed
    html = page_path.read_text()
    s = json.loads((out / "summary.json").read_text())
    flagged = s["scan"]["flagged"]
    assert f"of {flagged:,} flagged pairs by combined score" in html
    # the four models side by side, and the attack goal's table
    for model in ("reference", "clean", "poisoned", "sanitized"):
        assert f"<td>{model}</td>" in html
    assert "Attack goal food2bird" in html
    srcs = re.findall(r'<img src="([^"]*)"', html)
    assert len(srcs) >= 3 + min(100, flagged)  # plots + a thumbnail per gallery card
    page = render(page_path, screenshot=SCREENSHOT)
    assert page["images"] == page["decoded"] == len(srcs) and page["broken"] == 0
    assert page["errors"] == 0 and page["console"] == []
    assert SCREENSHOT.stat().st_size > 50_000
