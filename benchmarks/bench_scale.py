"""Scale benchmark: what the proxy costs against the target, per geometry and dtype, through the real pipeline.

Builds a random-initialised Llama of a named geometry from its config alone (no download; cost does
not depend on the weights), with the SmolLM2 tokenizer (vocabulary 49,152), and measures on a pool of
GSM8K problems and two BBH target tasks:

1. **Stage 1 from one probe**: probe time, the first factorisation (eigendecompositions + core SVDs),
   and the cost of two more sparsities reusing its rank-free decompositions.
2. **Features per model**: target and IPSVD proxies at sparsity 0.3/0.5/0.7, each after a short
   warm-up (LoRA on the target, factors on a proxy), Kronecker engine with factored Adam: examples/s,
   its ratio to the target beside the analytic FLOP ratio, and the cost floor (a plain forward and a
   backward without weight gradients of the same batches, same dtype, timed interleaved).
3. **Kronecker against dense** (LESS-style per-example loop) on the target at equal dimensions.
4. **Two pipelines** (``python -m iprox.cli run``, one process each): target-only (LESS on the
   target) and IProX (proxy 0.5 on the library's defaults unless ``--align-steps`` and the probe's
   options pin them: target-first warm-up, 5 alignment epochs of at least 40 steps, validation by
   both models with 30 calibration examples, the target's rerank of the proxy's shortlist); each
   stage's time, peak RSS and peak accelerator memory from ``pipeline.json``; per-pool-example cost
   (warm-up + features + rerank, which grows with the pool), the build's fixed cost, the pool size
   at which it is recovered, and the build against featurising a 10k pool.

Usage::

    python benchmarks/bench_scale.py --geometry 135m               # CPU (float32), writes BENCHMARKS.md
    python benchmarks/bench_scale.py --geometry tiny --quick         # seconds: checks the script
    # GPU (one run, benchmarks/device_scale.sh; estimated at 8 minutes on one H200, not yet run there):
    # copy inputs into the repo first, since the data and the GGUF tokenizer do not travel to the device
    python benchmarks/bench_scale.py --export-inputs bench-inputs --pool 512
    PYTHONPATH=src python3 benchmarks/bench_scale.py --inputs bench-inputs --geometry 1b --dtype bf16 --pool 512 --max-length 512

Results: ``benchmarks/results/scale.json`` (merged per geometry and dtype) and the ``scale`` section of
``BENCHMARKS.md`` (rewritten from all results held in the JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from common import build_seconds, find_data, update_benchmarks_md  # noqa: E402

from iprox.data import batches, collate, load_examples, tokenize_examples  # noqa: E402
from iprox.features import FeatureConfig, compute_features  # noqa: E402
from iprox.loading import read_manifest  # noqa: E402
from iprox.session import Session  # noqa: E402
from iprox.models import DTYPES, compressible_modules, default_device, projection_weight, resolve_dtype  # noqa: E402
from iprox.monitor import PeakRSS  # noqa: E402
from iprox.plan import llama_config as plan_geometry  # noqa: E402
from iprox.probe import collect_moments  # noqa: E402
from iprox.projection import KroneckerEngine, _loss_sum, feature_modules, make_preconditioners, make_projections  # noqa: E402
from iprox.proxy import factorize_model, save_proxy  # noqa: E402
from iprox.warmup import WarmupConfig, run_warmup  # noqa: E402

log = logging.getLogger("bench_scale")
RESULTS = ROOT / "benchmarks" / "results"
VOCAB = 49152

# The benchmark's short names for iprox.plan's geometries; the vocabulary is 49,152 throughout, so
# that the SmolLM2 tokenizer serves every one.
GEOMETRIES = {"tiny": "tiny", "135m": "smollm2-135m", "1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "8b": "llama-3.1-8b"}
SPARSITIES = (0.3, 0.5, 0.7)


def llama_config(geometry: str):
    return plan_geometry(GEOMETRIES[geometry], vocab=VOCAB)


def export_inputs(folder: Path, n_pool: int, n_val: int) -> None:
    """Pool, validation set and tokenizer as plain files in ``folder`` (to carry to a GPU machine)."""
    from iprox.models import EMBEDDED_MODEL, load_tokenizer, resolve_model

    folder.mkdir(parents=True, exist_ok=True)
    data = find_data()
    gsm = load_examples(str(data / "gsm8k" / "train.jsonl"))
    pool = random.Random(0).sample(gsm, min(n_pool, len(gsm)))
    val = []
    for task in ("boolean_expressions", "multistep_arithmetic_two"):
        exs = load_examples(str(data / "bbh" / "tasks" / f"{task}.json"))
        val += exs[: n_val // 2]
        pool += exs[n_val // 2: n_val // 2 + max(2, n_pool // 50)]  # a few target-task examples in the pool

    def dump(path, exs):
        path.write_text("".join(json.dumps({"id": e.id, "source": e.source, "task": e.task, "messages": e.messages})
                                + "\n" for e in exs))

    dump(folder / "pool.jsonl", pool)
    dump(folder / "validation.jsonl", val)
    tok = load_tokenizer(resolve_model(EMBEDDED_MODEL))
    tok.save_pretrained(folder / "tokenizer")
    log.info("exported %d pool and %d validation examples and the tokenizer to %s", len(pool), len(val), folder)


def make_target(folder: Path, geometry: str, dtype: str, tokenizer_dir: Path) -> None:
    """A random-initialised model of ``geometry`` saved as a Hugging Face folder (with the tokenizer)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    if (folder / "config.json").exists():
        return
    cfg = llama_config(geometry)
    torch.manual_seed(0)
    device = default_device()
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    # A random init whose backward pass stays finite. transformers' plain init (every weight std 0.02)
    # keeps the residual stream at rms 0.02, so every RMSNorm multiplies the output gradient by ~50
    # on the way down: through 30 layers it passes float32's range (measured: ×30 per layer, inf by
    # layer 0 of the 135M geometry) and the probe's moments turn NaN. Trained models have a residual
    # stream of rms ~1. Here: embeddings std 1, GPT-2's 1/√(2L) on the projections that write into
    # the residual stream, and the final norm scaled so that the (tied) head's logits have std ~1.
    # The cost measured does not depend on any of this.
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
        model.model.norm.weight.fill_(1.0 / math.sqrt(cfg.hidden_size))
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(1.0 / math.sqrt(2 * cfg.num_hidden_layers))
    model = model.to(DTYPES[dtype])
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    del model


def flops_per_token(model, seq_len: float) -> float:
    """Forward FLOPs per token: 2 per multiply-add of every projection (factored ones at their rank),
    the LM head, and causal attention (2·T·d_attn per layer at mean length T). Features cost a
    forward plus a backward without weight gradients, about twice this; the ratio is what matters."""
    cfg = model.config
    mm = 0
    for mod in compressible_modules(model).values():
        m, n = projection_weight(mod).shape
        mm += m * n
    mm += cfg.hidden_size * cfg.vocab_size
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 2 * seq_len * cfg.num_attention_heads * head_dim * cfg.num_hidden_layers
    return 2 * mm + attn


def time_interleaved(engines: dict, items, pad_id, device, batch_size, proj_dim) -> dict:
    """Seconds per model over the same batches: the Kronecker engine (factored Adam) and a plain forward
    + backward without weight gradients, each batch run by every model in turn (one pass to warm up,
    one timed), so that noise on a shared machine hits every model alike."""
    kron = {}
    for name, (model, modules, ck) in engines.items():
        pc = make_preconditioners("factored-adam", modules, ck.exp_avg, ck.exp_avg_sq, tuple(ck.info["betas"]),
                                  ck.info["eps"])
        kron[name] = KroneckerEngine(model, modules, make_projections(modules, proj_dim, 0, torch.float32, device), pc)
        for p in model.parameters():
            p.requires_grad_(False)
    t_floor = {n: 0.0 for n in engines}
    t_kron = {n: 0.0 for n in engines}
    bs = batches(items, batch_size, sort_by_length=True)
    for rep, batch_list in ((0, bs[:1]), (1, bs)):  # rep 0 warms up caches and allocators, untimed
        for b in batch_list:
            enc = {k: v.to(device) for k, v in collate(b, pad_id).items()}
            for name, (model, _, _) in engines.items():
                _sync(device)
                t0 = time.perf_counter()
                emb = model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_(True)
                _loss_sum(model, enc, emb).backward()
                _sync(device)
                t1 = time.perf_counter()
                kron[name](enc).cpu()
                _sync(device)
                if rep:
                    t_floor[name] += t1 - t0
                    t_kron[name] += time.perf_counter() - t1
    return {n: {"floor_s": t_floor[n], "kron_s": t_kron[n], "kron_over_floor": t_kron[n] / t_floor[n]} for n in engines}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _accel_reset(device):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _accel_peak(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0


def run_pipeline(work: Path, name: str, target: Path, inputs: Path, args, selector: str) -> dict:
    """``python -m iprox.cli run`` in its own process; returns its pipeline.json."""
    out = work / f"run-{name}"
    proxy = ""
    if selector == "proxy":  # the library's defaults, except what the command line pins
        pinned = {"probe_examples": args.probe_examples, "probe_tokens": args.probe_tokens,
                  "align_examples": args.align_examples, "align_steps": args.align_steps, "batch_size": args.align_batch}
        proxy = "[proxy]\nsparsity = 0.5\n" + "".join(f"{k} = {v}\n" for k, v in pinned.items() if v is not None)
    cfg = f"""[run]
out = "{out}"
model = "{target}"
selector = "{selector}"
dtype = "{args.dtype}"
[data]
pool = ["{inputs / 'pool.jsonl'}"]
validation = ["{inputs / 'validation.jsonl'}"]
max_length = {args.max_length}
{proxy}
[warmup]
fraction = 0.05
epochs = 2
batch_size = {args.batch_size}
[features]
proj_dim = 64
batch_size = {args.batch_size}
shard_size = 1024
[select]
fraction = 0.05
"""
    path = work / f"{name}.toml"
    path.write_text(cfg)
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "iprox.cli", "run", str(path), "--no-progress"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    meta = json.loads((out / "pipeline.json").read_text())
    meta["wall_s"] = time.perf_counter() - t0
    # each feature store's own time: the pool's stores grow with the pool, validation and calibration do not
    meta["feature_stores_s"] = {d.name: read_manifest(d)["timing"]["rank0_seconds"]
                                for d in sorted((out / "features").iterdir()) if (d / "COMPLETE").exists()}
    if selector == "proxy":  # what the defaults came to on this pool
        meta["align_steps_run"] = _rows(out / "proxy" / "align_log.csv") - 1
        # every round's shortlist: a grown one adds shortlist-2.jsonl, ...
        meta["rerank_examples"] = sum(_rows(f) for f in (out / "rerank").glob("shortlist*.jsonl"))
    return meta


def _rows(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="135m", choices=sorted(GEOMETRIES))
    ap.add_argument("--dtype", default="auto", help="float32, bf16, fp16 or auto (bf16 on a GPU, float32 on CPU)")
    ap.add_argument("--pool", type=int, default=64, help="pool examples (GSM8K plus a few of the target tasks)")
    ap.add_argument("--val", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dense-examples", type=int, default=16, help="examples for Kronecker vs dense (0: skip it)")
    ap.add_argument("--no-pipelines", action="store_true",
                    help="skip the two pipelines (a run's results keep those of an earlier run under the same key)")
    # Unpinned (None), the IProX pipeline takes the library's defaults; stage 1's own measurement then
    # probes 16 examples at 4,096 tokens.
    ap.add_argument("--probe-examples", type=int, default=None)
    ap.add_argument("--probe-tokens", type=int, default=None)
    ap.add_argument("--align-examples", type=int, default=None)
    ap.add_argument("--align-steps", type=int, default=None)
    ap.add_argument("--align-batch", type=int, default=None)
    ap.add_argument("--inputs", default="", help="folder from --export-inputs (default: export into the work folder)")
    ap.add_argument("--export-inputs", default="", help="only write pool, validation and tokenizer to this folder")
    ap.add_argument("--work", default="/tmp/iprox-bench-scale")
    ap.add_argument("--quick", action="store_true", help="tiny sizes; BENCHMARKS.md untouched")
    ap.add_argument("--report", action="store_true", help="only rewrite the BENCHMARKS.md section from scale.json")
    ap.add_argument("--merge", default="", help="add a run's results (another machine's scale.json, or the partial.json "
                    "of a run cut short) to scale.json, then rewrite the BENCHMARKS.md section")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    results_path = RESULTS / "scale.json"
    if args.merge:
        merge(Path(args.merge), results_path)
    if args.report or args.merge:
        update_benchmarks_md("scale", report(json.loads(results_path.read_text())))
        return
    if args.export_inputs:
        export_inputs(Path(args.export_inputs), args.pool, args.val)
        return
    if args.quick:
        args.pool, args.val, args.max_length, args.dense_examples = 16, 4, 64, 4
        args.probe_examples, args.probe_tokens, args.align_examples, args.align_steps = 4, 256, 4, 1
    device = default_device()
    dtype = resolve_dtype(args.dtype, device)
    args.dtype = dtype
    work = Path(args.work) / f"{args.geometry}-{dtype}"
    work.mkdir(parents=True, exist_ok=True)
    inputs = Path(args.inputs).resolve() if args.inputs else work / "inputs"
    if not args.inputs:
        export_inputs(inputs, args.pool, args.val)
    target_dir = work / "target"
    t0 = time.perf_counter()
    make_target(target_dir, args.geometry, dtype, inputs / "tokenizer")
    res: dict = {"geometry": args.geometry, "dtype": dtype, "device": device,
                 "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)",
                 "settings": {k: v for k, v in vars(args).items() if k not in ("work", "inputs", "export_inputs", "report")},
                 "make_target_s": time.perf_counter() - t0,
                 "pool": _rows(inputs / "pool.jsonl")}  # the pipelines' pool; tokenising below drops none or says so

    # 4. Pipelines, each in its own process (first: on a GPU with a time limit, the figure users ask
    # for first is what the whole pipeline costs).
    res["pipelines"] = {}
    for name, selector in (("target", "model"), ("iprox", "proxy")) if not args.no_pipelines else ():
        res["pipelines"][name] = run_pipeline(work, name, target_dir, inputs, args, selector)
        log.info("pipeline %s: %s", name, res["pipelines"][name]["timings"])
        partial(work, res)

    session = Session()
    t0 = time.perf_counter()
    target, tok = session.model(str(target_dir), dtype, device)
    res["load_s"] = time.perf_counter() - t0
    res["params"] = sum(p.numel() for p in target.parameters())
    pool = load_examples(str(inputs / "pool.jsonl"))
    pool_tok, _ = tokenize_examples(tok, pool, args.max_length)
    mean_len = sum(len(t.input_ids) for t in pool_tok) / len(pool_tok)
    res["pool"], res["mean_tokens"] = len(pool_tok), mean_len

    # 1. Stage 1 from one probe, three sparsities.
    probe_tok = pool_tok[: args.probe_examples or 16]
    _accel_reset(device)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        moments = collect_moments(target, compressible_modules(target), probe_tok, args.probe_tokens or 4096,
                                  batch_size=args.batch_size, pad_id=tok.pad_token_id, progress=False)
    _sync(device)
    res["probe_s"] = time.perf_counter() - t0
    decs: dict = {}
    proxies = {}
    res["factorise_s"] = {}
    for sp in SPARSITIES:
        t0 = time.perf_counter()
        proxy = copy.deepcopy(target)
        recs = factorize_model(proxy, sp, "ipsvd", moments, decompositions=decs, factor_dtype="float32")
        _sync(device)
        res["factorise_s"][str(sp)] = time.perf_counter() - t0
        pdir = work / f"proxy-{sp}"
        shutil.rmtree(pdir, ignore_errors=True)
        save_proxy(proxy, tok, pdir, {"format_version": 1, "method": "ipsvd", "sparsity": sp, "layers": recs,
                                      "uid": f"bench-{args.geometry}-{sp}", "config": {}})
        proxies[sp] = pdir
        session.register(str(pdir), proxy, tok, dtype, device)
    res["stage1_peak_accelerator_gib"] = _accel_peak(device)
    res["stage1_peak_rss_gib"] = mem.peak
    del moments, decs
    partial(work, res)

    # 2. Features per model, with the cost floor beside.
    res["models"] = {}
    shapes = {"target": (flops_per_token(target, mean_len), sum(p.numel() for p in target.parameters()))}
    for sp in SPARSITIES:
        m, _ = session.model(str(proxies[sp]), dtype, device)
        shapes[f"proxy {sp}"] = (flops_per_token(m, mean_len), sum(p.numel() for p in m.parameters()))
    checkpoints = {}
    for name, spec in [("target", target_dir)] + [(f"proxy {sp}", proxies[sp]) for sp in SPARSITIES]:
        wdir = work / f"warmup-{name.replace(' ', '-')}"
        shutil.rmtree(wdir, ignore_errors=True)
        ck_dir = run_warmup(WarmupConfig(model=str(spec), data=[str(inputs / "pool.jsonl")], out=str(wdir), examples=8,
                                         epochs=1, batch_size=args.batch_size, max_length=args.max_length, dtype=dtype,
                                         progress=False), session)[-1]
        fdir = work / f"features-{name.replace(' ', '-')}"
        shutil.rmtree(fdir, ignore_errors=True)
        _accel_reset(device)
        compute_features(FeatureConfig(checkpoint=str(ck_dir), data=[str(inputs / "pool.jsonl")], out=str(fdir),
                                       grad="factored-adam", proj_dim=64, batch_size=args.batch_size,
                                       shard_size=1 << 20, max_length=args.max_length, dtype=dtype, progress=False), session)
        man = read_manifest(fdir)
        t = man["timing"]
        res["models"][name] = {"store_examples_per_s": t["rank0_examples"] / t["rank0_seconds"], "dim": man["dim"],
                               "flops_per_token": shapes[name][0], "params": shapes[name][1],
                               "peak_accelerator_gib": _accel_peak(device)}
        checkpoints[name] = ck_dir
        if name == "target" and args.dense_examples:
            # 3. Kronecker against dense at equal dimensions, same checkpoint, same examples.
            items = pool_tok[: args.dense_examples]
            sub = work / "dense-subset.jsonl"
            keep = {t.id for t in items}
            sub.write_text("".join(e.raw + "\n" for e in pool if e.id in keep))
            rates = {}
            for engine, grad in (("kronecker", "factored-adam"), ("dense", "adam")):
                d = work / f"engine-{engine}"
                shutil.rmtree(d, ignore_errors=True)
                compute_features(FeatureConfig(checkpoint=str(ck_dir), data=[str(sub)], out=str(d), grad=grad,
                                               engine=engine, proj_dim=64, batch_size=args.batch_size, shard_size=1 << 20,
                                               max_length=args.max_length, dtype=dtype, progress=False), session)
                tt = read_manifest(d)["timing"]
                rates[engine] = tt["rank0_examples"] / tt["rank0_seconds"]
            res["kronecker_vs_dense"] = {**rates, "ratio": rates["kronecker"] / rates["dense"], "n": len(items)}
    # The throughput ratios: every model's Kronecker features and its plain forward + backward (no weight
    # gradients), batch by batch in turn, so that the machine's noise falls on all of them alike.
    engines = {}
    for name, ck_dir in checkpoints.items():
        ck = session.checkpoint(ck_dir, dtype, device)
        engines[name] = (ck.model, feature_modules(ck.model), ck)
    timed = time_interleaved(engines, pool_tok, tok.pad_token_id, device, args.batch_size, 64)
    for name, tm in timed.items():
        m = res["models"][name]
        m.update(tm, examples_per_s=len(pool_tok) / tm["kron_s"])
        log.info("%s: %.2f examples/s (kronecker/floor %.2f)", name, m["examples_per_s"], tm["kron_over_floor"])
    del target, session, engines
    partial(work, res)

    summarise(res)

    if args.quick:
        print(json.dumps({k: v for k, v in res.items() if k != "pipelines"}, indent=1, default=str))
        print(report({"runs": {key(res): res}}))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    allres = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    store(allres, res)
    results_path.write_text(json.dumps(allres, indent=1, default=str) + "\n")
    update_benchmarks_md("scale", report(allres))


def merge(path: Path, results_path: Path) -> None:
    """Another machine's runs (its scale.json, or one run's partial.json) into this machine's results."""
    got = json.loads(path.read_text())
    runs = got["runs"].values() if "runs" in got else [got]
    allres = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    for res in runs:
        store(allres, res)
        log.info("merged %s from %s", key(res), path)
    results_path.write_text(json.dumps(allres, indent=1, default=str) + "\n")


def partial(work: Path, res: dict) -> None:
    """What has been measured so far, in the work folder (a run cut short by a time limit keeps it)."""
    (work / "partial.json").write_text(json.dumps(res, indent=1, default=str) + "\n")


def key(res: dict) -> str:
    batch = res["settings"].get("batch_size", 8)
    return f"{res['geometry']}/{res['dtype']}/{res['device']}" + (f"/b{batch}" if batch != 8 else "")


def store(allres: dict, res: dict) -> None:
    """``res`` under its key; what it did not measure (the pipelines skipped, a part cut short) stays
    as an earlier run under the same key measured it."""
    old = allres["runs"].get(key(res), {})
    new = {**old, **{k: v for k, v in res.items() if v or k not in old}}
    summarise(new)
    allres["runs"][key(res)] = new


def summarise(res: dict) -> None:
    """Ratios and break-even figures from the raw measurements (those a run cut short reached)."""
    models = res.get("models", {})
    if "target" in models and all("examples_per_s" in m for m in models.values()):
        t = models["target"]
        for m in models.values():
            m["speedup"] = m["examples_per_s"] / t["examples_per_s"]
            m["flop_ratio"] = t["flops_per_token"] / m["flops_per_token"]
            m["share_of_flop_ratio"] = m["speedup"] / m["flop_ratio"]
    pipes = res.get("pipelines", {})
    if not {"target", "iprox"} <= set(pipes):
        return
    n = res["pool"]
    per_ex, fixed = {}, {}
    for name, meta in pipes.items():
        tm, ld = meta["timings"], meta.get("model_load_s", {})
        # Loading a model and hashing it happen once whatever the pool: fixed costs, not per example.
        # The rerank featurises a share of the pool with the target: it grows with the pool.
        # So does featurising it; the validation and calibration stores do not.
        pool_feats = sum(v for k, v in meta.get("feature_stores_s", {}).items() if k.startswith("train-"))
        other_feats = tm.get("features", 0) - ld.get("features", 0) - pool_feats if pool_feats else 0.0
        grows = ("warmup", "features", "rerank")
        per_ex[name] = (sum(tm.get(st, 0) - ld.get(st, 0) for st in grows) - other_feats) / n
        fixed[name] = sum(ld.values()) + build_seconds(tm) - build_seconds(ld) + other_feats
    build = fixed["iprox"] - fixed["target"]
    gain = per_ex["target"] - per_ex["iprox"]
    res["summary"] = {
        "per_example_s": per_ex, "per_example_ratio": per_ex["iprox"] / per_ex["target"],
        "build_s": build, "fixed_s": fixed, "break_even_pool": (build / gain) if gain > 0 else None,
        "pipeline_ratio": sum(pipes["iprox"]["timings"].values()) / sum(pipes["target"]["timings"].values()),
    }
    if "store_examples_per_s" in models.get("proxy 0.5", {}):
        ckpts = 2  # the pipelines' warm-up epochs: one train store per checkpoint
        res["summary"]["build_over_10k_features"] = build / (10_000 * ckpts / models["proxy 0.5"]["store_examples_per_s"])


def report(allres: dict) -> str:
    lines = ["## Scale: proxy against target by geometry and dtype (issue 11)", "",
             "`benchmarks/bench_scale.py` (command in each block). Random-initialised Llama geometries with the SmolLM2 "
             "tokenizer (vocabulary 49,152); pool of GSM8K problems plus a few examples of the two BBH target tasks. "
             "Every ratio comes from one run on one machine; absolute times on the 2-core CPU mean little.", ""]
    for k, r in allres["runs"].items():
        lines += _report_run(r)
    return "\n".join(lines)


def _report_run(r: dict) -> list[str]:
    """One run's block; a run cut short by its time limit shows what it reached and says so."""
    s = r["settings"]
    models = r.get("models", {})
    params = f"{r['params']:,} parameters, " if "params" in r else ""
    tokens = f" (mean {r['mean_tokens']:.0f} tokens)" if "mean_tokens" in r else ""
    lines = [f"### {r['geometry']}, {r['dtype']}, {r['device_name']}", "",
             f"`python benchmarks/bench_scale.py --geometry {r['geometry']} --dtype {r['dtype']} --pool {s['pool']} "
             f"--max-length {s['max_length']} --batch-size {s['batch_size']}` — {params}pool {r['pool']}{tokens}.", ""]
    missing = [part for part, there in (("the pipelines", {"target", "iprox"} <= set(r.get("pipelines", {}))),
                                        ("stage 1", "factorise_s" in r and len(r["factorise_s"]) == len(SPARSITIES)),
                                        ("the per-model features", "speedup" in models.get("target", {})),
                                        ("Kronecker vs dense", "kronecker_vs_dense" in r)) if not there]
    if missing:
        lines += [f"Cut short by its time limit: {', '.join(missing)} not measured.", ""]
    if "speedup" in models.get("target", {}):
        lines += ["| model | examples/s (interleaved) | × target | FLOP ratio | share of FLOP ratio | Kronecker / plain fwd+bwd (no weight grads) | examples/s (`iprox features` store) | dims |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, m in models.items():
            lines.append(f"| {name} | {m['examples_per_s']:.2f} | {m['speedup']:.2f} | {m['flop_ratio']:.2f} | "
                         f"{m['share_of_flop_ratio']:.0%} | {m['kron_over_floor']:.2f} | "
                         f"{m.get('store_examples_per_s', float('nan')):.2f} | {m['dim']} |")
        lines.append("")
    if "kronecker_vs_dense" in r:
        kd = r["kronecker_vs_dense"]
        lines.append(f"- Kronecker vs dense (LESS loop, elementwise Adam) on the target at equal dimensions, "
                     f"{kd['n']} examples: {kd['kronecker']:.2f} vs {kd['dense']:.2f} examples/s = **{kd['ratio']:.1f}×**.")
    if "factorise_s" in r and len(r["factorise_s"]) == len(SPARSITIES):
        f = r["factorise_s"]
        lines.append(f"- Stage 1 from one probe: probe {r['probe_s']:.1f}s; factorise {f['0.3']:.1f}s at 0.3 (eigendecompositions "
                     f"and SVDs), then {f['0.5']:.1f}s at 0.5 and {f['0.7']:.1f}s at 0.7 reusing them; peak RSS "
                     f"{r['stage1_peak_rss_gib']:.1f} GiB" + (f", peak accelerator {r['stage1_peak_accelerator_gib']:.1f} GiB"
                                                              if r.get("stage1_peak_accelerator_gib") else "") + ".")
    if "summary" not in r:
        return lines + [""]
    pt, pi = r["pipelines"]["target"], r["pipelines"]["iprox"]
    stages = [st for st in ("pool", "proxy", "warmup", "features", "score", "rerank", "select")]
    lines += ["", "| pipeline | " + " | ".join(stages) + " | total | loads | peak RSS GiB | peak accel GiB |",
              "|---" * (len(stages) + 5) + "|"]
    for name, p in (("target only (LESS)", pt), ("IProX 0.5", pi)):
        tm = p["timings"]
        accel = max(p.get("peak_accelerator_gib", {}).values(), default=0.0)
        tm = {**tm, "proxy": build_seconds(tm)}  # compress + align (one stage before 0.5)
        lines.append(f"| {name} | " + " | ".join(f"{tm.get(st, 0):.1f}" for st in stages) +
                     f" | {sum(p['timings'].values()):.1f} | {sum(p.get('loads', {}).values())} | "
                     f"{max(p['peak_rss_gib'].values()):.1f} | {accel:.1f} |")
    sm = r["summary"]
    be = sm["break_even_pool"]
    steps = pi.get("align_steps_run", s["align_steps"])
    tenk = sm.get("build_over_10k_features")
    lines += ["", f"- Per pool example (warm-up + features + rerank): target {sm['per_example_s']['target']:.3f}s, IProX "
              f"{sm['per_example_s']['iprox']:.3f}s = **{sm['per_example_ratio']:.2f}×**; whole pipeline "
              f"{sm['pipeline_ratio']:.2f}× the target's at this pool size.",
              "- Fixed costs (model loads and hashes" + (", featurising the validation and calibration sets"
                                                         if "feature_stores_s" in pt else "") + "): "
              f"{sm['fixed_s']['target']:.1f}s (target only) and "
              f"{sm['fixed_s']['iprox']:.1f}s (IProX, with the build: probe, factorise, {steps} alignment "
              f"steps" + (f"; the rerank featurised {pi['rerank_examples']} examples with the target"
                          if pi.get("rerank_examples") else "") + f"); the build adds {sm['build_s']:.1f}s; "
              + (f"recovered by a pool of **{be:,.0f}** examples" if be else "never recovered (the proxy is not cheaper per example)")
              + (f"; the build is **{tenk:.1%}** of featurising a 10k pool at 2 checkpoints" if tenk is not None else "")
              + ".", ""]
    return lines


if __name__ == "__main__":
    main()
