"""In-kernel copy speed of a folder of shards: `cp -r` against `os.copy_file_range` at the same and at shifted offsets.

poison and sanitize copy every untouched run of samples with `copy_file_range` (`shards.copy_range`);
after the first dropped or replaced sample a run lands at another offset in the output than in the
input. This measures whether that matters: each shard is copied whole with one call per shard (the
destination offset equal to the source offset, as `cp -r` does) and with the destination shifted
by `--shift` bytes (a few zero bytes written first), alternating, each run after reading the input
once (page cache warm) and a `sync`. Prints seconds per run and the ratio same-offset / shifted.

    python benchmarks/bench_copy_offsets.py --data CACHE/n2000000_s0/data --scratch /path/on/same/disk
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path


def warm(shards: list[Path]) -> None:
    for p in shards:
        with open(p, "rb") as f:
            while f.read(16 << 20):
                pass
    os.sync()


def copy_all(shards: list[Path], dst: Path, shift: int) -> float:
    """Copy every shard into `dst` with copy_file_range, the output `shift` bytes later; seconds."""
    dst.mkdir()
    t = time.perf_counter()
    for p in shards:
        with open(p, "rb") as fi, open(dst / p.name, "wb") as fo:
            if shift:
                fo.write(bytes(shift))
                fo.flush()
            size, off = os.fstat(fi.fileno()).st_size, 0
            while off < size:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), size - off, off, off + shift)
                if n == 0:
                    raise OSError(f"copy_file_range stopped at {off} of {p}")
                off += n
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="A folder of .tar shards (e.g. bench_scale's data folder).")
    ap.add_argument("--scratch", help="Where the copies go (default: beside --data); removed after each run.")
    ap.add_argument("--shift", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    data = Path(args.data).resolve()
    shards = sorted(data.glob("*.tar"))
    if not shards:
        raise SystemExit(f"no .tar shards in {data}")
    scratch = Path(args.scratch or data.parent / "copy_offsets").resolve()
    total = sum(p.stat().st_size for p in shards)
    print(f"{len(shards)} shards, {total / 1e9:.2f} GB; shift {args.shift} bytes; {args.runs} runs, alternating")
    times: dict[str, list[float]] = {"cp -r": [], "same offsets": [], "shifted": []}
    for run in range(args.runs):
        for name, runs in times.items():
            shutil.rmtree(scratch, ignore_errors=True)
            warm(shards)
            if name == "cp -r":
                t = time.perf_counter()
                subprocess.run(["cp", "-r", str(data), str(scratch)], check=True)
                seconds = time.perf_counter() - t
            else:
                seconds = copy_all(shards, scratch, 0 if name == "same offsets" else args.shift)
            runs.append(seconds)
            print(f"  run {run + 1}: {name}: {seconds:.2f} s ({total / seconds / 1e9:.2f} GB/s)", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print("\n| copy | median s | runs s |\n|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.2f} | {', '.join(f'{t:.2f}' for t in ts)} |")
    same, shifted = statistics.median(times["same offsets"]), statistics.median(times["shifted"])
    print(f"same offsets / shifted: {same / shifted:.2f}x (median); cp -r / shifted: "
          f"{statistics.median(times['cp -r']) / shifted:.2f}x")


if __name__ == "__main__":
    main()
