"""Compare poison and sanitize outputs of this checkout with another checkout's, file by file.

Builds small labelled shards (tests/test_poison.py's `make_rich_dataset`) and an image pool, runs
`python -m mmsanitize poison` for every attack (replace and inject, keyword and column labels,
`--perturb`, `--images-from`) and `sanitize` (a scan folder flagging every 7th sample) once with
each checkout's code (PYTHONPATH, separate cache folders, from /tmp), and compares every output
file byte for byte. Prints one line per case and exits 1 when any file differs.

    python benchmarks/compare_outputs.py --reference /work/main [--work /tmp/compare_outputs]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    ["--attack", "single-label", "--goal", "dog2boat"],
    ["--attack", "single-label", "--goal", "dog2boat", "--count", "4", "--mode", "inject"],
    ["--attack", "single-image", "--source", "dog", "--target", "boat"],
    ["--attack", "multi-label", "--goal", "dog2boat", "--goal", "cat2car", "--source-fraction", "0.5"],
    ["--attack", "patch", "--target", "boat", "--count", "5", "--trigger-position", "random"],
    ["--attack", "blended", "--target", "boat", "--rate", "0.1", "--mode", "inject"],
    ["--attack", "label-consistent", "--target", "boat", "--count", "3", "--trigger-pattern", "noise"],
    ["--attack", "single-label", "--goal", "dog2boat", "--label-from", "keywords"],
    ["--attack", "single-label", "--goal", "dog2boat", "--label-from", "column:label", "--perturb", "jitter"],
    ["--attack", "single-label", "--goal", "dog2boat", "--images-from", "{pool}", "--count", "3"],
]


def run_both(work: Path, tag: str, argv: list[str], code: dict[str, str]) -> list[str]:
    """Run `argv` with each checkout's code into work/TAG_WHO; return the differing files."""
    outs = {}
    for who, path in code.items():
        out = work / f"{tag}_{who}"
        env = dict(os.environ, PYTHONPATH=path, XDG_CACHE_HOME=str(work / f"xdg_{who}"), MMSANITIZE_PROGRESS="0")
        r = subprocess.run([sys.executable, "-m", "mmsanitize", *argv, "--workers", "1", "--out", str(out)],
                           env=env, cwd="/tmp", capture_output=True, text=True, check=False)
        if r.returncode:
            return [f"{who} failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"]
        outs[who] = out
    a, b = outs.values()
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    if files != sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()):
        return ["the file lists differ"]
    return [str(f) for f in files if not filecmp.cmp(a / f, b / f, shallow=False)] or [f"{len(files)} files identical"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="Root of the other checkout (its mmsanitize/ is used).")
    ap.add_argument("--work", default="/tmp/compare_outputs")
    args = ap.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import pandas as pd
    from test_poison import make_rich_dataset

    from mmsanitize.shards import iter_raw_samples

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data = make_rich_dataset(work / "data", n_shards=4, per_shard=15)
    pool = make_rich_dataset(work / "pool", n_shards=1, per_shard=10, size=24)
    code = {"reference": str(Path(args.reference).resolve()), "this": str(ROOT)}
    bad = 0
    for i, case in enumerate(CASES):
        argv = ["poison", str(data), *[a.format(pool=pool) for a in case], "--seed", "3"]
        res = run_both(work, f"poison{i}", argv, code)
        bad += not res[0].endswith("identical")
        print(f"poison {' '.join(case[1:4])} ...: {'; '.join(res)}")
    scan = work / "scan"
    scan.mkdir()
    rows = [(r.key, t.name) for t in sorted(data.glob("*.tar")) for r in iter_raw_samples(t, with_data=False)]
    pd.DataFrame({"key": [k for k, _ in rows], "shard": [s for _, s in rows], "combined": [i / 7 for i in range(len(rows))],
                  "flagged": [i % 7 == 0 for i in range(len(rows))], "reason": ["r"] * len(rows)}
                 ).to_parquet(scan / "scores.parquet")
    res = run_both(work, "sanitize", ["sanitize", str(data), "--scan", str(scan)], code)
    bad += not res[0].endswith("identical")
    print(f"sanitize: {'; '.join(res)}")
    print("all identical" if not bad else f"{bad} case(s) differ")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
