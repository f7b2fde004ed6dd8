"""Scan at scale: seeded synthetic clustered pairs with planted poisons, cached on disk.

Generates once (cached under --cache, seeded): N pairs in shards of --shard-size, each a tiny real
PNG (unique bytes) + caption + json label in a real tar, and 256-d float16 embeddings in our
`embed` layout. Planted poisons (manifest.parquet): swapped-class pairs (a class-A caption on a
class-B image), one image under many captions (byte-equal, groups of 25) and near-duplicate
copies (re-encoded: different bytes, image cosine ~0.99 to the target, groups of 25).

Then runs, each as `python -m mmsanitize` in a child process whose tree is sampled for RSS:
  - catalog (once; the scans reuse it),
  - the default scan with 2 workers, and the same job with 1 worker (on --ratio-shards shards),
  - the all-detector scan with 2 workers (on --all-shards shards),
and prints wall time, samples/s, peak RSS of the client and of the largest worker, the 2-vs-1
worker ratio, kNN recall@10 and ms/query of the scan's image index against exact search on
--queries seeded queries for the scan's (nprobe, re-rank) setting and a grid around it (exact
answer cached per data set), the recall@10 of the all-detector scan's kNN reference per kind
(when the scan sampled one; --knn-reference sets its size), and the planted-poison AUROC per
detector. --skip-ratio,
--only-ratio and --skip-all pick the jobs; --code CHECKOUT runs another checkout's mmsanitize
on the same data (a before/after in one session).

Usage: nice python benchmarks/bench_scale.py --n 1000000 [--ratio-shards 20] [--all-shards 20] [--code DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIM = 256
CLASSES = 50
GROUP = 25


def tiny_png(ident: int) -> bytes:
    """A valid 1x1 PNG whose bytes are unique to `ident` (a tEXt chunk carries it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    v = ident % 251
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"tEXt", b"id\x00" + str(ident).encode())
            + chunk(b"IDAT", zlib.compress(bytes([0, v, 255 - v, 7]))) + chunk(b"IEND", b""))


def plan(n: int, seed: int):
    """Per-row class, caption class, poison kind (0 clean, 1 swapped, 2 same image, 3 near copy)
    and the row whose image it shows (itself unless reused)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, CLASSES, n)
    cap_class = label.copy()
    kind = np.zeros(n, np.int8)
    source = np.arange(n)
    rows = rng.permutation(n)
    n_swap, n_same, n_near = int(0.005 * n), int(0.0025 * n) // GROUP * GROUP, int(0.0025 * n) // GROUP * GROUP
    swap, same, near = rows[:n_swap], rows[n_swap:n_swap + n_same], rows[n_swap + n_same:n_swap + n_same + n_near]
    clean_rows = rows[n_swap + n_same + n_near:]
    kind[swap] = 1
    cap_class[swap] = (label[swap] + rng.integers(1, CLASSES, len(swap))) % CLASSES
    targets = rng.choice(clean_rows, (n_same + n_near) // GROUP, replace=False)
    for which, rows_, k in ((0, same, 2), (1, near, 3)):
        for g, group in enumerate(rows_.reshape(-1, GROUP)):
            t = targets[g if which == 0 else n_same // GROUP + g]
            kind[group] = k
            source[group] = t
            label[group] = label[t]
            cap_class[group] = (label[t] + rng.integers(1, CLASSES, GROUP)) % CLASSES
    return label, cap_class, kind, source


def generate(cache: Path, n: int, shard_size: int, seed: int) -> None:
    """Write shards, embeddings and manifest into `cache` once (a done marker guards reruns)."""
    import pandas as pd

    from mmsanitize.shards import Sample, ShardWriter

    if (cache / "done.json").exists():
        return
    shutil.rmtree(cache, ignore_errors=True)
    data, emb = cache / "data", cache / "emb"
    for sub in ("img_emb", "text_emb", "metadata"):
        (emb / sub).mkdir(parents=True, exist_ok=True)
    label, cap_class, kind, source = plan(n, seed)
    rng = np.random.default_rng(seed + 1)
    centres = rng.normal(size=(CLASSES, DIM)).astype(np.float32) * 1.2
    t0 = time.time()
    names = [f"c{c:02d}" for c in range(CLASSES)]

    def base_image(rows):  # a row's own (clean) image embedding, a function of the row id only
        out = np.empty((len(rows), DIM), np.float32)
        for i, r in enumerate(rows):
            g = np.random.default_rng([seed, 7, int(r)])
            out[i] = centres[label_of_clean[r]] + g.normal(size=DIM).astype(np.float32)
        return out

    label_of_clean = label.copy()
    keys_all = []
    for s, a in enumerate(range(0, n, shard_size)):
        rows = np.arange(a, min(n, a + shard_size))
        img = base_image(source[rows])
        near = kind[rows] == 3
        img[near] += rng.normal(size=(int(near.sum()), DIM)).astype(np.float32) * 0.12
        txt = centres[cap_class[rows]] + rng.normal(size=(len(rows), DIM)).astype(np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        keys = [f"{s:05d}{j:05d}" for j in range(len(rows))]
        keys_all.append(np.asarray(keys, object)[kind[rows] > 0])
        name = f"{s:05d}"
        with ShardWriter(data, name) as w:
            for j, r in enumerate(rows):
                ident = int(source[r]) if kind[r] == 2 else int(r)
                c = names[cap_class[r]]
                w.write(Sample(keys[j], tiny_png(ident), "png", f"a photo of a {c} number {r}", {"label": c}))
        np.save(emb / "img_emb" / f"img_emb_{name}.npy", img.astype(np.float16))
        np.save(emb / "text_emb" / f"text_emb_{name}.npy", txt.astype(np.float16))
        pd.DataFrame({"key": keys}).to_parquet(emb / "metadata" / f"metadata_{name}.parquet")
        if s % 10 == 0:
            print(f"  generated {rows[-1] + 1:,} / {n:,} pairs ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    (emb / "model.json").write_text(json.dumps({"name": "synthetic-clustered-256"}))
    poisoned = np.concatenate(keys_all)
    kinds = kind[kind > 0]
    pd.DataFrame({"key": poisoned, "kind": pd.Categorical.from_codes(kinds - 1, ["swapped", "same-image", "near-copy"])
                  }).to_parquet(cache / "manifest.parquet")
    (cache / "done.json").write_text(json.dumps({"n": n, "seed": seed, "shard_size": shard_size,
                                                 "poisoned": int(len(poisoned)), "seconds": time.time() - t0}))


def run_tree(cmd: list[str], env: dict) -> dict:
    """Run `cmd`, sampling the RSS of it (the client) and of its descendants (Dask workers)."""
    import psutil

    t0 = time.time()
    # `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH: run from the
    # checkout whose code is meant (`--code`), not from wherever the script was started
    proc = subprocess.Popen(cmd, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    p = psutil.Process(proc.pid)
    client = worker = client_anon = worker_anon = 0
    while proc.poll() is None:
        try:
            client = max(client, p.memory_info().rss)
            client_anon = max(client_anon, anon_rss(p.pid))
            for c in p.children(recursive=True):
                try:
                    worker = max(worker, c.memory_info().rss)
                    worker_anon = max(worker_anon, anon_rss(c.pid))
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        try:  # a sample every 0.5 s, but the end timed when it happens (a sleep rounded it up to 0.5 s)
            proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
    seconds = time.time() - t0
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return {"seconds": seconds, "client_rss": client, "worker_rss": worker, "client_anon": client_anon,
            "worker_anon": worker_anon, "stdout": out}


def anon_rss(pid: int) -> int:
    """RssAnon of `pid` in bytes (0 when unreadable): RSS without the file pages a process has
    memory-mapped (the shards' embedding files, the on-disk inverted lists), which the kernel can
    drop and re-read at any time."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def shard_subset(cache: Path, count: int | None) -> str:
    tars = sorted((cache / "data").glob("*.tar"))
    if count is None or count >= len(tars):
        return str(cache / "data")
    return str(cache / "data" / ("{00000..%05d}.tar" % (count - 1)))


def recall_curve(cache: Path, scan_dir: Path, queries: int, seed: int) -> dict:
    """Recall@10 of the scan's image index vs exact inner-product search (streamed over shards) on
    `queries` seeded queries, for the scan's own (nprobe, refine factor) and a grid around it:
    refine None = FAISS's SQ8 order, else `refine`·10 candidates re-ranked exactly from the float16
    embedding files (`mmsanitize.index.rerank`, as the scan's tasks do)."""
    import faiss

    from mmsanitize.index import load_ondisk
    from mmsanitize.scan_tasks import Rows

    s = json.loads((scan_dir / "summary.json").read_text())
    path = scan_dir / "index" / "image.index"
    files = sorted((cache / "emb" / "img_emb").glob("*.npy"))[:len(list((scan_dir).glob("scores_*.parquet")))]
    counts = [np.load(f, mmap_mode="r").shape[0] for f in files]
    n = sum(counts)
    rng = np.random.default_rng(seed)
    q_ids = np.sort(rng.choice(n, min(queries, n), replace=False))
    offs = np.r_[0, np.cumsum(counts)]
    q = np.concatenate([np.asarray(np.load(f, mmap_mode="r")[q_ids[(q_ids >= o) & (q_ids < o + c)] - o], np.float32)
                        for f, o, c in zip(files, offs, counts)])
    best_s = np.full((len(q), 10), -np.inf, np.float32)
    best_i = np.full((len(q), 10), -1, np.int64)
    truth = cache / f"exact_top10_n{n}_q{len(q)}_s{seed}.npz"  # the exact answer, computed once per data set
    t = time.time()
    for f, o in zip(files, offs) if not truth.exists() else ():
        base = np.asarray(np.load(f), np.float32)
        sims = q @ base.T
        top = np.argpartition(-sims, 10, axis=1)[:, :10]
        cand_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1)
        cand_i = np.concatenate([best_i, top + o], 1)
        keep = np.argsort(-cand_s, axis=1, kind="stable")[:, :10]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
    if truth.exists():
        z = np.load(truth)
        best_i, t_exact = z["ids"], float(z["seconds"])
    else:
        t_exact = time.time() - t
        np.savez(truth, ids=best_i, seconds=t_exact)
    out = {"kind": s["index"]["kind"], "exact_ms": 1000 * t_exact / len(q), "curve": []}
    if not isinstance(faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR), faiss.IndexIVF):
        return out
    rows = Rows({"shards": [{"img": str(f)} for f in files], "offsets": offs, "work": str(scan_dir)})
    used = (s["index"]["nprobe"], s["index"].get("refine_factor"))
    grid = sorted({used} | {(p, r) for p in (31, 64, 128) for r in (None, 2, 4)}, key=lambda x: (x[0], x[1] or 0))
    for nprobe, refine in grid:
        index = load_ondisk(path, nprobe=nprobe, refine=None if refine is None else (lambda ids: rows.take("img", ids)),
                            refine_factor=refine or 1)
        index.knn(q[:200], 10)  # warm the touched lists' pages
        t = time.time()
        approx = np.concatenate([index.knn(q[a:a + 1024], 10)[1] for a in range(0, len(q), 1024)])  # scan's block
        ms = 1000 * (time.time() - t) / len(q)
        hits = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, best_i)]))
        out["curve"].append({"nprobe": nprobe, "refine": refine, "recall": hits, "ms": ms, "scan": (nprobe, refine) == used})
    return out


def reference_recall(cache: Path, scan_dir: Path, queries: int, seed: int) -> list[dict]:
    """Recall@10 of the all-detector scan's kNN reference (one index per kind) vs exact search over
    the same reference vectors, on `queries` seeded dataset rows (the scan queries every row)."""
    from mmsanitize.detectors.density import joint
    from mmsanitize.reference import Reference

    ref = json.loads((scan_dir / "summary.json").read_text())["index"].get("reference")
    if ref is None:
        return []
    shards = len(list(scan_dir.glob("scores_*.parquet")))
    files = {w: sorted((cache / "emb" / f"{w}_emb").glob("*.npy"))[:shards] for w in ("img", "text")}
    counts = [np.load(f, mmap_mode="r").shape[0] for f in files["img"]]
    offs = np.r_[0, np.cumsum(counts)]
    q_ids = np.sort(np.random.default_rng(seed + 1).choice(offs[-1], min(queries, offs[-1]), replace=False))
    take = {w: np.concatenate([np.asarray(np.load(f, mmap_mode="r")[q_ids[(q_ids >= o) & (q_ids < o + c)] - o],
                                          np.float32) for f, o, c in zip(fs, offs, counts)]) for w, fs in files.items()}
    q_of = {"image": take["img"], "text": take["text"], "joint": joint(take["img"], take["text"]), "union": take["img"]}
    r = Reference(scan_dir / "index" / "reference")
    kinds = dict(ref["kinds"])
    if {"image", "text"} <= set(kinds):  # kdistance's search: the image and text searches merged
        kinds["union"] = {"vectors": kinds["image"]["vectors"] + kinds["text"]["vectors"], "nlist": "image + text",
                          "nprobe": "image + text"}
    out = []
    for kind, params in kinds.items():
        q = q_of[kind]
        if kind == "union":
            index = r.union(ref["sampled_from"])
            base = np.concatenate([np.asarray(index.image.vectors), np.asarray(index.text.vectors)])
            ids = np.concatenate([np.asarray(index.image.ids), np.asarray(index.text.ids) + ref["sampled_from"]])
        else:
            index = r.index(kind)
            base, ids = np.asarray(index.vectors), np.asarray(index.ids)
        t = time.time()
        exact = []
        for a in range(0, len(q), 1000):
            sims = q[a:a + 1000] @ base.T
            top = np.argpartition(-sims, 10, axis=1)[:, :10]
            exact.append(ids[np.take_along_axis(top, np.argsort(-np.take_along_axis(sims, top, 1), axis=1), 1)])
        exact = np.concatenate(exact)
        t_exact = time.time() - t
        t = time.time()
        approx = index.knn(q, 10)[1]
        t_ivf = time.time() - t
        hits = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approx, exact)]))
        out.append({"kind": kind, **params, "recall": hits, "ms": 1000 * t_ivf / len(q),
                    "exact_ms": 1000 * t_exact / len(q)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--shard-size", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/mmsanitize/bench_scale"))
    ap.add_argument("--work", default=None, help="Scan outputs (default: CACHE/runs).")
    ap.add_argument("--ratio-shards", type=int, default=None, help="Shards for the 1-vs-2-worker job (default all).")
    ap.add_argument("--all-shards", type=int, default=None, help="Shards for the all-detector scan (default all).")
    ap.add_argument("--skip-all", action="store_true", help="Skip the all-detector scan.")
    ap.add_argument("--skip-ratio", action="store_true", help="Skip the 1-vs-2-worker job.")
    ap.add_argument("--only-all", action="store_true", help="Run only the all-detector scan (--all-shards).")
    ap.add_argument("--only-ratio", action="store_true",
                    help="Run only the 1-vs-2-worker job (on --ratio-shards shards) and print its ratio.")
    ap.add_argument("--code", default=str(ROOT),
                    help="The checkout whose mmsanitize the scans run (default this one; another checkout gives "
                         "a before/after on the same data).")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--knn-reference", default=None,
                    help="--knn-reference of the all-detector scan (default: the scan's own default).")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    cache = Path(args.cache) / f"n{args.n}_s{args.seed}"
    t = time.time()
    generate(cache, args.n, args.shard_size, args.seed)
    gen = json.loads((cache / "done.json").read_text())
    print(f"data: {args.n:,} pairs, {gen['poisoned']:,} planted poisons, {cache} "
          f"(generated in {gen['seconds']:.0f} s; this run {time.time() - t:.0f} s)")
    work = Path(args.work) if args.work else cache / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(Path(args.code).resolve()), MMSANITIZE_PROGRESS="0")
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=args.code, capture_output=True, text=True)
    print(f"code: {Path(args.code).resolve()} ({rev.stdout.strip() or 'not a git checkout'})", flush=True)
    py = [sys.executable, "-m", "mmsanitize"]
    man = str(cache / "manifest.parquet")
    rows = []

    def scan(tag, shards, workers, *extra):
        n = sum(np.load(f, mmap_mode="r").shape[0] for f in sorted((cache / "emb" / "img_emb").glob("*.npy"))
                [:len(list(Path(shards).glob("*.tar"))) if Path(shards).is_dir() else int(shards[-10:-5]) + 1])
        r = run_tree(py + ["scan", shards, "--embeddings", str(cache / "emb"), "--threshold", "auto",
                           "--manifest", man, "--workers", str(workers), "--out", str(work / tag), *extra], env)
        r.update(tag=tag, n=n, workers=workers)
        rows.append(r)
        print(f"  {tag}: {n:,} pairs, {workers} worker(s): {r['seconds']:.0f} s, {n / r['seconds']:,.0f} pairs/s, "
              f"peak RSS client {r['client_rss'] / 2**30:.2f} GiB, largest worker {r['worker_rss'] / 2**30:.2f} GiB "
              f"(anonymous: {r['client_anon'] / 2**30:.2f} / {r['worker_anon'] / 2**30:.2f} GiB)", flush=True)
        return r

    r = run_tree(py + ["catalog", str(cache / "data"), "--workers", "2"], env)
    print(f"catalog (once, cached for the scans): {r['seconds']:.0f} s, {args.n / r['seconds']:,.0f} pairs/s, "
          f"peak RSS client {r['client_rss'] / 2**30:.2f} GiB, worker {r['worker_rss'] / 2**30:.2f} GiB", flush=True)
    full = shard_subset(cache, None)
    d2 = None if args.only_ratio or args.only_all else scan("default_2w", full, 2)
    sub = shard_subset(cache, args.ratio_shards)
    r1 = r2 = None
    if not (args.skip_ratio or args.only_all):
        r2 = d2 if sub == full and d2 is not None else scan("ratio_2w", sub, 2)
        r1 = scan("ratio_1w", sub, 1)
    if not (args.skip_all or args.only_ratio):
        scan("all_2w", shard_subset(cache, args.all_shards), 2, "--flag-fraction", "0.01", "--detectors",
             "similarity,class_consistency,image_reuse,caption_neighbours,density,kdistance",
             *(["--knn-reference", args.knn_reference] if args.knn_reference is not None else []))

    print("\n| job | pairs | workers | wall s | pairs/s | peak RSS client GiB | peak RSS largest worker GiB | "
          "anonymous (client / worker) GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tag']} | {r['n']:,} | {r['workers']} | {r['seconds']:.0f} | {r['n'] / r['seconds']:,.0f} | "
              f"{r['client_rss'] / 2**30:.2f} | {r['worker_rss'] / 2**30:.2f} | "
              f"{r['client_anon'] / 2**30:.2f} / {r['worker_anon'] / 2**30:.2f} |")
    if r1 is not None:
        print(f"\n2 workers vs 1 on the default scan of {r1['n']:,} pairs: {r1['seconds'] / r2['seconds']:.2f}x")
    if (work / "all_2w" / "summary.json").exists():
        rr = reference_recall(cache, work / "all_2w", args.queries, args.seed)
        if rr:
            print(f"\nkNN recall@10 of the all-detector scan's reference vs exact search over the same reference, "
                  f"{args.queries:,} seeded dataset rows as queries:")
            print("| kind | reference vectors | nlist | nprobe | recall@10 | ms/query | exact ms/query |")
            print("|---|---|---|---|---|---|---|")
            for c in rr:
                print(f"| {c['kind']} | {c['vectors']:,} | {c['nlist']} | {c['nprobe']} | {c['recall']:.4f} | "
                      f"{c['ms']:.3f} | {c['exact_ms']:.3f} |")
    if d2 is None and not args.only_all:
        return
    if d2 is not None:
        rc = recall_curve(cache, work / "default_2w", args.queries, args.seed)
        print(f"\nkNN recall@10 of the scan's image index ({rc['kind']}) vs exact search on {args.queries:,} seeded "
              f"queries (exact: {rc['exact_ms']:.2f} ms/query, streamed over the float16 files):")
        print("| nprobe | re-rank | recall@10 | ms/query | vs exact | scan's setting |")
        print("|---|---|---|---|---|---|")
        for c in rc["curve"]:
            rr = "no (SQ8 order)" if c["refine"] is None else f"{c['refine']}x{10} candidates"
            print(f"| {c['nprobe']} | {rr} | {c['recall']:.4f} | {c['ms']:.3f} | {rc['exact_ms'] / c['ms']:.0f}x faster | "
                  f"{'yes' if c['scan'] else ''} |")
    print("\nplanted-poison detection (summary.json, --manifest):")
    print("| scan | detector | AUROC | precision@k | flagged | precision | recall |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["tag"] not in ("default_2w", "all_2w"):
            continue
        det = json.loads((work / r["tag"] / "summary.json").read_text())["detection"]
        for name, m in det.items():
            if isinstance(m, dict):
                f = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
                print(f"| {r['tag']} | {name} | {f(m.get('auroc'))} | {f(m.get('precision_at_k'))} | "
                      f"{f(m.get('flagged'))} | {f(m.get('precision'))} | {f(m.get('recall'))} |")
    if d2 is None:
        return
    kinds = __import__("pandas").read_parquet(man)
    sc = __import__("pandas").read_parquet(work / "default_2w" / "scores.parquet", columns=["key", "image_reuse", "flagged"])
    m = sc.merge(kinds, on="key", how="left")
    near = m["kind"] == "near-copy"
    clean = m["kind"].isna()
    reuse_rule = sc["image_reuse"] > 0
    print(f"\nnear-duplicate copies with image_reuse > 0: {reuse_rule[near].mean():.4f}; clean pairs with "
          f"image_reuse > 0: {reuse_rule[clean].mean():.4%}; flagged: near copies {m.loc[near, 'flagged'].mean():.4f}, "
          f"clean {m.loc[clean, 'flagged'].mean():.4%}")


if __name__ == "__main__":
    main()
