"""What new memory costs on this machine: the time to fill S GiB of freshly allocated memory,
for several sizes S, in one process and split over two processes at once.

On a virtual machine whose guest reports free pages to its host (virtio-balloon free page
reporting, `/sys/module/page_reporting`), memory the guest has handed back must be faulted in
from the host again when it is next used. Every new page-cache page a copy writes and every new
buffer a process fills may pay for it, so `cp -r`, poison and sanitize (which write 6 GB of new
pages at 2M tiny samples) and the 2-vs-1-worker ratios all move with it. The script prints the
module's parameters when it is loaded, then per size the median seconds and GiB/s over the
rounds (each fill after a pause, in fresh processes).

    python benchmarks/bench_fresh_memory.py --sizes 0.5,1,2,4 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from multiprocessing import Barrier, Process, Queue
from pathlib import Path


def fill(gib: float, barrier, out: Queue) -> None:
    """Allocate and write `gib` GiB once the other processes are ready; put the seconds on `out`."""
    import numpy as np

    n = int(gib * (1 << 27))
    barrier.wait()
    t = time.perf_counter()
    a = np.ones(n, dtype=np.float64)
    out.put(time.perf_counter() - t)
    del a


def run(procs: int, gib: float) -> float:
    """Seconds for `procs` fresh processes to fill `gib` GiB between them (the slowest one's)."""
    barrier, out = Barrier(procs), Queue()
    ps = [Process(target=fill, args=(gib / procs, barrier, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    times = [out.get() for _ in ps]
    for p in ps:
        p.join()
    return max(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.5,1,2,4", help="GiB to fill, comma list.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pause", type=float, default=5.0, help="Seconds idle before each fill.")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    params = Path("/sys/module/page_reporting/parameters")
    if params.is_dir():
        print("free page reporting: " + ", ".join(f"{p.name}={p.read_text().strip()}" for p in sorted(params.iterdir())))
    else:
        print("free page reporting: not loaded")
    times: dict[tuple[float, int], list[float]] = {(s, p): [] for s in sizes for p in (1, 2)}
    for r in range(args.rounds):
        for (s, p), runs in times.items():
            time.sleep(args.pause)
            seconds = run(p, s)
            runs.append(seconds)
            print(f"  round {r + 1}: {s:g} GiB by {p} process(es): {seconds:.2f} s", flush=True)
    print("\n| GiB filled | 1 process: median s (GiB/s) | runs | 2 processes at once: median s (GiB/s) | runs |")
    print("|---|---|---|---|---|")
    for s in sizes:
        cells = []
        for p in (1, 2):
            ts = times[(s, p)]
            m = statistics.median(ts)
            cells += [f"{m:.2f} ({s / m:.1f})", ", ".join(f"{t:.2f}" for t in ts)]
        print(f"| {s:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
