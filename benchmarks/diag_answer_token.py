"""How much of the proxy's error follows the answer a pool example gives?

Two misses of the fidelity study were blocks of one task and one answer: hyperbaton's "(A)/(B)"
neighbours (snarks) and, on the pool of 1,000, formal_fallacies' causal_judgement examples answering
"No" (BENCHMARKS.md, "Growing the shortlist by the recalibrated scores"). This measures how general
that is, on the pool of 1,000 (``diag_calibration_size.py --pool-1000``'s stores; seeds 0, 1, 2; each
target task's column), with nothing rebuilt.

Every ranking is turned into normal scores of its ranks (what Spearman sees), and the error of a
ranking is its difference from the reference's. The error's variance is split by the pool's groups:
the share that the pool task's mean explains (a task placed too high or too low as a whole), and the
further share that the mean of each (task, answer) group explains, where the answer is the example's
response when its task has at most ``MAX_ANSWERS`` distinct responses in the pool (a free-form task is
one group). Group means fit noise too, more so for small groups: each figure is given beside its mean
over ``PERMUTATIONS`` shuffles of the answers within each task (``chance``).

Rankings, per seed and target task:

* ``proxy``: the proxy's rows scored against both validation means (how the run's scores stage ranks
  before calibration), against the target at the same seed (same warm-up and projection);
* ``calibrated``: corrected on ``CALIBRATION`` seeded pool examples (ridge as the run's), against the
  target's validation mean (the order below what the rerank's target scored, before its refits);
* ``target, other seed``: the target at seeds 1 and 2 against the target at seed 0, the control: how
  much of the target's own seed-to-seed difference follows the answer.

    python benchmarks/diag_answer_token.py [--work /tmp/iprox-bench-fidelity] [--report]
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

import torch
from scipy.stats import norm, rankdata

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import TASKS  # noqa: E402
from common import measure_and_report  # noqa: E402
from diag_calibration_size import _validation  # noqa: E402
from diag_larger_pool import pool_at  # noqa: E402

from iprox.calibration import correction_from_rows  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MAX_ANSWERS = 10
PERMUTATIONS = 50
CALIBRATION = 100
RANKINGS = ("proxy", "calibrated", "target, other seed")


def normal_ranks(x: torch.Tensor) -> torch.Tensor:
    r = rankdata(x.double().numpy())
    return torch.tensor(norm.ppf((r - 0.5) / len(r)), dtype=torch.float64)


def explained(err: torch.Tensor, groups: list[str]) -> float:
    """The share of ``err``'s variance (about its mean) that the means of ``groups`` explain."""
    total = float(((err - err.mean()) ** 2).sum())
    codes: dict[str, int] = {}
    idx = torch.tensor([codes.setdefault(g, len(codes)) for g in groups])
    sums = torch.zeros(len(codes), dtype=torch.float64).index_add_(0, idx, err)
    counts = torch.zeros(len(codes), dtype=torch.float64).index_add_(0, idx, torch.ones_like(err))
    left = float(((err - (sums / counts)[idx]) ** 2).sum())
    return 1 - left / total


def answers(pool: Path, ids: list[str]) -> tuple[list[str], list[str]]:
    """Per example: its task, and its (task, answer) group."""
    rec = {}
    for line in pool.read_text().splitlines():
        r = json.loads(line)
        rec[r["id"]] = (r["task"], r["messages"][-1]["content"].strip())
    tasks = [rec[i][0] for i in ids]
    distinct: dict[str, set] = {}
    for t, a in rec.values():
        distinct.setdefault(t, set()).add(a)
    groups = [f"{t}|{a}" if len(distinct[t]) <= MAX_ANSWERS else t for t, a in (rec[i] for i in ids)]
    return tasks, groups


def split(err: torch.Tensor, tasks: list[str], groups: list[str]) -> dict:
    by_task = explained(err, tasks)
    by_answer = explained(err, groups) - by_task
    rng = random.Random(0)
    chance = []
    for _ in range(PERMUTATIONS):
        shuffled = list(groups)
        for t in set(tasks):
            at = [k for k, x in enumerate(tasks) if x == t]
            vals = [groups[k] for k in at]
            rng.shuffle(vals)
            for k, v in zip(at, vals):
                shuffled[k] = v
        chance.append(explained(err, shuffled) - by_task)
    return {"variance": float(err.var()), "task": by_task, "answer": by_answer, "chance": statistics.fmean(chance)}


def measure_all(work: Path) -> dict:
    out: dict = {}
    target0 = None
    for seed in (0, 1, 2):
        _, ids, _, _, P, T, tcols = pool_at(work, seed)
        tasks, groups = answers(work / "pool1000" / "pool.jsonl", ids)
        pos = {i: r for r, i in enumerate(ids)}
        if seed == 0:
            target0 = {t: normal_ranks(tcols[t]) for t in TASKS}
        for task in TASKS:
            Vp, Vt, ridge = _validation(work, task, seed)
            up, ut = Vp.mean(0), Vt.mean(0)
            ref = normal_ranks(tcols[task])
            cal = random.Random(300).sample(ids, CALIBRATION)
            at = [pos[i] for i in cal]
            C = correction_from_rows(cal, P[at], T[at], ridge).apply(ids, P)
            rows = {"proxy": normal_ranks(P @ (up + ut)) - ref, "calibrated": normal_ranks(C @ ut) - ref}
            if seed:
                rows["target, other seed"] = ref - target0[task]
            for name, err in rows.items():
                out.setdefault(name, {}).setdefault(task, []).append({"seed": seed, **split(err, tasks, groups)})
        print(f"seed {seed}: done", flush=True)
    return out


def report(out: dict) -> str:
    mean = statistics.fmean
    lines = ["## How much of the proxy's error follows the answer (issue 12)", "",
             "`benchmarks/diag_answer_token.py`: on the pool of 1,000 (seeds 0, 1, 2), the error of a ranking (normal "
             "scores of its ranks minus the reference's) split by the pool's groups: the share of its variance that "
             "the pool task's mean explains, and the further share that the (task, answer) groups' means explain "
             f"(tasks with at most {MAX_ANSWERS} distinct answers); beside it that further share with the answers "
             f"shuffled within each task (mean of {PERMUTATIONS}). Per target task boolean_expressions / hyperbaton / "
             "formal_fallacies, mean over seeds. The error variance is about 2(1 - r), r the Pearson correlation of the two "
             "normal scores (about Spearman's).", "",
             "| ranking | reference | error variance | by task | by answer, further | by answer, shuffled |",
             "|---|---|---|---|---|---|"]
    refs = {"proxy": "target, same seed", "calibrated": "target, same seed", "target, other seed": "target, seed 0"}
    for name in RANKINGS:
        cases = out[name]
        cells = [" / ".join(f"{mean(c[key] for c in cases[t]):.2f}" for t in TASKS) for key in ("variance", "task", "answer", "chance")]
        lines.append(f"| {name} | {refs[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    measure_and_report(__doc__, RESULTS / "answer_token.json", "answer-token", measure_all, report)


if __name__ == "__main__":
    main()
