"""`mmsanitize report`: a real scan of real shards rendered in headless Chromium; the page is
self-contained, deterministic, and stays small when most of a large scan is flagged."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from browser import render
from conftest import make_image

from mmsanitize.cli import main
from mmsanitize.shards import Sample, ShardWriter, write_sizes

SHARED = "00001"  # the Attack I signature: one image under several class-A captions


@pytest.fixture
def scanned(tmp_path, dask_address):
    """Two shards with URLs, three pairs sharing one image, a manifest of those three, a scan
    with the tiny model and an evaluate result."""
    data = tmp_path / "data"
    classes = ["dog", "boat", "cat", "car"]
    shared_img = make_image("boat", 999)
    poisoned = []
    for s in range(2):
        with ShardWriter(data, f"{s:05d}") as w:
            for j in range(14):
                i = s * 14 + j
                label = classes[i % 4]
                key = f"{s:05d}{j:04d}"
                img, cap = make_image(label, i), f"a photo of a {label} number {i}"
                if s == 1 and j < 3:
                    img, cap = shared_img, f"a dog on a sofa, picture {j}"
                    poisoned.append(key)
                w.write(Sample(key, img, "jpg", cap, {"label": label, "key": key,
                                                      "url": f"http://127.0.0.1:8000/img/{key}.jpg"}))
    write_sizes(data)
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame({"key": poisoned}).to_parquet(manifest)
    scan = tmp_path / "scan"
    main(["scan", str(data), "--model", "tiny", "--detectors", "similarity,image_reuse", "--flag-fraction", "0.25",
          "--manifest", str(manifest), "--out", str(scan), "--scheduler", dask_address])
    metrics = tmp_path / "tiny_metrics.json"
    main(["evaluate", "tiny", "--test", str(data), "--out", str(metrics)])
    return data, scan, manifest, metrics


def test_report_of_a_real_scan_renders_in_chromium(scanned, tmp_path, capsys):
    data, scan, manifest, metrics = scanned
    capsys.readouterr()
    out = tmp_path / "r" / "report.html"
    main(["report", str(scan), str(metrics), "--shards", str(data), "--manifest", str(manifest), "--top", "5",
          "--out", str(out)])
    printed = capsys.readouterr().out
    flagged = pd.read_parquet(scan / "scores.parquet").query("flagged")
    assert f"5 of {len(flagged)} flagged pairs on the page" in printed
    html = out.read_text()

    # self-contained: every image is a data URI, nothing is fetched
    srcs = re.findall(r'<img src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/") for s in srcs)
    assert "<link" not in html and 'src="http' not in html
    # gallery: the top 5 by combined score, with caption, URL, key/shard, scores and reason
    assert html.count('class="card') == 5
    top = flagged.sort_values("combined", ascending=False).iloc[0]
    assert top["key"] in html and f"http://127.0.0.1:8000/img/{top['key']}.jpg" in html
    assert "similarity" in html and "combined" in html
    # the three pairs sharing one image are one group, with the manifest's truth
    assert re.search(r"<b>3 pairs</b>, [1-3] flagged", html)
    for j in range(3):
        assert f"a dog on a sofa, picture {j}" in html
    # ROC + cosine + per-detector histograms, the detection table and the evaluate run's utility table
    assert 'alt="ROC curve per detector"' in html and 'alt="histogram of image-text cosine' in html
    assert "Detection quality against the manifest (3 poisoned pairs)" in html
    assert "Utility on the test split" in html and "tiny" in html
    # every flagged pair is in the CSV beside the page
    csv = pd.read_csv(out.with_name("report_flagged.csv"), dtype={"key": str})
    assert sorted(csv["key"]) == sorted(flagged["key"]) and csv["caption"].notna().all()
    assert csv["combined"].is_monotonic_decreasing

    page = render(out)
    assert page["images"] == page["decoded"] == len(srcs) and page["broken"] == 0
    assert page["errors"] == 0 and page["console"] == []

    # deterministic: the same command gives the same bytes
    again = tmp_path / "r2" / "report.html"
    main(["report", str(scan), str(metrics), "--shards", str(data), "--manifest", str(manifest), "--top", "5",
          "--out", str(again)])
    assert again.read_bytes() == out.read_bytes()


def test_report_without_shards_reads_captions_from_the_embeddings(scanned, tmp_path):
    _, scan, _, _ = scanned
    out = tmp_path / "plain.html"
    main(["report", str(scan), "--out", str(out)])
    html = out.read_text()
    assert "a photo of a" in html and "no thumbnails or URLs" in html
    assert "Needs the shards" in html


def test_report_of_a_large_scan_shows_only_the_top(scanned, tmp_path):
    """150k flagged rows (a real scan's rows repeated under new keys): the page holds the top N,
    the CSV holds them all."""
    _, scan, _, _ = scanned
    big = tmp_path / "big_scan"
    big.mkdir()
    scores = pd.read_parquet(scan / "scores.parquet")
    reps = 150_000 // len(scores) + 1
    rows = pd.concat([scores.assign(key=scores["key"] + f"_{r:05d}") for r in range(reps)], ignore_index=True)
    rows["flagged"] = True
    rows.to_parquet(big / "scores.parquet")
    summary = json.loads((scan / "summary.json").read_text())
    summary.update(samples=len(rows), flagged=len(rows), fraction_flagged=1.0)
    (big / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "big.html"
    main(["report", str(big), "--top", "50", "--out", str(out)])
    assert out.stat().st_size < 1_500_000
    assert out.read_text().count('class="card') == 50
    assert len(out.with_name("big_flagged.csv").read_text().splitlines()) == len(rows) + 1


def test_report_of_a_folder_that_is_no_scan_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a finished scan folder" in err
    assert not (tmp_path / "r.html").exists()
