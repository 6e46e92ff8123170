"""Stage-1 benchmark: proxy size, build time and held-out loss of IPSVD against its baselines.

On the embedded SmolLM2-135M-Instruct, at sparsity 0.3, 0.5 and 0.7, for ``ipsvd``, ``svd`` and
``layer-drop`` (plus ``random`` at 0.5 as the no-information floor): proxy parameters, stage-1 time
(probe pass, shared by every IPSVD proxy built from it, plus factorisation), and held-out next-token
loss on response tokens of GSM8K test problems and BBH examples kept out of the probe set, beside
the target's own loss. A second table compares the full-ridge and skinny IPSVD forms when the probe
has fewer tokens than the widest layer (1536 inputs of the MLP down-projection).

Writes its section of ``BENCHMARKS.md``, ``benchmarks/results/stage1.json`` and
``benchmarks/results/stage1_loss.png``. Run with ``make bench`` (about 30 minutes on 2 CPU cores)
or ``--quick`` to check the script in a few minutes (quick runs leave ``BENCHMARKS.md`` alone).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import find_data, update_benchmarks_md  # noqa: E402

from iprox.data import load_examples, tokenize_examples  # noqa: E402
from iprox.evaluation import heldout_loss  # noqa: E402
from iprox.models import EMBEDDED_MODEL, compressible_modules, count_parameters, load_model  # noqa: E402
from iprox.probe import collect_moments  # noqa: E402
from iprox.data import probe_split  # noqa: E402
from iprox.proxy import drop_layers, factorize_model  # noqa: E402

log = logging.getLogger("bench_stage1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    ap.add_argument("--sparsities", default="0.3,0.5,0.7")
    ap.add_argument("--probe-examples", type=int, default=64)
    ap.add_argument("--probe-tokens", type=int, default=4096)
    ap.add_argument("--heldout", type=int, default=48, help="held-out examples per source (GSM8K, BBH)")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    if args.quick:
        args.probe_examples, args.probe_tokens, args.heldout, args.sparsities = 8, 512, 4, "0.5"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = find_data()

    t0 = time.perf_counter()
    model, tok, _ = load_model(EMBEDDED_MODEL)
    load_s = time.perf_counter() - t0
    pad = tok.pad_token_id

    # Pool: GSM8K train + all BBH tasks. Probe: a seeded slice of it. Held-out: GSM8K test problems
    # and BBH examples outside the probe slice, spread over the tasks.
    pool = load_examples([str(data / "gsm8k" / "train.jsonl"), str(data / "bbh" / "tasks")])
    order = probe_split(len(pool), seed=0)
    probe = [pool[i] for i in order[: args.probe_examples]]
    probe_ids = {e.id for e in probe}
    bbh_rest = [e for e in pool if e.source == "bbh" and e.id not in probe_ids]
    tasks = sorted({e.task for e in bbh_rest})
    per_task = {t: [e for e in bbh_rest if e.task == t][-10:] for t in tasks}   # tail of each file
    bbh_held = [per_task[t][k] for k in range(10) for t in tasks if k < len(per_task[t])][: args.heldout]
    gsm_held = load_examples(str(data / "gsm8k" / "test.jsonl"))[: args.heldout]
    held = {"gsm8k": tokenize_examples(tok, gsm_held, args.max_length)[0],
            "bbh": tokenize_examples(tok, bbh_held, args.max_length)[0]}
    probe_tok, _ = tokenize_examples(tok, probe, args.max_length)

    def evaluate(m) -> dict[str, float]:
        t = time.perf_counter()
        res = {k: heldout_loss(m, v, 8, pad, progress=False)["token_loss"] for k, v in held.items()}
        log.info("evaluated in %.0fs: %s", time.perf_counter() - t, res)
        return res

    rows = []
    target_params = count_parameters(model)
    rows.append({"method": "target", "sparsity": 0.0, "params": target_params, "probe_s": 0.0,
                 "factorise_s": 0.0, **evaluate(model)})

    mods = compressible_modules(model)
    t = time.perf_counter()
    moments = collect_moments(model, mods, probe_tok, args.probe_tokens, batch_size=4, pad_id=pad, progress=True)
    probe_s = time.perf_counter() - t
    n_tokens = next(iter(moments.values())).n_tokens
    log.info("probe: %d examples, %d tokens, %.0fs", len(probe_tok), n_tokens, probe_s)

    def build(method: str, rho: float, mom=None, form="full"):
        m = copy.deepcopy(model)
        t = time.perf_counter()
        if method == "layer-drop":
            drop_layers(m, rho)
        else:
            factorize_model(m, rho, method, mom, ipsvd_form=form, seed=0)
        return m, time.perf_counter() - t

    for rho in sparsities:
        for method in ["ipsvd", "svd", "layer-drop"] + (["random"] if rho == 0.5 else []):
            m, fac_s = build(method, rho, moments)
            rows.append({"method": method, "sparsity": rho, "params": count_parameters(m),
                         "probe_s": probe_s if method == "ipsvd" else 0.0, "factorise_s": fac_s, **evaluate(m)})
            del m

    # Full-ridge vs skinny when the probe has fewer tokens than the widest layer's inputs.
    del moments
    few = min(1024, args.probe_tokens)
    few_ex = probe_tok[: max(1, args.probe_examples // 4)]
    t = time.perf_counter()
    few_moments = collect_moments(model, mods, few_ex, few, batch_size=4, pad_id=pad, progress=True)
    few_probe_s = time.perf_counter() - t
    few_tokens = next(iter(few_moments.values())).n_tokens
    form_rows = []
    for form in ["full", "skinny"]:
        m, fac_s = build("ipsvd", 0.5, few_moments, form)
        form_rows.append({"form": form, "sparsity": 0.5, "probe_tokens": few_tokens, "probe_examples": len(few_ex),
                          "probe_s": few_probe_s, "factorise_s": fac_s, **evaluate(m)})
        del m

    results = {"model": EMBEDDED_MODEL, "load_s": load_s, "probe_examples": len(probe_tok),
               "probe_tokens": n_tokens, "heldout": {k: len(v) for k, v in held.items()},
               "max_length": args.max_length, "rows": rows, "form_rows": form_rows,
               "torch_threads": torch.get_num_threads(), "quick": args.quick}
    (out_dir / "stage1.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out_dir / "stage1_loss.png")
    if not args.quick:  # quick runs check the script; they never overwrite the committed report
        update_benchmarks_md("stage1", render(results))
    print(render(results))


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    target = next(r for r in res["rows"] if r["method"] == "target")
    for ax, src in zip(axes, ["gsm8k", "bbh"]):
        for method, style in [("ipsvd", "o-"), ("svd", "s--"), ("layer-drop", "^:")]:
            pts = sorted((r["sparsity"], r[src]) for r in res["rows"] if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), style, label=method)
        ax.axhline(target[src], color="k", lw=1, label="target")
        ax.set_title(f"held-out loss, {src} ({res['heldout'][src]} examples)")
        ax.set_xlabel("sparsity (fraction of projection parameters removed)")
        ax.set_ylabel("response-token loss (nats)")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(f"Stage-1 proxies of {res['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(res: dict) -> str:
    lines = [
        "## Stage 1: proxy construction (IPSVD against its baselines)",
        "",
        f"Target `{res['model']}` on CPU ({res['torch_threads']} threads). Probe set: {res['probe_examples']} examples "
        f"drawn from GSM8K train + 20 BBH tasks, {res['probe_tokens']} sampled token positions. Held-out: "
        f"{res['heldout']['gsm8k']} GSM8K test problems and {res['heldout']['bbh']} BBH examples outside the probe set "
        f"(max length {res['max_length']}). Loss: mean next-token cross-entropy over response tokens. "
        f"Stage-1 time = probe pass (shared by all IPSVD proxies of one probe set) + factorisation; "
        f"loading the target took {res['load_s']:.0f}s and is not included."
        + (" **Quick mode: sizes too small to read anything into.**" if res["quick"] else ""),
        "",
        "| method | sparsity | params | % of target | probe s | factorise s | stage-1 s | GSM8K loss | BBH loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tp = res["rows"][0]["params"]
    for r in res["rows"]:
        lines.append(f"| {r['method']} | {r['sparsity']:g} | {r['params']:,} | {100 * r['params'] / tp:.1f}% | "
                     f"{r['probe_s']:.0f} | {r['factorise_s']:.0f} | {r['probe_s'] + r['factorise_s']:.0f} | "
                     f"{r['gsm8k']:.3f} | {r['bbh']:.3f} |")
    lines += ["", "![held-out loss against sparsity](benchmarks/results/stage1_loss.png)", "",
              "IPSVD form with fewer probe tokens than the widest layer is wide (sparsity 0.5):", "",
              "| form | probe examples | probe tokens | GSM8K loss | BBH loss |", "|---|---|---|---|---|"]
    for r in res["form_rows"]:
        lines.append(f"| {r['form']} | {r['probe_examples']} | {r['probe_tokens']} | {r['gsm8k']:.3f} | {r['bbh']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
