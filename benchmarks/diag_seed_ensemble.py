"""How close can any ranking come to one target seed's? The target against its own other seeds,
alone and averaged.

The fidelity study holds every proxy to the seed-0 target (warm-up and projection seed 0). The
target itself, run with another seed, agrees with seed 0 only so far (the study's ceiling row). A
proxy that follows the target at its own seed inherits that spread, and no ranking built from
other seeds can remove the reference's own share of it: if each seed's scores are the expected
order plus independent seed noise, the expected order itself correlates with one seed at about
sqrt(rho), rho being the seeds' correlation with each other.

This script measures that from the study's target runs on disk (nothing is trained or
featurised here; `bench_fidelity.py --settings target --seeds 0 1 2` makes them). For every task
column and every choice of reference seed r among the three:

* each other seed alone against r (the ceiling row, both orders);
* the other two seeds averaged (mean of their ranks) against r: what a two-seed ensemble of the
  target would reach, about the most that two proxies, each following its own target seed, could
  reach averaged;
* the noise-model bound for the whole pool, sqrt(rho) with rho the Spearman of the other two seeds
  with each other.

With ``--proxy SETTING`` (a one-task-per-run setting of the study whose runs at seeds 1 and 2 are on
disk), the same for the proxy against the seed-0 target: each of its seeds alone, and the two averaged
(twice the proxy's cost: two target warm-ups, two proxy builds, two pool passes, two reranks).

Figures: whole-pool Spearman, head Spearman (over the reference's top 20%), top-5% overlap; the
mean over the three reference seeds, and seed 0's alone (the study's reference).

    python benchmarks/diag_seed_ensemble.py [--work /tmp/iprox-bench-fidelity] [--proxy "0.14 default, one task per run"]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fidelity import TASKS, final_scores  # noqa: E402
from common import slug, update_benchmarks_md  # noqa: E402

from iprox.agreement import head_spearman, overlap_at, spearman  # noqa: E402
from iprox.loading import read_scores  # noqa: E402

SEEDS = [0, 1, 2]
RESULTS = Path(__file__).resolve().parent / "results"


def mean_rank(a: list[float], b: list[float]) -> list[float]:
    """Two rankings averaged: each example's mean rank (the seeds' scores need not share a scale)."""
    def ranks(x):
        return np.argsort(np.argsort(np.asarray(x), kind="stable"), kind="stable")
    return ((ranks(a) + ranks(b)) / 2).tolist()


def figures(ref: list[float], other: list[float]) -> dict[str, float]:
    return {"spearman": spearman(ref, other), "head_spearman": head_spearman(ref, other),
            "overlap_5": overlap_at(ref, other, 5.0)["overlap"]}


def measure(cols: dict[int, list[float]]) -> dict:
    """Per reference seed: the others alone, their rank mean, and the noise-model bound."""
    out = {}
    for r in SEEDS:
        a, b = [s for s in SEEDS if s != r]
        rho = spearman(cols[a], cols[b])
        out[str(r)] = {"alone": {str(s): figures(cols[r], cols[s]) for s in (a, b)},
                       "ensemble": figures(cols[r], mean_rank(cols[a], cols[b])),
                       "others_rho": rho, "bound_whole": math.sqrt(max(rho, 0.0))}
    return out


def summary(per_task: dict) -> dict:
    """Means over the reference seeds (each 'alone' figure is the mean of the two other seeds)."""
    out = {}
    for t, by_ref in per_task.items():
        def mean(get):
            return statistics.mean(get(by_ref[str(r)]) for r in SEEDS)
        row = {}
        for m in ("spearman", "head_spearman", "overlap_5"):
            row[f"alone_{m}"] = mean(lambda v: statistics.mean(x[m] for x in v["alone"].values()))
            row[f"ensemble_{m}"] = mean(lambda v: v["ensemble"][m])
            row[f"alone_{m}_ref0"] = statistics.mean(x[m] for x in by_ref["0"]["alone"].values())
            row[f"ensemble_{m}_ref0"] = by_ref["0"]["ensemble"][m]
        row["bound_whole"] = mean(lambda v: v["bound_whole"])
        row["bound_whole_ref0"] = by_ref["0"]["bound_whole"]
        out[t] = row
    return out


def measure_proxy(runs: Path, setting: str, ref: dict[str, dict], ids: list[str]) -> dict:
    """Per task: the setting's runs at seeds 1 and 2 against the seed-0 target, alone and averaged."""
    out = {}
    for t in TASKS:
        cols = {}
        for s in (1, 2):
            run = runs / f"{slug(setting)}-{slug(t)}-s{s}"
            if not (final_scores(run) / "COMPLETE").exists():
                raise SystemExit(f"no finished run of {setting!r} for {t} at seed {s} ({run}); make it with "
                                 f'benchmarks/bench_fidelity.py --settings "{setting}" --seeds 1 2')
            rows = {r["id"]: r for r in read_scores(final_scores(run))}
            if sorted(rows) != ids:
                raise SystemExit(f"{run} scores another pool than the target's")
            cols[s] = [float(rows[i][t]) for i in ids]
        r0 = [float(ref[i][t]) for i in ids]
        out[t] = {"alone": {str(s): figures(r0, cols[s]) for s in cols},
                  "ensemble": figures(r0, mean_rank(cols[1], cols[2]))}
    return out


def proxy_rows(setting: str, p: dict) -> list[str]:
    def cell(get):
        return " / ".join(f"{get(p[t]):.2f}" for t in TASKS)
    rows = []
    for m_name, get in (("one of its seeds 1, 2 (mean)", lambda v, m: statistics.mean(x[m] for x in v["alone"].values())),
                        ("its seeds 1 and 2 averaged", lambda v, m: v["ensemble"][m])):
        rows.append(f"| seed 0 (the study's reference) | proxy, {setting}: {m_name} | "
                    + " | ".join(cell(lambda v, m=m: get(v, m)) for m in ("spearman", "head_spearman", "overlap_5"))
                    + " |")
    return rows


def report(s: dict, proxy: dict | None = None) -> str:
    def cell(m, kind, ref0=False):
        return " / ".join(f"{s[t][f'{kind}_{m}' + ('_ref0' if ref0 else '')]:.2f}" for t in TASKS)
    lines = [
        "## The target against its own other seeds: how close a ranking can come to one seed's (issue 12)",
        "",
        "`benchmarks/diag_seed_ensemble.py`: the fidelity study's target runs (warm-up and projection seeds 0, 1, 2; "
        "store format 3, proj_dim 64), each seed in turn the reference. Per task (boolean_expressions / hyperbaton / "
        "formal_fallacies). \"Another seed\": the mean of the two other seeds, each alone, against the reference; "
        "\"two seeds averaged\": the mean of their ranks; bound: sqrt of the two other seeds' Spearman with each "
        "other (whole pool, the independent-noise model).",
        "",
        "| against | ranking | whole-pool | head (reference's top 20%) | top-5% overlap |",
        "|---|---|---|---|---|",
    ]
    for ref0, name in ((True, "seed 0 (the study's reference)"), (False, "each seed in turn (mean of 3)")):
        lines.append(f"| {name} | another seed | {cell('spearman', 'alone', ref0)} | "
                     f"{cell('head_spearman', 'alone', ref0)} | {cell('overlap_5', 'alone', ref0)} |")
        lines.append(f"| {name} | two seeds averaged | {cell('spearman', 'ensemble', ref0)} | "
                     f"{cell('head_spearman', 'ensemble', ref0)} | {cell('overlap_5', 'ensemble', ref0)} |")
        bound = " / ".join(f"{s[t]['bound_whole' + ('_ref0' if ref0 else '')]:.2f}" for t in TASKS)
        lines.append(f"| {name} | bound, sqrt(rho) | {bound} | – | – |")
        if ref0 and proxy:
            lines += proxy_rows(proxy["setting"], proxy["per_task"])
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity")
    ap.add_argument("--proxy", metavar="SETTING", help="also this setting's runs at seeds 1 and 2, alone and averaged")
    args = ap.parse_args()
    runs = Path(args.work) / "runs"
    missing = [s for s in SEEDS if not (final_scores(runs / f"target-s{s}") / "COMPLETE").exists()]
    if missing:
        raise SystemExit(f"no finished target run at seed(s) {missing} under {runs}; make them with "
                         f"benchmarks/bench_fidelity.py --settings target --seeds {' '.join(map(str, missing))}")
    tables = {s: {r["id"]: r for r in read_scores(final_scores(runs / f"target-s{s}"))} for s in SEEDS}
    ids = sorted(tables[0])
    if any(sorted(tables[s]) != ids for s in SEEDS):
        raise SystemExit("the target runs score different pools")
    per_task = {t: measure({s: [float(tables[s][i][t]) for i in ids] for s in SEEDS}) for t in TASKS}
    s = summary(per_task)
    proxy = ({"setting": args.proxy, "per_task": measure_proxy(runs, args.proxy, tables[0], ids)}
             if args.proxy else None)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "seed_ensemble.json").write_text(json.dumps({"per_task": per_task, "summary": s, "proxy": proxy},
                                                           indent=1))
    body = report(s, proxy)
    update_benchmarks_md("seed_ensemble", body)
    print(body)


if __name__ == "__main__":
    main()
