"""Does the rerank's shortlist, featurised by the target anyway, improve the calibration of the rest?

The rerank stage has the target featurise the proxy's shortlist (3 times the selection); the
calibration (:mod:`iprox.calibration`) fits its correction of the proxy's pool features from the
target's rows of a random sample of the pool. Both are pairs of proxy and target rows of pool
examples, at the same checkpoint and projection. Fitting the correction on the two together costs
no further target pass; what it could buy is the order below the shortlist (whole-pool and head
Spearman), which the rerank leaves to the proxy.

Measured from the stores of the fidelity study's "0.12 default, one task per run" runs on disk,
nothing rebuilt: each run is rescored (scored "both" as the pipeline does) with the correction
fitted on (a) the calibration sample alone, which must reproduce the run's own scores, and (b) the
calibration sample with the shortlist, for a few ridges; then the run's own rerank places the
target's scores of the shortlist. Figures against the target's run (seed 0) and the target's exact
gradients (warm-up seed 0), as bench_fidelity.py reports them.

    python benchmarks/diag_shortlist_calibration.py [--work /tmp/iprox-bench-fidelity]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import TASKS, final_scores, measure  # noqa: E402
from common import figure_table, slug, update_benchmarks_md  # noqa: E402

import iprox.scores as scores_mod  # noqa: E402
from iprox.calibration import correction_from_rows, fit_correction  # noqa: E402
from iprox.loading import read_scores  # noqa: E402
from iprox.rerank import combine  # noqa: E402
from iprox.scores import ScoreConfig, compute_scores, read_score_result, write_scores_folder  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SETTING = "0.12 default, one task per run"
RIDGES = (0.01, 0.03, 0.1)
K = 15  # the study's 5% of 300


def _merged_fit(extra: str):
    """A ``fit_correction`` that also fits on the target's rows of store ``extra`` (the shortlist)."""
    def fit(train, calib, ridge, chunk_rows=4096):
        a, b = fit_correction(train, calib, ridge, chunk_rows), fit_correction(train, extra, ridge, chunk_rows)
        seen = set(a.ids)
        keep = [r for r, i in enumerate(b.ids) if i not in seen]
        return correction_from_rows(a.ids + [b.ids[r] for r in keep], torch.cat([a.P, b.P[keep]]),
                                    torch.cat([a.T, b.T[keep]]), ridge)
    return fit


def rescore(run: Path, extra: str | None, ridge: float, tmp: Path) -> list[dict]:
    """The run's final table, its proxy scores recomputed with the correction fitted as asked."""
    assert len(read_score_result(run / "scores").subtasks) == 1, "one task per run"
    stage = json.loads((run / "scores" / "stage.json").read_text())["config"]
    cfg = ScoreConfig(**{k: v for k, v in stage.items() if k in ScoreConfig.__dataclass_fields__ and k != "out"},
                      out=str(tmp / "unused"))
    cfg.calibration_ridge = ridge
    original = scores_mod.fit_correction
    if extra:
        scores_mod.fit_correction = _merged_fit(extra)
    try:
        proxy = compute_scores(cfg)
    finally:
        scores_mod.fit_correction = original
    target = read_score_result(run / "rerank" / "target-scores")
    res, rep = combine(proxy, target, K)
    # one subtask: its column is the aggregate, placed with the whole shortlist on top (a subtask's
    # column takes only the prefix of its new order that lies in the shortlist, which a correction
    # fitted on the shortlist can cut short: that would measure the placement, not the correction)
    res.per_subtask[:, 0] = res.score
    out = tmp / slug(f"{run.name}-{extra is not None}-{ridge}")
    out.mkdir(parents=True, exist_ok=True)
    write_scores_folder(out, res, {"rerank": rep})
    return read_scores(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/iprox-bench-fidelity"))
    args = ap.parse_args()
    fid = json.loads((RESULTS / "fidelity.json").read_text())
    refs = {"target": read_scores(final_scores(args.work / "runs" / "target-s0")),
            "exact": read_scores(Path(fid["exact_gradients"]))}
    rows, out = [], {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for task in TASKS:
            for seed in (0, 1, 2):
                run = args.work / "runs" / f"{slug(SETTING)}-{task}-s{seed}"
                if not (run / "rerank" / "target-scores" / "COMPLETE").exists():
                    print(f"skipping {run}: no rerank on disk")
                    continue
                own = read_scores(final_scores(run))
                again = rescore(run, None, 0.01, tmp)
                diff = max(abs(a["score"] - b["score"]) / max(abs(a["score"]), 1e-30) for a, b in zip(own, again))
                print(f"{run.name}: rescored as the run did, largest relative difference {diff:.1e}", flush=True)
                variants = {"run": own}
                for ridge in RIDGES:
                    variants[f"calibration + shortlist, ridge {ridge}"] = rescore(
                        run, str(run / "rerank" / "target-1"), ridge, tmp)
                for name, table in variants.items():
                    for ref, ref_rows in refs.items():
                        m = measure(table, ref_rows)[task]
                        out.setdefault(name, {}).setdefault(ref, {}).setdefault(task, []).append(m)
                        rows.append({"run": run.name, "variant": name, "ref": ref, "task": task, "seed": seed, **m})
                        print(f"  {name:38s} vs {ref:6s}: {m['spearman']:.2f} / {m['head_spearman']:.2f} / "
                              f"{m['overlap_5']:.2f}", flush=True)
    (RESULTS / "shortlist_calibration.json").write_text(json.dumps(rows, indent=1))
    lines = ["## Calibrating on the rerank's shortlist too (issue 12)", "", "`benchmarks/diag_shortlist_calibration.py`: the fidelity study's runs of 0.12's defaults (one task per "
             "run, seeds 0, 1, 2), rescored with the calibration's correction fitted on the calibration sample together "
             "with the rerank's shortlist (the target's rows of both, no further target pass), then reranked as the run "
             "did. Mean over seeds of whole-pool Spearman / head Spearman / top-5% overlap.", ""]
    lines += figure_table("correction fitted on", TASKS, out,
                          label=lambda n: "calibration sample (the run)" if n == "run" else n,
                          ref_label=lambda r: "target run (seed 0)" if r == "target" else "exact gradients")
    update_benchmarks_md("shortlist-calibration", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
