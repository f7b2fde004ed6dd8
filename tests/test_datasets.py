"""Dataset builders on real data: openclipart subset (with a decompression-bomb PNG), fashion-mnist, folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from mmsanitize.catalog import build_catalog
from mmsanitize.cli import main
from mmsanitize.datasets import build_dataset
from mmsanitize.datasets.openclipart import collect_items, label_for, load_vocabulary, make_caption
from mmsanitize.datasets.splits import assign_split, parse_splits
from mmsanitize.errors import UsageError
from mmsanitize.shards import iter_samples

OCA = Path("/usr/share/openclipart")
BOMB = "computer/microchip_v.2_havok_redh_01"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_oca = pytest.mark.skipif(not (OCA / "png" / f"{BOMB}.png").exists(), reason="openclipart packages not installed")
needs_fm = pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")


def _copy(rel: str, dst: Path) -> None:
    for kind in ("png", "svg"):
        target = dst / kind / f"{rel}.{kind}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(OCA / kind / f"{rel}.{kind}", target)


@pytest.fixture(scope="module")
def oca_subset(tmp_path_factory):
    """60 small real drawings with usable titles plus the 231-megapixel PNG, copied to a temp folder."""
    items, _ = collect_items(str(OCA))
    small = [it for it in items if (OCA / "png" / f"{it.source}.png").stat().st_size < 60_000]
    chosen = [it.source for it in small[::max(1, len(small) // 60)][:60]]
    root = tmp_path_factory.mktemp("oca_src")
    for rel in chosen + [BOMB]:
        _copy(rel, root)
    return root, chosen


def _tars(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


def test_parse_splits_and_assignment():
    splits = parse_splits("ref=0.4,train=0.4,test=0.2")
    assert [n for n, _ in splits] == ["ref", "train", "test"]
    got = [assign_split(f"id-{i}", splits) for i in range(2000)]
    assert got == [assign_split(f"id-{i}", splits) for i in range(2000)]
    assert 0.15 < got.count("test") / 2000 < 0.25
    assert got != [assign_split(f"id-{i}", splits, seed=1) for i in range(2000)]
    for bad in ("ref=0.5,train=0.4", "ref", "a=0.5,a=0.5", "x/y=1", "a=-1,b=2"):
        with pytest.raises(UsageError):
            parse_splits(bad)


def test_labels_and_captions_from_vocabulary():
    vocab = load_vocabulary()
    assert label_for("Happy Puppy", [], "animals", vocab) == "dog"
    assert label_for("Sailing", ["sea", "yacht"], "transportation", vocab) == "boat"
    assert label_for("Acquila", [], "animals/birds", vocab) == "bird"  # title word
    assert label_for("Xyzzy", [], "animals/birds", vocab) == "bird"  # folder path
    assert label_for("Xyzzy", [], "tools/garden", vocab) == "tools"  # category fallback
    assert label_for("Scatter plot", [], "science", vocab) == "science"  # 'cat' only as a whole word
    assert make_caption("Big truck", "Big truck", ["Truck", "vehicle"]) == "Big truck. truck, vehicle"


@needs_oca
def test_openclipart_subset_build_skips_bomb_and_is_deterministic(oca_subset, tmp_path, dask_address):
    src, chosen = oca_subset
    out1, out2 = tmp_path / "a", tmp_path / "b"
    report = build_dataset("openclipart", str(out1), source=str(src), shard_size=16, image_size=64,
                           scheduler=dask_address)
    assert sum(report["samples"].values()) == len(chosen)
    assert [s["source"] for s in report["skipped"]] == [BOMB]
    assert "not decoded" in report["skipped"][0]["reason"]
    on_disk = json.loads((out1 / "build_report.json").read_text())
    assert on_disk["skipped"] == report["skipped"]
    build_dataset("openclipart", str(out2), source=str(src), shard_size=16, image_size=64, scheduler=dask_address)
    t1, t2 = _tars(out1), _tars(out2)
    assert t1 and t1 == t2
    # a rerun into the same folder reuses the finished shards (resume), same report
    mtimes = {p: p.stat().st_mtime_ns for p in out1.rglob("*.tar")}
    again = build_dataset("openclipart", str(out1), source=str(src), shard_size=16, image_size=64,
                          scheduler=dask_address)
    assert again["counts"] == report["counts"] and again["skipped"] == report["skipped"]
    assert {p: p.stat().st_mtime_ns for p in out1.rglob("*.tar")} == mtimes
    with pytest.raises(UsageError, match="not part of this build"):
        build_dataset("openclipart", str(out1), source=str(src), shard_size=8, image_size=64,
                      scheduler=dask_address)
    # splits are disjoint, cover everything, and every sample is well formed
    sources = {}
    for split in ("ref", "train", "test"):
        sizes = json.loads((out1 / split / "sizes.json").read_text())
        n = 0
        for tar in sorted((out1 / split).glob("*.tar")):
            for s in iter_samples(tar):
                n += 1
                assert s.meta["source"] not in sources
                sources[s.meta["source"]] = split
                assert max(s.meta["width"], s.meta["height"]) == 64
                im = Image.open(__import__("io").BytesIO(s.image))
                assert im.mode == "RGB" and im.size == (s.meta["width"], s.meta["height"])
                assert s.caption.strip() and s.meta["label"]
                assert len(s.key) == 9 and s.key.startswith(tar.stem)
        assert n == sum(sizes.values()) == report["samples"][split]
    assert set(sources) == set(chosen)
    # rebuilding with a different split seed moves samples; the same seed never does
    out3 = tmp_path / "c"
    build_dataset("openclipart", str(out3), source=str(src), shard_size=16, image_size=64, seed=7,
                  scheduler=dask_address)
    moved = {s.meta["source"] for split in ("ref", "train", "test") for t in (out3 / split).glob("*.tar")
             for s in iter_samples(t) if sources[s.meta["source"]] != split}
    assert moved
    df = build_catalog(out1 / "train", scheduler=dask_address)
    assert len(df) == report["samples"]["train"] and df["label"].notna().all()


@needs_oca
def test_openclipart_title_filter_on_full_library():
    items, filtered = collect_items(str(OCA))
    assert 3000 < len(items) < 3600
    titles = [dict(it.extra)["title"] for it in items]
    assert not any("gramastar" in t.lower() or "flat icon collection" in t.lower() for t in titles)
    assert filtered["collection title"] > 1000
    labels = {it.label for it in items}
    assert {"dog", "cat", "bird", "boat", "car", "flower", "tree", "house", "person"} <= labels


@needs_fm
def test_fashion_mnist_small_build(tmp_path, dask_address):
    from mmsanitize.datasets.fashion_mnist import CLASSES
    from mmsanitize.datasets.fashion_mnist import collect_items as fm_items

    out = tmp_path / "fm"
    report = build_dataset("fashion-mnist", str(out), limit=150, shard_size=40, scheduler=dask_address)
    assert sum(report["samples"].values()) == 150
    truth = {it.source: it.label for it in fm_items(None)[0]}
    seen = 0
    for tar in sorted(out.rglob("*.tar")):
        for s in iter_samples(tar):
            seen += 1
            assert s.meta["label"] == truth[s.meta["source"]]
            assert s.meta["label"] in CLASSES and s.meta["label"] in s.caption
            assert (s.meta["width"], s.meta["height"]) == (64, 64)
    assert seen == 150
    assert len({c for split in report["counts"].values() for c in split}) == 10


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares `width` x `height` pixels (its data is far too short)."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def test_folder_builder_reports_missing_and_broken_files(tmp_path, dask_address):
    src = tmp_path / "src"
    src.mkdir()
    rows = []
    for i in range(8):
        Image.new("RGBA", (40 + i, 30), (255, 0, 0, 128)).save(src / f"img{i}.png")
        rows.append({"file": f"img{i}.png", "caption": f"a red square {i}", "label": "square"})
    (src / "broken.jpg").write_bytes(b"this is not an image")
    (src / "huge.png").write_bytes(_png_declaring(8000, 8000))
    rows += [{"file": "broken.jpg", "caption": "broken", "label": "x"},
             {"file": "huge.png", "caption": "huge", "label": "x"},
             {"file": "missing.jpg", "caption": "missing", "label": "x"}]
    (src / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = build_dataset("folder", str(tmp_path / "out"), source=str(src), splits="all=1",
                           image_size=32, scheduler=dask_address)
    assert report["samples"] == {"all": 8}
    reasons = {s["source"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"broken.jpg", "missing.jpg", "huge.png"}
    assert "64,000,000 pixels > limit" in reasons["huge.png"]
    samples = [s for t in sorted((tmp_path / "out" / "all").glob("*.tar")) for s in iter_samples(t)]
    assert len(samples) == 8
    # alpha flattened on white: half-transparent red becomes pink, not dark red
    px = Image.open(__import__("io").BytesIO(samples[0].image)).getpixel((10, 10))
    assert px[0] > 240 and 100 < px[1] < 160


def test_missing_sources_exit_2(tmp_path, capsys):
    for argv in (["datasets", "build", "openclipart", "--out", str(tmp_path / "o"), "--source", str(tmp_path / "none")],
                 ["datasets", "build", "fashion-mnist", "--out", str(tmp_path / "o"), "--source", str(tmp_path)],
                 ["datasets", "build", "folder", "--out", str(tmp_path / "o")],
                 ["datasets", "build", "folder", "--out", str(tmp_path / "o"), "--source", str(tmp_path)],
                 ["datasets", "build", "openclipart", "--out", str(tmp_path / "o"), "--splits", "a=0.3"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["datasets", "build", "openclipart", "--out", str(tmp_path / "o"), "--source", str(tmp_path / "none")])
    assert "apt-get install openclipart-png openclipart-svg" in capsys.readouterr().err


@needs_oca
def test_cli_build_prints_class_table(oca_subset, tmp_path, dask_address, capsys):
    src, _ = oca_subset
    main(["datasets", "build", "openclipart", "--out", str(tmp_path / "o"), "--source", str(src), "--limit", "10",
          "--image-size", "32", "--scheduler", dask_address])
    out = capsys.readouterr().out
    assert "TOTAL" in out and "skipped" in out
    total = out.splitlines()[[l.startswith("TOTAL") for l in out.splitlines()].index(True)]
    assert sum(int(x) for x in total.split()[1:]) == 10


@needs_oca
@pytest.mark.slow
def test_full_openclipart_build(tmp_path, dask_address):
    out = tmp_path / "oca"
    report = build_dataset("openclipart", str(out), image_size=48, scheduler=dask_address)
    total = sum(report["samples"].values())
    assert 3200 < total < 3400
    for split, frac in (("ref", 0.4), ("train", 0.4), ("test", 0.2)):
        assert abs(report["samples"][split] / total - frac) < 0.05
    skipped = {s["source"] for s in report["skipped"]}
    assert {BOMB, "signs_and_symbols/stop_sign_miguel_s_nchez_"} <= skipped
    assert all("not decoded" in s["reason"] for s in report["skipped"])
    train = report["counts"]["train"]
    assert min(train.get(c, 0) for c in ("dog", "cat", "bird", "boat", "car", "flower", "person")) >= 5
