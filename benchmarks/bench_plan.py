"""``iprox plan`` against measured peaks, and what it says of 1B-8B targets.

Part 1 measures, on the CPU, the peak memory of stage 1 (IPSVD with either probe route) and of one
alignment step (with and without recomputing the target's blocks) for random-init models of several
families and sizes, each in a fresh process (the weights plus the highest RSS above the RSS after
loading; glibc's mmap threshold is fixed so that freed blocks leave the RSS, as a device's caching
allocator reuses them), and puts the planner's estimate beside each. Part 2 is the planner alone for
Llama-3.2-1B, 3B and Llama-3.1-8B geometries in bf16 (no weights: the meta device): stage 1 by probe
route, and the alignment by the settings that decide whether it fits one 80 GB GPU.

Writes the "plan" section of BENCHMARKS.md and ``benchmarks/results/plan.json``. Memory figures do
not depend on other load on the machine; the times printed are wall times of a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import update_benchmarks_md  # noqa: E402

from iprox.plan import PlanConfig, plan  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
LENGTH, BATCH = 256, 4

CHILD = """
import json, resource, sys, time
import psutil
from iprox.models import load_model
from iprox.proxy import ProxyConfig, build_proxy
folder, what = sys.argv[1], sys.argv[2]
m, tok, _ = load_model(folder)
W = sum(p.numel() * p.element_size() for p in m.parameters())
base = psutil.Process().memory_info().rss
kw = dict(model=folder, data=[folder + "/data.jsonl"], out=folder + "/proxy-" + what, max_length=%d, batch_size=%d,
          progress=False)
if what.startswith("stage1"):
    kw.update(probe_examples=8, probe_tokens=512, probe_statistics=what.split("-")[1], align_epochs=0.0)
else:
    kw.update(init="svd", probe_examples=4, align_examples=%d, align_steps=1, gradient_checkpointing=what == "align-recompute",
              align_cosine="batch")
t0 = time.perf_counter()
build_proxy(ProxyConfig(**kw), model=m, tokenizer=tok)
print(json.dumps({"measured_gib": (W + resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**30,
                  "seconds": time.perf_counter() - t0}))
""" % (LENGTH, BATCH, BATCH)

# name → (family, hidden, MLP, layers, heads, KV heads)
MODELS = {
    "llama 4×256": ("llama", 256, 768, 4, 8, 4),
    "gpt2 4×256": ("gpt2", 256, 1024, 4, 8, 8),
    "qwen2 4×256": ("qwen2", 256, 768, 4, 8, 4),
    "llama 8×512": ("llama", 512, 1536, 8, 8, 4),
    "smollm2-135m geometry": ("llama", 576, 1536, 30, 9, 3),
}
WHAT = {"stage1-moments": ("probe+factorise", {"probe_statistics": "moments"}),
        "stage1-samples": ("probe+factorise", {"probe_statistics": "samples"}),
        "align": ("align", {}),
        "align-recompute": ("align", {"gradient_checkpointing": True})}


def build(folder: Path, spec: tuple) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    from iprox.models import EMBEDDED_MODEL, load_tokenizer, resolve_model

    family, h, ff, n, heads, kv = spec
    vocab = 49152  # the embedded tokenizer's
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=h, n_inner=ff, n_layer=n, n_head=heads, n_positions=512)
    else:
        cls = LlamaConfig if family == "llama" else Qwen2Config
        cfg = cls(vocab_size=vocab, hidden_size=h, intermediate_size=ff, num_hidden_layers=n, num_attention_heads=heads,
                  num_key_value_heads=kv, tie_word_embeddings=True, pad_token_id=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    load_tokenizer(resolve_model(EMBEDDED_MODEL)).save_pretrained(folder)
    words = " ".join("alpha beta gamma delta epsilon zeta eta theta".split() * 40)
    rec = {"messages": [{"role": "user", "content": words}, {"role": "assistant", "content": words}]}
    (folder / "data.jsonl").write_text((json.dumps(rec) + "\n") * 16)


def measure(models: list[str]) -> list[dict]:
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for name in models:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            build(folder, MODELS[name])
            for what, (stage, kw) in WHAT.items():
                r = subprocess.run([sys.executable, "-c", CHILD, str(folder), what], capture_output=True, text=True,
                                   env=env, timeout=3600)
                if r.returncode:
                    raise SystemExit(f"{name} {what} failed:\n{r.stderr[-3000:]}")
                got = json.loads(r.stdout.strip().splitlines()[-1])
                p = plan(PlanConfig(model=str(folder), dtype="float32", max_length=LENGTH,
                                    proxy=dict(batch_size=BATCH, probe_examples=8, probe_tokens=512, align_cosine="batch", **kw)))
                row = {"model": name, "what": what, "planned_gib": p["stages"][stage]["peak_gib"],
                       "measured_gib": got["measured_gib"], "seconds": got["seconds"], "params": p["params"]}
                row["ratio"] = row["planned_gib"] / row["measured_gib"]
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def scale() -> list[dict]:
    """The planner alone for real geometries: stage 1, and the alignment under both cosines (the
    summed gradient's, as the measured rows above, and the default per-example one, in passes of
    align_micro_batch examples)."""
    out = []
    summed = {"align_cosine": "batch"}
    cases = [("stage 1, moments (blocks per pass chosen for 80 GiB)", "probe+factorise", {}),
             ("stage 1, samples", "probe+factorise", {"probe_statistics": "samples"}),
             ("align, summed cosine, batch 4", "align", summed),
             ("align, summed cosine, batch 4, recompute", "align", {**summed, "gradient_checkpointing": True}),
             ("align, summed cosine, batch 4, offload", "align", {**summed, "offload_optimizer": True}),
             ("align, summed cosine, batch 2, offload", "align", {**summed, "offload_optimizer": True, "batch_size": 2}),
             ("align, summed cosine, batch 1, offload + recompute", "align",
              {**summed, "offload_optimizer": True, "gradient_checkpointing": True, "batch_size": 1}),
             ("align, per example (default: passes of 1)", "align", {}),
             ("align, per example, passes of 1, offload", "align", {"offload_optimizer": True}),
             ("align, per example, passes of 2, offload", "align", {"offload_optimizer": True, "align_micro_batch": 2}),
             ("align, per example, passes of 4, offload", "align", {"offload_optimizer": True, "align_micro_batch": 4})]
    for geo in ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"):
        for label, stage, kw in cases:
            p = plan(PlanConfig(model=geo, dtype="bf16", max_length=512, budget_gib=80, proxy=kw))
            out.append({"model": geo, "case": label, "peak_gib": p["stages"][stage]["peak_gib"],
                        "blocks_per_pass": p["probe_blocks_per_pass"] if stage == "probe+factorise" else None})
    return out


def report(r: dict) -> str:
    lines = ["## The planner against measured peaks (issue 13)", "",
             "`benchmarks/bench_plan.py`: random-init models (embedded tokenizer, vocabulary 49,152, tied embeddings), "
             f"float32 on the CPU, {BATCH} sequences of {LENGTH} tokens; stage 1 probes 8 examples (512 sampled tokens), "
             "the alignment runs one step of plain-SVD factors (no probe). Measured: weights plus the highest RSS above "
             "the RSS after loading, in a fresh process, glibc's mmap threshold fixed so freed memory leaves the RSS.", "",
             "| model | parameters | stage | planned GiB | measured GiB | planned / measured |", "|---|---|---|---|---|---|"]
    for x in r["measured"]:
        lines.append(f"| {x['model']} | {x['params'] / 1e6:.1f}M | {x['what']} | {x['planned_gib']:.2f} | "
                     f"{x['measured_gib']:.2f} | {x['ratio']:.2f} |")
    lines += ["", "The planner alone for real geometries (bf16, 512 tokens per sequence; a GPU also needs a CUDA "
              "context and workspaces, a few GB, which the plan leaves out):", "",
              "| geometry | case | planned peak GiB |", "|---|---|---|"]
    for x in r["scale"]:
        extra = f" ({x['blocks_per_pass']} blocks per pass)" if x["blocks_per_pass"] else ""
        lines.append(f"| {x['model']} | {x['case']} | {x['peak_gib']:.1f}{extra} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), metavar="NAME", help=f"of: {' / '.join(MODELS)}")
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the results JSON")
    ap.add_argument("--scale-only", action="store_true",
                    help="recompute only the planner's table for real geometries (seconds), keep the measured rows")
    args = ap.parse_args()
    path = RESULTS / "plan.json"
    if args.report:
        r = json.loads(path.read_text())
    elif args.scale_only:
        r = {**json.loads(path.read_text()), "scale": scale()}
        path.write_text(json.dumps(r, indent=2))
    else:
        r = {"measured": measure(args.models), "scale": scale()}
        RESULTS.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r, indent=2))
    body = report(r)
    print(body)
    update_benchmarks_md("plan", body)


if __name__ == "__main__":
    main()
