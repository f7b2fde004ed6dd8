"""img2dataset ingest end to end against a local HTTP server serving real openclipart PNGs."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pandas as pd
import pytest

from mmsanitize.catalog import build_catalog
from mmsanitize.cli import main
from mmsanitize.errors import UsageError
from mmsanitize.ingest import ingest
from mmsanitize.shards import iter_samples

PNGS = ["animals/bat_orlando_karam_.png", "animals/birds/acquila_architetto_franc_01.png",
        "transportation/vehicles/big_truck_01.png", "food/onion_rings.png"]
OCA = Path("/usr/share/openclipart/png")
pytestmark = pytest.mark.skipif(not all((OCA / p).exists() for p in PNGS), reason="openclipart-png not installed")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Serve `tmp_path/www` on 127.0.0.1 (ephemeral port) from a thread; yields the base URL."""
    www = tmp_path / "www"
    www.mkdir()
    for i, p in enumerate(PNGS):
        shutil.copyfile(OCA / p, www / f"img{i}.png")
    (www / "notes.png").write_text("this is a text file, not an image\n")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_ingest_reports_404_and_non_image(server, tmp_path, dask_address, capsys):
    rows = [{"url": f"{server}/img{i}.png", "caption": f"drawing number {i}"} for i in range(len(PNGS))]
    rows += [{"url": f"{server}/missing.png", "caption": "gone"}, {"url": f"{server}/notes.png", "caption": "text"}]
    urls = tmp_path / "urls.csv"
    pd.DataFrame(rows).to_csv(urls, index=False)
    out = tmp_path / "web"
    main(["ingest", str(urls), "--out", str(out), "--image-size", "64", "--processes", "1"])
    printed = capsys.readouterr().out
    assert f"{len(PNGS)} of {len(rows)} downloaded; 2 failed" in printed
    from mmsanitize.ingest import summarize

    summary = summarize(out)
    failed = {f["url"].rsplit("/", 1)[1]: f["error"] for f in summary["failures"]}
    assert set(failed) == {"missing.png", "notes.png"}
    assert "404" in failed["missing.png"]
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == len(PNGS)
    samples = [s for tar in sorted(out.glob("*.tar")) for s in iter_samples(tar)]
    assert sorted(s.caption for s in samples) == [f"drawing number {i}" for i in range(len(PNGS))]
    assert all(s.meta["sha256"] and s.meta["status"] == "success" for s in samples)
    df = build_catalog(out, scheduler=dask_address)
    assert len(df) == len(PNGS) and (df[["width", "height"]].max(axis=1) == 64).all()


def test_ingest_rejects_bad_input(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        ingest(str(tmp_path / "none.csv"), str(tmp_path / "o"))
    bad = tmp_path / "urls.csv"
    bad.write_text("link,caption\nhttp://127.0.0.1:9/x.png,x\n")
    with pytest.raises(UsageError, match="no column 'url'"):
        ingest(str(bad), str(tmp_path / "o"))
    with pytest.raises(SystemExit) as e:
        main(["ingest", str(bad), str(tmp_path / "o")])
    assert e.value.code == 2


def test_ingest_twice_adds_new_urls_and_keeps_columns(server, tmp_path, dask_address, capsys):
    """Rerun into the same folder with a grown list: only the new URLs are fetched, into a new shard;
    the list's extra columns reach the json and the catalog; both hashes are kept apart."""
    import hashlib

    rows = [{"url": f"{server}/img{i}.png", "caption": f"drawing {i}", "page": f"https://example.org/{i}",
             "label": ["bat", "bird", "truck", "food"][i]} for i in range(len(PNGS))]
    urls = tmp_path / "urls.csv"
    pd.DataFrame(rows[:2]).to_csv(urls, index=False)
    out = tmp_path / "web"
    main(["ingest", str(urls), str(out), "--image-size", "64", "--processes", "1"])  # positional: deprecated alias
    captured = capsys.readouterr()
    assert "deprecated" in captured.err and "2 new URL(s)" in captured.out
    first = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert list(first) == ["00000.tar"]
    pd.DataFrame(rows).to_csv(urls, index=False)
    main(["ingest", str(urls), "--out", str(out), "--image-size", "64", "--processes", "1"])
    assert "2 new URL(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert (out / "00000.tar").read_bytes() == first["00000.tar"]  # the first shard is not rewritten
    assert json.loads((out / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 2}
    main(["ingest", str(urls), "--out", str(out), "--image-size", "64", "--processes", "1"])  # nothing new
    assert "0 new URL(s)" in capsys.readouterr().out
    df = build_catalog(out, scheduler=dask_address)
    assert len(df) == 4 and df["key"].is_unique
    by_url = {r["url"]: r for r in rows}
    assert set(df["url"]) == set(by_url)
    assert [by_url[u]["label"] for u in df["url"]] == list(df["label"])  # a list column became the label
    for u, src in zip(df["url"], df["source_sha256"]):
        name = u.rsplit("/", 1)[1]
        served = (tmp_path / "www" / name).read_bytes()
        assert src == hashlib.sha256(served).hexdigest()  # img2dataset's hash: the downloaded bytes
    assert not (df["sha256"] == df["source_sha256"]).any()  # ours: the stored (resized) bytes
    samples = {s.meta["url"]: s for tar in sorted(out.glob("*.tar")) for s in iter_samples(tar)}
    assert {u: s.meta["page"] for u, s in samples.items()} == {r["url"]: r["page"] for r in rows}
    from mmsanitize.labels import class_masks

    masks = class_masks(df, [rows[0]["url"]], "column:url")
    assert masks[rows[0]["url"]].sum() == 1


def test_ingest_removes_partial_shards_of_a_killed_run(server, tmp_path):
    out = tmp_path / "web"
    urls = tmp_path / "urls.csv"
    pd.DataFrame({"url": [f"{server}/img{i}.png" for i in range(2)], "caption": ["a", "b"]}).to_csv(urls, index=False)
    ingest(str(urls), str(out), image_size=64, processes=1)
    (out / "00000_stats.json").unlink()  # as if killed before the shard finished
    (out / "00000.tar").write_bytes(b"partial")
    res = ingest(str(urls), str(out), image_size=64, processes=1)
    assert res["new_urls"] == 2 and res["successes"] == 2
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]
    assert len(list(iter_samples(out / "00000.tar"))) == 2
    with pytest.raises(UsageError, match="--shard-size"):
        ingest(str(urls), str(out), image_size=64, processes=1, shard_size=50)
    (out / "notes.json").write_text("{}")
    with pytest.raises(UsageError, match="notes.json, which img2dataset would read as a finished shard"):
        ingest(str(urls), str(out), image_size=64, processes=1)
