"""Below the rerank's shortlist, which of the proxy's scores orders the rest of the pool best?

The rerank puts the target's order of the shortlist on top; the rest of the pool keeps the proxy's
order, which is what whole-pool Spearman mostly measures (hyperbaton's is the one that misses the
bar). The run scores the pool "both": its calibrated pool features against the proxy's and the
target's validation gradients, added. Earlier sessions found the target's validation gradients alone
rank the whole pool better and its head worse (BENCHMARKS.md, "validation model"). With the rerank
owning the head, the rest could be ordered by that score instead.

Measured from the fidelity study's "0.14 default, one task per run" runs on disk, nothing rebuilt:
each run's reranked table with the rows below its (grown) shortlist ordered by (a) the run's
"both" scores, (b) the calibrated pool features against the target's validation gradients alone,
(c) against the proxy's alone. The variant the run itself took ([rerank] rest_order: "run" is (a),
"target", the default since it was measured here, is (b)) must reproduce its table. Figures against the seed-0
target, the target at the run's own seed, and the target's exact gradients.

    python benchmarks/diag_bulk_order.py [--work /tmp/iprox-bench-fidelity]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import TASKS, final_scores, measure  # noqa: E402
from common import figure_table, score_rows, slug, update_benchmarks_md  # noqa: E402

from iprox.loading import read_scores  # noqa: E402
from iprox.rerank import combine, concat  # noqa: E402
from iprox.scores import ScoreConfig, ScoreResult, compute_scores, read_score_result  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SETTING = "0.14 default, one task per run"
K = 15


def _scores(run: Path, pairs: str) -> ScoreResult:
    """The run's pool scores recomputed with the validation stores ``pairs`` asks for."""
    cfg = json.loads((run / "scores" / "stage.json").read_text())["config"]
    keep = {"both": (0, 1), "target": (1,), "proxy": (0,)}[pairs]
    sc = ScoreConfig(**{k: v for k, v in cfg.items() if k in ScoreConfig.__dataclass_fields__ and k != "out"},
                     out="unused")
    sc.train, sc.val = [sc.train[i] for i in keep], [sc.val[i] for i in keep]
    sc.calibration = [sc.calibration[i] for i in keep] if sc.calibration else []
    return compute_scores(sc)


def finished_runs(runs: Path, setting: str):
    """(task, seed, run folder) of each of ``setting``'s one-task runs whose rerank finished, in
    task then seed order (a run not on disk is reported and skipped)."""
    for task in TASKS:
        for seed in (0, 1, 2):
            run = runs / f"{slug(setting)}-{task}-s{seed}"
            if not (run / "rerank" / "scores" / "COMPLETE").exists():
                print(f"skipping {run.name}: not on disk")
                continue
            yield task, seed, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/iprox-bench-fidelity"))
    args = ap.parse_args()
    runs = args.work / "runs"
    fid = json.loads((RESULTS / "fidelity.json").read_text())
    seed0, exact = read_scores(final_scores(runs / "target-s0")), read_scores(Path(fid["exact_gradients"]))
    out: dict = {}
    for task, seed, run in finished_runs(runs, SETTING):
        rounds = sorted(run.glob("rerank/target-scores*"), key=lambda p: (len(p.name), p.name))
        target = concat([read_score_result(p) for p in rounds])
        own = read_scores(run / "rerank" / "scores")
        # the variant the run itself took (0.14 before rest_order: the run's own "both" scores)
        took = {"run": "both", "target": "target"}[
            json.loads((run / "rerank" / "scores" / "scores.json").read_text())["rerank"].get("rest_order", "run")]
        refs = {"seed 0": seed0, "same seed": read_scores(runs / f"target-s{seed}" / "scores"), "exact": exact}
        for pairs in ("both", "target", "proxy"):
            proxy = _scores(run, pairs)
            proxy.per_subtask[:, 0] = proxy.score  # one subtask: the column is the aggregate
            res, _ = combine(proxy, target, K)
            res.per_subtask[:, 0] = res.score
            rows = score_rows(res)
            if pairs == took:  # the check: the run's own table
                diff = max(abs(a["score"] - b["score"]) / max(abs(b["score"]), 1e-30) for a, b in zip(rows, own))
                print(f"{run.name}: rescored as the run did, largest relative difference {diff:.1e}", flush=True)
                if diff > 1e-6:
                    raise SystemExit("the rescoring does not reproduce the run's table")
            for name, ref in refs.items():
                m = measure(rows, ref)[task]
                out.setdefault(pairs, {}).setdefault(name, {}).setdefault(task, []).append(
                    {"seed": seed, **{k: m[k] for k in ("spearman", "head_spearman", "overlap_5")}})
    (RESULTS / "bulk_order.json").write_text(json.dumps(out, indent=1))
    labels = {"both": "both models' validation gradients (rest_order \"run\")",
              "target": "target validation gradients alone (rest_order \"target\", the default)",
              "proxy": "proxy validation gradients alone"}
    lines = ["## Below the shortlist: which score orders the rest of the pool (issue 12)", "",
             "`benchmarks/diag_bulk_order.py`: the fidelity study's runs of 0.14's defaults (one task per run, seeds 0, "
             "1, 2), the rows below each run's (grown) shortlist ordered by the calibrated pool features against each "
             "validation model's gradients; the shortlist on top in the target's order, as the run has it. Mean over "
             "seeds of whole-pool Spearman / head Spearman / top-5% overlap.", ""]
    lines += figure_table("rest of the pool ordered by", TASKS, out, label=labels.get)
    update_benchmarks_md("bulk-order", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
