"""poison plans from the catalog columns it needs (never the whole table on the client) and gives
the same plan, catalog hash and outputs as planning from the whole table; sanitize reads only the
flagged rows of a scan."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_poison import ATTACKS, make_rich_dataset

from mmsanitize import catalog as catalog_mod
from mmsanitize.cli import main
from mmsanitize.shards import Sample, ShardWriter

UNUSED = {"position", "bytes", "image_ext", "url", "source_sha256"}


def make_mixed_dataset(out):
    """Non-ASCII captions (the hash's JSON escapes them) and a shard without labels (an all-None
    column there: Arrow type null in that part)."""
    return make_rich_dataset(out, n_shards=4, per_shard=10, caption="a photo of a {label} n° {i} — ünïcode",
                             unlabelled=(2,))


@pytest.fixture
def spy_reads(monkeypatch):
    """Record (file name, columns, filters) of every parquet read in this (the client) process,
    by `pq.read_table` or `pq.ParquetFile(...).read`."""
    reads = []
    real = pq.read_table

    def read_table(source, *args, columns=None, **kw):
        reads.append((str(source), None if columns is None else list(columns), kw.get("filters")))
        return real(source, *args, columns=columns, **kw)

    class ParquetFile(pq.ParquetFile):
        def __init__(self, source, *args, **kw):
            super().__init__(source, *args, **kw)
            self.spied_source = str(source)

        def read(self, columns=None, *args, **kw):
            reads.append((self.spied_source, None if columns is None else list(columns), None))
            return super().read(columns, *args, **kw)

    monkeypatch.setattr(pq, "read_table", read_table)
    monkeypatch.setattr(pq, "ParquetFile", ParquetFile)
    return reads


def test_catalog_hash_and_plans_equal_the_whole_table_ones(tmp_path, dask_address):
    """Plans from the columns poison reads (captions left in Arrow memory, or not) equal the plans
    from the whole table, for every attack."""
    import pandas as pd

    from mmsanitize.attacks.plan import AttackSpec
    from mmsanitize.catalog import HASH_COLUMNS, content_hash
    from mmsanitize.poison import _goals, _hash, make_plan, plan_columns

    data = make_mixed_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    parts = catalog_mod.catalog_parts(data, scheduler=dask_address, cache_dir=cache)
    full = catalog_mod.build_catalog(data, scheduler=dask_address, cache_dir=cache)
    assert parts.count == len(full) == 40
    expected = _hash(full[HASH_COLUMNS].values.tolist())
    assert content_hash(parts) == expected  # saved when the joined table was written
    (cache / "content_hash.json").unlink()
    assert content_hash(parts) == expected  # computed part by part
    for attack, opts, mode in ATTACKS:
        goals = [opts[i + 1] for i, o in enumerate(opts) if o == "--goal"]
        kw = {"source": opts[opts.index("--source") + 1] if "--source" in opts else None,
              "target": opts[opts.index("--target") + 1] if "--target" in opts else None}
        amount = {o[2:].replace("-", "_"): float(opts[i + 1]) if o != "--count" else int(opts[i + 1])
                  for i, o in enumerate(opts) if o in ("--count", "--rate", "--source-fraction")}
        spec = AttackSpec(attack=attack, goals=_goals(attack, goals, kw["source"], kw["target"], None), mode=mode,
                          seed=3, trigger_position="random", **amount)
        columns = plan_columns(attack, "field", need_sha256=False)
        assert not UNUSED & set(columns)
        small = make_plan(catalog_mod.read_catalog(parts, columns), spec)
        whole = make_plan(full, spec)
        assert small.edits == whole.edits and small.rows == whole.rows and small.edits, attack
        arrow = catalog_mod.read_catalog(parts, columns, arrow_strings=("caption",))  # what poison reads
        assert isinstance(arrow["caption"].dtype, pd.ArrowDtype) and arrow["caption"].tolist() == full["caption"].tolist()
        lazy = make_plan(arrow, spec)
        assert lazy.edits == whole.edits and lazy.rows == whole.rows, attack
        assert all(type(e.caption) is str for e in lazy.edits)


@pytest.mark.parametrize("attack,opts", [("single-label", ["--goal", "dog2boat", "--count", "5"]),
                                         ("patch", ["--target", "boat", "--count", "4"])])
def test_poison_client_reads_only_needed_columns(tmp_path, dask_address, monkeypatch, spy_reads, attack, opts):
    from mmsanitize.catalog import HASH_COLUMNS
    from mmsanitize.poison import plan_columns

    data = make_mixed_dataset(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    main(["catalog", str(data), "--scheduler", dask_address])
    spy_reads.clear()

    def whole_table(*a, **k):
        raise AssertionError("poison built the whole catalog table on the client")

    monkeypatch.setattr(catalog_mod, "build_catalog", whole_table)
    out = tmp_path / "out"
    main(["poison", str(data), "--attack", attack, *opts, "--seed", "1", "--out", str(out),
          "--scheduler", dask_address])
    part_reads = [(c, f) for s, c, f in spy_reads if "/mmsanitize/catalogs/" in s and not s.endswith("catalog.parquet")]
    allowed = set(plan_columns(attack, "field", need_sha256=False)) | set(HASH_COLUMNS)
    assert part_reads, "the plan should read the catalog parts"
    assert all(c is not None and set(c) <= allowed for c, _ in part_reads), part_reads
    assert not any(s.endswith("/catalog.parquet") for s, _, _ in spy_reads)  # the joined table is not read
    assert json.loads((out / "poison.json").read_text())["counts"]["samples_in"] == 40


def test_sanitize_reads_only_flagged_rows(tmp_path, tiny_dataset, dask_address, spy_reads):
    import pandas as pd

    scan = tmp_path / "scan"
    main(["scan", str(tiny_dataset), "--model", "tiny", "--flag-fraction", "0.2", "--reuse-min", "0",
          "--out", str(scan), "--scheduler", dask_address])
    spy_reads.clear()
    out = tmp_path / "clean"
    main(["sanitize", str(tiny_dataset), "--scan", str(scan), "--out", str(out), "--scheduler", dask_address])
    score_reads = [(c, f) for s, c, f in spy_reads if s.endswith("scores.parquet")]
    assert score_reads
    for columns, filters in score_reads:  # every read is either the shard column or only flagged rows
        assert columns == ["shard"] or filters == [("flagged", "==", True)], (columns, filters)
    removed = pd.read_parquet(out / "removed.parquet")
    flagged = pd.read_parquet(scan / "scores.parquet").query("flagged")
    assert sorted(removed["key"]) == sorted(flagged["key"]) and len(removed) == 7


def test_sanitize_skips_decoding_catalogued_shards_with_the_same_output(tmp_path, monkeypatch):
    import filecmp

    import pandas as pd
    from conftest import make_dataset

    from mmsanitize import sanitize as sanitize_mod
    from mmsanitize.shards import iter_samples

    data = tmp_path / "data"
    make_dataset(data, n_shards=3, per_shard=8)
    with ShardWriter(data, "00003") as w:  # one undecodable image: the catalog refuses this shard
        for j, s in enumerate(iter_samples(data / "00000.tar")):
            w.write(Sample(f"00003{j:04d}", b"not an image" if j == 2 else s.image, "jpg", s.caption, s.meta))
    scan = tmp_path / "scan"
    scan.mkdir()
    keys = [(f"{s:05d}{j:04d}", f"{s:05d}.tar") for s in range(4) for j in range(8)]
    pd.DataFrame({"key": [k for k, _ in keys], "shard": [s for _, s in keys], "combined": 0.5,
                  "flagged": [i % 5 == 0 for i in range(len(keys))], "reason": "x"}).to_parquet(scan / "scores.parquet")
    outs = {}
    for tag in ("plain", "catalogued"):  # real runs (worker processes): same bytes with or without a catalog
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / f"xdg_{tag}"))
        if tag == "catalogued":
            for s in range(3):
                catalog_mod.build_catalog(data / f"{s:05d}.tar", workers=1)
        outs[tag] = tmp_path / tag
        assert sanitize_mod.sanitize(data, scan=scan, out=outs[tag], workers=1)["invalid"] == 1
    names = sorted(p.name for p in outs["plain"].iterdir())
    assert names == sorted(p.name for p in outs["catalogued"].iterdir())
    assert all(filecmp.cmp(outs["plain"] / n, outs["catalogued"] / n, shallow=False) for n in names)

    decoded = []  # in this process: which shards' images the task decodes
    real = sanitize_mod.invalid_samples
    monkeypatch.setattr(sanitize_mod, "invalid_samples", lambda p: decoded.append(Path(p).name) or real(p))
    parts = str(catalog_mod.catalog_dir([data / "00000.tar"]))
    for s in range(4):
        task = sanitize_mod.SanitizeTask(f"{s:05d}", str(data / f"{s:05d}.tar"), str(tmp_path / "direct"), (), "h", parts)
        sanitize_mod.sanitize_shard(task)
    assert decoded == ["00003.tar"]


def test_poison_reads_the_catalogued_byte_range_or_names_the_sample(tmp_path):
    from conftest import make_dataset

    from mmsanitize.errors import ShardError
    from mmsanitize.poison import read_ranges
    from mmsanitize.shards import iter_samples

    data = tmp_path / "data"
    make_dataset(data, n_shards=1, per_shard=6)
    cat = catalog_mod.build_catalog(data, workers=1, cache_dir=tmp_path / "cache")
    want = cat.iloc[[4, 1]]
    got = read_ranges(str(data / "00000.tar"), list(want["key"]), list(zip(want["offset"], want["end"])))
    assert got == {s.key: s for s in iter_samples(data / "00000.tar") if s.key in set(want["key"])}
    with pytest.raises(ShardError) as e:  # a range that holds another sample (the shard changed)
        read_ranges(str(data / "00000.tar"), [want["key"].iloc[0]], [(want["offset"].iloc[1], want["end"].iloc[1])])
    assert "00000.tar" in str(e.value) and want["key"].iloc[0] in str(e.value)


def test_read_catalog_column_by_column_equals_one_conversion(tmp_path, dask_address):
    """read_catalog converts one column at a time (and skips de-duplication for unique columns):
    the same frame, dtypes and values as converting the joined Arrow table at once, including a
    part whose label column is all None."""
    import pandas as pd

    data = make_mixed_dataset(tmp_path / "data")
    parts = catalog_mod.catalog_parts(data, scheduler=dask_address, cache_dir=tmp_path / "cache")
    for columns in (None, ["key", "shard", "caption", "label", "offset", "end"], ["label", "width"]):
        got = catalog_mod.read_catalog(parts, columns)
        want = catalog_mod._read_table(parts.paths, columns).to_pandas()
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        assert got["label"].isna().sum() == 10 and got["label"].notna().sum() == 30


def test_unique_key_check_is_saved_for_the_shard_contents(tmp_path, dask_address, spy_reads):
    """The duplicate-key check reads the key column once per set of shard contents: a rerun on the
    same shards skips it, and a shard whose content changes is checked again (and refused here)."""
    from mmsanitize.errors import ShardError
    from mmsanitize.shards import iter_samples

    data = make_rich_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    catalog_mod.catalog_parts(data, scheduler=dask_address, cache_dir=cache)
    assert any(cols == ["key"] for _, cols, _ in spy_reads)
    spy_reads.clear()
    catalog_mod.catalog_parts(data, scheduler=dask_address, cache_dir=cache)
    assert not any(cols == ["key"] for _, cols, _ in spy_reads)
    samples = list(iter_samples(data / "00002.tar"))
    samples[0] = Sample("000010000", samples[0].image, samples[0].image_ext, samples[0].caption, samples[0].meta)
    with ShardWriter(data, "00002") as w:  # its first key is now one of shard 00001's
        for s in samples:
            w.write(s)
    with pytest.raises(ShardError, match="duplicate key across shards"):
        catalog_mod.catalog_parts(data, scheduler=dask_address, cache_dir=cache)


def test_a_source_sample_not_at_its_catalogued_range_is_one_line_naming_shard_and_key(
        tmp_path, dask_address, monkeypatch, capsys):
    """The poison tasks read their source samples at the catalog's byte ranges; a range that does
    not hold the sample (the catalog is stale) fails with one line naming the shard and key, and
    no output is left."""
    import pyarrow.compute as pc

    data = make_rich_dataset(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    main(["catalog", str(data), "--scheduler", dask_address])
    for part in (tmp_path / "xdg").glob("mmsanitize/catalogs/*/0000?.parquet"):
        t = pq.read_table(part)
        pq.write_table(t.set_column(t.schema.get_field_index("offset"), "offset", pc.add(t["offset"], 512)), part)
    capsys.readouterr()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["poison", str(data), "--attack", "single-label", "--goal", "dog2boat", "--out", str(out),
              "--scheduler", dask_address])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert "not where the catalog says" in err and ", key 0000" in err and ".tar" in err
    assert not out.exists() or not list(out.glob("*.tar"))
