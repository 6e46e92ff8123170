"""How many calibration examples the bulk of the ranking needs, at today's defaults.

The calibration (:mod:`iprox.calibration`) corrects the proxy's pool features from the target's on a
few pool examples; by default ``min(32, pool / 10)`` until 0.18, ``min(128, pool / 10)`` since (what this
script found). In a pool of 300 that cap is 30 examples, a
tenth of the target's pool pass; in a pool of 100,000 the same 32 cost 0.03% of it, and a few hundred
would still cost well under 1%. So the share a larger calibration costs says little about scale; what it
buys does: this script measures it on the fidelity study's runs of 0.14's defaults (sparsity 0.5; one
task per run; seeds 0, 1, 2), nothing rebuilt.

A fixed evaluation set ``E`` of 100 pool examples (seeded) is never calibrated on. For each size ``c``
(30: the run's own share; 60, 120, all 200 others), five seeded draws of ``c`` calibration examples
from the other 200 are corrected with, using the target's rows of them from the target run at the
run's seed (the same warm-up checkpoint and projection: the rows the run's calibration store holds,
to float16). Each draw then goes through the rest of the run as the pipeline does it: the "both"
scores pick the shortlist (45, grown up to 90 as the run grows it), the target's scores of it (its
same-seed run) order it on top, and the calibrated rows against the target's validation gradients
order the rest. Figures: Spearman over ``E`` (the examples a larger pool's calibration would not
touch) against the seed-0 target and against the target at the run's seed; head Spearman and top-5%
overlap over the whole pool against the seed-0 target. The ceiling over ``E``: the target's seeds 1
and 2 against seed 0.

Then the same question in a larger pool (``--pool-1000``, seeds 0, 1, 2): the study's 300 examples and 700
more of the same kinds (200 GSM8K problems, 25 of each BBH task; seeded, none held out and none already
in the pool), featurised by the target and by each seed's proxy at that run's checkpoint and projection
(``iprox features``, written once into the work folder). There, without the rerank (which only orders
the head), Spearman over 300 never-calibrated examples of the calibrated rows' scores against the
target's rows' scores (both against the target's validation gradients), for calibration samples of
each size from the other 700; beside it the same figure in the 300-example pool. A sample of a fixed
size covers a larger pool more thinly, which is what a pool of 100,000 would meet.

``--estimates``: in the pool of 1,000, the run's own estimate of its agreement
(:func:`iprox.calibration.estimate_agreement`) against the agreement measured over the whole pool, per
calibration size (five seeded draws from the whole pool per task and seed).

Before any draw, each run's own calibration is replayed through the same steps and must give the
run's own ranking, and the replay with the target run's rows in place of the calibration store's must
give the same order.

    python benchmarks/diag_calibration_size.py [--work /tmp/iprox-bench-fidelity] [--pool-1000]
    python benchmarks/diag_calibration_size.py --estimates   # needs --pool-1000's stores
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
from common import IPROX, find_data, sh, score_rows, slug, update_benchmarks_md  # noqa: E402
from diag_bulk_order import _scores, finished_runs  # noqa: E402
from diag_common_mode import _rows  # noqa: E402
from diag_shortlist_length import _target_table  # noqa: E402

from iprox.calibration import AGREEMENT_WARNING, correction_from_rows, estimate_agreement, fit_correction  # noqa: E402
from iprox.loading import read_manifest, read_scores  # noqa: E402
from iprox.rerank import DEFAULT_FACTOR, rerank_rounds  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SETTING = "0.14 default, one task per run"
K = 15
SIZES = (30, 60, 120, 200)
DRAWS = 5
GROWTH = 2.0
ESTIMATE_SIZES = (30, 100, 128, 240)
BIG_SIZES = {300: (30, 60, 120, 200), 1000: (30, 60, 100, 120, 240, 700)}  # 100: the default for 1,000 since 0.18


def _order(rows: list[dict]) -> list[str]:
    return [r["id"] for r in sorted(rows, key=lambda r: -r["score"])]


def _over(rows: list[dict], ref: list[dict], task: str, ids: list[str]) -> float:
    """Spearman of ``rows``' ``task`` column (their score where they have one column) with ``ref``'s
    over ``ids``."""
    a = {r["id"]: float(r.get(task, r["score"])) for r in rows}
    b = {r["id"]: float(r[task]) for r in ref}
    return float(spearmanr([a[i] for i in ids], [b[i] for i in ids])[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/iprox-bench-fidelity"))
    ap.add_argument("--pool-1000", action="store_true", help="also the bulk in a pool of 1,000 (featurises 700 more "
                    "examples with the target and each seed's proxy once: about 16 minutes a seed on 2 cores)")
    ap.add_argument("--estimates", action="store_true", help="only the run's own estimate against the measured "
                    "agreement in the pool of 1,000, per calibration size (needs --pool-1000's stores; a few minutes)")
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the results JSON")
    args = ap.parse_args()
    path = RESULTS / "calibration_size.json"
    if args.estimates:
        out = json.loads(path.read_text())
        out["estimates_1000"] = estimates(args.work)
        path.write_text(json.dumps(out, indent=1))
    if args.report or args.estimates:
        body = report(json.loads(path.read_text()))
        update_benchmarks_md("calibration-size", body)
        print(body)
        return
    runs = args.work / "runs"
    seed0 = read_scores(final_scores(runs / "target-s0"))
    out: dict = {"ceiling": {}, "sizes": {}}
    if args.pool_1000:
        out["pool_1000"] = larger_pool(args.work)
    evaluation: list[str] | None = None
    for task, seed, run in finished_runs(runs, SETTING):
        cfg = json.loads((run / "scores" / "stage.json").read_text())["config"]
        train, calib = Path(cfg["train"][1]), Path(cfg["calibration"][1])
        ids, P = _rows(train)
        _, Vp = _rows(Path(cfg["val"][0]))
        _, Vt = _rows(Path(cfg["val"][1]))
        tids, T = _rows(runs / f"target-s{seed}" / "features" / train.name)
        if tids != ids:
            raise SystemExit(f"target-s{seed}'s pool store holds other examples than {run.name}'s")
        same = read_scores(runs / f"target-s{seed}" / "scores")
        if evaluation is None:
            evaluation = sorted(random.Random(0).sample(ids, 100))
        others = [i for i in ids if i not in set(evaluation)]
        both, rest = _scores(run, "both"), _scores(run, "target")
        own = fit_correction(train, calib, cfg.get("calibration_ridge", 0.01))

        def ranking(cids: list[str], corr=None) -> list[dict]:
            if corr is None:
                at = [ids.index(i) for i in cids]
                corr = correction_from_rows(cids, P[at], T[at], own.ridge)
            C = corr.apply(ids, P)
            b, r = (C @ Vp.T).mean(1) + (C @ Vt.T).mean(1), (C @ Vt.T).mean(1)
            both.score, rest.score = scales[0] * b, scales[1] * r
            both.per_subtask[:, 0], rest.per_subtask[:, 0] = both.score, rest.score
            res, _ = rerank_rounds(both, K, DEFAULT_FACTOR * K, GROWTH,
                                   lambda new, _r: _target_table(same, task, new), rest=rest)
            res.per_subtask[:, 0] = res.score
            return score_rows(res)

        # the checks: the run's own calibration replayed gives its ranking, scale for scale
        C = own.apply(ids, P)
        b, r = (C @ Vp.T).mean(1) + (C @ Vt.T).mean(1), (C @ Vt.T).mean(1)
        scales = (float(both.score @ b / (b @ b)), float(rest.score @ r / (r @ r)))
        for name, x, y, s in (("both", both.score, b, scales[0]), ("target", rest.score, r, scales[1])):
            if float((x - s * y).abs().max() / x.abs().max()) > 1e-6:
                raise SystemExit(f"{run.name}: the rows do not reproduce the pipeline's {name} scores")
        if _order(ranking(own.ids, own)) != _order(read_scores(run / "rerank" / "scores")):
            raise SystemExit(f"{run.name}: the replay does not give the run's ranking")
        if _order(ranking(own.ids)) != _order(read_scores(run / "rerank" / "scores")):
            raise SystemExit(f"{run.name}: the target run's rows do not stand in for the calibration store's")
        print(f"{run.name}: replays the run's ranking", flush=True)
        for c in SIZES:
            for draw in range(DRAWS if c < len(others) else 1):
                rows = ranking(random.Random(100 + draw).sample(others, c))
                m = measure(rows, seed0)[task]
                out["sizes"].setdefault(str(c), {}).setdefault(task, []).append({
                    "seed": seed, "draw": draw, "held_out_seed0": _over(rows, seed0, task, evaluation),
                    "held_out_same": _over(rows, same, task, evaluation),
                    "head_seed0": m["head_spearman"], "top5_seed0": m["overlap_5"]})
    for s in (1, 2):
        rows = read_scores(final_scores(runs / f"target-s{s}"))
        for task in TASKS:
            out["ceiling"].setdefault(task, []).append(_over(rows, seed0, task, evaluation))
    out["evaluation"] = evaluation
    if path.exists():  # measured earlier: kept
        before = json.loads(path.read_text())
        for key in ("pool_1000", "estimates_1000"):
            if key not in out and before.get(key):
                out[key] = before[key]
    path.write_text(json.dumps(out, indent=1))
    body = report(out)
    update_benchmarks_md("calibration-size", body)
    print(body)


def _extension(work: Path) -> Path:
    """700 pool examples beside the study's 300, as :func:`common.selection_data` draws its own: none
    of the target tasks' validation or test examples, none already in the pool."""
    from iprox.data import load_examples

    out = work / "extpool" / "ext.jsonl"
    if out.exists():
        return out
    data = find_data()
    by_task: dict[str, list] = {}
    for e in load_examples(str(data / "bbh" / "tasks")):
        by_task.setdefault(e.task, []).append(e)
    rng = random.Random(0)  # selection_data's draw of the held-out examples, replayed
    held = {e.id for t in TASKS for e in rng.sample(by_task[t], 4 + 40)}
    have = {json.loads(line)["id"] for line in (work / "pool.jsonl").read_text().splitlines() if line.strip()}
    rng = random.Random(1)
    ext = rng.sample([e for e in load_examples(str(data / "gsm8k" / "train.jsonl")) if e.id not in have], 200)
    for t in sorted(by_task):
        ext += rng.sample([e for e in by_task[t] if e.id not in held and e.id not in have], 25)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"id": e.id, "source": e.source, "task": e.task, "messages": e.messages}) + "\n"
                           for e in ext))
    return out


def _bulk(P: torch.Tensor, T: torch.Tensor, Vt: torch.Tensor, ids: list[str], evaluation: list[str],
          sizes: tuple[int, ...], ridge: float) -> dict[str, list[float]]:
    """Per calibration size, the Spearman over ``evaluation`` of the calibrated proxy rows' scores
    with the target rows' (both against ``Vt``), one per seeded draw from the other examples."""
    pos = {i: k for k, i in enumerate(ids)}
    ev = [pos[i] for i in evaluation]
    others = [i for i in ids if i not in set(evaluation)]
    t = (T @ Vt.T).mean(1)[ev]
    res: dict[str, list[float]] = {}
    for c in sizes:
        for draw in range(DRAWS if c < len(others) else 1):
            cids = random.Random(100 + draw).sample(others, c)
            at = [pos[i] for i in cids]
            C = correction_from_rows(cids, P[at], T[at], ridge).apply(ids, P)
            res.setdefault(str(c), []).append(float(spearmanr((C @ Vt.T).mean(1)[ev], t)[0]))
    return res


def _pool_1000(work: Path, seed: int):
    """The study's 300 pool examples and the 700 of the extension at ``seed``: (ids of the 300, the
    proxy's and the target's unit rows of them, ids of all 1,000, the proxy's and the target's rows of
    those). Featurises the extension once (the target and the seed's proxy at the run's checkpoint and
    projection) and checks that its stores are featurised as the run's pool store is."""
    runs = work / "runs"
    ext = _extension(work)
    first = runs / f"{slug(SETTING)}-{TASKS[0]}-s{seed}"
    stores = {"target": work / "extpool" / f"target-train-s{seed}", "proxy": work / "extpool" / f"proxy-train-s{seed}"}
    for who, store in stores.items():
        if not (store / "COMPLETE").exists():
            model = work / "target" if who == "target" else first / "proxy"
            sh(IPROX + ["features", "--data", str(ext), "--model", str(model), "--checkpoint",
                        str(first / "warmup" / "checkpoint-1"), "--grad", "adam", "--seed", str(seed),
                        "--proj-dim", "64", "--max-length", "320", "--batch-size", "8", "--out", str(store),
                        "--no-progress"], work / "log.txt")
    train = first / "features" / "train-1"
    want = read_manifest(train)
    for store in stores.values():
        got = read_manifest(store)
        if (got["checkpoint"], got["seed"], got["proj_dim"], got["dim"]) != (want["checkpoint"], want["seed"],
                                                                             want["proj_dim"], want["dim"]):
            raise SystemExit(f"{store} is not featurised as {train} is (checkpoint, seed, projection)")
    ids, P = _rows(train)
    tids, T = _rows(runs / f"target-s{seed}" / "features" / "train-1")
    eids, EP = _rows(stores["proxy"])
    etids, ET = _rows(stores["target"])
    if tids != ids or etids != eids:
        raise SystemExit(f"the proxy's and the target's stores at seed {seed} hold other examples")
    return ids, P, T, ids + eids, torch.cat([P, EP]), torch.cat([T, ET])


def _validation(work: Path, task: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The run's proxy and target validation rows (unit) and its calibration ridge."""
    cfg = json.loads((work / "runs" / f"{slug(SETTING)}-{task}-s{seed}" / "scores" / "stage.json").read_text())["config"]
    return _rows(Path(cfg["val"][0]))[1], _rows(Path(cfg["val"][1]))[1], cfg.get("calibration_ridge", 0.01)


def larger_pool(work: Path) -> dict:
    """The bulk's agreement by calibration size in the study's pool and in a pool of 1,000, per seed
    (each seed's proxy and target at its checkpoint and projection)."""
    out: dict = {}
    for seed in (0, 1, 2):
        ids, P, T, big_ids, BP, BT = _pool_1000(work, seed)
        small_eval = sorted(random.Random(0).sample(ids, 100))
        big_eval = sorted(random.Random(0).sample(big_ids, 300))
        for task in TASKS:
            _, Vt, ridge = _validation(work, task, seed)
            out.setdefault(task, {}).setdefault("300", {})[str(seed)] = _bulk(P, T, Vt, ids, small_eval, BIG_SIZES[300], ridge)
            out[task].setdefault("1000", {})[str(seed)] = _bulk(BP, BT, Vt, big_ids, big_eval, BIG_SIZES[1000], ridge)
        print(f"pool of 1,000, seed {seed}: done", flush=True)
    return out


def estimates(work: Path) -> dict:
    """The run's own estimate of its agreement (:func:`iprox.calibration.estimate_agreement`, as
    ``scores.json`` reports it) against the agreement measured, per calibration size, in the pool of
    1,000: per task, seed and draw, the estimate over the calibration examples and the whole-pool
    Spearman of the calibrated "both" scores (the proxy's and the target's validation gradients)
    with the target's own scores, as the estimate's reference is."""
    out: dict = {}
    for seed in (0, 1, 2):
        _, _, _, ids, P, T = _pool_1000(work, seed)
        for task in TASKS:
            Vp, Vt, ridge = _validation(work, task, seed)
            up, ut = Vp.mean(0, keepdim=True).T, Vt.mean(0, keepdim=True).T  # (dim, 1)
            ref = (T @ ut)[:, 0]
            for c in ESTIMATE_SIZES:
                for draw in range(DRAWS):
                    cids = random.Random(200 + draw).sample(ids, c)
                    at = [ids.index(i) for i in cids]
                    corr = correction_from_rows(cids, P[at], T[at], ridge)
                    est = estimate_agreement([(corr, up, 1.0, False), (corr, ut, 1.0, True)], [task])
                    got = (corr.apply(ids, P) @ (up + ut))[:, 0]
                    out.setdefault(str(c), []).append({"task": task, "seed": seed, "draw": draw,
                                                       "estimate": est["spearman"][task],
                                                       "measured": float(spearmanr(got, ref)[0])})
        print(f"estimates, seed {seed}: done", flush=True)
    return out


def report(out: dict) -> str:
    mean = statistics.fmean
    keys = (("held_out_seed0", "held-out Spearman, seed 0"), ("held_out_same", "held-out Spearman, same seed"),
            ("head_seed0", "head, seed 0"), ("top5_seed0", "top 5%, seed 0"))
    lines = ["## Calibration size at today's defaults: what more examples buy the bulk (issue 12)", "",
             "`benchmarks/diag_calibration_size.py`: the fidelity study's runs of 0.14's defaults (sparsity 0.5, one task "
             "per run, seeds 0, 1, 2), replayed with calibration samples of each size drawn from 200 pool examples; "
             "100 others (seeded) are never calibrated on. Per task (boolean_expressions / hyperbaton / "
             "formal_fallacies), the mean over seeds and draws of: Spearman over the 100 held-out examples against "
             "the seed-0 target and against the target at the run's seed; head Spearman (the seed-0 target's top "
             "20%) and top-5% overlap over the whole pool. Target passes of the calibration: the size (a pool of "
             "100,000 pays 0.03-0.2% of its pool pass for 30-200).", "",
             "| calibration examples | " + " | ".join(label for _, label in keys) + " |", "|---|" + "---|" * len(keys)]
    for c, by_task in out["sizes"].items():
        cells = [" / ".join(f"{mean(e[k] for e in by_task[t]):.2f}" for t in TASKS) for k, _ in keys]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    ceil = [mean(out["ceiling"][t]) for t in TASKS]
    lines += ["", "The target's own seeds 1 and 2 against seed 0 over the same 100 examples: " +
              " / ".join(f"{x:.2f}" for x in ceil) + " (95%: " + " / ".join(f"{0.95 * x:.2f}" for x in ceil) + ")."]
    big = out.get("pool_1000")
    if big:
        seeds = sorted({s for t in TASKS for s in big[t]["1000"]})
        lines += ["", f"The bulk without the rerank, seeds {', '.join(seeds)}: Spearman over never-calibrated examples (100 of the study's "
                  "300; 300 of the pool of 1,000) of the calibrated proxy rows' scores with the target rows' scores, "
                  "against the target at the run's seed, per calibration size (mean over seeds and five draws; per task boolean_expressions / hyperbaton / "
                  "formal_fallacies).", "",
                  "| calibration examples | pool of 300 | pool of 1,000 |", "|---|---|---|"]
        sizes = sorted({int(c) for t in TASKS for n in ("300", "1000") for v in big[t][n].values() for c in v})
        for c in sizes:
            cells = []
            for n in ("300", "1000"):
                # the mean over seeds and draws
                have = [[x for v in big[t][n].values() for x in v.get(str(c), [])] for t in TASKS]
                cells.append(" / ".join(f"{mean(v):.2f}" for v in have) if all(have) else "–")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    est = out.get("estimates_1000")
    if est:
        lines += ["", "The run's own estimate of its agreement (`scores.json`'s `calibration`: each calibration example "
                  "scored from the correction fitted on the others, ranked against the target's own score of it) "
                  "against the agreement measured over the whole pool of 1,000 (the calibrated scores of the "
                  "proxy's and the target's validation gradients against the target's scores), per calibration "
                  "size: 3 tasks × 3 seeds × 5 draws each. Error: estimate minus measured. Warning: the run "
                  f"warns below {AGREEMENT_WARNING}.", "",
                  "| calibration examples | mean error | mean absolute error | largest absolute error | "
                  "rank correlation | measured (mean, range) | warned / measured below |", "|---|---|---|---|---|---|---|"]
        for c, cases in est.items():
            e = [x["estimate"] - x["measured"] for x in cases]
            m = [x["measured"] for x in cases]
            rho = float(spearmanr([x["estimate"] for x in cases], m)[0])
            warned = sum(x["estimate"] < AGREEMENT_WARNING for x in cases)
            below = sum(x["measured"] < AGREEMENT_WARNING for x in cases)
            lines.append(f"| {c} | {mean(e):+.3f} | {mean(abs(x) for x in e):.3f} | {max(abs(x) for x in e):.3f} | "
                         f"{rho:.2f} | {mean(m):.2f} ({min(m):.2f}-{max(m):.2f}) | {warned} / {below} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
