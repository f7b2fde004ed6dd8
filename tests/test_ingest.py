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
    main(["ingest", str(urls), str(out), "--image-size", "64", "--processes", "1"])
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
