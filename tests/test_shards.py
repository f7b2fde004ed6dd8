"""Shard reader/writer: round trips with webdataset and img2dataset conventions, determinism, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile

import pandas as pd
import pytest

from conftest import make_dataset, make_image
from mmsanitize.cli import main
from mmsanitize.errors import ShardError, UsageError
from mmsanitize.shards import (Sample, ShardWriter, expand_shards, iter_raw_samples, iter_samples,
                               rewrite_shard)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_webdataset_and_img2dataset_layout(tiny_dataset):
    import webdataset as wds

    tars = expand_shards(tiny_dataset)
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]
    ours = {s.key: s for t in tars for s in iter_samples(t)}
    theirs = {}
    for t in tars:
        for d in wds.WebDataset(str(t), shardshuffle=False):
            theirs[d["__key__"]] = d
    assert set(ours) == set(theirs) and len(ours) == 36
    for key, s in ours.items():
        assert theirs[key]["jpg"] == s.image
        assert theirs[key]["txt"].decode() == s.caption
        assert json.loads(theirs[key]["json"]) == s.meta
    # img2dataset's conventions: parquet with the same keys in order, stats file, sizes.json
    for t in tars:
        stem = t.name[:-4]
        pq = pd.read_parquet(tiny_dataset / f"{stem}.parquet")
        assert list(pq["key"]) == [s.key for s in iter_samples(t)]
        assert set(pq["status"]) == {"success"}
        stats = json.loads((tiny_dataset / f"{stem}_stats.json").read_text())
        assert stats["count"] == stats["successes"] == len(pq)
    sizes = json.loads((tiny_dataset / "sizes.json").read_text())
    assert sizes == {"00000.tar": 12, "00001.tar": 12, "00002.tar": 12}
    # tarfile agrees on member names (plain, flat, regular files)
    with tarfile.open(tars[0]) as tf:
        assert all(m.isfile() and "/" not in m.name for m in tf.getmembers())


def test_writer_is_deterministic(tmp_path):
    a = make_dataset(tmp_path / "a", n_shards=2, per_shard=5)
    b = make_dataset(tmp_path / "b", n_shards=2, per_shard=5)
    for x, y in zip(a, b):
        assert digest(x) == digest(y)
        assert digest(x.with_suffix(".parquet")) == digest(y.with_suffix(".parquet"))
    with tarfile.open(a[0]) as tf:
        m = tf.getmembers()[0]
        assert (m.mtime, m.uid, m.gid, m.uname, m.mode) == (946684800, 0, 0, "", 0o644)


def test_identity_splice_is_byte_identical_and_edits_apply(tiny_dataset, tmp_path):
    src = tiny_dataset / "00001.tar"
    rewrite_shard(src, tmp_path / "same", "00001")
    assert digest(src) == digest(tmp_path / "same" / "00001.tar")
    new = Sample("000010003", make_image("boat", 500), "jpg", "a replaced caption", {"label": "boat"})
    extra = Sample("x99", make_image("cat", 501), "png", "appended", None)
    rewrite_shard(src, tmp_path / "edit", "00001", replace={"000010003": new}, drop={"000010007"}, append=[extra])
    got = {s.key: s for s in iter_samples(tmp_path / "edit" / "00001.tar")}
    orig = {s.key: s for s in iter_samples(src)}
    assert "000010007" not in got and got["x99"].caption == "appended"
    assert got["000010003"].image == new.image and got["000010003"].caption == "a replaced caption"
    for k in set(orig) - {"000010003", "000010007"}:
        assert got[k].image == orig[k].image and got[k].caption == orig[k].caption
    pq = pd.read_parquet(tmp_path / "edit" / "00001.parquet")
    assert list(pq["key"]) == list(got)
    with pytest.raises(ShardError, match="not found"):
        rewrite_shard(src, tmp_path / "bad", "00001", drop={"nope"})
    assert not (tmp_path / "bad" / "00001.tar").exists()
    assert not list((tmp_path / "bad").glob("*.tmp"))


def test_expand_shards_specs(tiny_dataset):
    assert len(expand_shards(tiny_dataset)) == 3
    assert len(expand_shards(str(tiny_dataset / "{00000..00001}.tar"))) == 2
    assert len(expand_shards(str(tiny_dataset / "00002.tar"))) == 1
    assert len(expand_shards(str(tiny_dataset / "*.tar"))) == 3
    with pytest.raises(UsageError, match="missing"):
        expand_shards(str(tiny_dataset / "{00000..00005}.tar"))
    with pytest.raises(UsageError, match="no such"):
        expand_shards(str(tiny_dataset / "nope"))


# ----------------------------------------------------------------------------- bad input


def add(tf: tarfile.TarFile, name: str, data: bytes, kind=tarfile.REGTYPE, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    info.linkname = linkname
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def good(tf, key, caption=b"a photo of a dog"):
    add(tf, f"{key}.jpg", make_image("dog", 1))
    add(tf, f"{key}.txt", caption)


def build_bad(tmp_path, case: str):
    """A dataset folder with one good shard and one shard broken as `case`; returns (dir, bad shard, key)."""
    d = tmp_path / case
    d.mkdir()
    with tarfile.open(d / "00000.tar", "w") as tf:
        good(tf, "000000000")
        good(tf, "000000001")
    bad = d / "00001.tar"
    key = "000010001"
    if case == "truncated":
        with tarfile.open(bad, "w") as tf:
            good(tf, "000010000")
            good(tf, key)
        data = bad.read_bytes()
        bad.write_bytes(data[:1700])
        key = None
    elif case == "empty":
        with tarfile.open(bad, "w"):
            pass
        key = None
    else:
        with tarfile.open(bad, "w") as tf:
            good(tf, "000010000")
            if case == "undecodable":
                add(tf, f"{key}.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
                add(tf, f"{key}.txt", b"a photo of a cat")
            elif case == "no-caption":
                add(tf, f"{key}.jpg", make_image("cat", 2))
            elif case == "non-utf8":
                add(tf, f"{key}.jpg", make_image("cat", 2))
                add(tf, f"{key}.txt", b"caf\xe9 au lait")
            elif case == "dotted-key":
                key = "0000.10001"
                add(tf, "0000.10001.jpg", make_image("cat", 2))
                add(tf, "0000.10001.txt", b"a cat")
            elif case == "duplicate-across":
                key = "000000001"
                good(tf, key)
            elif case == "escape":
                key = "../x"
                add(tf, "../x.jpg", make_image("cat", 2))
                add(tf, "../x.txt", b"a cat")
            elif case == "symlink":
                key = "000010001.jpg"
                add(tf, key, b"", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
                add(tf, "000010001.txt", b"a cat")
    return d, bad.name, key


@pytest.mark.parametrize("case,reason", [
    ("truncated", "truncated"),
    ("undecodable", "undecodable image"),
    ("no-caption", "no caption"),
    ("non-utf8", "not valid UTF-8"),
    ("dotted-key", "contains a dot"),
    ("duplicate-across", "duplicate key across shards"),
    ("empty", "no samples"),
    ("escape", "escapes"),
    ("symlink", "link"),
])
def test_bad_input_one_line_error_and_no_output(tmp_path, capsys, dask_address, case, reason):
    d, shard, key = build_bad(tmp_path, case)
    with pytest.raises(SystemExit) as exc:
        main(["catalog", str(d), "--scheduler", dask_address])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert reason in err
    assert f"shard {shard}" in err
    if key is not None:
        assert f"key {key}" in err
    assert not (d / "_catalog" / "catalog.parquet").exists()
    assert not list(d.rglob("*.tmp"))


def test_iter_raw_samples_reports_offsets(tiny_dataset):
    raws = list(iter_raw_samples(tiny_dataset / "00000.tar", with_data=False))
    assert raws[0].start == 0
    assert all(a.end == b.start for a, b in zip(raws, raws[1:]))
    assert all(d is None for r in raws for _, _, d in r.members)


def test_writer_aborts_cleanly(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, "00000") as w:
            w.write(Sample("k1", make_image("dog", 1), "jpg", "a dog", None))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_file_fingerprint_is_content_based(tmp_path):
    import os

    from mmsanitize.shards import file_fingerprint

    p = tmp_path / "00000.tar"
    p.write_bytes(b"a" * 1000)
    first = file_fingerprint(p)
    os.utime(p, ns=(5, 5))
    assert file_fingerprint(p) == first  # a new mtime, same bytes
    p.write_bytes(b"b" * 1000)
    os.utime(p, ns=(5, 5))  # same size and mtime, other bytes: the memo must not hide the change
    assert file_fingerprint(p) != first
    assert set(first) == {"name", "size", "sha256"}


# ----------------------------------------------------------------------------- splicing fast path


def _rich_shards(d):
    """Shards that exercise rewrite_shard's parquet rows: (path, read by the in-memory fast path?)."""
    d.mkdir(parents=True)
    metas = [{"label": "dog", "n": 3, "ok": True, "x": 1.5, "none": None, "nested": {"a": 1}, "lst": [1]},
             {"key": "other", "caption": "meta caption", "status": "failed", "label": "cat"},
             None, {"label": "bøat ✓", "extra_col": "only here"}, {}]
    with ShardWriter(d, "00000") as w:
        w.write(Sample("k" * 95, make_image("dog", 99), "jpg", "a 100-byte member name", {"label": "dog"}))
        for i in range(15):
            w.write(Sample(f"k{i:03d}", make_image("dog", i), "png" if i % 3 else "jpg",
                           f"caption {i} ünïcode" if i % 4 else f"plain {i}", metas[i % len(metas)],
                           {"cls": str(i).encode()} if i % 5 == 0 else {}))
    # Python's tarfile (pax format, plain ASCII names): json spelled with spaces, a BOM, no json
    with tarfile.open(d / "00001.tar", "w") as tf:
        for i in range(12):
            add(tf, f"t{i:03d}.jpg", make_image("cat", 100 + i))
            add(tf, f"t{i:03d}.txt", f"a cat {i}".encode())
            js = [b' {"label": "cat"} ', b'\xef\xbb\xbf{"label":"cat"}', b'{"label":"cat","i":%d}' % i, None][i % 4]
            if js is not None:
                add(tf, f"t{i:03d}.json", js)
    # GNU tar with a directory entry and an upper-case extension: only the streaming reader
    with tarfile.open(d / "00002.tar", "w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        tf.addfile(info)
        for i in range(6):
            add(tf, f"g{i:03d}.jpg", make_image("car", 200 + i))
            add(tf, f"g{i:03d}.{'TXT' if i == 2 else 'txt'}", f"a car {i}".encode())
    return [(d / "00000.tar", True), (d / "00001.tar", True), (d / "00002.tar", False)]


def _rewrite_both(monkeypatch, out, src, **kw):
    """rewrite_shard through the fast path and through the streaming reader: {fast: files or error}."""
    from mmsanitize import shards

    got = {}
    for fast, limit in ((True, shards._FAST_MAX_BYTES), (False, 0), ("too large", 1000)):
        monkeypatch.setattr(shards, "_FAST_SCAN", bool(fast))
        monkeypatch.setattr(shards, "_FAST_MAX_BYTES", limit)  # a larger shard: the streaming reader
        o = out / str(fast)
        try:
            shards.rewrite_shard(src, o, "00007", **kw)
            got[fast] = {p.name: p.read_bytes() for p in sorted(o.iterdir())}
        except ShardError as e:
            got[fast] = ("ShardError", str(e), sorted(p.name for p in o.iterdir()) if o.exists() else [])
    assert got[True] == got["too large"]
    return got


def test_fast_splice_is_byte_identical_to_streaming_reader(tmp_path, monkeypatch):
    from mmsanitize.shards import _scan_plain_tar

    for i, (src, plain) in enumerate(_rich_shards(tmp_path / "data")):
        assert (_scan_plain_tar(src.read_bytes()) is not None) == plain, src.name
        samples = list(iter_samples(src)) if i == 0 else []  # (parse_sample refuses a BOM in json)
        keys = [r.key for r in iter_raw_samples(src, with_data=False)]
        new = Sample("zz_new", make_image("boat", 7), "webp", "a new caption", {"label": "boat", "k": [1]})
        edits = [{}, {"drop": {keys[0], keys[5]}}, {"drop": {keys[-1]}},
                 {"replace": {keys[2]: new}, "drop": {keys[3]}, "append": [Sample("zz_app", b"img", "jpg", "app", None)]},
                 {"append": samples[:2] and [Sample(s.key + "b", s.image, s.image_ext, s.caption, s.meta, s.extras)
                                             for s in samples[:2]]},
                 {"drop": set(keys[1:])},
                 {"stats_extra": {"input": {"name": src.name}}}]
        for j, kw in enumerate(edits):
            got = _rewrite_both(monkeypatch, tmp_path / f"out{i}_{j}", src, **kw)
            assert got[True] == got[False], (src.name, kw)
            assert isinstance(got[True], dict) and len(got[True]) == 3
        # the parquet is img2dataset's: key, caption first, one row per sample in tar order
        pq = pd.read_parquet(tmp_path / f"out{i}_0" / "True" / "00007.parquet")
        assert list(pq.columns[:2]) == ["key", "caption"] and list(pq["key"]) == keys


def test_fast_splice_errors_match_streaming_reader(tmp_path, monkeypatch):
    d = tmp_path / "bad"
    d.mkdir()
    cases = {"bad-json": [("a.txt", b"ok"), ("a.json", b'{"x":'), ("b.txt", b"ok")],
             "bad-utf8": [("a.txt", b"ok"), ("b.txt", b"caf\xe9")],
             "json-extra-data": [("a.txt", b"ok"), ("a.json", b'{"x":1} {"y":2}')],
             "json-utf16": [("a.txt", b"ok"), ("a.json", '{"x":1}'.encode("utf-16-le"))],
             "json-list": [("a.txt", b"ok"), ("a.json", b"[1, 2]")]}
    for name, members in cases.items():
        src = d / f"{name}.tar"
        with tarfile.open(src, "w") as tf:
            for member, data in members:
                add(tf, member, data)
        if name == "json-list":  # _row cannot take a list: the same exception either way
            from mmsanitize import shards

            for fast in (True, False):
                monkeypatch.setattr(shards, "_FAST_SCAN", fast)
                with pytest.raises(AttributeError):
                    shards.rewrite_shard(src, tmp_path / name / str(fast), "00000")
            continue
        got = _rewrite_both(monkeypatch, tmp_path / name, src)
        assert got[True] == got[False], got
        if name == "json-utf16":  # json.loads reads UTF-16 bytes
            assert isinstance(got[True], dict)
        else:
            assert got[True][0] == "ShardError" and got[True][2] == [], got
    src = make_dataset(tmp_path / "good", n_shards=1, per_shard=6)[0]
    keys = [r.key for r in iter_raw_samples(src, with_data=False)]
    clash = Sample(keys[4], make_image("dog", 9), "jpg", "clash", None)  # a replacement named like a later key
    for kw in ({"replace": {keys[1]: clash}}, {"drop": {"nope"}}, {"append": [clash]},
               {"replace": {keys[4]: Sample(keys[0], b"x", "jpg", "c", None)}}):
        got = _rewrite_both(monkeypatch, tmp_path / f"clash{len(str(kw))}", src, **kw)
        assert got[True] == got[False] and got[True][0] == "ShardError", got


def _parquet_bytes(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


ROW_CASES = {
    # name: (metas for 6 samples, whether the column path applies)
    "img2dataset json": ([{"key": f"k{i}", "caption": f"c{i}", "url": f"http://x/{i}", "width": 32 + i,
                           "height": 32, "sha256": "ab" * 32, "status": "success", "error_message": None,
                           "label": "dog"} for i in range(6)], True),
    "floats and bools": ([{"score": 0.5 * i, "ok": i % 2 == 0, "note": None if i % 3 else "n"} for i in range(6)], True),
    "all None column": ([{"label": None, "w": 1} for _ in range(6)], True),
    "own status": ([{"status": "failed" if i == 2 else "success"} for i in range(6)], True),
    "no json": ([None] * 6, True),
    "empty json": ([{}] * 6, True),
    "key after other fields": ([{"a": i, "key": "x", "caption": "y"} for i in range(6)], True),
    "int column with a None": ([{"w": None if i == 3 else i} for i in range(6)], False),
    "int and float": ([{"w": 1.5 if i == 3 else i} for i in range(6)], False),
    "int and bool": ([{"w": True if i == 3 else i} for i in range(6)], False),
    "NaN": ([{"w": float("nan") if i == 3 else 0.5} for i in range(6)], False),
    "beyond int64": ([{"w": 2**63 if i == 3 else i} for i in range(6)], False),
    "nested values": ([{"exif": {"a": 1} if i == 3 else None, "tags": ["x"], "w": i} for i in range(6)], False),
    "fields in another order": ([{"a": 1, "b": 2} if i % 2 else {"b": 2, "a": 1} for i in range(6)], False),
    "a field missing": ([{"a": 1, "b": 2} if i != 4 else {"a": 1} for i in range(6)], False),
    "some without json": ([None if i == 1 else {"a": "x"} for i in range(6)], False),
    "str and int": ([{"a": "x" if i else 3} for i in range(6)], False),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_shard_parquet_from_columns_equals_pandas_rows(case, monkeypatch):
    """rows_table builds plain columns directly and falls back to pandas otherwise: the parquet
    bytes are the pandas path's in every case, and the direct path is taken where it applies."""
    from mmsanitize import shards

    metas, direct = ROW_CASES[case]
    rows = [(f"{i:04d}", f"caption {i}", m) for i, m in enumerate(metas)]

    def outcome(fn):
        try:
            return _parquet_bytes(fn(rows))
        except Exception as e:  # noqa: BLE001 - pyarrow refuses some mixed columns: the same way both times
            return type(e)

    want = outcome(shards._rows_table_by_rows)
    calls = []
    real = shards._rows_table_by_rows
    monkeypatch.setattr(shards, "_rows_table_by_rows", lambda r: calls.append(1) or real(r))
    assert outcome(shards.rows_table) == want
    assert bool(calls) == (not direct)


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_rows_from_the_stored_table_equal_the_table_of_the_rows(case):
    """What sanitize and poison write for a catalogued shard (the stored table of every row, read
    back from parquet, sliced, with new samples' rows put in) has the bytes of `rows_table` of
    those rows: for every subset of the rows ("floats and bools" leaves a str/None column with
    only None) and with a new row in the middle and at the end whose values are of the same, a
    narrower or another type (then None: pandas' inference). The pandas cases store no table."""
    import pyarrow.parquet as pq

    from mmsanitize.shards import layout_rows_table, plain_rows_table, rows_table

    metas, direct = ROW_CASES[case]
    rows = [(f"{i:04d}", f"caption {i}", m) for i, m in enumerate(metas)]
    table = plain_rows_table(rows)
    assert (table is not None) == direct
    if table is None:
        return
    stored = pq.read_table(io.BytesIO(_parquet_bytes(table)))
    for mask in range(1, 2 ** len(rows)):
        keep = [i for i in range(len(rows)) if mask >> i & 1]
        pieces = [(0, i, i + 1) for i in keep]  # (one piece per row: runs are joined the same way)
        want = _parquet_bytes(rows_table([rows[i] for i in keep]))
        assert _parquet_bytes(layout_rows_table(stored, pieces)) == want, keep
    metas_new = [metas[0], metas[0] and {f: None for f in metas[0]}, metas[0] and {f: "s" for f in metas[0]},
                 metas[0] and {f: 7 for f in metas[0]}]
    for meta in metas_new:
        extra = [("n1", "new 1", meta), ("n2", "new 2", meta)]
        new = plain_rows_table(extra)
        if new is None:
            continue
        pieces = [(0, 0, 2), (1, 0, 1), (0, 3, 6), (1, 1, 2)]
        want_rows = [*rows[:2], extra[0], *rows[3:], extra[1]]
        got = layout_rows_table(stored, pieces, new)
        want = plain_rows_table(want_rows)
        assert (got is None) == (want is None), meta
        if got is not None:
            assert _parquet_bytes(got) == _parquet_bytes(want), meta


def _layout(path):
    """A shard's ShardLayout built by parsing it (what its catalog part stores)."""
    import numpy as np

    from mmsanitize.shards import ShardLayout, json_fields, parse_sample, plain_rows_table

    raws = list(iter_raw_samples(path))
    samples = [parse_sample(r, path.name) for r in raws]
    return ShardLayout([r.key for r in raws], np.array([r.start for r in raws]), np.array([r.end for r in raws]),
                       plain_rows_table([(s.key, s.caption, s.meta) for s in samples]), json_fields(samples[0].meta))


def test_rewrite_from_layout_writes_the_bytes_and_raises_the_errors_of_rewrite_shard(tmp_path):
    """Splicing from the catalog's layout (poison, sanitize) writes what parsing the shard writes
    (tar, parquet, stats) for replacements, drops and appends anywhere, raises the same one-line
    errors, and declines (None, nothing written) when a new sample's json would need pandas."""
    from mmsanitize.shards import rewrite_from_layout, rewrite_shard

    src = make_dataset(tmp_path / "data", n_shards=1, per_shard=8)[0]
    layout = _layout(src)
    keys = layout.keys

    def new(key, meta="same"):
        meta = {"key": key, "label": "boat"} if meta == "same" else meta  # the fields of make_dataset's json
        return Sample(key, make_image("boat", 99), "jpg", f"a new caption for {key}", meta)

    def outcome(fn, out, **edits):
        try:
            stats = fn(out, **edits)
        except ShardError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - pyarrow refuses a str/int column (the pandas path)
            return type(e)
        if stats is None:
            return None
        return [(out / f"00000{e}").read_bytes() for e in (".tar", ".parquet", "_stats.json")]

    def both(**edits):
        layout_out, parsed_out = tmp_path / "layout", tmp_path / "parsed"
        for d in (layout_out, parsed_out):
            for f in d.glob("*") if d.exists() else ():
                f.unlink()
        got = outcome(lambda out, **e: rewrite_from_layout(src, out, "00000", layout, stats_extra={"x": 1}, **e),
                      layout_out, **edits)
        want = outcome(lambda out, **e: rewrite_shard(src, out, "00000", stats_extra={"x": 1}, **e), parsed_out, **edits)
        return got, want

    cases = [
        {"replace": {keys[3]: new("p1")}},
        {"replace": {keys[0]: new("p0"), keys[7]: new(keys[7])}, "drop": [keys[4]], "append": [new("a1"), new("a2")]},
        {"drop": [keys[1], keys[2], keys[6]]},
        {"append": [new("a1")]},
        {"replace": {keys[2]: new(keys[5])}},  # the new key is a later kept key
        {"replace": {keys[5]: new(keys[1])}},  # the new key is an earlier kept key
        {"drop": [keys[0], "nope"]},
        {"append": [new(keys[3])]},
        {"replace": {keys[1]: new("bad/key")}},
        {"drop": list(keys)},
    ]
    for edits in cases:
        got, want = both(**edits)
        assert got == want, edits
    assert isinstance(both(replace={keys[3]: new("p1")})[0], list)
    assert "duplicate key in output shard" in both(append=[new(keys[3])])[0]
    for meta in ({"key": "x", "label": 3}, {"label": "boat", "key": "x"}, None, {"label": "boat"}):
        got, want = both(replace={keys[3]: new("p1", meta)})
        assert got is None and want is not None, meta
        assert not (tmp_path / "layout" / "00000.tar").exists()
    # stored rows that are not a plain table (a damaged or foreign cache): declined before anything is written
    import pyarrow as pa

    odd = layout._replace(rows=layout.rows.append_column("tags", pa.array([[1]] * len(keys))))
    assert rewrite_from_layout(src, tmp_path / "odd", "00000", odd, drop=[keys[1]]) is None
    assert not (tmp_path / "odd" / "00000.tar").exists()


def test_tar_header_from_its_template_equals_tarfiles_header():
    """The template header (names up to 100 UTF-8 bytes, sizes below 8 GiB) is byte for byte the
    header tarfile builds; longer names and larger sizes go to tarfile itself."""
    import random

    from mmsanitize import shards

    names = ["", "a", "x" * 100, "x" * 101, "é" * 50, "é" * 51, "000000001.jpg", "k/ey.txt", "日本語.png"]
    sizes = [0, 1, 511, 512, 10**6, 8**11 - 1, 8**11, 2**40]
    rng = random.Random(0)
    cases = [(n, s) for n in names for s in sizes]
    cases += [("".join(rng.choice("abcé/._-09日") for _ in range(rng.randint(0, 60))), rng.randint(0, 8**11 + 5))
              for _ in range(500)]
    for name, size in cases:
        assert shards.tar_header(name, size) == shards._tarfile_header(name, size), (name, size)


@pytest.mark.parametrize("refuse", [(), ("copy_file_range",), ("copy_file_range", "sendfile")])
def test_copy_range_copies_the_range_whichever_way_the_kernel_allows(tmp_path, monkeypatch, refuse):
    """copy_file_range, else sendfile (another filesystem: ext4 -> tmpfs), else user space: the same
    bytes at the writer's position, and the writer's position after them."""
    import errno
    import os

    from mmsanitize import shards

    calls = {"copy_file_range": 0, "sendfile": 0}
    for name in calls:
        real = getattr(os, name)

        def spy(*args, _name=name, _real=real):
            calls[_name] += 1
            if _name in refuse:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            return _real(*args)

        monkeypatch.setattr(os, name, spy)
    data = os.urandom(3 << 20)
    (tmp_path / "src").write_bytes(data)
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst:
        dst.write(b"head")
        shards.copy_range(src, dst, 1000, 1000 + (2 << 20) + 7)
        dst.write(b"tail")
    assert (tmp_path / "dst").read_bytes() == b"head" + data[1000:1000 + (2 << 20) + 7] + b"tail"
    assert calls["copy_file_range"] >= 1
    assert (calls["sendfile"] >= 1) == ("copy_file_range" in refuse)


def test_plain_sample_members_equal_the_tar_readers_or_give_way_to_it(tmp_path):
    """A sample's catalogued byte range parsed directly (`plain_sample_members`, poison's reads)
    gives the members the general tar reader gives, or None for anything it does not read (a
    100-byte name, an upper-case extension, a bad checksum); `read_ranges` returns
    `iter_samples`' samples either way and names the key when a range is damaged."""
    from mmsanitize.poison import read_ranges
    from mmsanitize.shards import parse_sample, plain_sample_members

    slow = []
    for path, _ in _rich_shards(tmp_path / "rich"):
        raws = list(iter_raw_samples(path))
        blob = path.read_bytes()
        for raw in raws:
            got = plain_sample_members(blob[raw.start:raw.end], raw.key)
            want = [((m.name, m.start - raw.start, m.data_offset - raw.start, m.size), ext, data)
                    for m, ext, data in raw.members]
            if got is None:
                slow.append(raw.key)
            else:
                assert [((m.name, m.start, m.data_offset, m.size), ext, data) for m, ext, data in got] == want
            try:
                want_sample = parse_sample(raw, path.name)
            except ShardError as e:  # e.g. a json with a BOM: the same error either way
                with pytest.raises(ShardError, match=re.escape(str(e))):
                    read_ranges(str(path), [raw.key], [(raw.start, raw.end)])
            else:
                assert read_ranges(str(path), [raw.key], [(raw.start, raw.end)]) == {raw.key: want_sample}
    assert slow == ["k" * 95, "g002"]  # a 100-byte member name (no NUL), an upper-case extension

    path = tmp_path / "rich" / "00000.tar"
    raw = list(iter_raw_samples(path))[3]
    data = bytearray(path.read_bytes())
    data[raw.start + 150] ^= 1  # a checksum digit of the sample's first header
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    assert plain_sample_members(bytes(data[raw.start:raw.end]), raw.key) is None
    with pytest.raises(ShardError, match=raw.key):
        read_ranges(str(bad), [raw.key], [(raw.start, raw.end)])
