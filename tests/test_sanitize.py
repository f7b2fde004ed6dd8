"""sanitize: exactly the flagged keys go, everything else is copied byte for byte; resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mmsanitize.cli import main
from mmsanitize.shards import iter_raw_samples


def _members(path):
    return {r.key: [(m.name, d) for m, _, d in r.members] for r in iter_raw_samples(path)}


@pytest.fixture
def scanned(tiny_dataset, tmp_path, dask_address):
    scan = tmp_path / "scan"
    main(["scan", str(tiny_dataset), "--model", "tiny", "--flag-fraction", "0.2", "--reuse-min", "0",
          "--out", str(scan), "--scheduler", dask_address])
    return tiny_dataset, scan


def test_removes_exactly_the_flagged_keys(scanned, tmp_path, dask_address, capsys):
    data, scan = scanned
    flagged = pd.read_parquet(scan / "scores.parquet").query("flagged")
    assert len(flagged) == 7  # round(0.2 * 36)
    out = tmp_path / "clean"
    main(["sanitize", str(data), "--scan", str(scan), "--out", str(out), "--scheduler", dask_address])
    assert "removed 7 pairs" in capsys.readouterr().out
    kept_total = 0
    for name in ("00000", "00001", "00002"):
        src, dst = _members(data / f"{name}.tar"), _members(out / f"{name}.tar")
        gone = set(flagged.loc[flagged["shard"] == f"{name}.tar", "key"])
        assert set(dst) == set(src) - gone
        assert list(dst) == [k for k in src if k not in gone]  # order kept
        for k in dst:
            assert dst[k] == src[k]  # names and bytes identical
        assert json.loads((out / f"{name}_stats.json").read_text())["count"] == len(dst)
        kept_total += len(dst)
        assert list(pd.read_parquet(out / f"{name}.parquet")["key"]) == list(dst)
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == kept_total == 29
    removed = pd.read_parquet(out / "removed.parquet")
    assert set(removed["key"]) == set(flagged["key"]) and (removed["reason"].str.len() > 0).all()


def test_resume_skips_finished_shards_and_gives_same_bytes(scanned, tmp_path, dask_address, capsys):
    data, scan = scanned
    out = tmp_path / "clean"
    argv = ["sanitize", str(data), "--scan", str(scan), "--out", str(out), "--scheduler", dask_address]
    main(argv)
    before = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    mtime = (out / "00000.tar").stat().st_mtime_ns
    (out / "00002_stats.json").unlink()
    (out / "00002.tar").unlink()
    from mmsanitize.sanitize import sanitize

    res = sanitize(data, scan=scan, out=out, scheduler=dask_address)
    assert sorted(res["skipped"]) == ["00000", "00001"]
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == before
    assert (out / "00000.tar").stat().st_mtime_ns == mtime


def test_scan_of_other_shards_is_refused(scanned, tmp_path, dask_address, capsys):
    from conftest import make_dataset

    _, scan = scanned
    other = tmp_path / "other"
    make_dataset(other, n_shards=4)
    with pytest.raises(SystemExit) as e:
        main(["sanitize", str(other), "--scan", str(scan), "--out", str(tmp_path / "c"), "--scheduler", dask_address])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "00003.tar" in err


def test_drop_label_removes_exactly_that_class(tiny_dataset, tmp_path, dask_address, capsys):
    from mmsanitize.catalog import build_catalog

    cat = build_catalog(tiny_dataset, scheduler=dask_address, cache_dir=tmp_path / "cat")
    label = sorted(cat["label"].unique())[0]
    want_gone = set(cat.loc[cat["label"] == label, "key"])
    out = tmp_path / "nolabel"
    main(["sanitize", str(tiny_dataset), "--drop-label", label, "--out", str(out), "--scheduler", dask_address])
    assert f"removed {len(want_gone)} pairs ({len(want_gone)} by label)" in capsys.readouterr().out
    kept = {k for name in ("00000", "00001", "00002") for k in _members(out / f"{name}.tar")}
    assert kept == set(cat["key"]) - want_gone and want_gone
    removed = pd.read_parquet(out / "removed.parquet")
    assert set(removed["key"]) == want_gone and (removed["reason"] == f"label: {label}").all()
    assert json.loads((out / "sanitize.json").read_text())["drop_label"] == [label]


def test_drop_label_nobody_carries_is_refused(tiny_dataset, tmp_path, dask_address, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sanitize", str(tiny_dataset), "--drop-label", "no-such-class", "--out", str(tmp_path / "c"),
              "--scheduler", dask_address])
    assert e.value.code == 2
    assert "no sample is labelled 'no-such-class'" in capsys.readouterr().err


def test_catalogued_shards_are_copied_by_range_with_the_bytes_of_a_parse(tmp_path, monkeypatch):
    """A shard with a finished catalog part is written from the catalog's byte ranges and stored
    parquet rows, never parsed again: the same tar, parquet and stats bytes as the parsing path for
    drops at the start, middle and end; a shard whose json needs pandas has no stored rows and is
    parsed; a key that is not in the shard fails the same way on both paths."""
    from conftest import make_dataset, make_image

    from mmsanitize import catalog as catalog_mod
    from mmsanitize import sanitize as sanitize_mod
    from mmsanitize.catalog import build_catalog, shard_layout
    from mmsanitize.errors import ShardError
    from mmsanitize.sanitize import SanitizeTask, _drop_hash, sanitize_shard
    from mmsanitize.shards import Sample, ShardWriter

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data = tmp_path / "data"
    make_dataset(data, n_shards=1)
    shard = data / "00000.tar"
    with ShardWriter(data, "00001") as w:  # json fields differ between samples: pandas' inference
        for j in range(6):
            w.write(Sample(f"x{j}", make_image("dog", j), "jpg", f"caption {j}", {"a": j} if j % 2 else {"b": "s"}))
    cat = tmp_path / "cat"
    build_catalog([shard, data / "00001.tar"], cache_dir=cat, workers=1)
    layout = shard_layout(shard, cat)
    assert layout is not None and layout.rows.num_rows == 12
    keys = layout.keys

    def run(drop, parsed: bool):
        out = tmp_path / ("parsed" if parsed else "ranges")
        with monkeypatch.context() as m:
            if parsed:
                m.setattr(catalog_mod, "shard_layout", lambda *a: None)
            else:
                m.setattr(sanitize_mod, "rewrite_shard", lambda *a, **k: pytest.fail("parsed a catalogued shard"))
            sanitize_shard(SanitizeTask("00000", str(shard), str(out), drop, _drop_hash(drop), str(cat)))
        return [(out / f"00000{e}").read_bytes() for e in (".tar", ".parquet", "_stats.json")]

    for drop in [(keys[0],), (keys[3], keys[4], keys[9]), (keys[-1],), tuple(keys[1:-1])]:
        assert run(drop, parsed=False) == run(drop, parsed=True), drop
    for parsed in (False, True):
        with pytest.raises(ShardError, match="key nope: key to rewrite not found in shard"):
            run((keys[0], "nope"), parsed)
    assert shard_layout(data / "00001.tar", cat) is None and catalog_mod.catalogued(data / "00001.tar", cat)
    (cat / "00000.rows.parquet").write_bytes(b"not parquet")  # a damaged cache: the shard is parsed
    assert shard_layout(shard, cat) is None
