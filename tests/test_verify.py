"""Split-view check round trip on 127.0.0.1: ingest -> the server swaps/removes images -> verify -> sanitize."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading

import pandas as pd
import pytest
from test_ingest import OCA, PNGS, _Quiet

from mmsanitize.cli import main
from mmsanitize.errors import UsageError
from mmsanitize.shards import iter_samples
from mmsanitize.verify import fetch

pytestmark = pytest.mark.skipif(not all((OCA / p).exists() for p in PNGS), reason="openclipart-png not installed")


class _Flaky(_Quiet):
    """`/flaky.png` answers 503 to its first request, then serves the file; counts requests."""

    hits: dict = {}

    def do_GET(self):
        n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path == "/flaky.png" and n == 1:
            self.send_error(503)
            return
        super().do_GET()


@pytest.fixture
def site(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    for i, p in enumerate(PNGS):
        shutil.copyfile(OCA / p, www / f"img{i}.png")
    shutil.copyfile(OCA / PNGS[0], www / "flaky.png")
    _Flaky.hits = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Flaky, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_retries_transient_errors_not_404(site):
    www, base = site
    status, body, err = fetch(f"{base}/flaky.png", timeout=5, retries=1)
    assert status == 200 and body == (www / "flaky.png").read_bytes() and _Flaky.hits["/flaky.png"] == 2
    assert fetch(f"{base}/none.png", timeout=5, retries=3)[:2] == (404, None) and _Flaky.hits["/none.png"] == 1
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    status, body, err = fetch(f"http://127.0.0.1:{port}/x.png", timeout=2, retries=1)
    assert status is None and body is None and "Refused" in err


def test_ingest_verify_sanitize_round_trip(site, tmp_path, dask_address, capsys):
    www, base = site
    rows = [{"url": f"{base}/img{i}.png", "caption": f"drawing number {i}"} for i in range(len(PNGS))]
    urls = tmp_path / "urls.csv"
    pd.DataFrame(rows).to_csv(urls, index=False)
    web = tmp_path / "web"
    main(["ingest", str(urls), "--out", str(web), "--image-size", "64", "--processes", "1"])
    # after the download, the domain serves other bytes for img1 and drops img3
    shutil.copyfile(OCA / PNGS[2], www / "img1.png")
    (www / "img3.png").unlink()
    ver = tmp_path / "verify"
    capsys.readouterr()
    main(["verify", str(web), "--out", str(ver), "--scheduler", dask_address, "--retries", "0"])
    printed = capsys.readouterr().out
    assert "1 URL(s) now serve other bytes" in printed
    summary = json.loads((ver / "summary.json").read_text())
    assert summary["counts"] == {"unchanged": 2, "changed": 1, "gone": 1, "error": 0, "unverifiable": 0}
    df = pd.read_parquet(ver / "verify.parquet")
    status = dict(zip(df["url"].str.rsplit("/", n=1).str[1], df["status"]))
    assert status == {"img0.png": "unchanged", "img1.png": "changed", "img2.png": "unchanged", "img3.png": "gone"}
    assert df.loc[df["status"] == "gone", "http_status"].tolist() == [404]
    before = (ver / "verify.parquet").read_bytes()
    from mmsanitize.verify import verify

    again = verify(web, out=ver, scheduler=dask_address)  # finished shards are not fetched again
    assert again["skipped"] == ["00000"] and (ver / "verify.parquet").read_bytes() == before

    clean = tmp_path / "clean"
    main(["sanitize", str(web), "--verify", str(ver), "--drop", "changed,gone", "--out", str(clean),
          "--scheduler", dask_address])
    assert "kept 2, removed 2 pairs (2 by verify)" in capsys.readouterr().out
    kept = {s.meta["url"].rsplit("/", 1)[1] for tar in clean.glob("*.tar") for s in iter_samples(tar)}
    assert kept == {"img0.png", "img2.png"}
    removed = pd.read_parquet(clean / "removed.parquet")
    assert sorted(removed["reason"]) == ["verify: changed", "verify: gone"]
    only_changed = tmp_path / "clean2"
    main(["sanitize", str(web), "--verify", str(ver), "--out", str(only_changed), "--scheduler", dask_address])
    assert "kept 3, removed 1 pairs" in capsys.readouterr().out
    # with a scan as well: the union of both, each pair with its reasons
    scan = tmp_path / "scan"
    main(["scan", str(web), "--model", "tiny", "--flag-fraction", "0.25", "--detectors", "similarity",
          "--out", str(scan), "--scheduler", dask_address])
    scores = pd.read_parquet(scan / "scores.parquet")
    by_scan = set(scores.loc[scores["flagged"], "key"])
    by_verify = set(df.loc[df["status"] == "changed", "key"])
    both = tmp_path / "clean3"
    main(["sanitize", str(web), "--scan", str(scan), "--verify", str(ver), "--out", str(both),
          "--scheduler", dask_address])
    removed = pd.read_parquet(both / "removed.parquet")
    assert set(removed["key"]) == by_scan | by_verify and len(by_scan) == 1
    reasons = dict(zip(removed["key"], removed["reason"]))
    assert all("verify: changed" in reasons[k] for k in by_verify)
    assert all(reasons[k] and reasons[k] != "verify: changed" for k in by_scan - by_verify)
    # the curator's page: the split-view section with the stored images of the changed/gone URLs
    page = tmp_path / "report.html"
    main(["report", str(scan), "--shards", str(web), "--verify", str(ver), "--out", str(page)])
    html = page.read_text()
    section = html[html.index("Split-view check"):]
    changed_key = df.loc[df["status"] == "changed", "key"].item()
    gone_key = df.loc[df["status"] == "gone", "key"].item()
    assert section.index(changed_key) < section.index(gone_key)  # changed first
    for key in df.loc[df["status"] == "unchanged", "key"]:
        assert f"<td>{key}</td>" not in section
    from browser import render

    rendered = render(page)
    assert rendered["broken"] == 0 and rendered["errors"] == 0 and not rendered["console"]
    assert rendered["decoded"] == rendered["images"] and f'alt="{changed_key}"' in rendered["dom"]


def test_verify_and_sanitize_bad_requests(tiny_dataset, tmp_path, dask_address, capsys):
    from mmsanitize.sanitize import sanitize
    from mmsanitize.verify import verify

    with pytest.raises(UsageError, match="mmsanitize ingest"):
        verify(tiny_dataset, out=tmp_path / "v", scheduler=dask_address)  # no urls: not img2dataset output
    with pytest.raises(UsageError, match="--scan DIR"):
        sanitize(tiny_dataset, out=tmp_path / "c")
    with pytest.raises(UsageError, match="not a verify folder"):
        sanitize(tiny_dataset, verify=tmp_path / "none", out=tmp_path / "c")
    with pytest.raises(SystemExit) as e:
        main(["verify", str(tiny_dataset), "--out", str(tmp_path / "v"), "--concurrency", "0"])
    assert e.value.code == 2 and "--concurrency" in capsys.readouterr().err
