"""Calibration (``[features] calibrate``): how much of the target's agreement a few target-featurised
pool examples buy back, by calibration size and ridge.

Two parts, against the target's exact gradients (seed-0 warm-up; ``diag_projection.py``'s
``target, warm-up 0, exact``), per task (boolean_expressions / hyperbaton / formal_fallacies):

1. **The pipeline's runs.** The fidelity study's ``0.8, calibrate 32`` runs (``bench_fidelity.py
   --settings "0.8, calibrate 32"``: the 0.7 default's proxy, 32 seeded calibration examples, ridge
   0.01), beside the same proxy, checkpoint and projection uncalibrated (``diag_projection.py``'s
   ``IProX, seed <s>``, store format 3).
2. **A sweep from the stores on disk.** The uncalibrated ``IProX, seed <s>`` stores corrected with
   :func:`iprox.calibration.correction_from_rows`, the target's rows of each calibration subset read
   from the target's own pool store at the same checkpoint and projection (``target, warm-up <s>,
   projection <s>``; the script checks those rows against a calibration store the pipeline wrote),
   subsets drawn by :func:`iprox.calibration.calibration_subset` with seeds 0-4. Figures over all 300
   examples (as a run scores them: a calibration example's row is the target's) and over the others.
3. **Other sparsities and plain SVD**, seed 0, from the study's own stores (store format 2, read
   directly): IProX and plain SVD at sparsity 0.3 and 0.7, scored "both" (the pool store with the
   proxy's and, from the study's ``..., val both`` run, the target's validation store), uncalibrated
   and corrected with 32 examples (5 subsets), the target's rows from the study's ``target`` run
   (the same seed-0 warm-up: its adapters and Adam state checked equal tensor for tensor; the same
   projection seed).

    python benchmarks/diag_calibration.py            # measure, then rewrite the section
    python benchmarks/diag_calibration.py --report   # only rewrite the section
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import TASKS, measure  # noqa: E402
from common import slug, update_benchmarks_md  # noqa: E402

from diag_layer_agreement import read_store  # noqa: E402

from iprox.calibration import calibration_subset, correction_from_rows  # noqa: E402
from iprox.loading import load_features, read_manifest, read_scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SIZES = (8, 16, 32, 64)
RIDGES = (0.001, 0.01, 0.1)
SUBSETS = range(5)
SEEDS = (0, 1, 2)
SETTING = "0.8, calibrate 32"
# part 3: label -> the study's setting (its "..., val both" run holds the target's validation store)
OTHER = {"IProX 0.3": "0.6 default, sparsity 0.3", "IProX 0.7": "0.6 default, sparsity 0.7",
         "plain SVD 0.3": "target-first svd 0.3, per-example align",
         "plain SVD 0.7": "target-first svd 0.7, per-example align"}


def unit(X: torch.Tensor) -> torch.Tensor:
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-30)


def rows_of(ids, sources, tasks, S: dict[str, torch.Tensor], keep=None) -> list[dict]:
    """A score table as ``read_scores`` gives it (per-task columns; the max as ``score``)."""
    keep = range(len(ids)) if keep is None else keep
    return [{"id": ids[i], "source": sources[i], "task": tasks[i], "score": max(float(S[t][i]) for t in TASKS),
             **{t: float(S[t][i]) for t in TASKS}} for i in keep]


def task_scores(X: torch.Tensor, vals: list[tuple[torch.Tensor, list[str]]]) -> dict[str, torch.Tensor]:
    """Each task's score: the sum over validation stores of the mean cosine with its examples."""
    return {t: sum(X @ unit(V)[[i for i, x in enumerate(vt) if x == t]].mean(0) for V, vt in vals) for t in TASKS}


def sweep(work: Path, exact: list[dict]) -> dict:
    base = work / "projection" / "format-3"
    out: dict = {}
    checked = False
    for s in SEEDS:
        proxy, target = base / slug(f"IProX, seed {s}"), base / slug(f"target, warm-up {s}, projection {s}")
        pm, tm = read_manifest(proxy / "train"), read_manifest(target / "train")
        if pm["checkpoint"] != tm["checkpoint"] or pm["seed"] != tm["seed"]:
            raise SystemExit(f"{proxy} and {target} are not at the same checkpoint and projection")
        ids, Xp = load_features(proxy / "train", torch.float64)
        tids, Xt = load_features(target / "train", torch.float64)
        assert ids == tids
        vals = [(load_features(proxy / v, torch.float64)[1], read_manifest(proxy / v)["tasks"]) for v in ("val", "val-target")]
        run = work / "runs" / f"{slug(SETTING)}-s{s}"
        written = run / "features" / "calib-target-1"
        if (written / "COMPLETE").exists():  # the rows used here are the ones the pipeline writes
            cids, C = load_features(written, torch.float64)
            at = [ids.index(i) for i in cids]
            rel = float(((Xt[at] - C).norm(dim=1) / C.norm(dim=1)).max())
            if rel > 1e-3:
                raise SystemExit(f"the target's pool rows differ from {written} (relative {rel:.2g})")
            out.setdefault("rows_check", {})[str(s)] = rel
            checked = True
        pool_file = work / "runs" / f"{slug('0.6 default, val both')}-s{s}" / "pool" / "pool.jsonl"
        X = unit(Xp)
        plain = task_scores(X, vals)
        out.setdefault("uncalibrated", {})[str(s)] = measure(rows_of(ids, pm["sources"], pm["tasks"], plain), exact)
        for c in SIZES:
            for lam in RIDGES:
                key = f"{c} / {lam:g}"
                for k in SUBSETS:
                    sub = subset_ids(pool_file, c, k)
                    at = [ids.index(i) for i in sub]
                    Y = correction_from_rows(sub, Xp[at], Xt[at], lam).apply(ids, X)
                    S = task_scores(Y, vals)
                    rest = [i for i in range(len(ids)) if i not in set(at)]
                    rec = out.setdefault(key, {}).setdefault(str(s), {"all": [], "others": []})
                    rec["all"].append(measure(rows_of(ids, pm["sources"], pm["tasks"], S), exact))
                    rec["others"].append(measure(rows_of(ids, pm["sources"], pm["tasks"], S, rest),
                                                 [r for r in exact if r["id"] not in set(sub)]))
        print(f"seed {s} swept", flush=True)
    if not checked:
        print("warning: no calibration store of the pipeline to check the rows against", flush=True)
    return out


def subset_ids(pool_file: Path, c: int, k: int) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        f = calibration_subset(pool_file, c, k, Path(tmp) / "c.jsonl")
        return [json.loads(x)["id"] for x in f.read_text().splitlines()]


def same_checkpoint(a: str, b: str) -> bool:
    """Whether two warm-up checkpoints hold the same adapters and Adam state, tensor for tensor (each
    warm-up names its checkpoint with a random uid, so two identical warm-ups differ in that alone)."""
    for f in ("adapter_model.safetensors", "optimizer.safetensors"):
        x, y = load_file(str(Path(a) / f)), load_file(str(Path(b) / f))
        if set(x) != set(y) or any(not torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def other_sparsities(work: Path, exact: list[dict]) -> dict:
    runs = work / "runs"
    tids, Xt, tman = read_store(runs / "target-s0" / "features" / "train-1")
    out = {}
    for label, setting in OTHER.items():
        run, both = runs / f"{slug(setting)}-s0", runs / f"{slug(setting + ', val both')}-s0"
        ids, Xp, man = read_store(run / "features" / "train-1")
        if ids != tids or man["seed"] != tman["seed"] or not same_checkpoint(man["checkpoint"], tman["checkpoint"]):
            raise SystemExit(f"{run} does not share the target's coordinates (checkpoint, projection, pool)")
        vals = [(read_store(d)[1], read_store(d)[2]["tasks"]) for d in (run / "features" / "val-1",
                                                                         both / "features" / "val-target-1")]
        X = unit(Xp)
        rec = {"uncalibrated": measure(rows_of(ids, man["sources"], man["tasks"], task_scores(X, vals)), exact),
               "calibrated": [], "pool_cosine": float((X * unit(Xt)).sum(1).mean())}
        for k in SUBSETS:
            sub = subset_ids(run / "pool" / "pool.jsonl", 32, k)
            at = [ids.index(i) for i in sub]
            Y = correction_from_rows(sub, Xp[at], Xt[at], 0.01).apply(ids, X)
            rec["calibrated"].append(measure(rows_of(ids, man["sources"], man["tasks"], task_scores(Y, vals)), exact))
        out[label] = rec
        print(f"{label} done", flush=True)
    return out


def pipeline_runs(work: Path, exact: list[dict]) -> dict:
    out = {}
    base = work / "projection" / "format-3"
    for s in SEEDS:
        cal = work / "runs" / f"{slug(SETTING)}-s{s}" / "scores"
        plain = base / slug(f"IProX, seed {s}") / "scores"
        if (cal / "COMPLETE").exists() and (plain / "COMPLETE").exists():
            meta = json.loads((cal.parent / "pipeline.json").read_text())
            out[str(s)] = {"calibrated": measure(read_scores(cal), exact),
                           "uncalibrated": measure(read_scores(plain), exact),
                           "features_s": meta["timings"].get("features")}
    return out


def _mean(ms: list[dict], t: str, k: str) -> float:
    return statistics.fmean(m[t][k] for m in ms)


def _triple(ms: list[dict], t: str) -> str:
    return " / ".join(f"{_mean(ms, t, k):.2f}" for k in ("spearman", "head_spearman", "overlap_5"))


def report(res: dict) -> str:
    lines = ["## Calibration: the proxy's pool features corrected by the target's on a few examples (issue 12)", "",
             "`benchmarks/diag_calibration.py`. Against the target's exact gradients (seed-0 warm-up), per task "
             "(" + " / ".join(TASKS) + "): whole-pool Spearman / head Spearman (target's top 20%) / top-5% overlap. "
             "Proxy: the 0.7 default (sparsity 0.5) of each seed, its validation model \"both\", store format 3, "
             "proj_dim 64.", ""]
    runs = res.get("pipeline", {})
    if runs:
        lines += [f"### The pipeline's runs (`{SETTING}`: 32 calibration examples, ridge 0.01)", "",
                  "| seed | run | " + " | ".join(TASKS) + " |", "|---|---|" + "---|" * len(TASKS)]
        for s, r in runs.items():
            for label in ("uncalibrated", "calibrated"):
                lines.append(f"| {s} | {label} | " + " | ".join(_triple([r[label]], t) for t in TASKS) + " |")
        for label in ("uncalibrated", "calibrated"):
            ms = [r[label] for r in runs.values()]
            lines.append(f"| mean | {label} | " + " | ".join(_triple(ms, t) for t in TASKS) + " |")
        lines += ["", "Features stage seconds of the calibrated runs (pool pass + 32 target examples + validation "
                  "stores): " + ", ".join(f"seed {s} {r['features_s']:.0f}" for s, r in runs.items()
                                            if r.get("features_s")) + ".", ""]
    sw = res.get("sweep")
    if sw:
        lines += ["### Calibration size and ridge, from the stores on disk", "",
                  f"Mean over seeds {', '.join(map(str, SEEDS))} × {len(SUBSETS)} calibration subsets; \"all\": the "
                  "300 examples as a run scores them, \"others\": without the calibration examples; \"worst\": the "
                  "lowest whole-pool / head Spearman over seeds × subsets × tasks. Rows of the target checked against "
                  "the pipeline's calibration store: largest relative difference "
                  + ", ".join(f"{v:.1g}" for v in sw.get("rows_check", {}).values()) + " (float16 storage).", "",
                  "| calibration examples / ridge | scored | " + " | ".join(TASKS) + " | worst |",
                  "|---|---|" + "---|" * (len(TASKS) + 1)]
        un = list(sw["uncalibrated"].values())
        lines.append("| none | all | " + " | ".join(_triple(un, t) for t in TASKS) + " | "
                     + f"{min(m[t]['spearman'] for m in un for t in TASKS):.2f} / "
                     f"{min(m[t]['head_spearman'] for m in un for t in TASKS):.2f} |")
        for key, per in sw.items():
            if key in ("uncalibrated", "rows_check"):
                continue
            for part in ("all", "others"):
                ms = [m for rec in per.values() for m in rec[part]]
                lines.append(f"| {key} | {part} | " + " | ".join(_triple(ms, t) for t in TASKS) + " | "
                             + f"{min(m[t]['spearman'] for m in ms for t in TASKS):.2f} / "
                             f"{min(m[t]['head_spearman'] for m in ms for t in TASKS):.2f} |")
    other = res.get("other sparsities")
    if other:
        lines += ["", "### Other sparsities and plain SVD (seed 0, store format 2, 32 examples, ridge 0.01, 5 subsets)", "",
                  "The study's own stores, scored \"both\"; \"pool cosine\": the proxy's pool features against the "
                  "target's, per example, mean.", "",
                  "| proxy | pool cosine | run | " + " | ".join(TASKS) + " |", "|---|---|---|" + "---|" * len(TASKS)]
        for label, rec in other.items():
            lines.append(f"| {label} | {rec['pool_cosine']:.2f} | uncalibrated | "
                         + " | ".join(_triple([rec["uncalibrated"]], t) for t in TASKS) + " |")
            lines.append(f"| {label} | | calibrated | " + " | ".join(_triple(rec["calibrated"], t) for t in TASKS) + " |")
    return "\n".join(lines).rstrip()


def _rounded(obj):
    """Floats to 4 significant digits (the report prints 2 decimals), through dicts and lists."""
    if isinstance(obj, float):
        return float(f"{obj:.4g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v) for v in obj]
    return obj


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity", help="the fidelity study's work folder")
    ap.add_argument("--report", action="store_true", help="only rewrite the section from the results file")
    args = ap.parse_args()
    path = RESULTS / "calibration.json"
    if not args.report:
        work = Path(args.work)
        ref = work / "projection" / "format-3" / slug("target, warm-up 0, exact") / "scores"
        if not (ref / "COMPLETE").exists():
            raise SystemExit(f"no exact target scores at {ref}: run benchmarks/diag_projection.py first")
        exact = read_scores(ref)
        res = {"pipeline": pipeline_runs(work, exact), "sweep": sweep(work, exact),
               "other sparsities": other_sparsities(work, exact)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_rounded(res), separators=(",", ":")) + "\n")  # (many subsets: kept compact)
    res = json.loads(path.read_text())
    update_benchmarks_md("calibration", report(res))
    print(report(res))


if __name__ == "__main__":
    main()
