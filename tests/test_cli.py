"""One CLI convention: --out everywhere (positional OUT deprecated), --loader-workers vs --workers,
the --help loop and the environment variables it lists."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mmsanitize.cli import cli, main


def test_help_lists_a_loop_that_creates_its_reference_and_the_environment():
    out = CliRunner().invoke(cli, ["--help"]).output
    loop = out[out.index("Typical loop"):]
    assert loop.index("mmsanitize align data/oca/ref/ --out runs/ref/") < loop.index("--model runs/ref/")
    for var in ("MMSANITIZE_PROGRESS", "MMSANITIZE_EXACT", "MMSANITIZE_FEATURE_CACHE", "XDG_CACHE_HOME",
                "HF_HUB_OFFLINE"):
        assert var in out
    from pathlib import Path

    import mmsanitize

    read = {v for f in Path(mmsanitize.__file__).parent.rglob("*.py") if f.name != "cli.py"
            for v in re.findall(r"environ(?:\.get\(|\[)\"([A-Z_]+)\"", f.read_text())}
    assert "MMSANITIZE_PROGRESS" in read and all(v in out for v in read)  # every variable the code reads


def test_every_output_is_out_and_the_positional_form_warns():
    runner = CliRunner()
    for argv in (["ingest", "--help"], ["datasets", "build", "--help"], ["verify", "--help"], ["poison", "--help"]):
        assert "--out" in runner.invoke(cli, argv).output
    for verb in (["train"], ["align"], ["defend", "finetune"]):
        text = runner.invoke(cli, [*verb, "--help"]).output
        assert "--loader-workers" in text and "--workers" not in text.replace("--loader-workers", "")


def test_deprecated_positional_out_and_workers_alias(tmp_path, capsys):
    src = tmp_path / "imgs"
    src.mkdir()
    with pytest.raises(SystemExit) as e:  # folder build of an empty folder: the error comes after the alias
        main(["datasets", "build", "folder", str(tmp_path / "o"), "--source", str(src)])
    assert e.value.code == 2
    assert "warning: the positional OUT is deprecated; use --out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["datasets", "build", "folder", "--source", str(src)])
    assert e.value.code == 2 and "missing --out DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["ingest", "urls.csv", "a", "--out", "b"])
    assert e.value.code == 2 and "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # --workers on align: DataLoader workers, deprecated spelling
        main(["align", str(tmp_path / "none"), "--out", str(tmp_path / "ref"), "--workers", "0"])
    assert e.value.code == 2
    assert "--workers on train/align/defend is deprecated; use --loader-workers" in capsys.readouterr().err


def test_help_is_instant_without_heavy_imports():
    code = ("import sys; from mmsanitize.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'dask', 'distributed', 'pandas', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout
    assert out.strip().splitlines()[-1] == "[]"
