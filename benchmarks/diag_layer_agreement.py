"""Where along the depth the proxy's scores part from the target's: TracIn recomputed from one third
of the decoder blocks at a time, in runs of the fidelity study.

For each run and each third of the blocks (first, middle, last), the score of a pool example for a
task is the mean over the task's validation examples of the cosine between their feature vectors
restricted to those blocks' dimensions (the scores stage's TracIn, on a slice of the store). Reported
per target task: Spearman over the pool between the run's slice score and the target's full score,
and between the target's own slice score and its full score (how much that third decides the
target's ranking). The slices compare across runs because both stores project each layer by a seed
of its own.

Reads ``<work>/runs/<name>/features/{train,val}-1`` of ``bench_fidelity.py``'s work folder (the
shards directly, so stores of the older format 1 read as well); writes the "layers" section of
BENCHMARKS.md and ``benchmarks/results/layer_agreement.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import update_benchmarks_md  # noqa: E402

from iprox.agreement import head_spearman, spearman  # noqa: E402

TASKS = ["boolean_expressions", "hyperbaton", "formal_fallacies"]
THIRDS = ("first", "middle", "last", "all")


def read_store(folder: Path) -> tuple[list[str], torch.Tensor, dict]:
    man = json.loads((folder / "manifest.json").read_text())
    X = torch.cat([load_file(str(folder / sh["file"]))["features"] for sh in man["shards"]]).double()
    return man["ids"], X, man


def block_of(name: str) -> int:
    parts = name.replace("base_model.model.", "").split(".")
    return int(parts[parts.index("layers") + 1])


def slice_scores(run: Path) -> tuple[list[str], dict[str, dict[str, list[float]]]]:
    """{third: {task: per-example score}} of a run's first checkpoint."""
    ids, X, man = read_store(run / "features" / "train-1")
    _, V, vman = read_store(run / "features" / "val-1")
    blocks = sorted({block_of(L["name"]) for L in man["layout"]})
    n = len(blocks)
    out = {}
    for third in THIRDS:
        keep = blocks if third == "all" else blocks[THIRDS.index(third) * n // 3:(THIRDS.index(third) + 1) * n // 3]
        idx = torch.cat([torch.arange(L["offset"], L["offset"] + L["k_out"] * L["k_in"])
                         for L in man["layout"] if block_of(L["name"]) in keep])
        Xs, Vs = X[:, idx], V[:, idx]
        Xs = Xs / Xs.norm(dim=1, keepdim=True).clamp_min(1e-30)
        Vs = Vs / Vs.norm(dim=1, keepdim=True).clamp_min(1e-30)
        S = Xs @ Vs.T
        out[third] = {t: S[:, [i for i, x in enumerate(vman["tasks"]) if x == t]].mean(1).tolist() for t in TASKS}
    return ids, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity")
    ap.add_argument("--runs", nargs="+", default=["target-s1", "target-first-s0", "target-first-s1", "proxy-first-s0"])
    args = ap.parse_args()
    runs = Path(args.work) / "runs"
    t_ids, target = slice_scores(runs / "target-s0")
    res = {"target's own thirds": {th: {t: spearman(target[th][t], target["all"][t]) for t in TASKS} for th in THIRDS}}
    for name in args.runs:
        if not (runs / name / "features" / "val-1").exists():
            print(f"skipping {name}: no features")
            continue
        ids, s = slice_scores(runs / name)
        assert ids == t_ids, name
        res[name] = {th: {t: spearman(s[th][t], target["all"][t]) for t in TASKS} for th in THIRDS}
        res[name + " (head)"] = {th: {t: head_spearman(target["all"][t], s[th][t], 0.2) for t in TASKS} for th in THIRDS}
    out = ROOT / "benchmarks" / "results" / "layer_agreement.json"
    out.write_text(json.dumps(res, indent=2))
    lines = ["## Where along the depth the proxy's scores part from the target's (issue 12)", "",
             "`benchmarks/diag_layer_agreement.py` on the fidelity study's runs: TracIn from one third of the 30 decoder "
             "blocks at a time (first checkpoint), against the target's full score (seed 0). Spearman over the pool per "
             "task (boolean_expressions / hyperbaton / formal_fallacies); \"(head)\": over the target's top 20%. The "
             "first row is the target's own thirds against its full score: how much each third decides its ranking.", "",
             "| run | " + " | ".join(f"blocks: {th}" for th in THIRDS) + " |", "|---|" + "---|" * len(THIRDS)]
    for name, rows in res.items():
        lines.append(f"| {name} | " + " | ".join(" / ".join(f"{rows[th][t]:.2f}" for t in TASKS) for th in THIRDS) + " |")
    body = "\n".join(lines)
    print(body)
    update_benchmarks_md("layers", body)


if __name__ == "__main__":
    main()
