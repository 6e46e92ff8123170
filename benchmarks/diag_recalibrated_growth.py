"""Does growing the rerank's shortlist by the recalibrated scores recover what the proxy misplaced?

The rerank (:mod:`iprox.rerank`) has the target score the head of the proxy's ranking; the rest of the
pool keeps the proxy's (calibrated) order. When the proxy misplaces a block of alike examples below the
shortlist, nothing in the rerank sees it: on the pool of 1,000, formal_fallacies at seed 1 lost 10 of
the target's top 50, all causal_judgement examples whose answer is "No", which the proxy ranked
187-557 while it ranked the same task's "Yes" examples in its top 70 (BENCHMARKS.md, "The bars in a
pool of 1,000"). Two of the "No" examples were in the shortlist, and the target placed them in its top
50. The recalibrated rounds (``rerank_rounds(..., recalibrate=...)``) refit the calibration's
correction on the target's rows of every example the target has scored, score the pool again against
the target's validation gradients (the same scale as the target's own scores), and have the target
score the examples this predicts would enter its top ``k``, until none is left (within the same
budget, twice the first shortlist).

Measured from the stores on disk, nothing rebuilt, each case without and with the recalibrated rounds:

* the fidelity study's pool of 300 (its runs of 0.14's defaults, one task per run, seeds 0, 1, 2; the
  run's own calibration examples, a selection of 15), each run first replayed to its own ranking;
* the pool of 1,000 replayed (``diag_larger_pool.py``'s replay; 100 calibration examples, five draws,
  a selection of 50);
* the runs made for real on the pool of 1,000 (``diag_larger_pool.py --real``; their own
  calibration examples, the target's rows from the target run at the same seed), each first replayed
  to its own ranking; where a run was redone by 0.19's pipeline (``--redo``: ``iprox run --from`` it,
  into ``<run>-v019``), that run's own final scores beside it.

Figures: whole-pool Spearman, head Spearman (the reference's top 20%), top-5% overlap, against the
target at seed 0 and at the run's seed (in the pool of 300 also against the target's exact gradients,
``diag_projection.py``'s store, where it is on disk); and the target's passes (examples it scored in the
rerank).

    python benchmarks/diag_recalibrated_growth.py [--work /tmp/iprox-bench-fidelity]
    python benchmarks/diag_recalibrated_growth.py --redo   # first redo the real runs with today's rerank
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import TASKS, final_scores, measure  # noqa: E402
from common import IPROX, score_rows, sh, slug, update_benchmarks_md  # noqa: E402
from diag_calibration_size import _order, _validation  # noqa: E402
from diag_common_mode import _rows  # noqa: E402
from diag_larger_pool import FIGURES, OLD_RERANK, SETTING, SMALL_K, K, _table, pool_at, replay  # noqa: E402

from iprox.loading import read_manifest, read_scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIZE = 100  # 0.18's default calibration in a pool of 1,000
DRAWS = 5
MODES = ("today", "recalibrated")


def _case(rows: dict, ref0: list[dict], ref: list[dict], task: str, exact: list[dict] | None = None) -> dict:
    """Both modes' figures against both references (and the exact gradients where given), and the
    target's passes."""
    out = {}
    refs = {"seed0": ref0, "same": ref, **({"exact": exact} if exact else {})}
    for mode, (r, rep) in rows.items():
        out[mode] = {}
        for name, x in refs.items():
            m = measure(r, x)[task]
            out[mode][name] = {k: m[k] for k, _ in FIGURES}
        out[mode].update(passes=rep["shortlist"], unchecked=rep.get("recalibrated", {}).get("unchecked", 0))
    return out


def _both(run_own: list[dict] | None, *args, **kw) -> dict:
    """The replay without and with the recalibrated rounds; the first checked against ``run_own`` (a
    run's own final table) where given: the same selection of ``k``, and the same ranking (Spearman 1
    to 1e-6: the stores are read in float64 here, scored in float32 by the pipeline)."""
    out = {mode: replay(*args, **kw, recalibrated=mode == "recalibrated") for mode in MODES}
    if run_own is not None:
        mine, k = out["today"][0], args[-2]
        rho = spearmanr([r["score"] for r in mine], [float(r["score"]) for r in _aligned(run_own, mine)])[0]
        if rho < 1 - 1e-6 or set(_order(mine)[:k]) != set(_order(run_own)[:k]):
            raise SystemExit(f"the replay does not give the run's own ranking (Spearman {rho})")
    return out


def _aligned(rows: list[dict], like: list[dict]) -> list[dict]:
    by = {r["id"]: r for r in rows}
    return [by[r["id"]] for r in like]


def study_and_replay(work: Path) -> dict:
    out: dict = {"300": {}, "1000": {}}
    rows0 = {}
    exact = work / "projection" / "format-3" / "target__warm-up_0__exact" / "scores"  # (diag_projection.py's)
    exact_rows = read_scores(exact) if (exact / "COMPLETE").exists() else None
    for seed in (0, 1, 2):
        small_ids, ids, sources, tasks, P, T, tcols = pool_at(work, seed)
        n = len(small_ids)
        big = score_rows(_table(ids, sources, tasks, tcols))
        small = score_rows(_table(small_ids, sources[:n], tasks[:n], {t: c[:n] for t, c in tcols.items()}))
        if seed == 0:
            rows0 = {"300": small, "1000": big}
        for task in TASKS:
            Vp, Vt, ridge = _validation(work, task, seed)
            up, ut = Vp.mean(0), Vt.mean(0)
            run = work / "runs" / f"{slug(SETTING)}-{task}-s{seed}"
            cal = read_manifest(run / "features" / "calib-target-1")["ids"]
            both = _both(read_scores(run / "rerank" / "scores"), small_ids, sources[:n], tasks[:n], P[:n],
                         T[:n], cal, up, ut, tcols[task][:n], task, SMALL_K, ridge)
            out["300"].setdefault(task, []).append({"seed": seed, **_case(both, rows0["300"], small, task, exact_rows)})
            for draw in range(DRAWS):
                both = _both(None, ids, sources, tasks, P, T, random.Random(300 + draw).sample(ids, SIZE), up, ut,
                             tcols[task], task, K, ridge)
                out["1000"].setdefault(task, []).append({"seed": seed, "draw": draw,
                                                          **_case(both, rows0["1000"], big, task)})
        print(f"seed {seed}: done", flush=True)
    return out


def redo(work: Path) -> None:
    """Each finished real run on the pool of 1,000 made again by today's pipeline into ``<run>-v019``:
    its config without 0.18's rerank, ``iprox run --from`` it (every stage before the rerank reused)."""
    base = work / "pool1000"
    for seed in (0, 1, 2):
        for task in TASKS:
            run = base / f"proxy-{task}-s{seed}"
            again = base / f"{run.name}-v019"
            if not (run / "selection" / "COMPLETE").exists() or (again / "selection" / "COMPLETE").exists():
                continue
            cfg = base / "configs" / f"{again.name}.toml"
            text = (base / "configs" / f"{run.name}.toml").read_text().replace(str(run), str(again))
            cfg.write_text(text.replace("[rerank]\n" + OLD_RERANK, ""))
            fresh = not (again / "pipeline.json").exists()
            print(f"redo {run.name}", flush=True)
            sh(IPROX + ["run", str(cfg), "--no-progress"] + (["--from", str(run)] if fresh else []), base / "log.txt")


def real(work: Path) -> dict:
    """The runs made for real on the pool of 1,000, from their stores."""
    base = work / "pool1000"
    ref0 = read_scores(final_scores(base / "target-s0"))
    out: dict = {}
    for seed in (0, 1, 2):
        tdir = base / f"target-s{seed}"
        runs = {t: base / f"proxy-{t}-s{seed}" for t in TASKS}
        if not all((r / "selection" / "COMPLETE").exists() for r in runs.values()):
            continue
        ref = read_scores(final_scores(tdir))
        tids, T = _rows(tdir / "features" / "train-1")
        for task, run in runs.items():
            cfg = json.loads((run / "scores" / "stage.json").read_text())["config"]
            pool_store, (pval, tval) = cfg["train"][0], cfg["val"]
            ids, P = _rows(Path(pool_store))
            if ids != tids:
                raise SystemExit(f"{run.name}: its pool store and the target run's hold other examples")
            man = read_manifest(Path(pool_store))
            cal = read_manifest(run / "features" / "calib-target-1")["ids"]
            vtasks = read_manifest(Path(tval))["tasks"]
            Vt, Vp = _rows(Path(tval))[1], _rows(Path(pval))[1]
            ptasks = read_manifest(Path(pval))["tasks"]
            ut = Vt[[k for k, x in enumerate(vtasks) if x == task]].mean(0)
            up = Vp[[k for k, x in enumerate(ptasks) if x == task]].mean(0)
            both = _both(read_scores(run / "rerank" / "scores"), ids, man["sources"], man["tasks"], P, T, cal,
                         up, ut, T @ ut, task, K, cfg.get("calibration_ridge", 0.01))
            case = {"seed": seed, **_case(both, ref0, ref, task)}
            again = base / f"{run.name}-v019"  # the run redone by 0.19's pipeline (`iprox run --from` it)
            if (again / "selection" / "COMPLETE").exists():
                rows = read_scores(final_scores(again))
                rep = json.loads((again / "rerank" / "scores" / "scores.json").read_text())["rerank"]
                m0, ms = measure(rows, ref0)[task], measure(rows, ref)[task]
                case["pipeline"] = {"seed0": {k: m0[k] for k, _ in FIGURES}, "same": {k: ms[k] for k, _ in FIGURES},
                                    "rounds": rep["rounds"], "recalibrated": rep.get("recalibrated")}
            out.setdefault(task, []).append(case)
        print(f"real runs, seed {seed}: done", flush=True)
    return out


def report(out: dict) -> str:
    mean = statistics.fmean
    lines = ["## Growing the shortlist by the recalibrated scores (issue 12)", "",
             "`benchmarks/diag_recalibrated_growth.py`: each case reranked as 0.18 does (today) and with the recalibrated "
             "rounds: the correction refitted on the target's rows of every example it scored, the pool scored again "
             "against the target's validation gradients, and the examples predicted to enter the target's top k "
             "scored by the target, until none is left (budget: twice the first shortlist). Per task "
             "boolean_expressions / hyperbaton / formal_fallacies, mean over cases; passes: the examples the target "
             "scored in the rerank.", "",
             "| pool | rerank | reference | " + " | ".join(label for _, label in FIGURES) + " | target passes |",
             "|---|---|---|" + "---|" * len(FIGURES) + "---|"]
    labels = {"300": "study's 300 (run's calibration, k 15; 3 seeds)",
              "1000": f"1,000 replayed ({SIZE} calibration, k 50; 3 seeds x {DRAWS} draws)",
              "real": "1,000 run for real (k 50; seeds " + "/".join(sorted({str(c["seed"]) for cs in out.get("real", {}).values()
                                                                              for c in cs})) + ")"}
    for pool in ("300", "1000", "real"):
        cases = out.get(pool)
        if not cases:
            continue
        for mode in MODES:
            for ref, rlabel in (("seed0", "target, seed 0"), ("same", "target, the run's seed"),
                                ("exact", "the target's exact gradients (seed 0, no projection)")):
                if ref not in cases[TASKS[0]][0][mode]:
                    continue
                cells = [" / ".join(f"{mean(c[mode][ref][k] for c in cases[t]):.2f}" for t in TASKS) for k, _ in FIGURES]
                passes = " / ".join(f"{mean(c[mode]['passes'] for c in cases[t]):.0f}" for t in TASKS)
                lines.append(f"| {labels[pool]} | {mode} | {rlabel} | " + " | ".join(cells) + f" | {passes} |")
    for t in TASKS:
        for c in out.get("real", {}).get(t, []):
            if "pipeline" in c:
                p = c["pipeline"]
                lines.append(f"| 1,000, {t} at seed {c['seed']} redone by 0.19's `iprox run` (`--from` the run) | "
                             f"recalibrated (rounds {p['rounds']}) | target, seed 0 / the run's seed | " +
                             " | ".join(f"{p['seed0'][k]:.2f} / {p['same'][k]:.2f}" for k, _ in FIGURES) +
                             f" | {sum(p['rounds'])} |")
    worst = [(c["today"]["same"]["overlap_5"], c["recalibrated"]["same"]["overlap_5"], pool, t, c["seed"])
             for pool in ("300", "1000", "real") for t in TASKS for c in out.get(pool, {}).get(t, [])]
    lost = sum(1 for a, b, *_ in worst if b < a - 1e-9)
    gained = sum(1 for a, b, *_ in worst if b > a + 1e-9)
    unchecked = sum(1 for pool in ("300", "1000", "real") for t in TASKS for c in out.get(pool, {}).get(t, [])
                    if c["recalibrated"]["unchecked"])
    lines += ["", f"Top-5% overlap with the target at the run's seed, case by case ({len(worst)} cases): higher with the "
              f"recalibrated rounds in {gained}, lower in {lost}; the budget ran out with examples still predicted to "
              f"enter in {unchecked}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/iprox-bench-fidelity"))
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the results JSON")
    ap.add_argument("--redo", action="store_true", help="first make each real run on the pool of 1,000 again with "
                    "today's rerank (`iprox run --from` it, into <run>-v019; 3-6 minutes a run on 2 cores)")
    args = ap.parse_args()
    path = RESULTS / "recalibrated_growth.json"
    if args.redo:
        redo(args.work)
    if not args.report:
        out = study_and_replay(args.work)
        out["real"] = real(args.work)
        path.write_text(json.dumps(out, indent=1))
    update_benchmarks_md("recalibrated-growth", report(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
