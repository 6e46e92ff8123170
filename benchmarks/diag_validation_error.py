"""Where the proxy's score error comes from: its pool features against its validation gradients.

For a run of ``bench_fidelity.py`` at seed 0 in the target-first order (its proxy carries the same
LoRA checkpoint as the reference target ``target-s0``, so their stores share coordinates, layer by
layer), prints: the per-example cosine of the proxy's pool features with the target's (per source)
and of its validation gradients; the whole-pool Spearman of proxy-pool × target-validation and
target-pool × proxy-validation scores against the target's; and the split of the proxy's score
``<x_p, v_p>`` into ``<x_t, v_t>`` and the error terms, with each term's spread over the pool and its
GSM8K-minus-BBH mean. (The figures of BENCHMARKS.md, "validation model".)

    python benchmarks/diag_validation_error.py 0.6_default__sparsity_0.3-s0 0.6_default__sparsity_0.7-s0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from diag_layer_agreement import TASKS, read_store  # noqa: E402

from iprox.agreement import spearman  # noqa: E402
from iprox.loading import canonical_name  # noqa: E402


def stores(run: Path, order: list[str] | None = None):
    """(manifest, pool rows, val manifest, val rows) of a run's first checkpoint, unit rows, columns
    in ``order``'s layer order (canonical names)."""
    _, X, man = read_store(run / "features" / "train-1")
    _, V, vman = read_store(run / "features" / "val-1")
    spans = {canonical_name(L["name"]): (L["offset"], L["k_out"] * L["k_in"]) for L in man["layout"]}
    names = order or list(spans)
    idx = torch.cat([torch.arange(spans[n][0], spans[n][0] + spans[n][1]) for n in names])
    unit = lambda A: A[:, idx] / A[:, idx].norm(dim=1, keepdim=True).clamp_min(1e-30)  # noqa: E731
    return man, unit(X), vman, unit(V), names


def task_scores(X, V, vtasks):
    return {t: X @ V[[i for i, x in enumerate(vtasks) if x == t]].mean(0) for t in TASKS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity")
    args = ap.parse_args()
    runs = Path(args.work) / "runs"
    tman, Xt, tvman, Vt, names = stores(runs / "target-s0")
    T = task_scores(Xt, Vt, tvman["tasks"])
    for name in args.runs:
        man, Xp, vman, Vp, _ = stores(runs / name, names)
        assert man["ids"] == tman["ids"] and vman["ids"] == tvman["ids"]
        src = man["sources"]
        cos = (Xp * Xt).sum(1)
        print(f"{name}: pool feature cosine with the target", {s: round(float(cos[[i for i, x in enumerate(src) if x == s]].mean()), 3)
                                                             for s in sorted(set(src))},
              "validation", [round(float(c), 3) for c in (Vp * Vt).sum(1)])
        for label, (A, B) in {"proxy pool x proxy val": (Xp, Vp), "proxy pool x target val": (Xp, Vt),
                              "target pool x proxy val": (Xt, Vp)}.items():
            S = task_scores(A, B, vman["tasks"])
            print(f"  {label:<24}", " / ".join(f"{spearman(S[t].tolist(), T[t].tolist()):.2f}" for t in TASKS))
        g = [i for i, s in enumerate(src) if s == "gsm8k"]
        b = [i for i, s in enumerate(src) if s != "gsm8k"]
        for t in TASKS:
            j = [i for i, x in enumerate(vman["tasks"]) if x == t]
            vp, vt = Vp[j].mean(0), Vt[j].mean(0)
            dx, dv = Xp - Xt, vp - vt
            terms = {"<xt,vt>": Xt @ vt, "<xt,dv>": Xt @ dv, "<dx,vt>": dx @ vt, "<dx,dv>": dx @ dv}
            print(f"  {t:<20}", "  ".join(f"{k} sd {float(v.std()):.4f} gsm8k-bbh {float(v[g].mean() - v[b].mean()):+.4f}"
                                          for k, v in terms.items()))


if __name__ == "__main__":
    main()
