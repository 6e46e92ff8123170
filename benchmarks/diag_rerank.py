"""Reranking the proxy's shortlist with the target: how long a shortlist buys the target's selection?

The rerank stage (:mod:`iprox.rerank`) has the target featurise the proxy's top ``m`` examples at
the same checkpoint and projection and puts them above the rest in the target's order. Its effect
is measured here from the stores of the fidelity study and the long-answer task, with nothing
rebuilt: for each proxy on disk (``diag_long_task.py``'s settings: the proxy's pool store, its
validation stores, and the target's pool store at the same checkpoint and projection), the run's
scores are the calibrated proxy's (32 examples, ridge 0.01, 5 subsets; scored "both", as the
pipeline does), the target's scores of the shortlist are the target's rows against the target's own
validation gradients (what the rerank stage computes), and :func:`iprox.rerank.combine` places them.

Runs: GSM8K as the target task (8 validation problems), each of the study's BBH tasks as a run of
its own, and the three BBH tasks as one run (the shortlist: the head of each task's column, as the
stage takes it; the selection by the max over the tasks). Figures against the target's exact
gradients (warm-up seed 0): whole-pool Spearman, head Spearman (the reference's top 20%), top-5%
overlap; and the rerank's own report (Spearman of proxy and target over the shortlist, how deep
the target's top 5% reaches in the proxy's order).
Shortlist fractions: 0 (no rerank), 0.10, 0.15 (the default for a 5% selection: 3 times it), 0.20,
0.30, and 1 (the target's own run at this projection: the rerank's cap).

    python benchmarks/diag_rerank.py            # measure and write the section
    python benchmarks/diag_rerank.py --featurise   # first make the 0.7 default's stores where its run is on disk
    python benchmarks/diag_rerank.py --report   # only rewrite the section
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import TASKS, measure  # noqa: E402
from common import slug, update_benchmarks_md  # noqa: E402
from diag_calibration import SUBSETS, rows_of, subset_ids, unit  # noqa: E402
from diag_long_task import DEFAULT_KEYS, TASK, _val_store, figures, validation_file  # noqa: E402
from diag_projection import featurise, jobs  # noqa: E402

from iprox.calibration import correction_from_rows  # noqa: E402
from iprox.loading import load_features, read_manifest, read_scores  # noqa: E402
from iprox.rerank import combine, shortlist, shortlist_size  # noqa: E402
from iprox.scores import ScoreResult  # noqa: E402
from iprox.selection import selection_size  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FRACTIONS = (0.0, 0.10, 0.15, 0.20, 0.30, 1.0)
SELECT = 0.05


def _table(ids, sources, tasks, cols: dict[str, torch.Tensor]) -> ScoreResult:
    names = sorted(cols)
    per = torch.stack([cols[t] for t in names], dim=1)
    return ScoreResult(list(ids), list(sources), list(tasks), names, per, per.max(dim=1).values, [1.0])


def _rerank(proxy: ScoreResult, target_cols: dict[str, torch.Tensor], fraction: float,
            rest: ScoreResult | None = None) -> tuple[ScoreResult, dict | None]:
    """The run's table after a rerank of ``fraction`` of the pool (``target_cols``: the target's
    scores of every pool example; only the shortlist's are used; ``rest``: other scores of the pool
    that order the rows below the shortlist, as ``[rerank] rest_order`` passes them)."""
    if not fraction:
        return proxy, None
    n = len(proxy.ids)
    m = shortlist_size(fraction, n, selection_size(SELECT, 0, n))
    short = set(shortlist(proxy, m))
    at = [r for r, i in enumerate(proxy.ids) if i in short]
    target = _table([proxy.ids[a] for a in at], [proxy.sources[a] for a in at], [proxy.tasks[a] for a in at],
                    {t: v[at] for t, v in target_cols.items()})
    return combine(proxy, target, selection_size(SELECT, 0, n), rest=rest)


def proxy_folder(base: Path, key: str) -> Path:
    """Where a proxy of the long-answer table has its stores (the 0.7 default's are diag_projection's)."""
    if key in DEFAULT_KEYS:
        return base / slug(f"IProX, seed {key.rsplit('seed ', 1)[1]}")
    return base / slug(key)


def featurise_missing(work: Path, max_length: int) -> None:
    """The 0.7 default's stores, where its run is on disk but its stores are not (a work folder whose
    stores were cleared): pool, validation and GSM8K validation stores, as diag_long_task makes them."""
    base = work / "projection" / "format-3"
    val = validation_file(work, json.loads((RESULTS / "long_task.json").read_text())["n_val"])
    for job in jobs(work):
        if not job["name"].startswith("IProX, seed") or job["name"].endswith("exact") or not Path(job["model"]).exists():
            continue
        folder = base / slug(job["name"])
        featurise(job, folder, work, max_length)
        _val_store(work, val, read_manifest(folder / "train"), folder.name, max_length)
        print(f"{job['name']}: stores at {folder}", flush=True)


def measure_all(work: Path) -> dict:
    base = work / "projection" / "format-3"
    long_task = json.loads((RESULTS / "long_task.json").read_text())
    val = validation_file(work, long_task["n_val"])
    tv = lambda store: unit(load_features(store, torch.float64)[1]).mean(0)  # noqa: E731
    exact_store = base / slug("target, warm-up 0, exact")
    ids, X0 = load_features(exact_store / "train", torch.float64)
    man = read_manifest(exact_store / "train")
    sources, tasks = man["sources"], man["tasks"]
    gsm_exact = unit(X0) @ tv(work / "long-task" / f"{exact_store.name}-{val.stem}")
    del X0
    bbh_exact = read_scores(exact_store / "scores")
    # the selection's reference in a run of the three tasks: the exact target's max over them, in every column
    agg_exact = [{**r, **{t: r["score"] for t in TASKS}} for r in bbh_exact]
    pool_file = work / "runs" / "0.6_default__val_both-s0" / "pool" / "pool.jsonl"
    out: dict = {"fractions": list(FRACTIONS), "pool": len(ids), "proxies": {}}
    for key in long_task["seeds"]:
        folder = proxy_folder(base, key)
        if not (folder / "train" / "COMPLETE").exists():
            print(f"{key}: no store at {folder}; skipped", flush=True)
            continue
        s = int(key.rsplit("seed ", 1)[1])
        tgt = base / slug(f"target, warm-up {s}, projection {s}")
        pids, Xp = load_features(folder / "train", torch.float64)
        tids, Xt = load_features(tgt / "train", torch.float64)
        if pids != ids or tids != ids:
            raise SystemExit(f"{folder} and {tgt} do not line up with the exact stores")
        X, T = unit(Xp), unit(Xt)
        # the validation vectors: GSM8K's (proxy, target) and each BBH task's (proxy's "val", target's "val-target")
        gp = tv(work / "long-task" / f"{folder.name}-{val.stem}")
        gt = tv(work / "long-task" / f"{tgt.name}-{val.stem}")
        bbh = {}
        for v in ("val", "val-target"):
            V, vt = load_features(folder / v, torch.float64)[1], read_manifest(folder / v)["tasks"]
            bbh[v] = {t: unit(V)[[i for i, x in enumerate(vt) if x == t]].mean(0) for t in TASKS}
        target_gsm = {TASK: T @ gt}
        target_bbh = {t: T @ bbh["val-target"][t] for t in TASKS}
        rec: dict = {}
        for k in SUBSETS:
            sub = subset_ids(pool_file, 32, k)
            at = [ids.index(i) for i in sub]
            Xc = correction_from_rows(sub, Xp[at], Xt[at], 0.01).apply(ids, X)
            runs = {"gsm8k": _table(ids, sources, tasks, {TASK: Xc @ (gp + gt)}),
                    "bbh, three tasks in one run": _table(ids, sources, tasks,
                                                          {t: Xc @ (bbh["val"][t] + bbh["val-target"][t]) for t in TASKS})}
            # the rows below the shortlist ordered against the target's validation gradients alone
            # ([rerank] rest_order = "target", the default since 0.14)
            rest_three = _table(ids, sources, tasks, {t: Xc @ bbh["val-target"][t] for t in TASKS})
            for t in TASKS:
                runs[f"bbh, {t} alone"] = _table(ids, sources, tasks, {t: Xc @ (bbh["val"][t] + bbh["val-target"][t])})
            for f in FRACTIONS:
                cell = rec.setdefault(str(f), {})
                res, rep = _rerank(runs["gsm8k"], target_gsm, f)
                g = figures(res.per_subtask[:, 0], gsm_exact, ids, sources, tasks)
                cell.setdefault("gsm8k", []).append({**g, **_own(rep, TASK)})
                res, rep = _rerank(runs["bbh, three tasks in one run"], target_bbh, f)
                m3 = measure(rows_of(ids, sources, tasks, {t: res.per_subtask[:, j] for j, t in enumerate(res.subtasks)}),
                             bbh_exact)
                agg = rows_of(ids, sources, tasks, {u: res.score for u in TASKS})
                ma = measure(agg, agg_exact)[TASKS[0]]  # (every column is the aggregate here)
                cell.setdefault("bbh, three tasks in one run", []).append(
                    {t: {**m3[t], **_own(rep, t)} for t in TASKS} | {"aggregate": {**ma, **_own(rep, "score")}})
                if f:
                    res, rep = _rerank(runs["bbh, three tasks in one run"], target_bbh, f, rest=rest_three)
                    agg = rows_of(ids, sources, tasks, {u: res.score for u in TASKS})
                    cell.setdefault("bbh, three tasks in one run, rest target", []).append(
                        {"aggregate": {**measure(agg, agg_exact)[TASKS[0]], **_own(rep, "score")}})
                for t in TASKS:
                    res, rep = _rerank(runs[f"bbh, {t} alone"], {t: target_bbh[t]}, f)
                    m1 = measure(rows_of(ids, sources, tasks, {u: res.per_subtask[:, 0] for u in TASKS}), bbh_exact)  # (its column t alone counts)
                    cell.setdefault(f"bbh, {t} alone", []).append({**m1[t], **_own(rep, t)})
        out["proxies"][key] = rec
        print(f"{key} measured", flush=True)
    return out


def _own(rep: dict | None, col: str) -> dict:
    """The rerank's own report for a column (nothing without a rerank)."""
    if rep is None:
        return {}
    c = rep["columns"][col]
    return {"own_spearman": c["spearman"], "deepest": c["deepest"], "shortlist": rep["shortlist"],
            "reranked": c["reranked"]}


def _mean(vals: list[float | None]) -> float:
    vals = [v for v in vals if v is not None]
    return statistics.fmean(vals) if vals else float("nan")


def report(res: dict) -> str:
    keys = list(res["proxies"])
    fr = [str(f) for f in res["fractions"]]

    def pooled(f: str, run: str, key: str, task: str | None = None) -> list[float]:
        """Per proxy the mean over its 5 subsets."""
        return [_mean([(m[task] if task else m)[key] for m in res["proxies"][p][f][run]]) for p in keys]

    def cell(f, run, key, task=None) -> str:
        v = pooled(f, run, key, task)
        return f"{statistics.fmean(v):.2f} ({min(v):.2f})"

    lines = ["## Reranking the proxy's shortlist with the target (issue 12)", "",
             "`benchmarks/diag_rerank.py`: the rerank stage (`[rerank] fraction`: the target featurises the head of each "
             "subtask's column of the proxy's scores at the same checkpoint and projection, and its order tops the "
             f"table) measured from the stores on disk, for the {len(keys)} proxies of the long-answer table "
             f"({'; '.join(keys)}); each calibrated "
             "(32 examples, ridge 0.01, 5 subsets) and scored \"both\" as the pipeline does. Against the target's exact "
             "gradients (warm-up seed 0). Each cell: the mean over the proxies of their 5-subset means, the lowest "
             "proxy in brackets. Cost: the target's extra feature passes, as a share of its own pool pass "
             "(fraction 1: the target's own run at proj_dim 64, the rerank's cap).", "",
             "GSM8K as the target task (one run):", "",
             "| shortlist | target passes | whole-pool Spearman | head Spearman | top-5% overlap | within GSM8K | "
             "proxy-target Spearman over the shortlist | deepest proxy rank of the target's top 15 |",
             "|---|---|---|---|---|---|---|---|"]
    for f in fr:
        own = (f"{cell(f, 'gsm8k', 'own_spearman')} | {cell(f, 'gsm8k', 'deepest')}" if float(f) else "– | –")
        lines.append(f"| {'none' if not float(f) else f} | {float(f):.2f} | {cell(f, 'gsm8k', 'spearman')} | "
                     f"{cell(f, 'gsm8k', 'head_spearman')} | {cell(f, 'gsm8k', 'overlap_5')} | "
                     f"{cell(f, 'gsm8k', 'within_gsm8k')} | {own} |")
    lines += ["", "Each BBH task as a run of its own (whole-pool Spearman / head Spearman / top-5% overlap; the "
              "lowest proxy's top-5% overlap in brackets):", "",
              "| shortlist | target passes | " + " | ".join(TASKS) + " |", "|---|---|" + "---|" * len(TASKS)]
    for f in fr:
        row = []
        for t in TASKS:
            run = f"bbh, {t} alone"
            ov = pooled(f, run, "overlap_5")
            row.append(f"{statistics.fmean(pooled(f, run, 'spearman')):.2f} / "
                       f"{statistics.fmean(pooled(f, run, 'head_spearman')):.2f} / {statistics.fmean(ov):.2f} ({min(ov):.2f})")
        lines.append(f"| {'none' if not float(f) else f} | {float(f):.2f} | " + " | ".join(row) + " |")
    lines += ["", "The three BBH tasks as one run (the shortlist: the head of each task's column, a third of it each; "
              "target passes: the shortlist's share, smaller where the heads share examples). First the aggregate "
              "(LESS's max over the tasks), what the selection takes, against the exact target's; then "
              "each task's column, with the rows of it that were reranked (the head of its own ranking that lies in "
              "the shortlist):", "",
              "| shortlist | target passes | aggregate (the selection) | " + " | ".join(TASKS) + " |",
              "|---|---|---|" + "---|" * len(TASKS)]
    run = "bbh, three tasks in one run"
    for f in fr:
        ov = pooled(f, run, "overlap_5", "aggregate")
        row = [f"{statistics.fmean(pooled(f, run, 'spearman', 'aggregate')):.2f} / "
               f"{statistics.fmean(pooled(f, run, 'head_spearman', 'aggregate')):.2f} / "
               f"{statistics.fmean(ov):.2f} ({min(ov):.2f})"]
        cost = statistics.fmean(pooled(f, run, "shortlist", "aggregate")) / res["pool"] if float(f) else 0.0
        for t in TASKS:
            ov = pooled(f, run, "overlap_5", t)
            done = f"; {statistics.fmean(pooled(f, run, 'reranked', t)):.0f} rows" if float(f) else ""
            row.append(f"{statistics.fmean(pooled(f, run, 'spearman', t)):.2f} / "
                       f"{statistics.fmean(pooled(f, run, 'head_spearman', t)):.2f} / "
                       f"{statistics.fmean(ov):.2f} ({min(ov):.2f}){done}")
        lines.append(f"| {'none' if not float(f) else f} | {cost:.2f} | " + " | ".join(row) + " |")
    run = "bbh, three tasks in one run, rest target"
    if run in res["proxies"][keys[0]][fr[-1]]:
        lines += ["", "The same three-task run with the rows below the shortlist ordered against the target's validation "
                  "gradients alone (`[rerank] rest_order = \"target\"`, the default since 0.14), the aggregate:", "",
                  "| shortlist | rows below the shortlist ordered by the run's scores | by the target's validation gradients |",
                  "|---|---|---|"]
        for f in fr[1:]:
            cells = []
            for r in ("bbh, three tasks in one run", run):
                ov = pooled(f, r, "overlap_5", "aggregate")
                cells.append(f"{statistics.fmean(pooled(f, r, 'spearman', 'aggregate')):.2f} / "
                             f"{statistics.fmean(pooled(f, r, 'head_spearman', 'aggregate')):.2f} / "
                             f"{statistics.fmean(ov):.2f} ({min(ov):.2f})")
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity", help="the fidelity study's work folder")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--featurise", action="store_true",
                    help="first featurise the 0.7 default's proxies whose runs are on disk but whose stores are not")
    ap.add_argument("--max-length", type=int, default=320)
    args = ap.parse_args()
    path = RESULTS / "rerank.json"
    if args.featurise:
        featurise_missing(Path(args.work), args.max_length)
    if not args.report:
        res = measure_all(Path(args.work))
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1) + "\n")
    res = json.loads(path.read_text())
    update_benchmarks_md("rerank", report(res))
    print(report(res))


if __name__ == "__main__":
    main()
