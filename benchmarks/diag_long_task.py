"""A long-answer target task: does the calibrated proxy rank the pool for GSM8K as the target does?

The fidelity study's target tasks are BBH tasks with answers of a few tokens; within the pool's
GSM8K third (answers of ~126 tokens) the proxy's order agrees with the target's at about 0
(``diag_calibration.py``, "within each pool source"). That order did not matter there, since GSM8K
is never selected for those tasks. Here it does: the target task is GSM8K itself, with
``--n-val`` validation problems from the GSM8K test split (none in the pool).

Nothing is rebuilt: the pool stores of ``diag_projection.py`` (store format 3) are reused, and only
the validation stores of the new task are featurised, with each store's own model, checkpoint,
projection seed and dimensions:

* the 0.7 default's proxy of seeds 0-2 (its validation gradients) and the target at the same
  checkpoint and projection (the target's, for ``val_model = "both"`` and as the same-seed reference);
* the target's exact gradients at warm-up seeds 0 (the reference) and 1 (the ceiling).

With ``--settings``, other proxies of the fidelity study (``NAME`` at seed 0 or ``NAME@SEED``, e.g.
its sparsity 0.3 and 0.7 runs) are featurised too, pool and validation stores, as ``diag_projection.py`` does (their warm-up
checkpoint is the target's own: checked tensor for tensor), and measured the same way.

The proxy's pool features are corrected as a calibrated run does (32 seeded examples, ridge 0.01,
the target's rows from its pool store at the same checkpoint and projection; 5 subsets) and scored
"both". Figures: whole-pool Spearman, head Spearman (the reference's top 20%), top-5% overlap, the
task's share of the top 5%, Spearman within GSM8K, and the run's own estimate
(:func:`iprox.calibration.estimate_agreement`); and, for the same proxies calibrated alike, the
figures on the study's BBH tasks (their own validation stores), so that a setting's gain on the long
task is seen beside what it does to the short ones.

    python benchmarks/diag_long_task.py             # featurise what is missing, measure, report
    python benchmarks/diag_long_task.py --report    # only rewrite the section
    python benchmarks/diag_long_task.py --add --settings "NAME@1"   # measure one more proxy, keep the rest
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import BASE, TASKS, measure  # noqa: E402
from common import IPROX, find_data, sh, slug, update_benchmarks_md  # noqa: E402
from diag_calibration import SEEDS, SUBSETS, _triple, rows_of, same_checkpoint, subset_ids, task_scores, unit  # noqa: E402
from diag_projection import DEFAULT, featurise, jobs  # noqa: E402

from iprox.agreement import spearman  # noqa: E402
from iprox.calibration import correction_from_rows, estimate_agreement  # noqa: E402
from iprox.fidelity import score_agreement  # noqa: E402
from iprox.loading import load_features, read_manifest, read_scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TASK = "gsm8k"
DEFAULT_LABEL = "0.7 default"  # the study's "0.6 default, val both" runs: the 0.7 default at sparsity 0.5
DEFAULT_KEYS = [f"{DEFAULT_LABEL}, seed {s}" for s in SEEDS]


def validation_file(work: Path, n: int) -> Path:
    """``n`` seeded GSM8K test problems as the task's validation examples."""
    from iprox.data import load_examples

    exs = random.Random(0).sample(load_examples(str(find_data() / "gsm8k" / "test.jsonl")), n)
    out = work / "long-task" / f"val-{TASK}-{n}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"id": e.id, "source": e.source, "task": e.task, "messages": e.messages}) + "\n"
                           for e in exs))
    return out


def _val_store(work: Path, val: Path, man: dict, name: str, max_length: int) -> Path:
    """The validation store beside a pool store with manifest ``man``: its model, checkpoint,
    projection seed and dimensions."""
    out = work / "long-task" / f"{name}-{val.stem}"
    if not (out / "COMPLETE").exists():
        sh(IPROX + ["features", "--data", str(val), "--out", str(out), "--model", man["model"],
                    "--checkpoint", man["checkpoint"], "--grad", "sgd", "--seed", str(man["seed"]),
                    "--proj-dim", str(man["proj_dim"]), "--max-length", str(max_length),
                    "--batch-size", str(BASE["features"]["batch_size"]), "--no-progress"], work / "long-task" / "log.txt")
    return out


def figures(scores: torch.Tensor, ref: torch.Tensor, ids: list[str], sources: list[str], tasks: list[str]) -> dict:
    rows = lambda s: [{"id": i, "source": src, "task": t, "score": float(x), TASK: float(x)}  # noqa: E731
                      for i, src, t, x in zip(ids, sources, tasks, s.tolist())]
    rep, _, _ = score_agreement(rows(ref), rows(scores))
    v = rep["subtasks"][TASK]
    g = [k for k, src in enumerate(sources) if src == "gsm8k"]
    return {"spearman": v["spearman"], "head_spearman": v["head_spearman"], "overlap_5": v["overlap_at"]["5"]["overlap"],
            "share_5": v["task_share_at_5"]["other"], "ref_share_5": v["task_share_at_5"]["target"],
            "within_gsm8k": spearman(scores[g].tolist(), ref[g].tolist())}


def measure_all(work: Path, n_val: int, max_length: int, settings: list[str], previous: dict | None = None) -> dict:
    """Every proxy's figures; with ``previous`` (the results on disk), only ``settings`` are measured
    and added to them (the default's seeds and the ceiling are kept as they were)."""
    base = work / "projection" / "format-3"
    base.mkdir(parents=True, exist_ok=True)
    val = validation_file(work, n_val)
    known = {j["name"]: j for j in jobs(work)}

    def task_vector(store: Path) -> torch.Tensor:
        return unit(load_features(store, torch.float64)[1]).mean(0)

    # the reference and the ceiling: the target's exact gradients, warm-ups 0 and 1
    exact = {}
    for s in (0,) if previous else (0, 1):
        featurise(known[f"target, warm-up {s}, exact"], base / slug(f"target, warm-up {s}, exact"), work, max_length)
        pool = base / slug(f"target, warm-up {s}, exact") / "train"
        ids, X = load_features(pool, torch.float32)
        man = read_manifest(pool)
        u = task_vector(_val_store(work, val, man, pool.parent.name, max_length)).float()
        exact[s] = (unit(X) @ u).double()
        del X
    if previous:
        if previous["n_val"] != n_val:
            raise SystemExit(f"the results on disk have {previous['n_val']} validation problems, not {n_val}")
        out = previous
    else:
        out = {"n_val": n_val, "ceiling": figures(exact[1], exact[0], ids, man["sources"], man["tasks"]), "seeds": {}}
    bbh_exact = read_scores(base / slug("target, warm-up 0, exact") / "scores")  # the BBH tasks' reference
    proxies = [] if previous else [(key, base / slug(f"IProX, seed {s}") / "train", s) for key, s in zip(DEFAULT_KEYS, SEEDS)]
    for spec in settings:  # other proxies of the study ("NAME" at seed 0, "NAME@SEED"), as diag_projection does
        name, _, seed = spec.partition("@")
        s = int(seed or 0)
        run = work / "runs" / f"{slug(name)}-s{s}"
        ck = run / "warmup" / "checkpoint-1"
        target_store = base / slug(f"target, warm-up {s}, projection {s}")
        if not (target_store / "train" / "COMPLETE").exists():  # (a work folder rebuilt since: from this run's warm-up)
            featurise({**known[f"target, warm-up {s}, projection {s}"], "ckpt": ck}, target_store, work, max_length)
        ref = read_manifest(target_store / "train")["checkpoint"]
        if not same_checkpoint(str(ck), ref):
            raise SystemExit(f"{run} does not carry the target's seed-{s} warm-up checkpoint")
        folder = base / slug(f"{name}, seed {s}")
        featurise({"name": f"{name}, seed {s}", "model": run / "proxy", "ckpt": ck, "seed": s, "both": True},
                  folder, work, max_length)
        proxies.append((f"{name}, seed {s}", folder / "train", s))
    for key, proxy, s in proxies:
        tgt = base / slug(f"target, warm-up {s}, projection {s}") / "train"
        pm = read_manifest(proxy)
        pids, Xp = load_features(proxy, torch.float64)
        tids, Xt = load_features(tgt, torch.float64)
        if pids != ids or tids != ids or read_manifest(tgt)["seed"] != pm["seed"]:
            raise SystemExit(f"{proxy} and {tgt} do not line up with the exact stores")
        up = task_vector(_val_store(work, val, pm, proxy.parent.name, max_length))
        ut = task_vector(_val_store(work, val, read_manifest(tgt), tgt.parent.name, max_length))
        X = unit(Xp)
        own = unit(Xt) @ ut  # the target's run at this checkpoint and projection
        rec = {"target, same seed (proj_dim 64)": figures(own, exact[0], ids, pm["sources"], pm["tasks"]),
               "uncalibrated": figures(X @ (up + ut), exact[0], ids, pm["sources"], pm["tasks"]),
               "calibrated": [], "calibrated, against the same-seed target": [], "estimate": []}
        pool_file = work / "runs" / f"{slug(DEFAULT)}-s0" / "pool" / "pool.jsonl"  # (every run's pool is this one)
        # the same proxy and correction on the study's BBH tasks (its own validation stores)
        bbh = [(load_features(proxy.parent / v, torch.float64)[1], read_manifest(proxy.parent / v)["tasks"])
               for v in ("val", "val-target")]
        for k in SUBSETS:
            sub = subset_ids(pool_file, 32, k)
            at = [ids.index(i) for i in sub]
            corr = correction_from_rows(sub, Xp[at], Xt[at], 0.01)
            S = corr.apply(ids, X) @ (up + ut)
            rec["calibrated"].append(figures(S, exact[0], ids, pm["sources"], pm["tasks"]))
            rec.setdefault("BBH tasks, calibrated", []).append(
                measure(rows_of(ids, pm["sources"], pm["tasks"], task_scores(corr.apply(ids, X), bbh)), bbh_exact))
            rec["calibrated, against the same-seed target"].append(figures(S, own, ids, pm["sources"], pm["tasks"]))
            est = estimate_agreement([(corr, up[:, None], 1.0, False), (corr, ut[:, None], 1.0, True)], [TASK])
            rec["estimate"].append(est["spearman"][TASK])
            # more calibration examples, and examples the proxy itself ranks high for the task
            for c in (64, 128):
                at = [ids.index(i) for i in subset_ids(pool_file, c, k)]
                corr = correction_from_rows([ids[a] for a in at], Xp[at], Xt[at], 0.01)
                rec.setdefault(f"{c} random examples", []).append(
                    figures(corr.apply(ids, X) @ (up + ut), exact[0], ids, pm["sources"], pm["tasks"]))
            top = (X @ (up + ut)).argsort(descending=True)[:64].tolist()
            at = [top[i] for i in torch.randperm(64, generator=torch.Generator().manual_seed(k))[:32].tolist()]
            corr = correction_from_rows([ids[a] for a in at], Xp[at], Xt[at], 0.01)
            rec.setdefault("32 of the uncalibrated proxy's top 64", []).append(
                figures(corr.apply(ids, X) @ (up + ut), exact[0], ids, pm["sources"], pm["tasks"]))
        out["seeds"][key] = rec
        print(f"{key} measured", flush=True)
    return out


def _cell(ms: list[dict]) -> str:
    m = lambda k: statistics.fmean(x[k] for x in ms)  # noqa: E731
    return (f"{m('spearman'):.2f} | {m('head_spearman'):.2f} | {m('overlap_5'):.2f} | "
            f"{round(m('share_5') * 15)} ({round(m('ref_share_5') * 15)}) | {m('within_gsm8k'):.2f}")


def report(res: dict) -> str:
    lines = ["## A long-answer target task: GSM8K (issue 12)", "",
             f"`benchmarks/diag_long_task.py`: the target task is GSM8K ({res['n_val']} validation problems from its "
             "test split); the pool, its stores and the proxies are the fidelity study's (300 examples, a third of "
             "them GSM8K train problems; the 0.7 default at sparsity 0.5 unless named; store format 3, proj_dim 64). "
             "Against the target's exact gradients (warm-up seed 0); the target at the same seed: its own run at "
             "the proxy's checkpoint and projection; calibrated: 32 examples, ridge 0.01, mean over 5 subsets; "
             "scored \"both\". Share: GSM8K examples in the top 5% (of 15; the reference's in brackets).", "",
             "| scores | proxy, seed | whole-pool Spearman | head Spearman | top-5% overlap | share | within GSM8K |",
             "|---|---|---|---|---|---|---|",
             f"| target, warm-up seed 1 (exact): the ceiling | – | {_cell([res['ceiling']])} |"]
    for label in ("target, same seed (proj_dim 64)", "uncalibrated", "calibrated"):
        for key, rec in res["seeds"].items():
            if label.startswith("target") and key not in DEFAULT_KEYS:
                continue  # (the same target store as the default's seed 0)
            r = rec[label]
            lines.append(f"| {label} | {key} | {_cell(r if isinstance(r, list) else [r])} |")
    if all("BBH tasks, calibrated" in rec for rec in res["seeds"].values()):
        lines += ["", "The same proxies, calibrated alike, on the fidelity study's BBH tasks (against the exact "
                  "target; whole-pool Spearman / head Spearman / top-5% overlap, mean over the 5 subsets):", "",
                  "| proxy, seed | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
        lines += [f"| {key} | " + " | ".join(_triple(rec["BBH tasks, calibrated"], t) for t in TASKS) + " |"
                  for key, rec in res["seeds"].items()]
    default = [rec for key, rec in res["seeds"].items() if key in DEFAULT_KEYS]
    variants = [k for k in default[0] if k.endswith("examples") or k.startswith("32 of")]
    if variants:
        lines += ["", f"Other calibration sets for the {DEFAULT_LABEL} (mean over its seeds and 5 subsets; the top-64 "
                  "choice is of the proxy's own uncalibrated ranking for the task, 32 drawn from it per subset):", "",
                  "| calibration | whole-pool Spearman | head Spearman | top-5% overlap | share | within GSM8K |",
                  "|---|---|---|---|---|---|",
                  f"| 32 random examples (the default) | {_cell([m for r in default for m in r['calibrated']])} |"]
        lines += [f"| {v} | {_cell([m for r in default for m in r[v]])} |" for v in variants]
    lines += ["", "The run's own estimate (over its 32 calibration examples) beside the whole-pool Spearman measured "
              "against the target's run at the same checkpoint and projection, mean over the 5 subsets: "
              + "; ".join(f"{key} {statistics.fmean(rec['estimate']):.2f} against "
                          f"{statistics.fmean(m['spearman'] for m in rec['calibrated, against the same-seed target']):.2f}"
                          for key, rec in res["seeds"].items()) + "."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity", help="the fidelity study's work folder")
    ap.add_argument("--n-val", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=320)
    ap.add_argument("--settings", nargs="*", default=[], metavar="NAME",
                    help="other proxies of the fidelity study to measure too (NAME at seed 0, or NAME@SEED; their pool "
                         "is featurised first)")
    ap.add_argument("--add", action="store_true",
                    help="measure only the --settings proxies and add them to the results on disk (for a work folder "
                         "rebuilt since: the stores they need are featurised if missing)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    path = RESULTS / "long_task.json"
    if not args.report:
        previous = json.loads(path.read_text()) if args.add else None
        res = measure_all(Path(args.work), args.n_val, args.max_length, args.settings, previous)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1) + "\n")
    res = json.loads(path.read_text())
    update_benchmarks_md("long-task", report(res))
    print(report(res))


if __name__ == "__main__":
    main()
