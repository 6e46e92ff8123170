"""How much of the proxy's whole-pool disagreement is where it places each pool source?

The fidelity study's pool mixes two sources: 200 BBH examples (a few answer tokens) and 100 GSM8K
problems (a ~130-token worked answer). A pool's whole-pool Spearman counts the order inside each
source and the order between them; the second is decided by how the two sources' scores compare in
size. Measured from the fidelity study's runs of 0.14's defaults on disk (one task per run, seeds 0,
1, 2; nothing rebuilt):

* the target's own heads: how many GSM8K examples each target seed puts in its top 20% and top 5%;
* per run, against the seed-0 target and the target at the run's own seed: whole-pool Spearman,
  Spearman within each source, and GSM8K's mean percentile (1 = the top) in each ranking;
* two counterfactual rankings that keep the run's order inside each source and take the placement
  between sources from a target run (each source's rows get, in the run's order, the scores that
  target gives that source's rows): with the same-seed target's placement (what the proxy would reach
  if it placed the sources as its own target does) and with the seed-0 target's (the study's
  reference);
* one correction a run could make itself: below the rerank's shortlist, each source's scores shifted
  by the mean, over the run's calibration examples of that source, of the target's score minus the
  proxy's (held out: the proxy's row corrected from the other calibration examples, as the
  calibration's own agreement estimate takes it). No further target pass;
* a shortlist stratified by source: of its m examples, each source's share (equal, or in proportion
  to the source's size in the pool) taken from the head of that source's own ranking, the target's
  scores of it the same-seed target run's (which the run's own rerank reproduces:
  diag_shortlist_length.py checks it), beside the proxy's top m as the rerank takes it; m = 45 (the
  default shortlist here) and 90 (grown once). No growth.

    python benchmarks/diag_source_placement.py [--work /tmp/iprox-bench-fidelity]

``--settings NAME ...`` reads instead the named settings' runs (every seed on disk) against the
seed-0 target alone, the one reference every run of the study is compared with: whole-pool
Spearman, Spearman within each source, GSM8K's mean percentile and the run's order placed as the
seed-0 target places the sources. For the seed-0 runs, which share the seed-0 target's warm-up
checkpoint (checked adapter for adapter) and projection, it also reads the rows themselves: per
source, the mean cosine of the run's pool feature row (uncalibrated, and calibrated as its scores
take it) with the target's row of the same example. It writes its own section
("source-placement-settings") and ``source_placement_settings.json``, and needs only ``target-s0`` on
disk.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import TASKS, final_scores, measure  # noqa: E402
from common import figure_table, score_rows, update_benchmarks_md  # noqa: E402
from diag_bulk_order import _scores, finished_runs  # noqa: E402
from diag_shortlist_length import _target_table  # noqa: E402

from iprox.agreement import spearman  # noqa: E402
from iprox.calibration import _unit, fit_correction  # noqa: E402
from iprox.loading import load_features, read_manifest, read_scores  # noqa: E402
from iprox.rerank import combine, concat, shortlist  # noqa: E402
from iprox.scores import ScoreResult, _subtask_matrix, read_score_result  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SETTING = "0.14 default, one task per run"
K = 15  # 5% of 300
SOURCES = ("bbh", "gsm8k")


def percentile(x: np.ndarray) -> np.ndarray:
    """Each row's place in the ranking of ``x``, in [0, 1] (1: the top)."""
    out = np.empty(len(x))
    out[x.argsort(kind="stable")] = np.arange(len(x)) / max(1, len(x) - 1)
    return out


def placed_as(run: np.ndarray, ref: np.ndarray, src: np.ndarray) -> np.ndarray:
    """The run's order inside each source, with ``ref``'s placement between them: each source's rows
    take ``ref``'s scores of that source, sorted, in the run's order."""
    out = np.empty(len(run))
    for s in set(src):
        m = np.where(src == s)[0]
        out[m[np.argsort(run[m], kind="stable")]] = np.sort(ref[m])
    return out


def placement(ref: np.ndarray, mine: np.ndarray, src: np.ndarray) -> dict:
    """A run's scores against a reference's: whole-pool Spearman, Spearman within each source, and
    GSM8K's mean percentile in each ranking."""
    return {"whole": spearman(ref, mine), "within": {s: spearman(ref[src == s], mine[src == s]) for s in SOURCES},
            "gsm8k_percentile": float(percentile(mine)[src == "gsm8k"].mean()),
            "ref_gsm8k_percentile": float(percentile(ref)[src == "gsm8k"].mean())}


def stratified(res, m: int, share: str) -> list[str]:
    """A shortlist of about ``m`` ids: per source the head of its own ranking, ``m / sources`` each
    (``equal``) or in proportion to its size (``proportional``)."""
    ids, srcs, score = np.array(res.ids), np.array(res.sources), res.score.numpy()
    out: list[str] = []
    for s in sorted(set(srcs)):
        rows = np.where(srcs == s)[0]
        q = m // len(set(srcs)) if share == "equal" else round(m * len(rows) / len(ids))
        out += ids[rows[np.argsort(-score[rows], kind="stable")[:q]]].tolist()
    return out


def _rest_scores(run: Path):
    """The run's pool scores below its shortlist (calibrated pool features against the target's
    validation gradients: [rerank] rest_order "target"), and per calibration example the target's
    score minus the proxy's held-out one."""
    rest = _scores(run, "target")
    cfg = json.loads((run / "scores" / "stage.json").read_text())["config"]
    train, val, calib = cfg["train"][1], cfg["val"][1], cfg["calibration"][1]
    corr = fit_correction(train, calib, cfg["calibration_ridge"])
    U = _subtask_matrix(val, "tracin", rest.subtasks, read_manifest(val)["tasks"])
    w = rest.weights[0]
    resid = ((corr.T @ U).max(1).values - (corr.held_out_rows() @ U).max(1).values) * w
    return rest, dict(zip(corr.ids, resid.tolist()))


def _column(rows: list[dict], ids: list[str], task: str) -> np.ndarray:
    by = {r["id"]: r for r in rows}
    return np.array([float(by[i][task]) for i in ids])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/iprox-bench-fidelity"))
    ap.add_argument("--settings", nargs="+", metavar="NAME",
                    help="compare these settings' runs with the seed-0 target only (see the module's docstring)")
    args = ap.parse_args()
    runs = args.work / "runs"
    if args.settings:
        compare_settings(runs, args.settings)
        return
    targets = {s: read_scores(final_scores(runs / f"target-s{s}")) for s in (0, 1, 2)}
    ids = [r["id"] for r in targets[0]]
    src = np.array([r["source"] for r in targets[0]])
    n = len(ids)
    heads: dict = {}
    for s, rows in targets.items():
        for task in TASKS:
            order = np.argsort(-_column(rows, ids, task), kind="stable")
            heads.setdefault(task, {})[s] = {f"top {p}%": int((src[order[:round(n * p / 100)]] == "gsm8k").sum())
                                             for p in (20, 5)}
    per_run: dict = {}
    strat: dict = {}
    for task, seed, run in finished_runs(runs, SETTING):
        own = read_scores(run / "rerank" / "scores")
        mine = _column(own, ids, task)
        rest, resid = _rest_scores(run)
        rest_plain = ScoreResult(rest.ids, rest.sources, rest.tasks, rest.subtasks, rest.per_subtask.clone(),
                                 rest.score.clone(), rest.weights)
        # the correction: below the shortlist, each source shifted by its calibration examples' mean residual
        by_src = dict(zip(rest.ids, rest.sources))
        shift = {s: float(np.mean([v for i, v in resid.items() if by_src[i] == s] or [0.0])) for s in SOURCES}
        for j, i in enumerate(rest.ids):
            if i not in resid:  # a calibration example's row is already the target's
                rest.score[j] += shift[by_src[i]]
        rest.per_subtask[:, 0] = rest.score  # one subtask: the column is the aggregate
        proxy = read_score_result(run / "scores")
        proxy.per_subtask[:, 0] = proxy.score
        rounds = sorted(run.glob("rerank/target-scores*"), key=lambda p: (len(p.name), p.name))
        shifted, _ = combine(proxy, concat([read_score_result(p) for p in rounds]), K, rest=rest)
        shifted.per_subtask[:, 0] = shifted.score
        shifted_rows = score_rows(shifted)
        for ref_name, ref_seed in (("seed 0", 0), ("same seed", seed)):
            ref = _column(targets[ref_seed], ids, task)
            m_run = measure(own, targets[ref_seed])[task]
            m_shift = measure(shifted_rows, targets[ref_seed])[task]
            rec = {
                "seed": seed, **placement(ref, mine, src), "head": m_run["head_spearman"],
                "placed_as_same_seed": spearman(ref, placed_as(mine, _column(targets[seed], ids, task), src)),
                "placed_as_seed_0": spearman(ref, placed_as(mine, _column(targets[0], ids, task), src)),
                "shifted": {"whole": m_shift["spearman"], "head": m_shift["head_spearman"],
                            "overlap_5": m_shift["overlap_5"], "shift": shift},
            }
            per_run.setdefault(ref_name, {}).setdefault(task, []).append(rec)
        same = targets[seed]
        for m in (45, 90):
            for share in ("none", "proportional", "equal"):
                sl = shortlist(proxy, m) if share == "none" else stratified(proxy, m, share)
                res, _ = combine(proxy, _target_table(same, task, sl), K, rest=rest_plain)
                res.per_subtask[:, 0] = res.score
                rows = score_rows(res)
                for ref_name, ref_seed in (("same seed", seed), ("seed 0", 0)):
                    mm = measure(rows, targets[ref_seed])[task]
                    strat.setdefault(f"{m}, {share}", {}).setdefault(ref_name, {}).setdefault(task, []).append(
                        {"seed": seed, **{k: mm[k] for k in ("spearman", "head_spearman", "overlap_5")}})
        print(f"{run.name}: done", flush=True)
    (RESULTS / "source_placement.json").write_text(json.dumps({"target_heads": heads, "runs": per_run,
                                                               "stratified": strat}, indent=1))

    f2 = lambda v: f"{v:.2f}"  # noqa: E731
    lines = ["## Where the proxy places each pool source (issue 12)", "",
             "`benchmarks/diag_source_placement.py`: the fidelity study's runs of 0.14's defaults (one task per run, "
             "seeds 0, 1, 2) and the target runs at seeds 0, 1, 2, from disk. The pool: 200 BBH examples (a few answer "
             "tokens), 100 GSM8K problems (~130-token answers).", "",
             "GSM8K examples in each target seed's top 20% (60 examples) / top 5% (15):", "",
             "| task | target seed 0 | seed 1 | seed 2 |", "|---|---|---|---|"]
    for task in TASKS:
        lines.append(f"| {task} | " + " | ".join(f"{heads[task][s]['top 20%']} / {heads[task][s]['top 5%']}"
                                                  for s in (0, 1, 2)) + " |")
    lines += ["", "Per run (seeds 0 / 1 / 2): whole-pool Spearman of the run's final ranking; within BBH; within GSM8K; "
              "GSM8K's mean percentile in the run's ranking (the reference's in brackets); the run's within-source order "
              "with the between-source placement of its same-seed target, then of the seed-0 target (counterfactuals); "
              "the run with each source shifted below the shortlist by its calibration examples' mean residual "
              "(whole-pool / head Spearman, top-5% overlap).", ""]
    for ref_name in ("seed 0", "same seed"):
        lines += [f"Against the target at {ref_name}:", "",
                  "| task | whole | within BBH | within GSM8K | GSM8K percentile | placed as same-seed target "
                  "| placed as seed-0 target | shifted by source: whole / head / top-5% |",
                  "|---|---|---|---|---|---|---|---|"]
        for task in TASKS:
            rs = per_run.get(ref_name, {}).get(task, [])
            if not rs:
                continue
            cat = lambda key: " / ".join(f2(key(r)) for r in rs)  # noqa: E731
            mean = lambda key: f2(float(np.mean([key(r) for r in rs])))  # noqa: E731
            lines.append(
                f"| {task} | {cat(lambda r: r['whole'])} ({mean(lambda r: r['whole'])}) "
                f"| {cat(lambda r: r['within']['bbh'])} | {cat(lambda r: r['within']['gsm8k'])} "
                f"| " + " / ".join(f"{f2(r['gsm8k_percentile'])} ({f2(r['ref_gsm8k_percentile'])})" for r in rs) +
                f" | {cat(lambda r: r['placed_as_same_seed'])} ({mean(lambda r: r['placed_as_same_seed'])}) "
                f"| {cat(lambda r: r['placed_as_seed_0'])} ({mean(lambda r: r['placed_as_seed_0'])}) "
                f"| {mean(lambda r: r['shifted']['whole'])} / {mean(lambda r: r['shifted']['head'])} / "
                f"{mean(lambda r: r['shifted']['overlap_5'])} (run: {mean(lambda r: r['whole'])} / "
                f"{mean(lambda r: r['head'])}) |")
        lines.append("")
    lines += ["A shortlist stratified by source (m examples; \"none\": the proxy's top m, as the rerank takes it). "
              "Mean over seeds of whole-pool Spearman / head Spearman / top-5% overlap:", ""]
    lines += figure_table("shortlist", TASKS, strat)
    update_benchmarks_md("source-placement", "\n".join(lines) + "\n")
    print("\n".join(lines))


def row_agreement(run: Path, target: Path, src: np.ndarray) -> dict:
    """Per source, the mean cosine of a run's pool feature rows with the target run's rows of the same
    examples: as stored, and calibrated as the run's scores take them. Refuses a pair that does not
    share the warm-up checkpoint's adapters and the projection."""
    cfg = json.loads((run / "scores" / "stage.json").read_text())["config"]
    train, calib = Path(cfg["train"][-1]), Path(cfg["calibration"][-1])
    ref = Path(json.loads((target / "scores" / "stage.json").read_text())["config"]["train"][-1])
    rm, tm = read_manifest(train), read_manifest(ref)
    if (rm["seed"], rm["grad"], rm["dim"]) != (tm["seed"], tm["grad"], tm["dim"]):
        raise SystemExit(f"{train} and {ref} are not projected alike")
    mine_ad = load_file(str(Path(rm["checkpoint"]) / "adapter_model.safetensors"))
    ref_ad = load_file(str(Path(tm["checkpoint"]) / "adapter_model.safetensors"))
    if mine_ad.keys() != ref_ad.keys() or any(not torch.equal(mine_ad[k], ref_ad[k]) for k in mine_ad):
        raise SystemExit(f"{rm['checkpoint']} and {tm['checkpoint']} hold different adapters")
    ids, P = load_features(train, torch.float64)
    tids, T = load_features(ref, torch.float64)
    if ids != tids:
        raise SystemExit(f"{train} and {ref} hold different examples")
    P, T = _unit(P), _unit(T)
    X = fit_correction(train, calib, cfg["calibration_ridge"]).apply(ids, P)
    raw, cal = (P * T).sum(1).numpy(), (X * T).sum(1).numpy()
    return {s: {"raw": float(raw[src == s].mean()), "calibrated": float(cal[src == s].mean())} for s in SOURCES}


def compare_settings(runs: Path, settings: list[str]) -> None:
    """Per setting and task, each run on disk against the seed-0 target: how much of its whole-pool
    disagreement is the placement between the two sources. A run measured by an earlier invocation
    whose folder is gone since (a cleared work folder) keeps the figures it was measured at."""
    ref_rows = read_scores(final_scores(runs / "target-s0"))
    ids = [r["id"] for r in ref_rows]
    src = np.array([r["source"] for r in ref_rows])
    res_path = RESULTS / "source_placement_settings.json"
    was = json.loads(res_path.read_text()) if res_path.exists() else {}
    out: dict = {}
    for setting in settings:
        found: dict = {}
        for task, seed, run in finished_runs(runs, setting):
            ref = _column(ref_rows, ids, task)
            mine = _column(read_scores(run / "rerank" / "scores"), ids, task)
            rec = {"seed": seed, **placement(ref, mine, src), "placed_as_seed_0": spearman(ref, placed_as(mine, ref, src))}
            if seed == 0:
                rec["rows"] = row_agreement(run, runs / "target-s0", src)
            found.setdefault(task, {})[seed] = rec
        for task in TASKS:
            recs = {r["seed"]: r for r in was.get(setting, {}).get(task, [])} | found.get(task, {})
            if recs:
                out.setdefault(setting, {})[task] = [recs[s] for s in sorted(recs)]
    res_path.write_text(json.dumps(out, indent=1))
    f2 = lambda v: f"{v:.2f}"  # noqa: E731
    lines = ["## Where each setting's proxy places the pool sources (issue 12)", "",
             "`benchmarks/diag_source_placement.py --settings " + " ".join(f'"{s}"' for s in settings) + "`: "
             "each run against the seed-0 target, seeds in order. Whole-pool Spearman; Spearman within BBH (200) "
             "and within GSM8K (100); GSM8K's mean percentile in the run's ranking (1 = the top; the target's in "
             "brackets); the run's order inside each source with the target's placement between them.", "",
             "| setting | task | seeds | whole | within BBH | within GSM8K | GSM8K percentile | placed as the target |",
             "|---|---|---|---|---|---|---|---|"]
    for setting, by_task in out.items():
        for task, rs in by_task.items():
            cat = lambda key: " / ".join(f2(key(r)) for r in rs)  # noqa: E731
            lines.append(f"| {setting} | {task} | {' / '.join(str(r['seed']) for r in rs)} | {cat(lambda r: r['whole'])} "
                         f"| {cat(lambda r: r['within']['bbh'])} | {cat(lambda r: r['within']['gsm8k'])} | "
                         + " / ".join(f"{f2(r['gsm8k_percentile'])} ({f2(r['ref_gsm8k_percentile'])})" for r in rs)
                         + f" | {cat(lambda r: r['placed_as_seed_0'])} |")
    lines += ["", "The seed-0 runs' feature rows against the seed-0 target's (the same warm-up checkpoint and projection): "
              "mean cosine per source, as stored / calibrated (a calibration example's calibrated row is the "
              "target's own).", "", "| setting | BBH | GSM8K |", "|---|---|---|"]
    for setting, by_task in out.items():
        r0 = [r["rows"] for rs in by_task.values() for r in rs if "rows" in r]
        if r0:  # the pool store is the same for every task of a seed (the tasks differ in validation only)
            cell = lambda s: f"{f2(r0[0][s]['raw'])} / {f2(r0[0][s]['calibrated'])}"  # noqa: E731
            lines.append(f"| {setting} | {cell('bbh')} | {cell('gsm8k')} |")
    update_benchmarks_md("source-placement-settings", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
