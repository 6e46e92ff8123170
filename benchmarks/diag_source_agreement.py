"""Which part of the pool the proxy's whole-pool ranking loses: agreement with the target within each
pool source, where each source sits in the ranking, and how faithful the proxy's gradients are on
each source's examples.

The fidelity study's pool mixes sources of very different shape (GSM8K: a question and a ~130-token
worked answer; BBH: a question and a few-token answer). Whole-pool Spearman counts both the order
inside each source and the order *between* them. For each run of ``bench_fidelity.py`` and each
target task this reports:

* Spearman with the target (seed 0) over the whole pool and within each source;
* each source's mean percentile in the run's ranking, beside the target's;
* with ``--gradcos N``: the held-out gradient cosine (``iprox fidelity``'s all-layer figure) and the
  response-token KL on N pool examples of each source, seeded (the proxy runs only).

Reads ``<work>/runs/<name>/scores`` and, for the gradient check, ``<work>/target`` and the runs'
``proxy/`` folders; writes the "sources" section of BENCHMARKS.md and
``benchmarks/results/source_agreement.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import update_benchmarks_md  # noqa: E402

from iprox.agreement import spearman  # noqa: E402
from iprox.loading import read_scores  # noqa: E402

TASKS = ["boolean_expressions", "hyperbaton", "formal_fallacies"]


def percentile(scores: np.ndarray) -> np.ndarray:
    """Each example's rank in [0, 1] (1: the top of the ranking)."""
    order = scores.argsort(kind="stable")
    out = np.empty(len(scores))
    out[order] = np.arange(len(scores)) / max(1, len(scores) - 1)
    return out


def by_source(rows: list[dict], ref: list[dict]) -> dict:
    """Per task: whole-pool and within-source Spearman against ``ref``, and mean percentiles."""
    ids = [r["id"] for r in ref]
    mine = {r["id"]: r for r in rows}
    src = np.array([r["source"] for r in ref])
    out = {}
    for t in TASKS:
        a = np.array([float(r[t]) for r in ref])
        b = np.array([float(mine[i][t]) for i in ids])
        pa, pb = percentile(a), percentile(b)
        out[t] = {"whole": spearman(a, b),
                  "within": {s: spearman(a[src == s], b[src == s]) for s in sorted(set(src))},
                  "percentile": {s: [float(pa[src == s].mean()), float(pb[src == s].mean())] for s in sorted(set(src))}}
    return out


def gradient_by_source(work: Path, run: str, n: int, max_length: int) -> dict:
    """All-layer gradient cosine and KL of a run's proxy on ``n`` seeded pool examples per source."""
    from iprox.data import load_examples, tokenize_examples
    from iprox.fidelity import gradient_fidelity
    from iprox.loading import load_model_or_proxy

    target, tok = load_model_or_proxy(str(work / "target"))
    proxy, _ = load_model_or_proxy(str(work / "runs" / run / "proxy"))
    pool = load_examples(str(work / "runs" / run / "pool" / "pool.jsonl"))
    out = {}
    for source in sorted({e.source for e in pool}):
        picked = random.Random(1).sample([e for e in pool if e.source == source], n)
        tokd, _ = tokenize_examples(tok, picked, max_length)
        rep = gradient_fidelity(proxy, target, tokd, tok.pad_token_id, progress=False)
        out[source] = {"grad_cosine": rep["grad_cosine_global"], "kl": rep["kl"],
                       "response_tokens": float(np.mean([t.n_response_tokens for t in tokd])), "n": len(tokd)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity")
    ap.add_argument("--runs", nargs="+", default=["target-s1", "target-s2", "target-first-s0", "target-first-s1",
                                                   "target-first-s2", "proxy-first-s0", "align_0_steps-s0",
                                                   "target-first_0.3-s0"])
    ap.add_argument("--gradcos", type=int, default=0, metavar="N", help="gradient check on N examples per source")
    ap.add_argument("--max-length", type=int, default=320)
    args = ap.parse_args()
    work = Path(args.work)
    res_path = ROOT / "benchmarks" / "results" / "source_agreement.json"
    res = json.loads(res_path.read_text()) if res_path.exists() else {}
    ref = read_scores(work / "runs" / "target-s0" / "scores")
    for run in args.runs:
        folder = work / "runs" / run
        if not (folder / "scores" / "COMPLETE").exists():
            print(f"skipping {run}: no finished scores")
            continue
        rec = res.get(run, {})
        rec["agreement"] = by_source(read_scores(folder / "scores"), ref)
        if args.gradcos and (folder / "proxy").is_dir() and "gradient" not in rec:
            rec["gradient"] = gradient_by_source(work, run, args.gradcos, args.max_length)
        res[run] = rec
        res_path.parent.mkdir(parents=True, exist_ok=True)
        res_path.write_text(json.dumps(res, indent=2))
    update_benchmarks_md("sources", report(res))


def report(res: dict) -> str:
    sources = sorted(next(iter(res.values()))["agreement"][TASKS[0]]["within"])
    lines = ["## Which part of the pool the proxy's ranking loses (issue 12)", "",
             "`benchmarks/diag_source_agreement.py` on the fidelity study's runs, against the target (seed 0). Per task "
             "(boolean_expressions / hyperbaton / formal_fallacies): Spearman over the whole pool and within each pool "
             "source; each source's mean percentile in the run's ranking (1 = top), the target's in brackets.", "",
             "| run | whole pool | " + " | ".join(f"within {s}" for s in sources) + " | "
             + " | ".join(f"{s} percentile" for s in sources) + " |",
             "|---|---|" + "---|" * (2 * len(sources))]
    for run, rec in res.items():
        ag = rec["agreement"]
        cells = [" / ".join(f"{ag[t]['whole']:.2f}" for t in TASKS)]
        cells += [" / ".join(f"{ag[t]['within'][s]:.2f}" for t in TASKS) for s in sources]
        cells += [" / ".join(f"{ag[t]['percentile'][s][1]:.2f} ({ag[t]['percentile'][s][0]:.2f})" for t in TASKS)
                  for s in sources]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    grads = {run: rec["gradient"] for run, rec in res.items() if "gradient" in rec}
    if grads:
        first = next(iter(grads.values()))
        n_tok = {s: first[s]["response_tokens"] for s in sources}
        lines += ["", "Gradient fidelity per source (`iprox fidelity`'s all-layer cosine of the proxy's factor gradients "
                  f"with the target's, and the response-token KL, on {first[sources[0]]['n']} seeded pool examples of each source; mean response "
                  "tokens: " + ", ".join(f"{s} {n_tok[s]:.0f}" for s in sources) + ").", "",
                  "| run | " + " | ".join(f"{s}: grad cos / KL" for s in sources) + " |", "|---|" + "---|" * len(sources)]
        for run, g in grads.items():
            lines.append(f"| {run} | " + " | ".join(f"{g[s]['grad_cosine']:.3f} / {g[s]['kl']:.2f}" for s in sources) + " |")
    body = "\n".join(lines)
    print(body)
    return body


if __name__ == "__main__":
    main()
