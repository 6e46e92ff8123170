"""Reliability counts for BENCHMARKS.md: the fuzz tier's bad inputs by category, and the kill/concurrency tier.

Runs the generated bad inputs of ``tests/fuzz_cases.py`` (the same ones ``make test-fuzz`` asserts on)
and counts, per category: cases, clean one-line errors naming their cause, tracebacks, silent
results (exit 0 on bad input), and other unclean failures (message not naming the cause, or output
left behind). Then runs ``pytest -m reliability`` (SIGKILL at 24 points of ``iprox run`` and a rerun,
plus two concurrent runs) and records its pass count. Writes the ``reliability`` section.

    python benchmarks/bench_reliability.py [--seed N] [--skip-kill]
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from common import update_benchmarks_md  # noqa: E402
from conftest import write_model_folder  # noqa: E402
from fuzz_cases import all_cases, run_case  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=20261130)
    ap.add_argument("--skip-kill", action="store_true", help="only the fuzz counts")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    counts = {"data": 300, "config": 300, "cli": 250, "store": 160}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = write_model_folder(tmp / "tiny", "llama")
        cases = all_cases(tmp, model_dir, args.seed, counts)
        t0 = time.perf_counter()
        outcomes = [run_case(c) for c in cases]
        seconds = time.perf_counter() - t0
    by: dict[str, Counter] = {}
    for o in outcomes:
        c = by.setdefault(o.case.category, Counter())
        c["cases"] += 1
        c["clean"] += o.clean
        c["traceback"] += o.traceback
        c["silent"] += o.code == 0
        c["other"] += (not o.clean) and not o.traceback and o.code != 0
        c[f"exit {o.code}"] += 1
    lines = ["## Reliability (issue 14)", "",
             f"`benchmarks/bench_reliability.py --seed {args.seed}`: the fuzz tier's generated bad inputs "
             f"(`tests/fuzz_cases.py`, asserted by `make test-fuzz`), run through `iprox.cli.main` in {seconds:.0f}s. "
             "Clean = non-zero exit, no traceback, the message names the offending file, line or setting, and "
             "nothing left in the output folder where the input could be checked first.", "",
             "| category | cases | clean errors | tracebacks | silent (exit 0) | other unclean | exit codes |",
             "|---|---|---|---|---|---|---|"]
    tot = Counter()
    for cat, c in by.items():
        codes = ", ".join(f"{k.split()[1]}: {v}" for k, v in sorted(c.items()) if k.startswith("exit "))
        lines.append(f"| {cat} | {c['cases']} | {c['clean']} | {c['traceback']} | {c['silent']} | {c['other']} | {codes} |")
        tot.update({k: v for k, v in c.items() if not k.startswith("exit ")})
    lines.append(f"| **all** | {tot['cases']} | {tot['clean']} | {tot['traceback']} | {tot['silent']} | {tot['other']} | |")
    if not args.skip_kill:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "reliability", "-p", "no:cacheprovider"],
                           cwd=ROOT, capture_output=True, text=True)
        m = re.search(r"(\d+) passed", r.stdout)
        f = re.search(r"(\d+) failed", r.stdout)
        lines += ["", f"Kill and concurrency tier (`make test-reliability`, {time.perf_counter() - t0:.0f}s): "
                  f"**{m.group(1) if m else 0} passed, {f.group(1) if f else 0} failed** — `iprox run` on a tiny "
                  "model killed with SIGKILL at 21 stage boundaries and points inside stages (seen as files "
                  "appearing in the run folder) and at 3 timed points, each rerun to completion and compared "
                  "byte for byte with an uninterrupted run (selection, its manifest less the run's own paths, "
                  "scores); and a second `iprox run` on a busy folder, refused with exit 3 and the holder's PID "
                  "while the first completes."]
    update_benchmarks_md("reliability", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
