"""Stage-2 benchmark: gradient fidelity before and after alignment, step cost, peak memory.

On the embedded SmolLM2-135M-Instruct at sparsity 0.5, for IPSVD and plain-SVD initialisation:
the factor-space gradient cosine and the target-to-proxy KL on held-out examples (GSM8K test and BBH
examples outside the probe and alignment sets) before and after a short alignment run; the time of
one alignment step against one target forward+backward on the same batch, timed side by side; and
the process's peak resident memory.

Writes its section of ``BENCHMARKS.md``, ``benchmarks/results/stage2.json`` and
``benchmarks/results/stage2_alignment.png``. ``--quick`` checks the script in a few minutes and
leaves ``BENCHMARKS.md`` alone.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import find_data, update_benchmarks_md  # noqa: E402

from iprox.align_objective import alignment_loss, layer_pairs  # noqa: E402
from iprox.alignment import AlignSettings, run_alignment  # noqa: E402
from iprox.data import collate, load_examples, tokenize_examples  # noqa: E402
from iprox.evaluation import per_example_loss  # noqa: E402
from iprox.fidelity import gradient_fidelity  # noqa: E402
from iprox.models import EMBEDDED_MODEL, compressible_modules, load_model  # noqa: E402
from iprox.probe import collect_moments  # noqa: E402
from iprox.data import probe_split  # noqa: E402
from iprox.proxy import factorize_model  # noqa: E402

log = logging.getLogger("bench_stage2")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports KiB


def time_side_by_side(target, proxy, enc, repeats: int) -> dict[str, float]:
    """Median seconds of a target forward+backward (all weights) and of one alignment step."""
    pairs = layer_pairs(proxy, target)
    params = [t for p in pairs for t in (p.proxy.A.weight, p.proxy.B.weight)]
    opt = torch.optim.AdamW(params, lr=0.0)   # lr 0: the timing does not change the proxy
    t_fb, t_step = [], []
    proxy.set_attn_implementation("eager")
    for _ in range(repeats):
        for p in target.parameters():
            p.requires_grad_(True)
        t0 = time.perf_counter()
        logits = target(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        per_example_loss(logits, enc["labels"]).mean().backward()
        t_fb.append(time.perf_counter() - t0)
        target.zero_grad(set_to_none=True)
        for p in target.parameters():
            p.requires_grad_(False)
        for pr in pairs:
            pr.target.weight.requires_grad_(True)
        for p in params:
            p.requires_grad_(True)
        t0 = time.perf_counter()
        loss, _, _ = alignment_loss(proxy, target, pairs, enc, 0.1, 2.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_step.append(time.perf_counter() - t0)
        for pr in pairs:
            pr.target.weight.grad = None
    for p in target.parameters():
        p.requires_grad_(False)
    return {"target_fwd_bwd_s": statistics.median(t_fb), "align_step_s": statistics.median(t_step)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default=EMBEDDED_MODEL, help="target (a tiny model folder checks the script fast)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--probe-examples", type=int, default=32)
    ap.add_argument("--probe-tokens", type=int, default=2048)
    ap.add_argument("--align-examples", type=int, default=32)
    ap.add_argument("--align-steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4, help="the paper's learning rate")
    ap.add_argument("--lambda-kl", type=float, default=0.1)
    ap.add_argument("--heldout", type=int, default=8, help="held-out examples per source")
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.quick:
        args.probe_examples, args.probe_tokens, args.align_examples, args.align_steps, args.heldout = 4, 256, 4, 2, 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = find_data()

    target, tok, _ = load_model(args.model)
    for p in target.parameters():
        p.requires_grad_(False)
    pad = tok.pad_token_id
    pool = load_examples([str(data / "gsm8k" / "train.jsonl"), str(data / "bbh" / "tasks")])
    order = probe_split(len(pool), seed=0)
    probe = [pool[i] for i in order[: args.probe_examples]]
    align = [pool[i] for i in order[args.probe_examples : args.probe_examples + args.align_examples]]
    used = {e.id for e in probe + align}
    bbh_rest = [e for e in pool if e.source == "bbh" and e.id not in used]
    held = (load_examples(str(data / "gsm8k" / "test.jsonl"))[: args.heldout]
            + [bbh_rest[i] for i in range(0, len(bbh_rest), max(1, len(bbh_rest) // args.heldout))][: args.heldout])
    probe_t = tokenize_examples(tok, probe, args.max_length)[0]
    align_t = tokenize_examples(tok, align, args.max_length)[0]
    held_t = tokenize_examples(tok, held, args.max_length)[0]

    t0 = time.perf_counter()
    moments = collect_moments(target, compressible_modules(target), probe_t, args.probe_tokens,
                              batch_size=args.batch_size, pad_id=pad, progress=False)
    probe_s = time.perf_counter() - t0
    timing_batch = collate(align_t[: args.batch_size], pad)

    runs = []
    curves = {}
    for init in ["ipsvd", "svd"]:
        proxy = copy.deepcopy(target)
        factorize_model(proxy, args.sparsity, init, moments if init == "ipsvd" else None)
        before = gradient_fidelity(proxy, target, held_t, pad, progress=False)
        log.info("%s before: cos %.4f kl %.4f", init, before["grad_cosine"], before["kl"])
        timing = time_side_by_side(target, proxy, timing_batch, repeats=1 if args.quick else 3)
        settings = AlignSettings(steps=args.align_steps, batch_size=args.batch_size, grad_accum=1, lr=args.lr,
                                 weight_decay=0.01, lambda_kl=args.lambda_kl, temperature=2.0,
                                 checkpoint_every=args.align_steps, seed=0)
        run_dir = out_dir / f"stage2_{init}_run"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        t0 = time.perf_counter()
        res = run_alignment(proxy, target, align_t, settings, run_dir, pad, progress=False)
        align_s = time.perf_counter() - t0
        with open(run_dir / "align_log.csv", newline="") as f:
            curves[init] = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        shutil.rmtree(run_dir, ignore_errors=True)
        after = gradient_fidelity(proxy, target, held_t, pad, progress=False)
        log.info("%s after: cos %.4f kl %.4f", init, after["grad_cosine"], after["kl"])
        runs.append({"init": init, "layers": len(before["layers"]), "before": {k: before[k] for k in ("grad_cosine", "grad_cosine_global", "kl")},
                     "after": {k: after[k] for k in ("grad_cosine", "grad_cosine_global", "kl")},
                     "align_seconds": align_s, "steps": args.align_steps, **timing,
                     "step_over_fwd_bwd": timing["align_step_s"] / timing["target_fwd_bwd_s"],
                     "final": {k: res[k] for k in ("loss", "grad_align", "kl")}})
        del proxy
        # Partial results survive a crash later in the run.
        (out_dir / "stage2_partial.json").write_text(json.dumps(runs, indent=2) + "\n")
    results = {"model": args.model, "sparsity": args.sparsity, "probe_examples": len(probe_t),
               "probe_s": probe_s, "align_examples": len(align_t), "heldout": len(held_t),
               "batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr,
               "lambda_kl": args.lambda_kl, "runs": runs, "curves": curves, "peak_rss_gib": peak_rss_gib(),
               "quick": args.quick, "torch_threads": torch.get_num_threads()}
    (out_dir / "stage2.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "stage2_partial.json").unlink(missing_ok=True)
    plot(results, out_dir / "stage2_alignment.png")
    if not args.quick:
        update_benchmarks_md("stage2", render(results))
    print(render(results))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for init, rows in res["curves"].items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["grad_align"] for r in rows], label=init)
        axes[1].plot(steps, [r["kl"] for r in rows], label=init)
    axes[0].set_title("L_GA (1 - mean factor-space cosine), training batches")
    axes[1].set_title("L_KL (tau^2-scaled), training batches")
    for ax in axes:
        ax.set_xlabel("alignment step")
        ax.legend()
    fig.suptitle(f"Stage-2 alignment of {res['model']} proxies, sparsity {res['sparsity']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(res: dict) -> str:
    lines = [
        "## Stage 2: alignment (gradient fidelity before and after)",
        "",
        f"Target `{res['model']}`, proxies at sparsity {res['sparsity']}. Probe: {res['probe_examples']} examples; "
        f"alignment: {res['align_examples']} examples, {res['runs'][0]['steps']} steps of batch {res['batch_size']} "
        f"(lr {res['lr']}, lambda_KL {res['lambda_kl']}, tau 2, max length {res['max_length']}). Fidelity on "
        f"{res['heldout']} held-out examples (GSM8K test + BBH outside probe and alignment sets), one example at a "
        f"time: gradient cosine = mean over the {res['runs'][0]['layers']} layers of (cos(g_A, G B^T) + cos(g_B, A^T G))/2; global = cosine of "
        f"all layers' factor-space gradients concatenated; KL(target || proxy) per response token at tau 1."
        + (" **Quick mode: sizes too small to read anything into.**" if res["quick"] else ""),
        "",
        "| init | cos before | cos after | global cos before | global cos after | KL before | KL after | align s | step / target fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['init']} | {b['grad_cosine']:.4f} | {a['grad_cosine']:.4f} | {b['grad_cosine_global']:.4f} | "
                     f"{a['grad_cosine_global']:.4f} | {b['kl']:.4f} | {a['kl']:.4f} | {r['align_seconds']:.0f} | "
                     f"{r['step_over_fwd_bwd']:.2f}x ({r['align_step_s']:.1f}s / {r['target_fwd_bwd_s']:.1f}s) |")
    lines += ["", f"Peak resident memory of the benchmark process (target + one proxy + alignment graph, CPU): "
              f"{res['peak_rss_gib']:.1f} GiB.", "", "![alignment curves](benchmarks/results/stage2_alignment.png)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
