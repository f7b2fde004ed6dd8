"""Hostile tars x every verb that reads shards: each run ends ok or as one `error:` line, exit 2;
nothing outside --out changes; nothing hangs. Prints the fault x verb matrix and its counts."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from conftest import make_dataset
from harness import Matrix, report, run_cli
from hostile import HOSTILE

VERBS = ["info", "catalog", "poison", "embed", "scan", "sanitize", "train", "evaluate"]
MATRIX = Matrix()


def _fake_scan(folder, data):
    """A scores.parquet covering every shard of `data` with nothing flagged (sanitize's input)."""
    from mmsanitize.shards import iter_tar

    rows = []
    for tar in sorted(data.glob("*.tar")):
        keys = set()
        try:
            with open(tar, "rb") as f:
                for m, _ in iter_tar(f, tar.name, with_data=False):
                    keys.add(m.name.split(".", 1)[0])
        except Exception:  # noqa: BLE001 - hostile shard: one placeholder row
            keys = {"placeholder"}
        rows += [{"key": k, "shard": tar.name, "combined": 0.0, "flagged": False, "reason": ""} for k in sorted(keys)]
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(folder / "scores.parquet", index=False)


def argv(verb, data, out, scan_dir, scheduler):
    d = ["--scheduler", scheduler]
    return {
        "info": ["info", data, *d],
        "catalog": ["catalog", data, *d],
        "poison": ["poison", data, "--attack", "single-label", "--goal", "dog2boat", "--count", "2", "--out", out, *d],
        "embed": ["embed", data, "--model", "tiny", "--out", out, *d],
        "scan": ["scan", data, "--model", "tiny", "--threshold", "auto", "--out", out, *d],
        "sanitize": ["sanitize", data, "--scan", scan_dir, "--out", out, *d],
        "train": ["train", data, "--model", "tiny", "--epochs", "1", "--batch-size", "4", "--loader-workers", "0",
                  "--out", out],
        "evaluate": ["evaluate", "tiny", "--test", data, "--out", out / "metrics.json"],
    }[verb]


def _all_usable(out) -> bool:
    """Every sample of every output shard has a decodable image and a UTF-8 caption."""
    from mmsanitize.errors import ShardError
    from mmsanitize.shards import image_size, iter_samples

    try:
        for tar in out.glob("*.tar"):
            for s in iter_samples(tar):
                image_size(s.image, tar.name, s.key)
    except ShardError:
        return False
    return True


@pytest.fixture(scope="module")
def hostile_datasets(tmp_path_factory):
    """One folder per hostile tar: a good shard 00000.tar + the hostile 00001.tar (read-only)."""
    root = tmp_path_factory.mktemp("hostile")
    good = root / "_good"
    make_dataset(good, n_shards=1, per_shard=8, classes=["dog", "boat"])
    sets = {}
    for name, build in HOSTILE.items():
        d = root / name / "data"
        d.mkdir(parents=True)
        shutil.copy(good / "00000.tar", d / "00000.tar")
        (d / "00001.tar").write_bytes(build())
        _fake_scan(root / name / "scan", d)
        sets[name] = root / name
    return sets


@pytest.fixture(scope="module", autouse=True)
def print_matrix(pytestconfig):
    yield
    if MATRIX.cells:
        report(pytestconfig, MATRIX.markdown("hostile tars x verbs (tests/faults/test_fault_matrix.py)"))


@pytest.mark.slow
@pytest.mark.parametrize("verb", VERBS)
def test_hostile_tars_every_verb(verb, hostile_datasets, dask_address, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bad = []
    for name, root in hostile_datasets.items():
        out = tmp_path / name / "out"
        run = run_cli(argv(verb, root / "data", out, root / "scan", dask_address), watch=root, outs=(out,))
        if verb == "sanitize" and run.outcome == "ok" and not _all_usable(out):
            run.outcome = "dirty-output"
        MATRIX.add(name, verb, run)
        if run.outcome not in ("ok", "error") or run.changed:
            bad.append((name, run.outcome, run.changed[:3], run.stderr[-300:]))
    assert not bad, bad
