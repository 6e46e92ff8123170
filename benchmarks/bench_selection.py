"""Selection benchmark: does a proxy select as the target would, does its selection help the target,
and at what cost?

On the embedded SmolLM2-135M-Instruct (the target), a pool of GSM8K train problems and examples of
all 20 BBH tasks, and BBH target tasks each given by 4 validation examples (held-out test examples
of those tasks are never in the pool). One ``iprox run`` per selector, each in its own process (so
its time and peak memory are its own); the validation set holds every target task, so one run
scores the pool for all of them (a per-task column in scores.csv). Then, per selector and target
task, the top 5% by that task's column fine-tunes the target (LoRA), which is evaluated on the
task's held-out examples (response loss, exact-match accuracy by greedy decoding).

Reports (``BENCHMARKS.md`` section and ``benchmarks/results/selection*.json/png``):
1. fidelity of each proxy selector's scores to the target's (Spearman, Kendall, top-k overlap);
2. per selector and task: share of the top 5% drawn from the task, held-out loss and accuracy
   after fine-tuning, against random data and no fine-tuning;
3. each pipeline stage's time and peak memory, as ratios to the target-only pipeline.

``--quick`` (under 30 minutes on 2 CPU cores): a smaller pool, four selectors. ``--quick --baselines``
adds every proxy baseline at sparsity 0.3, 0.5 and 0.7 (its 18 selection pipelines took 69 minutes;
fine-tuning and evaluation add about 1.5 minutes per selector and task, some 35 minutes). ``--only``
runs a subset of the mode's selectors; ``--report`` rewrites the report from the results JSON. Work is kept in ``--work`` and every step skips when
already done, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import IPROX, build_seconds, downstream, find_data, selection_data, sh, slug, update_benchmarks_md  # noqa: E402

from iprox.fidelity import score_agreement  # noqa: E402
from iprox.loading import read_scores  # noqa: E402

log = logging.getLogger("bench_selection")
RESULTS = ROOT / "benchmarks" / "results"

ALIGN = "align_examples = 16\nalign_steps = 8\nlr = 1e-4\n"  # batch 2 (set below): 8 steps see all 16


METHODS = {  # proxy method → [proxy] lines besides sparsity
    "IProX ipsvd+align": ALIGN,
    "ipsvd, no align": "align_epochs = 0\n",          # alignment is on by default: off for the baselines
    "svd": 'init = "svd"\nalign_epochs = 0\n',
    "svd+align": 'init = "svd"\n' + ALIGN,
    "layer-drop": 'init = "layer-drop"\n',
}
SPARSITIES = (0.3, 0.5, 0.7)


def selectors(quick: bool, baselines: bool = False) -> dict[str, dict]:
    """name → config fragments. ``proxy`` holds the [proxy] section body; ``downstream`` False skips the
    fine-tuning of that selector's top 5% (the sparsity sweep of the baselines is measured for fidelity only).

    Quick mode alone: random, target, RDS+ and IProX at 0.5. ``baselines`` (and full mode) add every proxy
    method of ``METHODS`` at every sparsity of ``SPARSITIES``; all of IProX and every method at 0.5 are
    fine-tuned on, the other baselines' sparsities are scored for fidelity.
    """
    s = {
        "random": {"selector": "random"},
        "target (LESS)": {"selector": "model"},
        "representation (RDS+)": {"selector": "representation"},
        "IProX ipsvd+align 0.5": {"selector": "proxy", "proxy": "sparsity = 0.5\n" + ALIGN},
    }
    if quick and not baselines:
        return s
    for method, lines in METHODS.items():
        for sp in SPARSITIES:
            s[f"{method} {sp}"] = {"selector": "proxy", "proxy": f"sparsity = {sp}\n" + lines,
                                   "downstream": sp == 0.5 or method == "IProX ipsvd+align"}
    return s


def write_config(path: Path, out: Path, target: Path, pool: Path, val: Path, sel: dict, epochs: int, probe: int,
                 max_len: int) -> None:
    proxy = sel.get("proxy", "sparsity = 0.5\n")
    path.write_text(f"""[run]
out = "{out}"
model = "{target}"
selector = "{sel['selector']}"
seed = 0
[data]
pool = ["{pool}"]
validation = ["{val}"]
max_length = {max_len}
[proxy]
{proxy}probe_examples = {probe}
probe_tokens = 4096
batch_size = 2
[warmup]
fraction = 0.05
epochs = {epochs}
lr = 2e-5
[features]
proj_dim = 64
batch_size = 8
[score]
method = "tracin"
aggregate = "max"
[select]
fraction = 0.05
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--baselines", action="store_true",
                    help="quick mode: also every proxy baseline (svd, svd+align, layer-drop, unaligned ipsvd) at 0.3, 0.5 and 0.7")
    ap.add_argument("--only", nargs="+", default=None, metavar="SELECTOR",
                    help="run only these selectors (names as in the report; the target is always run)")
    ap.add_argument("--work", default="")
    ap.add_argument("--report", action="store_true",
                    help="only rewrite the BENCHMARKS.md section and plots from the mode's results JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    mode = "quick" if args.quick else "full"
    if args.report:
        stem = f"selection_{mode}"
        update_benchmarks_md(f"selection-{mode}", report(json.loads((RESULTS / f"{stem}.json").read_text()), stem))
        return
    work = Path(args.work or f"/tmp/iprox-bench-selection-{mode}")
    work.mkdir(parents=True, exist_ok=True)
    data = find_data()
    t_all = time.perf_counter()
    tasks = ["boolean_expressions", "hyperbaton"] if args.quick else ["boolean_expressions", "hyperbaton", "formal_fallacies"]
    n_gsm, per_task = (40, 5) if args.quick else (100, 10)
    n_val, n_test = 4, (24 if args.quick else 40)
    epochs = 1 if args.quick else 2
    max_len = 256 if args.quick else 320

    pool, pool_f, val_f, test_f, target = selection_data(work, data, tasks, n_gsm, per_task, n_val, n_test)

    sels = selectors(args.quick, args.baselines)
    if args.only:
        unknown = set(args.only) - set(sels)
        if unknown:
            raise SystemExit(f"unknown selector(s) {sorted(unknown)}; known: {list(sels)}")
        sels = {n: v for n, v in sels.items() if n in args.only or n == "target (LESS)"}
    runs: dict[str, dict] = {}
    for name, sel in sels.items():
        out = work / "runs" / slug(name)
        cfg = work / "configs" / f"{slug(name)}.toml"
        cfg.parent.mkdir(exist_ok=True)
        write_config(cfg, out, target, pool_f, val_f, sel, epochs, probe=16, max_len=max_len)
        log.info("selector %s", name)
        sh(IPROX + ["run", str(cfg), "--no-progress"], work / "log.txt")
        meta = json.loads((out / "pipeline.json").read_text())
        runs[name] = {"out": str(out), "timings": meta["timings"], "peak_rss_gib": meta["peak_rss_gib"]}

    # 1. Fidelity to the target's scores.
    ref = read_scores(Path(runs["target (LESS)"]["out"]) / "scores")
    fidelity = {}
    for name in sels:
        if name in ("target (LESS)",):
            continue
        rep, _, _ = score_agreement(ref, read_scores(Path(runs[name]["out"]) / "scores"))
        fidelity[name] = rep

    # 2. Downstream: per selector and task, fine-tune on the top 5% by that task's column.
    k = max(1, int(0.05 * len(pool)))
    down = downstream(work, target, pool_f, test_f, tasks,
                      {name: Path(runs[name]["out"]) / "scores" for name, v in sels.items() if v.get("downstream", True)},
                      k, max_len)

    results = {"mode": mode, "tasks": tasks, "pool": len(pool), "per_task_in_pool": per_task, "gsm8k_in_pool": n_gsm,
               "validation_per_task": n_val, "test_per_task": n_test, "top_k": k, "epochs": epochs,
               "only": sorted(sels) if args.only else None, "runs": runs, "fidelity": fidelity, "downstream": down, "total_seconds": time.perf_counter() - t_all}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"selection_{mode}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
    body = report(results, stem)
    print(body)
    update_benchmarks_md(f"selection-{mode}", body)


def report(r: dict, stem: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"## Selection, fine-tuning and cost (issue 6, {r['mode']} mode)", "",
             f"`benchmarks/bench_selection.py{' --quick' if r['mode'] == 'quick' else ''}`: target SmolLM2-135M-Instruct; "
             f"pool of {r['pool']} ({r['gsm8k_in_pool']} GSM8K train, {r['per_task_in_pool']} from each of the 20 BBH tasks); "
             f"target tasks {', '.join(r['tasks'])}, {r['validation_per_task']} validation and {r['test_per_task']} "
             f"held-out test examples each (neither in the pool); warm-up 5% of the pool, {r['epochs']} epoch(s); "
             f"top 5% = {r['top_k']} examples per task; LoRA fine-tune 3 epochs, lr 2e-4. The selection pipelines took "
             f"{sum(sum(v['timings'].values()) for v in r['runs'].values()) / 60:.0f} min in all."
             + (f" Run with `--only`: {len(r['runs'])} of the mode's selectors." if r.get("only") else ""),
             "", "### 1. Fidelity to the target's scores (all target tasks; max over subtasks)", "",
             "| selector | Spearman | Kendall | top-1% | top-5% | top-10% | " +
             " | ".join(f"Spearman {t}" for t in r["tasks"]) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(r["tasks"])]
    for name, v in r["fidelity"].items():
        o = v["overlap_at"]
        sub = [f"{v['subtasks'][t]['spearman']:.3f}" if t in v["subtasks"] else "–" for t in r["tasks"]]
        lines.append(f"| {name} | {v['spearman']:.3f} | {v['kendall']:.3f} | {o['1']['overlap']:.2f} | "
                     f"{o['5']['overlap']:.2f} | {o['10']['overlap']:.2f} | " + " | ".join(sub) + " |")
    lines += sweep_table(r)
    lines += ["", "### 2. Top 5% per task: share from the task, then held-out loss / exact-match accuracy after fine-tuning", "",
              "| selector | " + " | ".join(f"{t}: share, loss, acc" for t in r["tasks"]) + " |",
              "|---|" + "---|" * len(r["tasks"])]
    names = list(next(iter(r["downstream"].values())).keys())
    for name in names:
        cells = []
        for t in r["tasks"]:
            d = r["downstream"][t][name]
            share = "–" if d["share"] is None else f"{d['share']:.2f}"
            cells.append(f"{share}, {d['loss']:.3f}, {d['accuracy']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    base = 1 / 20 * r["per_task_in_pool"] * 20 / r["pool"]
    lines.append(f"\nA task's share of the pool is {base:.3f}; random selection draws about that.")
    # 3. Cost
    ref = r["runs"]["target (LESS)"]
    tot_ref = sum(ref["timings"].values())
    lines += ["", "### 3. Cost of each pipeline stage, as a ratio to the target-only pipeline (time; peak RSS)", "",
              "| selector | total time | proxy | warm-up | features | score | peak RSS |", "|---|---|---|---|---|---|---|"]
    for name, v in r["runs"].items():
        t = dict(v["timings"])
        cells = [f"{sum(t.values()) / tot_ref:.2f} ({sum(t.values()) / 60:.1f} min)"]
        if build_seconds(t):  # compress + align (one "proxy" stage before 0.5)
            t["proxy"] = build_seconds(t)
        for st in ("proxy", "warmup", "features", "score"):
            if st not in t:
                cells.append("–")
            elif st in ref["timings"] and ref["timings"][st] > 0:
                cells.append(f"{t[st] / ref['timings'][st]:.2f}")
            else:
                cells.append(f"{t[st]:.0f}s")
        peak = max(v["peak_rss_gib"].values())
        cells.append(f"{peak / max(ref['peak_rss_gib'].values()):.2f} ({peak:.1f} GiB)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    # Plots
    fig, axes = plt.subplots(1, 1 + len(r["tasks"]), figsize=(5 + 4.5 * len(r["tasks"]), max(4.2, 0.28 * len(r["fidelity"]))))
    fn = list(r["fidelity"])
    axes[0].barh(range(len(fn)), [r["fidelity"][n]["spearman"] for n in fn], color="tab:blue")
    axes[0].set_yticks(range(len(fn)), fn, fontsize=7)
    axes[0].set_xlabel("Spearman with the target's scores")
    axes[0].set_title("1. fidelity")
    for ax, t in zip(axes[1:], r["tasks"]):
        d = r["downstream"][t]
        ax.barh(range(len(names)), [d[n]["accuracy"] for n in names], color="tab:green")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("held-out exact-match accuracy after fine-tuning")
        ax.set_title(f"2. {t}")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=110)
    plt.close(fig)
    lines += ["", f"![fidelity and downstream accuracy](benchmarks/results/{stem}.png)"]
    if sweep_plot(r, RESULTS / f"{stem}_sparsity.png"):
        lines += ["", f"![fidelity against sparsity](benchmarks/results/{stem}_sparsity.png)"]
    return "\n".join(lines)


def sweep(r: dict) -> dict[str, dict[float, dict]]:
    """method → sparsity → fidelity report, for the proxy selectors named "<method> <sparsity>"."""
    out: dict[str, dict[float, dict]] = {}
    for name, v in r["fidelity"].items():
        method, _, sp = name.rpartition(" ")
        if method in METHODS:
            out.setdefault(method, {})[float(sp)] = v
    return out


def sweep_table(r: dict) -> list[str]:
    sw = sweep(r)
    sps = sorted({sp for m in sw.values() for sp in m})
    if len(sps) < 2:
        return []
    lines = ["", "Each proxy method against sparsity (fraction of parameters removed): Spearman with the target's "
             "scores, then top-5% overlap.", "",
             "| proxy method | " + " | ".join(f"{sp}" for sp in sps) + " |", "|---|" + "---|" * len(sps)]
    for method, by in sw.items():
        cells = [f"{by[sp]['spearman']:.3f}, {by[sp]['overlap_at']['5']['overlap']:.2f}" if sp in by else "–" for sp in sps]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def sweep_plot(r: dict, path: Path) -> bool:
    import matplotlib.pyplot as plt

    sw = sweep(r)
    if not any(len(by) > 1 for by in sw.values()):
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, by in sw.items():
        sps = sorted(by)
        axes[0].plot(sps, [by[sp]["spearman"] for sp in sps], marker="o", label=method)
        axes[1].plot(sps, [by[sp]["overlap_at"]["5"]["overlap"] for sp in sps], marker="o", label=method)
    for ax, what in zip(axes, ("Spearman with the target's scores", "top-5% overlap with the target")):
        ax.set_xlabel("sparsity (fraction of parameters removed)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("1. fidelity of each proxy method against sparsity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
