"""The issue's bars in a pool of 1,000, at 0.18's defaults, replayed from the stores on disk.

The fidelity study's pool holds 300 examples, so its calibration is capped at a tenth (30) and its
selection is 15. A user's pool is larger. ``diag_calibration_size.py --pool-1000`` featurised 700 more
examples of the same kinds (200 GSM8K problems, 25 of each BBH task) with the target and each seed's
proxy at that run's checkpoint and projection; this script runs the rest of the pipeline on the
1,000 examples as the pipeline does it, for the study's runs of 0.14's defaults (sparsity 0.5, one
task per run, seeds 0, 1, 2), and measures what the issue asks of the result:

* calibration: ``c`` seeded pool examples, the correction fitted on the proxy's and the target's rows
  of them (the target's rows from its store at the run's seed: what the run's calibration store would
  hold); ``c`` = 32 (0.17's default, ``min(32, pool / 10)``) and 100 (0.18's, ``min(128, pool / 10)``),
  five draws each;
* scores: the calibrated rows against the proxy's and the target's validation gradients ("both");
* the rerank: the target's scores of a shortlist of 3 × 50 (a 5% selection of 1,000), grown up to
  twice that as the pipeline grows it, on top; the rest in the order of the calibrated rows against
  the target's validation gradients;
* figures against the target at seed 0 (its rows over the 1,000 against its validation gradients)
  and against the target at the run's seed: whole-pool Spearman, head Spearman (the reference's top
  20%: 200 examples), top-5% overlap (50); beside them the ceiling, the target's seeds 1 and 2
  against seed 0 over the same 1,000.

What differs from a run on a pool of 1,000: the warm-up is the study's (5% of its 300 examples, not of
1,000), so the checkpoint, and with it the proxy's LoRA, is the 300-example run's. Before anything is
measured, each target's rows against its validation gradients must reproduce its run's scores over
the study's 300 examples (Spearman 1 to 1e-6 per task), and each run, replayed on those 300 with its own
calibration examples and its selection of 15, must give its own final ranking.

``--real [SEED ...]``: seeds (default 0) run for real on the pool of 1,000 (about 45 minutes a seed on 2
cores): the target as the study's ``target-s<seed>`` (its warm-up on 5% of the 1,000) and the proxy at
today's defaults but 0.18's rerank (``recalibrate = false``), one run per task, the second and third
started ``--from`` the first (``iprox run``, folders under ``WORK/pool1000``; a finished run is skipped,
an interrupted one resumes). Measured as above, against the target run at the same seed and at seed 0,
beside the replay's seed-0 figures; with each run's calibration count and stage times. Seeds measured
before are kept.

    python benchmarks/diag_larger_pool.py [--work /tmp/iprox-bench-fidelity]   # after diag_calibration_size.py --pool-1000
    python benchmarks/diag_larger_pool.py --real 0 1
    python benchmarks/diag_larger_pool.py --report
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import TASKS, final_scores, measure  # noqa: E402
from common import IPROX, score_rows, sh, slug, update_benchmarks_md  # noqa: E402
from diag_calibration_size import _extension, _order, _pool_1000, _validation  # noqa: E402
from diag_common_mode import _rows  # noqa: E402

from iprox.calibration import correction_from_rows  # noqa: E402
from iprox.loading import read_manifest, read_scores  # noqa: E402
from iprox.rerank import DEFAULT_FACTOR, rerank_rounds  # noqa: E402
from iprox.scores import ScoreResult  # noqa: E402

OLD_RERANK = "recalibrate = false\n"  # the real runs' rerank: 0.18's
RESULTS = ROOT / "benchmarks" / "results"
SIZES = (32, 100)  # 0.17's default and 0.18's for a pool of 1,000
DRAWS = 5
K = 50  # a 5% selection of 1,000
SMALL_K = 15  # the study's: 5% of 300
SETTING = "0.14 default, one task per run"
GROWTH = 2.0
FIGURES = (("spearman", "whole pool"), ("head_spearman", "head"), ("overlap_5", "top 5%"))


def _table(ids: list[str], sources: list[str], tasks: list[str], cols: dict[str, torch.Tensor]) -> ScoreResult:
    names = list(cols)
    per = torch.stack([cols[n] for n in names], 1).double()
    return ScoreResult(list(ids), list(sources), list(tasks), names, per, per.max(1).values, [1.0])


def _target(work: Path, seed: int, ids: list[str], T: torch.Tensor) -> dict[str, torch.Tensor]:
    """The target at ``seed``: its rows against its own validation gradients, per task, checked
    against its run's scores over the study's 300 examples."""
    run = work / "runs" / f"target-s{seed}"
    vids, V = _rows(run / "features" / "val-1")
    vtasks = read_manifest(run / "features" / "val-1")["tasks"]
    assert len(vids) == len(vtasks)
    cols = {t: T @ V[[k for k, x in enumerate(vtasks) if x == t]].mean(0) for t in TASKS}
    own = {r["id"]: r for r in read_scores(run / "scores")}
    small = [k for k, i in enumerate(ids) if i in own]
    if len(small) != len(own):
        raise SystemExit(f"target-s{seed}'s scores hold examples its rows do not")
    for t in TASKS:
        rho = spearmanr(cols[t][small], [float(own[ids[k]][t]) for k in small])[0]
        if rho < 1 - 1e-6:
            raise SystemExit(f"target-s{seed}'s rows do not reproduce its {t} scores (Spearman {rho})")
    return cols


def replay(ids: list[str], sources: list[str], tasks: list[str], P: torch.Tensor, T: torch.Tensor, cids: list[str],
           up: torch.Tensor, ut: torch.Tensor, target_col: torch.Tensor, task: str, k: int,
           ridge: float, recalibrated: bool = False) -> tuple[list[dict], dict]:
    """The run's ranking from its rows, as the pipeline makes it: calibrated on ``cids``, scored
    against both validation means, the shortlist for a selection of ``k`` reranked with the target's
    scores ``target_col`` (grown as the pipeline grows it), the rest by the calibrated rows against
    the target's validation mean. ``recalibrated``: the rerank's recalibrated rounds too (the
    correction refitted on the calibration examples and every example the target scored). Returns
    its score rows and the rerank's report."""
    pos = {i: r for r, i in enumerate(ids)}

    def corrected(fit: list[str]) -> torch.Tensor:
        at = [pos[i] for i in fit]
        return correction_from_rows(fit, P[at], T[at], ridge).apply(ids, P)

    C = corrected(cids)
    both = _table(ids, sources, tasks, {task: C @ (up + ut)})
    rest = _table(ids, sources, tasks, {task: C @ ut})

    def score_target(new: list[str], _round: int) -> ScoreResult:
        rows = [pos[i] for i in new]
        return _table(new, [sources[r] for r in rows], [tasks[r] for r in rows], {task: target_col[rows]})

    def recalibrate(scored: list[str]) -> ScoreResult:
        seen = set(cids)
        return _table(ids, sources, tasks, {task: corrected(list(cids) + [i for i in scored if i not in seen]) @ ut})

    res, rep = rerank_rounds(both, k, DEFAULT_FACTOR * k, GROWTH, score_target, rest=rest,
                             recalibrate=recalibrate if recalibrated else None)
    return score_rows(res), rep


def pool_at(work: Path, seed: int):
    """The pool of 1,000 at ``seed``: (ids of the study's 300, ids of all, their sources and tasks, the
    proxy's and the target's unit rows, the target's column per task)."""
    small_ids, _, _, ids, P, T = _pool_1000(work, seed)
    meta = {}
    for store in (work / "runs" / f"target-s{seed}" / "features" / "train-1", work / "extpool" / f"target-train-s{seed}"):
        m = read_manifest(store)
        meta.update({i: (s, t) for i, s, t in zip(m["ids"], m["sources"], m["tasks"])})
    sources, tasks = [meta[i][0] for i in ids], [meta[i][1] for i in ids]
    return small_ids, ids, sources, tasks, P, T, _target(work, seed, ids, T)


def measure_all(work: Path) -> dict:
    out: dict = {"ceiling": {}, "runs": {}}
    rows0 = None
    for seed in (0, 1, 2):
        small_ids, ids, sources, tasks, P, T, tcols = pool_at(work, seed)
        target_rows = score_rows(_table(ids, sources, tasks, tcols))
        if seed == 0:
            rows0 = target_rows
        else:
            m = measure(target_rows, rows0)
            for t in TASKS:
                out["ceiling"].setdefault(t, []).append({k: m[t][k] for k, _ in FIGURES})
        n = len(small_ids)
        for task in TASKS:
            Vp, Vt, ridge = _validation(work, task, seed)
            up, ut = Vp.mean(0), Vt.mean(0)
            # the check: on the study's 300 examples, with the run's own calibration examples and
            # selection, the replay gives the run's final ranking
            run = work / "runs" / f"{slug(SETTING)}-{task}-s{seed}"
            cal = read_manifest(run / "features" / "calib-target-1")["ids"]
            own, _ = replay(small_ids, sources[:n], tasks[:n], P[:n], T[:n], cal, up, ut, tcols[task][:n], task,
                            SMALL_K, ridge)
            if _order(own) != _order(read_scores(run / "rerank" / "scores")):
                raise SystemExit(f"{run.name}: the replay does not give the run's ranking")
            for c in SIZES:
                for draw in range(DRAWS):
                    rows, rep = replay(ids, sources, tasks, P, T, random.Random(300 + draw).sample(ids, c), up, ut,
                                       tcols[task], task, K, ridge)
                    m0, ms = measure(rows, rows0)[task], measure(rows, target_rows)[task]
                    out["runs"].setdefault(str(c), {}).setdefault(task, []).append({
                        "seed": seed, "draw": draw, "shortlist": rep["shortlist"],
                        "seed0": {k: m0[k] for k, _ in FIGURES}, "same": {k: ms[k] for k, _ in FIGURES}})
        print(f"seed {seed}: done (each task's run replayed to its own ranking first)", flush=True)
    return out


def real_runs(work: Path, seeds: list[int]) -> dict:
    """``seeds`` run for real on the pool of 1,000 (see the module docstring): per seed and task, the
    proxy run's figures against the target run at its seed and at seed 0, its calibration count and
    its stage times; per seed the target run's times and (seeds other than 0) its figures against the
    target at seed 0."""
    base = work / "pool1000"
    (base / "configs").mkdir(parents=True, exist_ok=True)
    pool = base / "pool.jsonl"
    if not pool.exists():
        _extension(work)  # (diag_calibration_size's 700, written once)
        pool.write_text((work / "pool.jsonl").read_text() + (work / "extpool" / "ext.jsonl").read_text())
    study_pool = str(work / "pool.jsonl")

    def target_run(seed: int) -> Path:
        cfg = base / "configs" / f"target-s{seed}.toml"
        cfg.write_text((work / "configs" / f"target-s{seed}.toml").read_text()
                       .replace(str(work / "runs" / f"target-s{seed}"), str(base / f"target-s{seed}"))
                       .replace(study_pool, str(pool)))
        sh(IPROX + ["run", str(cfg), "--no-progress"], base / "log.txt")
        return base / f"target-s{seed}"

    ref0 = read_scores(final_scores(target_run(0)))
    out: dict = {}
    for seed in seeds:
        tdir = target_run(seed)
        ref = read_scores(final_scores(tdir))
        res: dict = {"target_timings": json.loads((tdir / "pipeline.json").read_text())["timings"]}
        if seed != 0:
            m = measure(ref, ref0)
            res["target_vs_seed0"] = {t: {k: m[t][k] for k, _ in FIGURES} for t in TASKS}
        first = None
        for task in TASKS:
            name = f"{slug(SETTING)}-{task}-s{seed}"
            run = base / f"proxy-{task}-s{seed}"
            cfg = base / "configs" / f"proxy-{task}-s{seed}.toml"
            # 0.18's rerank, which this section measures (diag_recalibrated_growth.py --redo makes each
            # run again with 0.19's recalibrated rounds, `--from` it)
            cfg.write_text((work / "configs" / f"{name}.toml").read_text()
                           .replace(str(work / "runs" / name), str(run)).replace(study_pool, str(pool))
                           + "[rerank]\n" + OLD_RERANK)
            fresh = not (run / "pipeline.json").exists()
            sh(IPROX + ["run", str(cfg), "--no-progress"] + (["--from", str(first)] if first and fresh else []),
               base / "log.txt")
            first = first or run
            rows = read_scores(final_scores(run))
            same, zero = measure(rows, ref)[task], measure(rows, ref0)[task]
            meta = json.loads((run / "pipeline.json").read_text())
            res[task] = {"same": {k: same[k] for k, _ in FIGURES}, "seed0": {k: zero[k] for k, _ in FIGURES},
                         "calibration": len((run / "features" / "calibration.jsonl").read_text().splitlines()),
                         "timings": meta["timings"], "reused": meta.get("reused", [])}
        out[str(seed)] = res
    return out


def report(out: dict) -> str:
    mean = statistics.fmean

    def cell(cases: list[dict], key: str) -> str:
        return " / ".join(f"{mean(x[key] for x in cases[t]):.2f}" for t in TASKS)

    lines = ["## The bars in a pool of 1,000 at 0.18's defaults (issue 12)", "",
             "`benchmarks/diag_larger_pool.py`: the study's runs of 0.14's defaults (sparsity 0.5, one task per run, "
             "seeds 0, 1, 2) replayed on the pool of 1,000 of `diag_calibration_size.py --pool-1000`: calibration on "
             "32 (0.17's default) or 100 (0.18's) seeded pool examples (five draws each), scores against both "
             "validation gradients, the rerank of a 5% selection (shortlist 150, grown up to 300) with the target at "
             "the run's seed, the rest in the calibrated rows' order against the target's validation gradients. The "
             "warm-up is the 300-example run's. Per task boolean_expressions / hyperbaton / formal_fallacies, mean "
             "over seeds and draws.", "",
             "| calibration examples | reference | " + " | ".join(label for _, label in FIGURES) + " |",
             "|---|---|" + "---|" * len(FIGURES)]
    for c, by_task in out["runs"].items():
        for ref, label in (("seed0", "target, seed 0"), ("same", "target, the run's seed")):
            cells = [" / ".join(f"{mean(x[ref][k] for x in by_task[t]):.2f}" for t in TASKS) for k, _ in FIGURES]
            lines.append(f"| {c} | {label} | " + " | ".join(cells) + " |")
    real = out.get("real")
    if real:
        for c, by_task in out["runs"].items():
            cells = [" / ".join(f"{mean(x['seed0'][k] for x in by_task[t] if x['seed'] == 0):.2f}" for t in TASKS)
                     for k, _ in FIGURES]
            lines.append(f"| {c} | seed 0 alone (replayed) | " + " | ".join(cells) + " |")
        for seed, r in real.items():
            n_cal = "/".join(sorted({str(r[t]["calibration"]) for t in TASKS}))
            for ref, label in (("same", f"the target run at seed {seed}"), ("seed0", "the target run at seed 0")):
                if ref == "seed0" and seed == "0":
                    continue
                lines.append(f"| {n_cal} | seed {seed} run for real on the 1,000, against {label} there | " +
                             " | ".join(" / ".join(f"{r[t][ref][k]:.2f}" for t in TASKS) for k, _ in FIGURES) + " |")
            if "target_vs_seed0" in r:
                tv = r["target_vs_seed0"]
                lines.append(f"| – | the target run at seed {seed} on the 1,000 against seed 0's there | " +
                             " | ".join(" / ".join(f"{tv[t][k]:.2f}" for t in TASKS) for k, _ in FIGURES) + " |")
    ceil = out["ceiling"]
    lines.append("| – | ceiling: the target's seeds 1 and 2 against seed 0 | " +
                 " | ".join(cell(ceil, k) for k, _ in FIGURES) + " |")
    bar = [max(0.0, min(0.9, 0.95 * mean(x["spearman"] for x in ceil[t]))) for t in TASKS]
    lines += ["", "The whole-pool bar against seed 0 (0.9, or 95% of the ceiling where that is lower): " +
              " / ".join(f"{b:.2f}" for b in bar) + "; the head bar 0.9; the top-5% bar 0.8 and at least the "
              "ceiling's overlap."]
    for seed, r in (real or {}).items():
        tt = r["target_timings"]
        lines += ["", f"The runs for real at seed {seed}: the target's warm-up took {tt['warmup']:.0f} s and its pool pass "
                  f"{tt['features']:.0f} s; the first proxy run ({TASKS[0]}) " +
                  ", ".join(f"{k} {v:.0f} s" for k, v in r[TASKS[0]]["timings"].items() if v >= 1) +
                  "; the others, started from it (reusing " + ", ".join(r[TASKS[1]]["reused"]) + "), " +
                  " and ".join(f"{sum(r[t]['timings'].values()):.0f} s" for t in TASKS[1:]) + " in all."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/iprox-bench-fidelity"))
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the results JSON")
    ap.add_argument("--real", nargs="*", type=int, metavar="SEED", default=None,
                    help="these seeds (default 0) run for real on the pool of 1,000 (about 45 minutes a seed; seed 0's "
                         "target run is made too, the reference of the others)")
    args = ap.parse_args()
    path = RESULTS / "larger_pool.json"
    if args.real is not None:
        out = json.loads(path.read_text())
        out["real"] = {**out.get("real", {}), **real_runs(args.work, args.real or [0])}  # (other seeds' kept)
        path.write_text(json.dumps(out, indent=1))
    elif not args.report:
        before = json.loads(path.read_text()) if path.exists() else {}
        out = measure_all(args.work)
        if before.get("real"):  # measured earlier: kept
            out["real"] = before["real"]
        path.write_text(json.dumps(out, indent=1))
    body = report(json.loads(path.read_text()))
    update_benchmarks_md("larger-pool", body)
    print(body)


if __name__ == "__main__":
    main()
