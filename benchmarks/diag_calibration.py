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
4. **Within each pool source**: the same runs' Spearman within the BBH and within the GSM8K examples,
   beside the target's (warm-up seed 1, exact; warm-up seed 0 at proj_dim 64): where the calibrated
   proxy's whole-pool order still parts from the target's.
5. **Alternatives** (the stores of part 2, 32 examples, ridge 0.01): other kernels for the correction
   (a Gaussian one in the features' cosine, one correction per decoder layer) and calibration
   examples chosen to cover the proxy's feature space (k-means++ seeding, pivoted Cholesky) instead
   of at random.

6. **The run's own estimate** (:func:`iprox.calibration.estimate_agreement`, in every calibrated
   run's ``scores.json``): per proxy and calibration subset, the estimated Spearman with the target's
   scores against the one measured over the whole pool (against the target's run at the same
   checkpoint and projection, which is what the estimate's reference is, and against the exact target).

7. **Exact stores** (only with ``--only exact``: ~6 min and ~12 GB per seed): the same correction on
   the unprojected stores of ``diag_projection.py`` (IProX seeds 0 and 1 and the target's warm-ups 0
   and 1, every LoRA side whole), to tell the projection's share of what is left from the proxy's.

The plot (``results/calibration.png``) draws part 2's curve: fidelity against calibration examples.

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

from iprox.agreement import spearman  # noqa: E402
from iprox.calibration import calibration_subset, correction_from_rows, estimate_agreement  # noqa: E402
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


def per_source(work: Path) -> dict:
    """Spearman within each pool source (per task) against the exact target: the pipeline's runs
    calibrated and not, and the target's own stores as the ceiling."""
    base = work / "projection" / "format-3"
    exact = {r["id"]: r for r in read_scores(base / slug("target, warm-up 0, exact") / "scores")}

    def within(scores: Path) -> dict:
        rows = read_scores(scores)
        return {t: {src: spearman([float(r[t]) for r in rows if r["source"] == src],
                                   [float(exact[r["id"]][t]) for r in rows if r["source"] == src])
                    for src in ("bbh", "gsm8k")} for t in TASKS}

    out = {"target, warm-up 1, exact": within(base / slug("target, warm-up 1, exact") / "scores"),
           "target, warm-up 0, proj_dim 64": within(base / slug("target, warm-up 0, projection 0") / "scores")}
    for s in SEEDS:
        cal = work / "runs" / f"{slug(SETTING)}-s{s}" / "scores"
        if (cal / "COMPLETE").exists():
            out[f"IProX seed {s}, uncalibrated"] = within(base / slug(f"IProX, seed {s}") / "scores")
            out[f"IProX seed {s}, calibrated"] = within(cal)
    return out


def _per_layer(layout: list[dict]) -> list[slice]:
    """The store's columns of each decoder layer (its blocks are contiguous)."""
    spans: dict[str, list[int]] = {}
    for b in layout:
        layer = b["name"].split(".layers.")[1].split(".")[0]
        lo, hi = b["offset"], b["offset"] + b["k_out"] * b["k_in"]
        spans.setdefault(layer, [lo, hi])
        spans[layer] = [min(spans[layer][0], lo), max(spans[layer][1], hi)]
    return [slice(lo, hi) for lo, hi in spans.values()]


def _kernel_error(X, P, T, kernel, ridge=0.01):
    """The error ``T - P`` predicted at each row of ``X`` by kernel ridge regression (the ridge
    relative to the kernel's mean diagonal: 1 for unit rows, a layer's share of it for its columns)."""
    K = kernel(P, P)
    lam = ridge * float(K.diagonal().mean())
    return kernel(X, P) @ torch.linalg.solve(K + lam * torch.eye(len(K), dtype=K.dtype), T - P)


def _kmeanspp(X, c: int, seed: int) -> list[int]:
    """k-means++ seeding in cosine distance: each next row drawn with probability ∝ distance²."""
    g = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(len(X), (1,), generator=g))]
    d = 1 - X @ X[chosen[0]]
    for _ in range(c - 1):
        w = d.clamp_min(0) ** 2
        chosen.append(int(torch.multinomial(w / w.sum(), 1, generator=g)))
        d = torch.minimum(d, 1 - X @ X[chosen[-1]])
    return chosen


def _pivoted(X, c: int) -> list[int]:
    """Greedy pivoted Cholesky of ``X Xᵀ``: each next row the one least explained by those chosen."""
    K = X @ X.T
    d, L, chosen = K.diagonal().clone(), torch.zeros(len(X), c, dtype=X.dtype), []
    for j in range(c):
        d[chosen] = -1.0
        i = int(d.argmax())
        chosen.append(i)
        L[:, j] = (K[:, i] - L[:, :j] @ L[i, :j]) / d[i].sqrt()
        d = d - L[:, j] ** 2
    return chosen


def alternatives(work: Path, exact: list[dict]) -> dict:
    base = work / "projection" / "format-3"
    out: dict = {}
    for s in SEEDS:
        proxy, target = base / slug(f"IProX, seed {s}"), base / slug(f"target, warm-up {s}, projection {s}")
        pm = read_manifest(proxy / "train")
        ids, Xp = load_features(proxy / "train", torch.float64)
        _, Xt = load_features(target / "train", torch.float64)
        vals = [(load_features(proxy / v, torch.float64)[1], read_manifest(proxy / v)["tasks"]) for v in ("val", "val-target")]
        X, T = unit(Xp), unit(Xt)
        Xc = unit(X - X.mean(0))  # centred: what the pool shares taken out before covering it
        pool_file = work / "runs" / f"{slug('0.6 default, val both')}-s{s}" / "pool" / "pool.jsonl"
        layers = _per_layer(pm["layout"])

        def per_layer(at):
            E = torch.zeros_like(X)
            for sl in layers:
                E[:, sl] = _kernel_error(X[:, sl], X[at][:, sl], T[at][:, sl], lambda a, b: a @ b.T)
            return E

        def gaussian(at):
            return _kernel_error(X, X[at], T[at], lambda a, b: torch.exp((a @ b.T - 1) / 0.1))

        def record(label, at, error=None):
            if error is None:  # the library's correction
                Y = correction_from_rows([ids[i] for i in at], Xp[at], Xt[at], 0.01).apply(ids, X)
            else:
                Y = unit(X + error(at))
                Y[at] = T[at]
            m = measure(rows_of(ids, pm["sources"], pm["tasks"], task_scores(Y, vals)), exact)
            out.setdefault(label, {}).setdefault(str(s), []).append(m)

        for k in SUBSETS:
            at = [ids.index(i) for i in subset_ids(pool_file, 32, k)]
            record("random (the library's)", at)
            record("Gaussian kernel, width 0.1", at, gaussian)
            record("one correction per layer", at, per_layer)
            record("k-means++ choice", _kmeanspp(Xc, 32, k))
        record("pivoted Cholesky choice", _pivoted(Xc, 32))
        print(f"seed {s}: alternatives done", flush=True)
    return out


def _task_matrix(V: torch.Tensor, vtasks: list[str]) -> torch.Tensor:
    """(dim, tasks): each task's mean unit validation feature, as scoring makes it."""
    return torch.stack([unit(V)[[i for i, x in enumerate(vtasks) if x == t]].mean(0) for t in TASKS], dim=1)


def estimates(work: Path, exact: list[dict]) -> dict:
    """Per proxy (3 seeds of the 0.7 default, store format 3; the other sparsities and plain SVD,
    seed 0, format 2) and 5 subsets of 32: the estimate against the measured whole-pool Spearman."""
    base, runs = work / "projection" / "format-3", work / "runs"
    cases = []
    for s in SEEDS:
        proxy, target = base / slug(f"IProX, seed {s}"), base / slug(f"target, warm-up {s}, projection {s}")
        pm = read_manifest(proxy / "train")
        ids, Xp = load_features(proxy / "train", torch.float64)
        _, Xt = load_features(target / "train", torch.float64)
        vals = [(load_features(proxy / v, torch.float64)[1], read_manifest(proxy / v)["tasks"]) for v in ("val", "val-target")]
        cases.append((f"IProX 0.5, seed {s}", ids, Xp, Xt, vals, pm,
                      runs / f"{slug('0.6 default, val both')}-s{s}" / "pool" / "pool.jsonl"))
    tids, Xt0, _ = read_store(runs / "target-s0" / "features" / "train-1")
    for label, setting in OTHER.items():
        run, both = runs / f"{slug(setting)}-s0", runs / f"{slug(setting + ', val both')}-s0"
        ids, Xp, man = read_store(run / "features" / "train-1")
        assert ids == tids  # (other_sparsities checks the checkpoint and projection)
        vals = [(read_store(d)[1], read_store(d)[2]["tasks"]) for d in (run / "features" / "val-1",
                                                                         both / "features" / "val-target-1")]
        cases.append((f"{label}, seed 0", ids, Xp, Xt0, vals, man, run / "pool" / "pool.jsonl"))
    out = {}
    for label, ids, Xp, Xt, vals, man, pool_file in cases:
        X = unit(Xp)
        Up, Ut = (_task_matrix(V, vt) for V, vt in vals)
        own = rows_of(ids, man["sources"], man["tasks"], {t: unit(Xt) @ Ut[:, j] for j, t in enumerate(TASKS)})
        for k in SUBSETS:
            sub = subset_ids(pool_file, 32, k)
            at = [ids.index(i) for i in sub]
            corr = correction_from_rows(sub, Xp[at], Xt[at], 0.01)
            est = estimate_agreement([(corr, Up, 1.0, False), (corr, Ut, 1.0, True)], TASKS)
            # the same over the half of the calibration examples the target ranks higher: a head estimate?
            held, ref = corr.held_out_rows() @ (Up + Ut), corr.T @ Ut
            top = [ref[:, j].argsort(descending=True)[:len(at) // 2] for j in range(len(TASKS))]
            est["top_half_spearman"] = {t: spearman(held[top[j], j].tolist(), ref[top[j], j].tolist())
                                        for j, t in enumerate(TASKS)}
            rows = rows_of(ids, man["sources"], man["tasks"], task_scores(corr.apply(ids, X), vals))
            out.setdefault(label, []).append({"estimate": est, "vs_own_target": measure(rows, own),
                                              "vs_exact": measure(rows, exact)})
        print(f"{label}: estimates done", flush=True)
    return out


def exact_stores(work: Path, exact: list[dict]) -> dict:
    """Part 7: 32 examples, ridge 0.01, 5 subsets on the exact stores (float32, applied in chunks:
    2.4 M dimensions per row)."""
    base = work / "projection" / "format-3"
    out = {}
    for s in (0, 1):
        proxy, target = base / slug(f"IProX, seed {s}, exact"), base / slug(f"target, warm-up {s}, exact")
        pm = read_manifest(proxy / "train")
        ids, Xp = load_features(proxy / "train", torch.float32)
        tids, Xt = load_features(target / "train", torch.float32)
        assert ids == tids and pm["seed"] == read_manifest(target / "train")["seed"]
        vals = [(load_features(proxy / v, torch.float32)[1], read_manifest(proxy / v)["tasks"]) for v in ("val", "val-target")]
        X = unit(Xp)
        del Xp
        rec = {"uncalibrated": measure(rows_of(ids, pm["sources"], pm["tasks"], task_scores(X, vals)), exact),
               "calibrated": []}
        pool_file = work / "runs" / f"{slug('0.6 default, val both')}-s{s}" / "pool" / "pool.jsonl"
        for k in SUBSETS:
            sub = subset_ids(pool_file, 32, k)
            at = [ids.index(i) for i in sub]
            corr = correction_from_rows(sub, X[at], Xt[at], 0.01)
            P, M = corr.P.float(), corr.M.float()
            Y = torch.empty_like(X)
            for a in range(0, len(X), 50):
                Y[a:a + 50] = unit(X[a:a + 50] + (X[a:a + 50] @ P.T) @ M)
            Y[at] = corr.T.float()
            rec["calibrated"].append(measure(rows_of(ids, pm["sources"], pm["tasks"], task_scores(Y, vals)), exact))
            del Y
        out[str(s)] = rec
        del X, Xt
        print(f"exact stores, seed {s} done", flush=True)
    return out


def plot(res: dict) -> str:
    """Part 2's curve (ridge 0.01, all examples): mean whole-pool and head Spearman per task against
    calibration examples, the target's own ceiling dotted. Returns the markdown image line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sw = res["sweep"]
    ceiling = json.loads((RESULTS / "projection.json").read_text()).get("store format 3", {}).get(
        "vs", {}).get("target warm-up 1 exact against target exact")
    sizes = [0] + [c for c in SIZES if f"{c} / 0.01" in sw]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (key, title) in zip(axes, (("spearman", "whole-pool Spearman"), ("head_spearman", "head Spearman"))):
        for t, colour in zip(TASKS, ("C0", "C1", "C2")):
            ys = [_mean(list(sw["uncalibrated"].values()), t, key)]
            ys += [_mean([m for rec in sw[f"{c} / 0.01"].values() for m in rec["all"]], t, key) for c in sizes[1:]]
            ax.plot(sizes, ys, "o-", color=colour, label=t)
            if ceiling:
                ax.axhline(ceiling[t][key], color=colour, ls=":", lw=1)
        ax.set_title(title)
        ax.set_xlabel("calibration examples (target passes per checkpoint)")
        ax.set_xticks(sizes)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("against the exact target")
    axes[0].legend(fontsize=8)
    fig.suptitle("Calibration (mean of 3 seeds x 5 subsets); dotted: the target's own warm-up seed 1, exact", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "calibration.png", dpi=110)
    plt.close(fig)
    return "![fidelity against calibration examples](benchmarks/results/calibration.png)"


def _mean(ms: list[dict], t: str, k: str) -> float:
    return statistics.fmean(m[t][k] for m in ms)


def _worst(ms: list[dict]) -> str:
    """The lowest whole-pool / head Spearman over the measurements and tasks."""
    return " / ".join(f"{min(m[t][k] for m in ms for t in TASKS):.2f}" for k in ("spearman", "head_spearman"))


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
        lines.append("| none | all | " + " | ".join(_triple(un, t) for t in TASKS) + f" | {_worst(un)} |")
        for key, per in sw.items():
            if key in ("uncalibrated", "rows_check"):
                continue
            for part in ("all", "others"):
                ms = [m for rec in per.values() for m in rec[part]]
                lines.append(f"| {key} | {part} | " + " | ".join(_triple(ms, t) for t in TASKS) + f" | {_worst(ms)} |")
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
    src = res.get("per source")
    if src:
        lines += ["", "### Within each pool source (Spearman against the exact target, per task: within BBH / within GSM8K)", "",
                  "The calibrated runs are the pipeline's (seed s, 32 examples); GSM8K is a third of the pool and "
                  "never among these tasks' selections.", "",
                  "| scores | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
        for label, per in src.items():
            lines.append(f"| {label} | " + " | ".join(f"{per[t]['bbh']:.2f} / {per[t]['gsm8k']:.2f}" for t in TASKS) + " |")
    alt = res.get("alternatives")
    if alt:
        lines += ["", "### Other kernels and other choices of the calibration examples (32 examples, ridge 0.01)", "",
                  "Mean over seeds 0, 1, 2 (× 5 subsets, or one deterministic choice for pivoted Cholesky); "
                  "\"worst\": the lowest whole-pool / head Spearman over seeds × subsets × tasks. Choices are made "
                  "on the proxy's centred unit features.", "",
                  "| variant | " + " | ".join(TASKS) + " | worst |", "|---|" + "---|" * (len(TASKS) + 1)]
        for label, per in alt.items():
            ms = [m for rec in per.values() for m in rec]
            lines.append(f"| {label} | " + " | ".join(_triple(ms, t) for t in TASKS) + f" | {_worst(ms)} |")
    est = res.get("estimates")
    if est:
        lines += ["", "### The run's own estimate of its agreement (32 examples, ridge 0.01, 5 subsets per proxy)", "",
                  "Per proxy, the mean over subsets of the estimated Spearman (over the 32 calibration examples, held "
                  "out) / the whole-pool Spearman measured against the target's run at the same checkpoint and "
                  "projection (the estimate's reference) / against the exact target, per task.", "",
                  "| proxy | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
        pairs, heads = [], []
        for label, recs in est.items():
            cells = []
            for t in TASKS:
                e = [r["estimate"]["spearman"][t] for r in recs]
                own = [r["vs_own_target"][t]["spearman"] for r in recs]
                ex = [r["vs_exact"][t]["spearman"] for r in recs]
                pairs += list(zip(e, own, ex))
                heads += [(r["estimate"]["top_half_spearman"][t], r["vs_own_target"][t]["head_spearman"]) for r in recs]
                cells.append(f"{statistics.fmean(e):.2f} / {statistics.fmean(own):.2f} / {statistics.fmean(ex):.2f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        e, own, ex = zip(*pairs)
        lines += ["", f"Over the {len(pairs)} proxy × subset × task cases: estimate minus measured (same-seed target) "
                  f"{statistics.fmean(a - b for a, b in zip(e, own)):+.2f} on average, mean absolute difference "
                  f"{statistics.fmean(abs(a - b) for a, b in zip(e, own)):.2f}, rank correlation {spearman(e, own):.2f}; "
                  f"against the exact target {statistics.fmean(a - b for a, b in zip(e, ex)):+.2f}, "
                  f"{statistics.fmean(abs(a - b) for a, b in zip(e, ex)):.2f}, {spearman(e, ex):.2f}. Below "
                  "0.5 the run warns: " + f"{sum(a < 0.5 for a in e)} of {len(e)} estimates, where the measured "
                  f"(same-seed) Spearman was below 0.5 in {sum(b < 0.5 for b in own)}, both in "
                  f"{sum(a < 0.5 and b < 0.5 for a, b in zip(e, own))}. The same Spearman over the half of the "
                  "calibration examples the target ranks higher, as an estimate of the head Spearman: rank correlation "
                  f"{spearman(*zip(*heads)):.2f} with the head Spearman measured (same-seed target)."]
    ex = res.get("exact")
    if ex:
        lines += ["", "### Exact stores (no projection; 32 examples, ridge 0.01, 5 subsets)", "",
                  "The proxy's and the target's exact gradients (every LoRA side whole) against the exact target "
                  "(warm-up seed 0), beside the projected stores of part 2 at the same seed (proj_dim 64).", "",
                  "| seed | stores | run | " + " | ".join(TASKS) + " |", "|---|---|---|" + "---|" * len(TASKS)]
        for s, rec in ex.items():
            lines.append(f"| {s} | exact | uncalibrated | " + " | ".join(_triple([rec['uncalibrated']], t) for t in TASKS) + " |")
            lines.append(f"| {s} | exact | calibrated | " + " | ".join(_triple(rec['calibrated'], t) for t in TASKS) + " |")
            proj = res.get("sweep", {}).get("32 / 0.01", {}).get(s)
            if proj:
                lines.append(f"| {s} | proj_dim 64 | calibrated | " + " | ".join(_triple(proj['all'], t) for t in TASKS) + " |")
    if res.get("sweep") and (RESULTS / "calibration.png").exists():
        lines += ["", "![fidelity against calibration examples](benchmarks/results/calibration.png)"]
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
    ap.add_argument("--only", nargs="+", metavar="PART", help="measure only these parts (pipeline, sweep, other "
                    "sparsities, per source, alternatives, estimates, exact; all but exact by default), keeping the others' "
                    "results")
    args = ap.parse_args()
    path = RESULTS / "calibration.json"
    if not args.report:
        work = Path(args.work)
        ref = work / "projection" / "format-3" / slug("target, warm-up 0, exact") / "scores"
        if not (ref / "COMPLETE").exists():
            raise SystemExit(f"no exact target scores at {ref}: run benchmarks/diag_projection.py first")
        exact = read_scores(ref)
        res = json.loads(path.read_text()) if path.exists() else {}  # parts not measured now keep their results
        parts = {"pipeline": lambda: pipeline_runs(work, exact), "sweep": lambda: sweep(work, exact),
                 "other sparsities": lambda: other_sparsities(work, exact), "per source": lambda: per_source(work),
                 "alternatives": lambda: alternatives(work, exact), "estimates": lambda: estimates(work, exact),
                 "exact": lambda: exact_stores(work, exact)}
        for name, part in parts.items():
            if (not args.only and name != "exact") or (args.only and name in args.only):
                res[name] = part()
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_rounded(res), separators=(",", ":")) + "\n")  # (many subsets: kept compact)
    res = json.loads(path.read_text())
    if res.get("sweep"):
        plot(res)
    update_benchmarks_md("calibration", report(res))
    print(report(res))


if __name__ == "__main__":
    main()
