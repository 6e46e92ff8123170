"""Would calibration examples chosen by design, not at random, buy fidelity?

The calibration (:mod:`iprox.calibration`) fits its correction on a seeded random sample of the pool.
The correction is a ridge regression of the target's rows on the proxy's, so a sample spread over
the proxy's feature space might predict the rest better; and the misses found so far were blocks of
alike examples (one task and one answer) that a random sample covers thinly. Two designs beside the
random sample, both made before the target featurises anything:

* ``pivoted``: greedy, the pool example whose proxy row the ridge fitted on those chosen so far
  predicts least (the largest posterior variance of that ridge with the proxy's unit rows as its
  kernel, ``λ`` the run's ridge; a pivoted Cholesky of ``P Pᵀ``), from a seeded first example;
* ``stratified``: round-robin over the pool's tasks (its records' ``task``), seeded within each.

Measured on ``diag_larger_pool.py``'s replay of the pool of 1,000 (the study's runs of 0.14's
defaults, seeds 0, 1, 2; 100 calibration examples, five draws each; a selection of 50; today's rerank
with its recalibrated rounds), against the target at seed 0 and at the run's seed: whole-pool
Spearman, head Spearman (the reference's top 20%), top-5% overlap, and the target's passes.

    python benchmarks/diag_calibration_design.py [--work /tmp/iprox-bench-fidelity] [--report]
"""

from __future__ import annotations

import math
import random
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import TASKS, measure  # noqa: E402
from common import measure_and_report, score_rows  # noqa: E402
from diag_calibration_size import _validation  # noqa: E402
from diag_larger_pool import FIGURES, K, _table, pool_at, replay  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIZE, DRAWS = 100, 5
DESIGNS = ("random", "pivoted", "stratified")


def pivoted(P: torch.Tensor, n: int, ridge: float, first: int) -> list[int]:
    """``n`` rows of unit rows ``P``: ``first``, then each time the row of the largest posterior variance
    of a ridge (``λ = ridge``) fitted on the rows chosen so far, kernel ``P Pᵀ``."""
    var = torch.ones(len(P), dtype=torch.float64) + ridge
    L = torch.zeros(len(P), n, dtype=torch.float64)
    pick: list[int] = []
    for j in range(n):
        i = first if j == 0 else int(torch.argmax(var))
        pick.append(i)
        L[:, j] = (P @ P[i] - L[:, :j] @ L[i, :j]) / var[i].sqrt()
        var = var - L[:, j] ** 2
        var[pick] = -math.inf
    return pick


def stratified(ids: list[str], tasks: list[str], n: int, rng: random.Random) -> list[str]:
    """``n`` ids, round-robin over the tasks in a seeded order, seeded within each task."""
    by: dict[str, list[str]] = {}
    for i, t in zip(ids, tasks):
        by.setdefault(t, []).append(i)
    for v in by.values():
        rng.shuffle(v)
    keys = sorted(by)
    rng.shuffle(keys)
    out: list[str] = []
    while len(out) < min(n, len(ids)):
        for key in keys:
            if by[key] and len(out) < n:
                out.append(by[key].pop())
    return out


def design(name: str, ids: list[str], tasks: list[str], P: torch.Tensor, ridge: float, draw: int) -> list[str]:
    rng = random.Random(300 + draw)  # the replay's own draws (diag_larger_pool.py) for "random"
    if name == "random":
        return rng.sample(ids, SIZE)
    if name == "pivoted":
        U = P / P.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return [ids[i] for i in pivoted(U, SIZE, ridge, rng.randrange(len(ids)))]
    return stratified(ids, tasks, SIZE, rng)


def measure_all(work: Path) -> dict:
    out: dict = {}
    rows0 = None
    for seed in (0, 1, 2):
        _, ids, sources, tasks, P, T, tcols = pool_at(work, seed)
        target_rows = score_rows(_table(ids, sources, tasks, tcols))
        rows0 = rows0 or target_rows
        for task in TASKS:
            Vp, Vt, ridge = _validation(work, task, seed)
            up, ut = Vp.mean(0), Vt.mean(0)
            for draw in range(DRAWS):
                for name in DESIGNS:
                    cal = design(name, ids, tasks, P, ridge, draw)
                    rows, rep = replay(ids, sources, tasks, P, T, cal, up, ut, tcols[task], task, K, ridge,
                                       recalibrated=True)
                    m0, ms = measure(rows, rows0)[task], measure(rows, target_rows)[task]
                    out.setdefault(name, {}).setdefault(task, []).append({
                        "seed": seed, "draw": draw, "passes": rep["shortlist"],
                        "seed0": {k: m0[k] for k, _ in FIGURES}, "same": {k: ms[k] for k, _ in FIGURES}})
            print(f"seed {seed}, {task}: done", flush=True)
    return out


def report(out: dict) -> str:
    mean = statistics.fmean
    lines = ["## Calibration examples by design (issue 12)", "",
             f"`benchmarks/diag_calibration_design.py`: the pool of 1,000 replayed ({SIZE} calibration examples, 3 seeds x "
             f"{DRAWS} draws, a selection of 50, today's rerank with its recalibrated rounds), the calibration sample "
             "random (today's), `pivoted` (greedy largest posterior variance of the ridge on the proxy's unit rows) "
             "or `stratified` (round-robin over the pool's tasks). Per task boolean_expressions / hyperbaton / "
             "formal_fallacies, mean over cases; passes: the examples the target scored in the rerank.", "",
             "| calibration | reference | " + " | ".join(label for _, label in FIGURES) + " | target passes |",
             "|---|---|" + "---|" * len(FIGURES) + "---|"]
    for name in DESIGNS:
        cases = out[name]
        for ref, label in (("seed0", "target, seed 0"), ("same", "target, the run's seed")):
            cells = [" / ".join(f"{mean(c[ref][k] for c in cases[t]):.2f}" for t in TASKS) for k, _ in FIGURES]
            passes = " / ".join(f"{mean(c['passes'] for c in cases[t]):.0f}" for t in TASKS)
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {passes} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    measure_and_report(__doc__, RESULTS / "calibration_design.json", "calibration-design", measure_all, report)


if __name__ == "__main__":
    main()
