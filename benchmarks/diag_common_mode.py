"""How alike the pool's gradient features are, in the proxy and in the target, and whether matching
the proxy's common direction to the target's moves the ranking.

Every pool example's feature row (Adam-preconditioned, projected) shares one dominant direction with
the others: the pool's mean row. How much of each row lies along it decides how alike the rows are
(their mean pairwise cosine), and so how much of a cosine score is common to every example and how
much tells examples apart. If a compressed network keeps the shared part of the gradients and loses
example-specific detail, its rows are more alike than the target's; a score then shifts whole blocks
of the pool (examples of one format) together, which is how the proxy misplaces the pool's GSM8K
block on hyperbaton (BENCHMARKS.md, "Where the proxy places each pool source").

Measured from the fidelity study's runs on disk (calibrated, reranked; one task per run), nothing
rebuilt:

* mean pairwise cosine of the pool rows within BBH and within GSM8K: the proxy's as stored, after
  the run's calibration, and the target's at the run's seed (same warm-up checkpoint and projection);
* an "equalised" ranking: each proxy row's component along the pool's mean row ``m`` (its own,
  from the pool, no labels) scaled by ``κ`` so that its cosine with ``m`` matches the target's with
  its mean row: ``x' = normalise(x + (κ − 1)(x·m) m)``, ``κ`` the median over the calibration
  examples of the per-example ratio that matches them (the target's rows of those are on disk in every
  calibrated run). The correction is then fitted on the equalised rows, and the rows below the run's
  shortlist are ordered by them against the target's validation gradients; the shortlist stays on
  top in the target's order, as the run has it.

Before any variant is measured, each run's own rest order (calibrated rows against the target's
validation gradients, ``rest_order = "target"``) is recomputed here from the rows and checked against
the pipeline's scoring of the same stores.

    python benchmarks/diag_common_mode.py [--work /tmp/iprox-bench-fidelity]
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

from bench_fidelity import TASKS, final_scores, measure  # noqa: E402
from common import FIGURES, score_rows, update_benchmarks_md  # noqa: E402
from diag_bulk_order import _scores, finished_runs  # noqa: E402

from iprox.calibration import _unit, correction_from_rows, fit_correction  # noqa: E402
from iprox.loading import iter_feature_rows, read_manifest, read_scores  # noqa: E402
from iprox.rerank import combine, concat  # noqa: E402
from iprox.scores import read_score_result  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SETTINGS = ["0.14 default, one task per run", "0.15 default, sparsity 0.7", "0.15 default, svd 0.5",
            "0.15 default, svd 0.7", "0.17 default, layer-drop 0.3", "0.17 default, layer-drop 0.5",
            "0.17 default, layer-drop 0.7"]
K = 15


def _rows(store: Path) -> tuple[list[str], torch.Tensor]:
    ids, parts = [], []
    for _, i, x in iter_feature_rows(store, 4096, torch.float64):
        ids += i
        parts.append(x)
    return ids, _unit(torch.cat(parts))


def _pairwise(X: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of unit rows."""
    K_ = X @ X.T
    n = len(X)
    return float((K_.sum() - K_.trace()) / (n * n - n))


def _kappa(P: torch.Tensor, T: torch.Tensor, m: torch.Tensor) -> float:
    """The scale of the proxy's rows ``P`` along ``m`` that gives each the cosine the target's row
    ``T`` has with the target's mean row, solved per example; the median."""
    mt = _unit(T.mean(0, keepdim=True))[0]
    a, at = (P @ m).clamp(-0.999, 0.999), (T @ mt).clamp(-0.999, 0.999)
    return float((at * (1 - a ** 2).sqrt() / (a * (1 - at ** 2).sqrt())).median())


def _equalise(X: torch.Tensor, m: torch.Tensor, kappa: float) -> torch.Tensor:
    return _unit(X + (kappa - 1) * (X @ m)[:, None] * m[None, :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/iprox-bench-fidelity"))
    args = ap.parse_args()
    runs = args.work / "runs"
    seed0 = read_scores(final_scores(runs / "target-s0"))
    targets: dict[int, torch.Tensor] = {}
    likeness: dict[str, list[dict]] = {}
    out: dict = {}
    for setting in SETTINGS:
        for task, seed, run in finished_runs(runs, setting):
            cfg = json.loads((run / "scores" / "stage.json").read_text())["config"]
            if len(cfg["train"]) != 2 or not cfg.get("calibration"):
                raise SystemExit(f"{run.name}: expected one checkpoint scored against both validation models, calibrated")
            train, val, calib = Path(cfg["train"][1]), Path(cfg["val"][1]), Path(cfg["calibration"][1])
            ids, P = _rows(train)
            sources = read_manifest(train)["sources"]
            gsm = torch.tensor([s == "gsm8k" for s in sources])
            _, V = _rows(val)
            if seed not in targets:
                tids, targets[seed] = _rows(runs / f"target-s{seed}" / "features" / train.name)
                if tids != ids:
                    raise SystemExit(f"target-s{seed}'s pool store holds other examples than {run.name}'s")
            T = targets[seed]
            ridge = cfg.get("calibration_ridge", 0.01)
            corr = fit_correction(train, calib, ridge)
            C = corr.apply(ids, P)
            # the check: the run's rest order recomputed from the rows is the pipeline's
            mine = (C @ V.T).mean(1)
            rest = _scores(run, "target")
            scale = float(rest.score @ mine / (mine @ mine))  # the checkpoint's learning-rate weight
            diff = float((rest.score - scale * mine).abs().max() / rest.score.abs().max())
            print(f"{run.name}: rest order from the rows against the pipeline's, largest relative difference "
                  f"{diff:.1e}", flush=True)
            if diff > 1e-6:
                raise SystemExit("the rows do not reproduce the pipeline's scores")
            at = [ids.index(i) for i in corr.ids]
            m = _unit(P.mean(0, keepdim=True))[0]
            kappa = _kappa(P[at], corr.T, m)
            E = _equalise(P, m, kappa)
            CE = correction_from_rows(corr.ids, E[at], corr.T, ridge).apply(ids, E)
            likeness.setdefault(setting, []).append({
                "task": task, "seed": seed, "kappa": kappa,
                **{f"{name}_{part}": _pairwise(X[sel]) for name, X in (("proxy", P), ("calibrated", C),
                                                                         ("equalised", CE), ("target", T))
                   for part, sel in (("bbh", ~gsm), ("gsm8k", gsm))}})
            proxy = _scores(run, "both")
            proxy.per_subtask[:, 0] = proxy.score
            rounds = sorted(run.glob("rerank/target-scores*"), key=lambda p: (len(p.name), p.name))
            target = concat([read_score_result(p) for p in rounds])
            own = read_scores(run / "rerank" / "scores")
            refs = {"seed 0": seed0, "same seed": read_scores(runs / f"target-s{seed}" / "scores")}
            for variant, below in (("run", C), ("equalised", CE)):
                rest.score = scale * (below @ V.T).mean(1)
                rest.per_subtask[:, 0] = rest.score
                res, _ = combine(proxy, target, K, rest=rest)
                res.per_subtask[:, 0] = res.score
                rows = score_rows(res)
                if variant == "run":
                    same = [a["id"] for a in sorted(rows, key=lambda x: -x["score"])] == \
                           [b["id"] for b in sorted(own, key=lambda x: -x["score"])]
                    if not same:
                        raise SystemExit(f"{run.name}: the recomputed ranking is not the run's")
                for name, ref in refs.items():
                    f = measure(rows, ref)[task]
                    out.setdefault(setting, {}).setdefault(variant, {}).setdefault(name, {}).setdefault(
                        task, []).append({"seed": seed, **{k: f[k] for k in FIGURES}})
    (RESULTS / "common_mode.json").write_text(json.dumps({"likeness": likeness, "figures": out}, indent=1))
    body = report(likeness, out)
    update_benchmarks_md("common-mode", body)
    print(body)


def report(likeness: dict, out: dict) -> str:
    mean = statistics.fmean
    lines = ["## How alike the pool's gradient rows are: the proxy's common direction (issue 12)", "",
             "`benchmarks/diag_common_mode.py`: the fidelity study's runs on disk (one task per run; the seeds "
             "listed), nothing rebuilt. Mean pairwise cosine of the pool's feature rows within BBH (200) and within "
             "GSM8K (100): the proxy's as stored / after the run's calibration / equalised and calibrated / the "
             "target's at the run's seed (the same warm-up checkpoint and projection). κ: the scale of the proxy's "
             "rows along the pool's mean row that matches the target's (below 1: the proxy's rows are too alike).", "",
             "| setting | runs | BBH: proxy / calibrated / equalised / target | GSM8K: proxy / calibrated / equalised / target | κ |",
             "|---|---|---|---|---|"]
    for setting, recs in likeness.items():
        cells = [" / ".join(f"{mean(x[f'{n}_{part}'] for x in recs):.3f}"
                            for n in ("proxy", "calibrated", "equalised", "target")) for part in ("bbh", "gsm8k")]
        seeds = sorted({x["seed"] for x in recs})
        lines.append(f"| {setting} | {len(recs)} (seeds {', '.join(map(str, seeds))}) | {cells[0]} | {cells[1]} | "
                     f"{mean(x['kappa'] for x in recs):.2f} ({min(x['kappa'] for x in recs):.2f}-"
                     f"{max(x['kappa'] for x in recs):.2f}) |")
    lines += ["", "The run's ranking (its shortlist on top in the target's order, the rest by its calibrated rows "
              "against the target's validation gradients) and the same with the rest ordered by the equalised rows. "
              "Mean over seeds of whole-pool Spearman / head Spearman / top-5% overlap; the change of whole-pool "
              "Spearman per seed in brackets.", "",
              "| setting | ranking | reference | " + " | ".join(TASKS) + " |", "|---|---|---|" + "---|" * len(TASKS)]
    for setting, by_variant in out.items():
        for variant, by_ref in by_variant.items():
            for ref, by_task in by_ref.items():
                cells = []
                for t in TASKS:
                    v = by_task.get(t, [])
                    if not v:
                        cells.append("–")
                        continue
                    cell = " / ".join(f"{mean(e[k] for e in v):.2f}" for k in FIGURES)
                    if variant == "equalised":
                        base = {e["seed"]: e["spearman"] for e in by_variant["run"][ref][t]}
                        cell += " (" + ", ".join(f"{e['spearman'] - base[e['seed']]:+.2f}" for e in v) + ")"
                    cells.append(cell)
                lines.append(f"| {setting} | {variant} | {ref} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
