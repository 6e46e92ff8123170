"""Gradient-feature benchmark: Kronecker against dense, proxies against the target, store size, fidelity
of the fast path to the reference.

On the embedded SmolLM2-135M-Instruct with a pool of GSM8K train problems and BBH examples:

1. Target, LoRA warm-up checkpoint: featurise the pool with the Kronecker engine (factored Adam)
   and with the dense LESS-style per-example loop (elementwise Adam), same K, in one run; examples/s,
   peak memory during the stage, bytes per example; then TracIn scores from each against the same
   validation features, and their rank agreement over the pool. Kronecker without any
   preconditioner is scored too, to show what the factored Adam buys.
2. The cost floor: a plain forward+backward of the same batches, timed interleaved with the Kronecker
   engine.
3. IPSVD proxies (stage 1) at sparsity 0.3, 0.5, 0.7, warm-up training their factors: Kronecker
   examples/s against the target's, and agreement of their scores with the target's reference. At
   0.5 also LoRA on the proxy's factors, the alternative warm-up.

Writes its section of ``BENCHMARKS.md``, ``benchmarks/results/features.json`` and PNGs.
``--quick`` runs a small version and leaves ``BENCHMARKS.md`` alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import find_data, update_benchmarks_md  # noqa: E402

from iprox.agreement import kendall, overlap_at, spearman  # noqa: E402
from iprox.data import batches, collate, load_examples, tokenize_examples  # noqa: E402
from iprox.features import FeatureConfig, compute_features  # noqa: E402
from iprox.loading import read_manifest  # noqa: E402
from iprox.models import EMBEDDED_MODEL, load_model  # noqa: E402
from iprox.monitor import PeakRSS  # noqa: E402
from iprox.projection import KroneckerEngine, feature_modules, make_preconditioners, make_projections  # noqa: E402
from iprox.projection import _loss_sum  # noqa: E402
from iprox.proxy import ProxyConfig, build_proxy, load_proxy  # noqa: E402
from iprox.scores import ScoreConfig, compute_scores  # noqa: E402
from iprox.loading import load_checkpoint  # noqa: E402
from iprox.warmup import WarmupConfig, run_warmup  # noqa: E402

log = logging.getLogger("bench_features")
RESULTS = ROOT / "benchmarks" / "results"


def featurise(name: str, results: dict, **kw) -> str:
    with PeakRSS() as mem:
        compute_features(FeatureConfig(progress=False, **kw))
    man = read_manifest(kw["out"])
    t = man["timing"]
    rate = t["rank0_examples"] / t["rank0_seconds"] if t["rank0_seconds"] else float("nan")
    results["stores"][name] = {"examples_per_s": rate, "seconds": t["rank0_seconds"], "n": man["n_examples"],
                               "dim": man["dim"], "bytes_per_example": man["bytes_per_example"],
                               "peak_rss_gib": mem.peak, "engine": man["engine"], "grad": man["grad"]}
    log.info("%s: %.2f examples/s, dim %d, peak %.2f GiB", name, rate, man["dim"], mem.peak)
    return kw["out"]


def scores_of(train: str, val: str) -> list[float]:
    res = compute_scores(ScoreConfig(train=[train], val=[val], out="unused"))
    return res.score.tolist()


def agreement(a, b) -> dict:
    return {"spearman": spearman(a, b), "kendall": kendall(a, b),
            "overlap_at": {str(p): overlap_at(a, b, p) for p in (1, 5, 10)}}


def time_floor(spec: str, checkpoint: str, items, pad_id: int, proj_dim: int, repeats: int) -> dict:
    """Median seconds per batch: plain forward+backward vs the Kronecker engine, interleaved."""
    ck = load_checkpoint(checkpoint) if checkpoint else None
    model = ck.model if ck else load_proxy(spec)
    modules = feature_modules(model)
    pc = make_preconditioners("factored-adam", modules, ck.exp_avg, ck.exp_avg_sq) if ck else make_preconditioners("sgd", modules)
    eng = KroneckerEngine(model, modules, make_projections(modules, proj_dim, 0), pc)
    t_floor, t_kron = [], []
    bs = batches(items, 8, sort_by_length=True)
    for _ in range(repeats):
        for b in bs:
            enc = collate(b, pad_id)
            t0 = time.perf_counter()
            _loss_sum(model, enc).backward()  # every trainable weight gets its gradient: a training step's cost
            t_floor.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            eng(enc)
            t_kron.append(time.perf_counter() - t0)
    return {"floor_s": sum(t_floor), "kron_s": sum(t_kron), "ratio": sum(t_kron) / sum(t_floor)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small run to check the script; BENCHMARKS.md untouched")
    ap.add_argument("--work", default="/tmp/iprox-bench-features")
    ap.add_argument("--proj-dim", type=int, default=64)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.WARNING)
    torch.manual_seed(0)
    data = find_data()
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    n_gsm, n_bbh = (12, 12) if args.quick else (100, 100)
    sparsities = [0.5] if args.quick else [0.3, 0.5, 0.7]
    max_len = 320
    t_all = time.perf_counter()

    # The pool and validation set, as the pipeline would write them.
    import random

    gsm = load_examples(str(data / "gsm8k" / "train.jsonl"))
    bbh = load_examples(str(data / "bbh" / "tasks"))
    val_tasks = ("boolean_expressions", "multistep_arithmetic_two")
    val = [e for t in val_tasks for e in [x for x in bbh if x.task == t][:4]]
    val_ids = {e.id for e in val}
    rng = random.Random(0)
    pool = rng.sample(gsm, n_gsm) + rng.sample([e for e in bbh if e.id not in val_ids], n_bbh)

    def dump(path, exs):
        path.write_text("".join(json.dumps({"id": e.id, "source": e.source, "task": e.task, "messages": e.messages}) + "\n"
                                for e in exs))
        return str(path)

    pool_f, val_f = dump(work / "pool.jsonl", pool), dump(work / "val.jsonl", val)

    # The target as a plain HF folder, so every stage loads it in seconds rather than from GGUF.
    target, tok, _ = load_model(EMBEDDED_MODEL)
    target.save_pretrained(work / "target")
    tok.save_pretrained(work / "target")
    del target
    tspec = str(work / "target")
    results = {"pool": len(pool), "validation": len(val), "proj_dim": args.proj_dim, "stores": {}, "agreement": {},
               "max_length": max_len, "quick": args.quick}
    common = dict(data=[pool_f], proj_dim=args.proj_dim, batch_size=8, max_length=max_len, store_dtype="float16")
    wcommon = dict(data=[pool_f], examples=16, epochs=1, lr=2e-5, batch_size=4, max_length=max_len, progress=False)

    # 1. Target: fast path against the LESS-style reference.
    tck = str(run_warmup(WarmupConfig(model=tspec, out=str(work / "warm-target"), **wcommon))[-1])
    tval = featurise("target val (sgd)", results, checkpoint=tck, out=str(work / "f-target-val"),
                     **{**common, "data": [val_f]})
    fast = featurise("target kronecker factored-adam", results, checkpoint=tck, grad="factored-adam",
                     out=str(work / "f-target-kron-fadam"), **common)
    ref = featurise("target dense adam", results, checkpoint=tck, grad="adam", engine="dense",
                    out=str(work / "f-target-dense-adam"), **common)
    featurise("target kronecker factored-adam, batch 1", results, checkpoint=tck, grad="factored-adam",
              out=str(work / "f-target-kron-fadam-b1"), **{**common, "batch_size": 1})
    plain = featurise("target kronecker sgd", results, checkpoint=tck, out=str(work / "f-target-kron-sgd"), **common)
    s_ref, s_fast, s_plain = scores_of(ref, tval), scores_of(fast, tval), scores_of(plain, tval)
    results["agreement"]["target kronecker factored-adam vs dense adam"] = agreement(s_fast, s_ref)
    results["agreement"]["target kronecker sgd vs dense adam"] = agreement(s_plain, s_ref)
    results["scatter"] = {"reference": s_ref, "fast": s_fast}

    # 2. The cost floor (a plain forward+backward), side by side with the Kronecker engine.
    tokd, _ = tokenize_examples(tok, load_examples(pool_f)[:32], max_len)
    results["floor"] = {"target": time_floor(tspec, tck, tokd, tok.pad_token_id, args.proj_dim, 1)}

    # 3. Proxies.
    for sp in sparsities:
        pdir = str(work / f"proxy-{sp}")
        build_proxy(ProxyConfig(model=tspec, data=[pool_f], out=pdir, sparsity=sp, probe_examples=32,
                                probe_tokens=4096, max_length=max_len, align_epochs=0.0, progress=False))  # stage 1
        trains = ["factors", "lora"] if sp == 0.5 else ["factors"]
        for mode in trains:
            ck = str(run_warmup(WarmupConfig(model=pdir, out=str(work / f"warm-{sp}-{mode}"), proxy_trains=mode,
                                             **wcommon))[-1])
            pv = featurise(f"proxy {sp} {mode} val (sgd)", results, checkpoint=ck, out=str(work / f"f-{sp}-{mode}-val"),
                           **{**common, "data": [val_f]})
            pf = featurise(f"proxy {sp} {mode} kronecker factored-adam", results, checkpoint=ck, grad="factored-adam",
                           out=str(work / f"f-{sp}-{mode}-kron"), **common)
            results["agreement"][f"proxy {sp} ({mode}) vs target dense adam"] = agreement(scores_of(pf, pv), s_ref)
        if sp == 0.5:
            results["floor"]["proxy 0.5 (factors)"] = time_floor(pdir, str(work / "warm-0.5-factors" / "checkpoint-1"),
                                                                 tokd, tok.pad_token_id, args.proj_dim, 1)
    results["total_seconds"] = time.perf_counter() - t_all
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "features_quick" if args.quick else "features"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    body = report(results, name)
    print(body)
    if not args.quick:
        update_benchmarks_md("features", body)


def report(r: dict, name: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = r["stores"]
    t_fast, t_ref = st["target kronecker factored-adam"], st["target dense adam"]
    lines = [
        "## Gradient features (issue 4)",
        "",
        f"`benchmarks/bench_features.py`: SmolLM2-135M-Instruct, a pool of {r['pool']} examples (GSM8K train and BBH, "
        f"max {r['max_length']} tokens), {r['validation']} validation examples of two BBH tasks, {r['proj_dim']} projected "
        "dimensions per layer, one warm-up checkpoint (16 examples, 1 epoch). All rows come from one run; the "
        "speed figures are ratios within it.",
        "",
        "| store | engine | grad | examples/s | × target dense | × target kronecker | dims | bytes/example (fp16) | peak RSS (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, v in st.items():
        if "val" in k:
            continue
        lines.append(f"| {k} | {v['engine']} | {v['grad']} | {v['examples_per_s']:.2f} | "
                     f"{v['examples_per_s'] / t_ref['examples_per_s']:.2f} | "
                     f"{v['examples_per_s'] / t_fast['examples_per_s']:.2f} | {v['dim']} | {v['bytes_per_example']} | "
                     f"{v['peak_rss_gib']:.2f} |")
    lines += ["", f"Kronecker (factored Adam) is {t_fast['examples_per_s'] / t_ref['examples_per_s']:.2f}× the dense "
              "per-example loop (elementwise Adam) on the target.", ""]
    lines += ["Cost floor: a plain forward+backward (all trainable weights get gradients) on the same 32 examples, "
              "batches of 8, timed interleaved with the Kronecker engine:", "",
              "| model | fwd+bwd (s) | kronecker (s) | kronecker / floor |", "|---|---|---|---|"]
    for k, v in r["floor"].items():
        lines.append(f"| {k} | {v['floor_s']:.1f} | {v['kron_s']:.1f} | {v['ratio']:.2f} |")
    if "proxy 0.5 (factors)" in r["floor"]:
        tf, pf = r["floor"]["target"], r["floor"]["proxy 0.5 (factors)"]
        lines.append(f"\nKronecker time, proxy 0.5 / target: {pf['kron_s'] / tf['kron_s']:.2f}.")
    lines += ["", "Agreement of TracIn scores over the pool (the reference: target, dense, elementwise Adam):", "",
              "| scores | Spearman | Kendall | top-1% overlap | top-5% overlap | top-10% overlap |", "|---|---|---|---|---|---|"]
    for k, v in r["agreement"].items():
        o = v["overlap_at"]
        lines.append(f"| {k} | {v['spearman']:.3f} | {v['kendall']:.3f} | {o['1']['overlap']:.2f} | "
                     f"{o['5']['overlap']:.2f} | {o['10']['overlap']:.2f} |")
    # Plots
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    keys = [k for k in st if "val" not in k]
    ax[0].barh(range(len(keys)), [st[k]["examples_per_s"] for k in keys], color="tab:blue")
    ax[0].set_yticks(range(len(keys)), keys, fontsize=7)
    ax[0].set_xlabel("examples / s (CPU, same run)")
    ax[0].set_title("feature throughput")
    ax[1].scatter(r["scatter"]["reference"], r["scatter"]["fast"], s=8)
    ax[1].set_xlabel("dense + Adam score (reference)")
    ax[1].set_ylabel("Kronecker + factored Adam score")
    a = r["agreement"]["target kronecker factored-adam vs dense adam"]
    ax[1].set_title(f"target TracIn scores, Spearman {a['spearman']:.3f}")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    lines += ["", f"![feature throughput and score agreement](benchmarks/results/{name}.png)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
