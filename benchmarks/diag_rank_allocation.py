"""Does spreading the kept parameters unevenly over the layers make a more faithful stage-1 proxy?

One probe (the fidelity study's: 16 pool examples, 4,096 tokens, balanced, seed 0) and one rank-free
IPSVD of every projection of the study's target, then stage-1 proxies (no alignment) at sparsity 0.5
under several rank allocations with about the same parameter count: ``uniform`` (every layer loses
half), ``influence`` (:func:`iprox.lowrank.allocate_ranks`: each rank unit to the layer whose IPSVD
error it lowers most per parameter), and linear depth profiles (:func:`iprox.lowrank.depth_ranks`,
``build-proxy --depth-slope``: a positive slope ``s`` keeps ``(1 − ρ)(1 + s)`` of the first block and
``(1 − ρ)(1 − s)`` of the last; a negative one the reverse, the upper blocks less compressed, as the
depth analysis of the fidelity study had suggested). Each is compared with the target on the study's
held-out examples by ``iprox fidelity``'s gradient check (factor-space gradient cosine per layer, KL).

    python benchmarks/diag_rank_allocation.py            # writes the "rank allocation" section
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import update_benchmarks_md  # noqa: E402

from iprox.data import load_examples, probe_split, tokenize_examples  # noqa: E402
from iprox.fidelity import gradient_fidelity  # noqa: E402
from iprox.lowrank import allocate_ranks, depth_ranks, rank_for_sparsity  # noqa: E402
from iprox.models import compressible_modules, count_parameters, load_model, projection_weight  # noqa: E402
from iprox.probe import collect_moments  # noqa: E402
from iprox.proxy import decompose_layers, factorize_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def block_of(name: str) -> int:
    return int(re.search(r"\.(\d+)\.", name).group(1))


def thirds(layers: dict, n_blocks: int) -> list[float]:
    vals = [[], [], []]
    for name, v in layers.items():
        vals[min(2, 3 * block_of(name) // n_blocks)].append(0.5 * (v["cos_A"] + v["cos_B"]))
    return [sum(v) / len(v) for v in vals]


def report(rows: dict, sparsity: float) -> None:
    lines = [
        "## Rank allocation: spreading a proxy's kept parameters over its layers (stage 1)",
        "",
        "`benchmarks/diag_rank_allocation.py`: stage-1 proxies (no alignment) of the fidelity study's target at "
        f"sparsity {sparsity:g}, one probe (seed 0) and one IPSVD per layer, under rank allocations with about the same "
        "parameter count; gradient check on the study's 12 held-out examples (as `iprox fidelity --proxy`). "
        "Kept: fraction of the blocks' projection parameters kept, first / middle / last third of the blocks.",
        "",
        "| allocation | proxy params | kept (thirds) | grad cosine (layer mean) | global | by third | KL |",
        "|---|---|---|---|---|---|---|",
    ]
    order = lambda n: (0, 0.0) if n == "uniform" else (1, 0.0) if n == "influence" else (2, float(n.split()[-1]))  # noqa: E731
    for name, r in sorted(rows.items(), key=lambda kv: order(kv[0])):
        lines.append(f"| {name} | {r['params'] / 1e6:.1f} M | {' / '.join(f'{k:.2f}' for k in r['kept_by_third'])} | "
                     f"{r['grad_cosine']:.3f} | {r['grad_cosine_global']:.3f} | "
                     f"{' / '.join(f'{c:.2f}' for c in r['thirds'])} | {r['kl']:.2f} |")
    update_benchmarks_md("rank-allocation", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity", help="bench_fidelity.py's work folder")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--slopes", type=float, nargs="+", default=[0.4, 0.6, 0.8])
    ap.add_argument("--only", nargs="*", default=None, help="allocations to run (default: all); earlier rows of "
                    "benchmarks/results/rank_allocation.json are kept")
    ap.add_argument("--report", action="store_true", help="only rewrite the section from the results JSON")
    args = ap.parse_args()
    out_json = RESULTS / "rank_allocation.json"
    if args.report:
        report(json.loads(out_json.read_text()), args.sparsity)
        return
    work = Path(args.work)
    torch.manual_seed(0)
    target, tok, _ = load_model(str(work / "target"), "float32", "cpu")
    mods = compressible_modules(target)
    shapes = {n: tuple(projection_weight(m).shape) for n, m in mods.items()}
    pool = load_examples([str(work / "pool.jsonl")])
    probe, _ = tokenize_examples(tok, [pool[i] for i in probe_split(len(pool), 0)[:16]], 320)
    t0 = time.perf_counter()
    moments = collect_moments(target, mods, probe, 4096, batch_size=1, pad_id=tok.pad_token_id, seed=0,
                              progress=False, balance="example")
    decs: dict = {}
    decompose_layers(mods, moments, 1e-3, "full", "float32", decs)
    del moments
    print(f"probe and decompositions: {time.perf_counter() - t0:.0f}s", flush=True)
    held, _ = tokenize_examples(tok, load_examples([str(work / "heldout.jsonl")]), 320)
    uniform = {n: rank_for_sparsity(m, k, args.sparsity) for n, (m, k) in shapes.items()}
    profiles = {"uniform": uniform,
                "influence": allocate_ranks({n: d.s for n, d in decs.items()}, shapes, args.sparsity)}
    n_blocks = max(block_of(n) for n in shapes) + 1
    blocks = {n: block_of(n) for n in shapes}
    for a in args.slopes:
        profiles[f"depth_slope {a:g}"] = depth_ranks(shapes, blocks, n_blocks, args.sparsity, a)
        profiles[f"depth_slope {-a:g}"] = depth_ranks(shapes, blocks, n_blocks, args.sparsity, -a)
    rows = json.loads(out_json.read_text()) if out_json.exists() and args.only else {}
    for name, ranks in profiles.items():
        if args.only and name not in args.only:
            continue
        proxy = copy.deepcopy(target)
        factorize_model(proxy, args.sparsity, "ipsvd", None, decompositions=decs, ranks=ranks)
        rep = gradient_fidelity(proxy, target, held, tok.pad_token_id, progress=False)
        rows[name] = {"params": count_parameters(proxy), "grad_cosine": rep["grad_cosine"],
                      "grad_cosine_global": rep["grad_cosine_global"], "kl": rep["kl"],
                      "thirds": thirds(rep["layers"], n_blocks),
                      "kept_by_third": [sum(ranks[n] * sum(shapes[n]) for n in shapes if min(2, 3 * block_of(n) // n_blocks) == t)
                                        / sum(shapes[n][0] * shapes[n][1] for n in shapes
                                              if min(2, 3 * block_of(n) // n_blocks) == t) for t in range(3)]}
        print(name, json.dumps(rows[name]), flush=True)
        del proxy
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(rows, indent=2))
    report(rows, args.sparsity)


if __name__ == "__main__":
    main()
