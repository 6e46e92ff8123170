"""How should the proxy's and the target's validation scores be combined, and is the whole-pool gap
noise of one proxy build?

Since 0.7 a target-first run scores the pool's proxy features against the proxy's validation
gradients and the target's, and adds the two cosine scores (``val_model = "both"``). The fidelity
study (``benchmarks/bench_fidelity.py``) found the target's validation gradients alone rank the
whole pool near the target's own seed-to-seed ceiling but lose the head at weak seeds, and the
proxy's alone the other way round. For every IProX run of the study whose pool store and both
validation stores are on disk, this scores the pool other ways (TracIn over the run's one
checkpoint, as `iprox score` does): each validation model alone, the two cosine scores summed (the
0.7 default), summed after standardising each over the pool, their ranks summed, the target's
standardised score weighted twice, and a split by subspace: the target's task vector within the top
``k`` right singular directions of the pool's normalised features (what all the pool shares), the
proxy's outside them. It also averages the "both" scores of the default's three seeds (three
proxies, three target warm-ups): if the gap were one build's noise, the average would close it.

Nothing is rebuilt or recomputed: feature stores and score tables are only read.

    python benchmarks/diag_val_combination.py       # writes the "val-combination" section
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import TASKS, measure  # noqa: E402
from common import slug, update_benchmarks_md  # noqa: E402

from iprox.data import load_examples  # noqa: E402
from iprox.loading import load_features, read_scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
METRICS = (("spearman", "whole-pool Spearman"), ("head_spearman", "head Spearman"),
           ("overlap_5", "top-5% overlap"), ("share_5", "task share of the top 5%"))
SUBSPACE_K = (4, 8, 32)


def _z(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std(unbiased=False)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x, stable=True), stable=True).double()


def _task_vectors(store: Path, tasks_of: dict[str, str]) -> dict[str, torch.Tensor]:
    """Per target task the mean of its normalised validation features (what `iprox score` uses)."""
    ids, v = load_features(store, dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    return {t: v[[k for k, i in enumerate(ids) if tasks_of[i] == t]].mean(0) for t in TASKS}


def _runs(work: Path) -> list[tuple[str, int, Path, Path, Path]]:
    """(setting, seed, pool store, proxy's validation store, target's validation store) of each IProX
    run with the three on disk (for runs made before val_model, the target's store is the one its
    "<setting>, val target" rescoring computed)."""
    out = []
    for s in range(3):
        for name in ("0.6 default, val both", "0.7 default, LoRA-space align", "0.7 default, depth slope 0.6",
                     "0.6 default, sparsity 0.3", "0.6 default, sparsity 0.7", "0.6 default, align 40 steps"):
            feats = work / "runs" / f"{slug(name)}-s{s}" / "features"
            target_val = feats / "val-target-1"
            if not target_val.is_dir():
                target_val = work / "runs" / f"{slug(name + ', val target')}-s{s}" / "features" / "val-target-1"
            stores = (feats / "train-1", feats / "val-1", target_val)
            if all((d / "COMPLETE").exists() for d in stores) and not (feats / "train-2").exists():
                out.append((name, s, *stores))
    return out


def _rows(base: list[dict], ids: list[str], per_task: dict[str, torch.Tensor]) -> list[dict]:
    at = {i: k for k, i in enumerate(ids)}
    rows = []
    for r in base:
        r = {**r, **{t: float(per_task[t][at[r["id"]]]) for t in TASKS}}
        r["score"] = max(r[t] for t in TASKS)
        rows.append(r)
    return rows


def _combinations(x: torch.Tensor, vp: dict, vt: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Per way of combining: per task the pool's scores (x: normalised pool features)."""
    p = {t: x @ vp[t] for t in TASKS}
    q = {t: x @ vt[t] for t in TASKS}
    out = {"proxy's alone": p, "target's alone": q,
           "sum (the 0.7 default)": {t: p[t] + q[t] for t in TASKS},
           "standardised sum": {t: _z(p[t]) + _z(q[t]) for t in TASKS},
           "rank sum": {t: _ranks(p[t]) + _ranks(q[t]) for t in TASKS},
           "standardised, target ×2": {t: _z(p[t]) + 2 * _z(q[t]) for t in TASKS}}
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    for k in SUBSPACE_K:
        basis = vh[:k].T
        out[f"target's in the pool's top {k} directions, proxy's outside"] = {
            t: x @ (vp[t] - basis @ (basis.T @ vp[t]) + basis @ (basis.T @ vt[t])) for t in TASKS}
    return out


def _averaged(folders: list[Path]) -> list[dict]:
    tables = [read_scores(f) for f in folders]
    rows = [dict(r) for r in tables[0]]
    for col in TASKS + ["score"]:
        mean = np.mean([[float(r[col]) for r in t] for t in tables], axis=0)
        for r, v in zip(rows, mean):
            r[col] = float(v)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity")
    args = ap.parse_args()
    work = Path(args.work)
    ref = read_scores(work / "runs" / "target-s0" / "scores")
    runs = _runs(work)
    if not runs:
        raise SystemExit(f"no run in {work} has its pool store and both validation stores; run bench_fidelity.py first")
    tasks_of = {e.id: e.task for e in load_examples([str(work / "runs" / "target-s0" / "pool" / "validation.jsonl")])}
    per: dict[str, list[dict]] = {}  # one {task: figures} per run
    for name, seed, train, val, target_val in runs:
        ids, x = load_features(train, dtype=torch.float64)
        x = x / x.norm(dim=1, keepdim=True)
        base = read_scores(train.parent.parent / "scores")
        for how, scores in _combinations(x, _task_vectors(val, tasks_of), _task_vectors(target_val, tasks_of)).items():
            per.setdefault(how, []).append(measure(_rows(base, ids, scores), ref))
        print(f"{name}, seed {seed}: done", flush=True)
    ensemble = {}
    both = [work / "runs" / f"{slug('0.6 default, val both')}-s{s}" / "scores" for s in range(3)]
    if all((f / "COMPLETE").exists() for f in both):
        for s, f in enumerate(both):
            ensemble[f"seed {s} alone"] = measure(read_scores(f), ref)
        ensemble["mean of seeds 0-2"] = measure(_averaged(both), ref)
        ensemble["mean of seeds 1-2 (target warm-ups other than the reference's)"] = measure(_averaged(both[1:]), ref)
    result = {"runs": [[name, s] for name, s, *_ in runs], "combinations": per, "ensemble": ensemble}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "val_combination.json").write_text(json.dumps(result, indent=2))
    update_benchmarks_md("val-combination", report(result))
    print(report(result))


def report(r: dict) -> str:
    seeds: dict[str, list[int]] = {}
    for name, s in r["runs"]:
        seeds.setdefault(name, []).append(s)
    labels = [f"{name} (seed {', '.join(map(str, ss))})" for name, ss in seeds.items()]
    lines = ["## Combining the proxy's and the target's validation scores (issue 12)", "",
             "`benchmarks/diag_val_combination.py`: the IProX runs of the fidelity study whose pool store and both "
             f"validation stores (the proxy's and the target's) are on disk ({len(r['runs'])} runs: {'; '.join(labels)}), "
             "the pool scored with each combination of the two; against the target (seed 0): mean and worst of each "
             "figure over runs × 3 tasks.", "",
             "| combination | " + " | ".join(f"{title}: mean / worst" for _, title in METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    for name, figs in r["combinations"].items():
        cells = []
        for key, _ in METRICS:
            xs = [f[t][key] for f in figs for t in TASKS]
            cells.append(f"{statistics.mean(xs):.2f} / {min(xs):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if r["ensemble"]:
        lines += ["", "The 0.7 default's \"both\" scores at sparsity 0.5, each seed and averaged over seeds (per task "
                  "boolean_expressions / hyperbaton / formal_fallacies: whole-pool Spearman / head / top-5% overlap):",
                  "", "| scores | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
        for name, f in r["ensemble"].items():
            lines.append(f"| {name} | " + " | ".join(
                f"{f[t]['spearman']:.2f} / {f[t]['head_spearman']:.2f} / {f[t]['overlap_5']:.2f}" for t in TASKS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
