"""Scoring at pool scale: time and peak memory of ``iprox score`` and of the top-k cut for synthetic
stores of 10k, 100k and 1M examples.

The stores are written in the real store format (fp16 shards with ids and checksums, a manifest),
``--dim`` dimensions per example (default 2,048; LESS keeps 8,192), with 12 validation examples of 3
tasks. Each measurement runs in its own process, which reports its own wall time and peak RSS, so
the figures are the scoring's alone. What is expected: features are streamed shard by shard, so
memory grows only with what is O(n) by nature (the ids, the n × tasks result), not with n × dim.

Writes the "scoring" section of BENCHMARKS.md and ``benchmarks/results/scoring.json``. Run it alone:
it is a timing benchmark. The stores take n × dim × 2 bytes of disk under ``--work`` (4 GB at 1M).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import update_benchmarks_md  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TASKS = ["a", "b", "c"]


def write_store(folder: Path, n: int, dim: int, shard_size: int, seed: int, tasks: list[str]) -> None:
    """A complete feature store of ``n`` random fp16 rows (the format ``iprox features`` writes)."""
    from iprox import artifacts
    from iprox.features import _shard_crc, _write_shard
    from iprox.loading import MANIFEST_FILE, STORE_FORMAT_VERSION, shard_name

    if artifacts.is_complete(folder):
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    ids = [f"{folder.name}-{i:07d}" for i in range(n)]
    shards = []
    for i, a in enumerate(range(0, n, shard_size)):
        b = min(n, a + shard_size)
        _write_shard(folder / shard_name(i), torch.randn(b - a, dim, generator=g).half(), ids[a:b])
        shards.append({"file": shard_name(i), "start": a, "count": b - a, "crc32": _shard_crc(folder / shard_name(i))})
    man = {"format_version": STORE_FORMAT_VERSION, "model": "synthetic", "checkpoint": "", "epoch": 1, "lr": 1e-5,
           "trains": None, "model_hash": "synthetic", "grad": "sgd", "engine": "kronecker", "proj_dim": dim,
           "total_dim": 0, "seed": 0, "dim": dim, "dtype": "float16", "bytes_per_example": 2 * dim, "n_examples": n,
           "ids": ids, "sources": ["synthetic"] * n, "tasks": tasks, "dropped": 0,
           "layout": [{"name": "synthetic", "k_out": 1, "k_in": dim, "offset": 0}], "shards": shards}
    artifacts.atomic_write_json(folder / MANIFEST_FILE, man)
    artifacts.mark_complete(folder)


def child(args) -> None:
    """One measurement in this process: prints JSON with seconds and peak RSS (GiB)."""
    t0 = time.perf_counter()
    if args.child == "score":
        from iprox.scores import ScoreConfig, score

        score(ScoreConfig(train=[args.train], val=[args.val], out=args.out, overwrite=True))
    else:
        from iprox.loading import read_scores
        from iprox.selection import rank

        rows = read_scores(args.out)
        rank(rows, max(1, len(rows) // 20))
    print(json.dumps({"seconds": time.perf_counter() - t0,
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def measure(kind: str, train: Path, val: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--train", str(train), "--val", str(val), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--shard-size", type=int, default=16384)
    ap.add_argument("--work", default="/tmp/iprox-bench-scoring")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic stores")
    ap.add_argument("--child", choices=["score", "topk"], help=argparse.SUPPRESS)
    ap.add_argument("--train", help=argparse.SUPPRESS)
    ap.add_argument("--val", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    work = Path(args.work)
    val = work / "val"
    write_store(val, 12, args.dim, 16, 1, [t for t in TASKS for _ in range(4)])
    rows = []
    for n in args.sizes:
        train = work / f"train-{n}"
        t0 = time.perf_counter()
        write_store(train, n, args.dim, args.shard_size, 2, [TASKS[i % 3] for i in range(n)])
        made = time.perf_counter() - t0
        shutil.rmtree(work / f"scores-{n}", ignore_errors=True)  # else `score` skips: same settings, complete
        s = measure("score", train, val, work / f"scores-{n}")
        k = measure("topk", train, val, work / f"scores-{n}")
        rows.append({"n": n, "dim": args.dim, "store_gib": n * args.dim * 2 / 2**30, "write_s": made,
                     "score_s": s["seconds"], "score_rss_gib": s["peak_rss_gib"],
                     "topk_s": k["seconds"], "topk_rss_gib": k["peak_rss_gib"]})
        print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(train)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scoring.json").write_text(json.dumps(rows, indent=2))
    lines = ["## Scoring at pool scale (issue 13)", "",
             f"`benchmarks/bench_scoring.py`: synthetic fp16 stores of {args.dim} dimensions per example (the real store "
             "format, shards of 16,384 rows), 12 validation examples of 3 tasks; TracIn, one checkpoint. Each figure "
             "from its own process (wall time, peak RSS of that process). `score` streams the store shard by shard and "
             "writes scores.csv and scores.parquet; `top 5%` reads scores.csv and cuts the top 5% by a heap.", "",
             "| pool | store (GiB) | score (s) | score peak RSS (GiB) | µs per example | top 5% (s) | top 5% peak RSS (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['store_gib']:.2f} | {r['score_s']:.1f} | {r['score_rss_gib']:.2f} | "
                     f"{1e6 * r['score_s'] / r['n']:.0f} | {r['topk_s']:.1f} | {r['topk_rss_gib']:.2f} |")
    body = "\n".join(lines)
    print(body)
    update_benchmarks_md("scoring", body)


if __name__ == "__main__":
    main()
