"""``iprox plan``: what each stage of a run will need, before it runs, from the model's config alone.

For a model spec (a folder or ``config.json``, a hub id, the embedded model, or a named geometry such
as ``llama-3.1-8b``) the model is built on the *meta* device: every tensor has a shape and a dtype but
no memory, so an 8B model costs nothing to build. The plan gives per stage:

* **peak memory** on the stage's device: resident weights (exact, from the meta model's
  parameters), the activations a forward keeps for its backward (exact for the model's code: a
  forward on the meta device records every tensor saved for the backward, deduplicated by storage),
  the loss's float32 logits and their gradients, and the stage's own state: the probe's float64
  moments for the blocks of one pass (one input moment per distinct input, as the probe shares them)
  and the float32 eigendecomposition of the largest; optimiser state (float32 masters of low-precision
  trained tensors, two Adam moments); the proxy beside the target during stage 1;
* **FLOPs**, by ``2 × parameters × tokens`` per forward (a backward to the inputs only doubles it, one
  with weight gradients triples it), with every example taken at ``max_length`` (an upper bound);
* the **feature store**: dimensions per example from the featurised layers' shapes, bytes per
  checkpoint and in all.

What it leaves out: allocator fragmentation and caching, CUDA context and library workspaces (a few
hundred MB to a few GB on a GPU), and the transient peak of individual kernels. On the CPU the
estimate is tested against measured peaks (tests/test_plan.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from .evaluation import per_example_loss
from .lowrank import rank_for_sparsity
from .models import DTYPES, EMBEDDED_MODEL, block_of, compressible_modules, decoder_layers, resolve_dtype
from .projection import side_dims
from .runtime import check_types, section_config

GIB = 2**30
VOCAB = 49152
# Llama geometries (hidden, MLP, layers, heads, KV heads, tied embeddings), for plans and benchmarks
# without any file: random-init models of these shapes cost what the real ones cost.
GEOMETRIES = {
    "tiny": (256, 1024, 4, 8, 4, True, VOCAB),
    "smollm2-135m": (576, 1536, 30, 9, 3, True, 49152),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, True, 128256),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, True, 128256),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, False, 128256),
}


def llama_config(name: str, vocab: int | None = None):
    """A ``LlamaConfig`` of a named geometry (``vocab`` overrides its vocabulary)."""
    from transformers import LlamaConfig

    h, ff, L, nh, kv, tied, v = GEOMETRIES[name]
    return LlamaConfig(vocab_size=vocab or v, hidden_size=h, intermediate_size=ff, num_hidden_layers=L,
                       num_attention_heads=nh, num_key_value_heads=kv, max_position_embeddings=4096,
                       tie_word_embeddings=tied, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def model_config(spec: str):
    """The transformers config of a model spec, without its weights."""
    from transformers import CONFIG_MAPPING, AutoConfig

    if spec in GEOMETRIES:
        return llama_config(spec)
    if spec == EMBEDDED_MODEL:
        return llama_config("smollm2-135m")
    p = Path(spec).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if p.is_file():
        raw = json.loads(p.read_text(encoding="utf-8"))
        if raw.get("model_type") not in CONFIG_MAPPING:
            raise ValueError(f"{p}: model type {raw.get('model_type')!r} is not one transformers knows")
        return CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    if p.exists() or spec.startswith((".", "/")):
        raise FileNotFoundError(f"{spec}: no config.json there (a plan needs the model's config, not its weights)")
    return AutoConfig.from_pretrained(spec)  # a hub id: the one download the user asked for


def meta_model(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


@dataclass
class PlanConfig:
    """Settings of ``iprox plan``: the model, the data's size, and the run's own stage settings.

    Attributes:
        model: the target: a folder or config.json, a hub id, the embedded model, or one of the named
            geometries (tiny, smollm2-135m, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b).
        dtype: the models' dtype (bf16 on a GPU; float32 on a CPU).
        pool: candidate examples.
        validation: validation examples.
        max_length: tokens per example (every example is costed at this length).
        budget_gib: memory one device has; the plan names the probe setting that fits it.
        proxy: the run's ``[proxy]`` settings (sparsity, probe_*, batch_size, align_*, ...); the others
            are ProxyConfig's defaults, as in ``iprox run``.
        warmup: the run's ``[warmup]`` settings (fraction, epochs, batch_size, lora_rank, proxy_trains).
        features: the run's ``[features]`` settings (batch_size, proj_dim, total_dim, store_dtype).
        warmup_on: the run's order, as ``[run] warmup_on``: ``target`` (the default: the target warms
            up, the proxy carries its LoRA checkpoints, the target featurises the validation and the
            calibration examples) or ``proxy`` (the proxy warms up and featurises everything).
        val_model: the model(s) whose validation gradients are featurised, as ``[features]
            val_model`` ("": the order's default, ``both`` target-first, ``proxy`` proxy-first).
        calibrate: pool examples the target also featurises, as ``[features] calibrate`` (-1: the
            default, ``min(128, pool / 10)`` target-first and none proxy-first; 0: none).
        rerank: pool examples the target scores again after the proxy, as ``[rerank]`` resolves them
            (-1: the default, three times a 5% selection target-first and none proxy-first; 0: none).
        rerank_growth: how many times its first length the shortlist may grow to, as ``[rerank]
            max_growth`` (where the proxy's order looks short; the plan states the cost's upper bound).
    """

    model: str = EMBEDDED_MODEL
    dtype: str = "bf16"
    pool: int = 10000
    validation: int = 12
    max_length: int = 512
    budget_gib: float = 80.0
    proxy: dict = field(default_factory=dict)
    warmup: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)
    warmup_on: Literal["target", "proxy"] = "target"
    val_model: Literal["", "proxy", "target", "both"] = ""
    calibrate: int = -1
    rerank: int = -1
    rerank_growth: float = 2.0

    def __post_init__(self):
        check_types(self)
        if self.warmup_on == "proxy" and (self.val_model not in ("", "proxy") or self.calibrate > 0 or self.rerank > 0):
            raise ValueError("val_model target/both, calibrate and rerank need the target-first order (warmup_on = target)")
        from .rerank import check_growth

        check_growth(self.rerank_growth)
        for name in ("calibrate", "rerank"):
            if getattr(self, name) < -1:
                raise ValueError(f"{name} must be a number of pool examples (0: none, -1: the default), "
                                 f"got {getattr(self, name)}")
        self.dtype = resolve_dtype(self.dtype, "cuda")
        if min(self.pool, self.max_length) < 1:
            raise ValueError("pool and max_length must be >= 1")
        if self.budget_gib <= 0:
            raise ValueError(f"budget_gib must be > 0, got {self.budget_gib}")
        # The stages' own settings classes check and complete the sections: one source of defaults.
        from .features import FeatureConfig
        from .proxy import ProxyConfig
        from .warmup import WarmupConfig

        common = {"max_length": self.max_length}
        self.stage_proxy = section_config("proxy", ProxyConfig, self.proxy, data=["x"], **common)
        self.stage_warmup = section_config("warmup", WarmupConfig, self.warmup, data=["x"], out="x", **common)
        self.stage_features = section_config("features", FeatureConfig, self.features, data=["x"], out="x",
                                             checkpoint="x", **common)

    def target_featurises(self) -> tuple[int, int]:
        """The target's own feature passes per checkpoint in the IProX run: (validation examples,
        calibration examples), as the pipeline resolves ``val_model`` and ``calibrate``."""
        from .calibration import calibration_size

        if self.warmup_on == "proxy":
            return 0, 0
        n_cal = calibration_size(None if self.calibrate < 0 else self.calibrate, self.pool)
        return (self.validation if self.resolved_val_model() in ("target", "both") else 0), n_cal

    def rerank_examples(self) -> int:
        """The shortlist the target scores again after the proxy, as the pipeline resolves ``[rerank]``
        (by default for ``[select]``'s default 5%)."""
        from .rerank import shortlist_size
        from .selection import selection_size

        if self.warmup_on == "proxy":
            return 0
        return shortlist_size("auto", self.pool, selection_size(0.05, 0, self.pool)) if self.rerank < 0 else self.rerank

    def resolved_val_model(self) -> str:
        """``val_model``, or the order's default as the pipeline takes it."""
        from .runconfig import DEFAULT_VAL_MODEL

        return self.val_model or (DEFAULT_VAL_MODEL if self.warmup_on == "target" else "proxy")

    def align_steps(self) -> int:
        """The alignment's optimiser steps for this pool, as the align stage counts them."""
        px = self.stage_proxy
        return px.alignment_steps(px.steps_per_pass(self.pool))


# ---------------------------------------------------------------------------------------------
# Measuring a model on the meta device
# ---------------------------------------------------------------------------------------------


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def param_bytes(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(_nbytes(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def saved_activation_bytes(model: nn.Module, batch: int, length: int) -> int:
    """Bytes the forward of a ``(batch, length)`` batch keeps for its backward (meta device, exact for
    the model's code), the backward reaching the inputs as the probe's and the features' do."""
    seen: dict[int, int] = {}
    weights = {p.untyped_storage()._cdata for p in model.parameters()}  # saved too, but resident anyway

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in weights:
            seen[st._cdata] = st.nbytes()
        return t

    ids = torch.zeros(batch, length, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=emb)  # no mask: a data-dependent check on it cannot run on meta tensors
    return sum(seen.values())


def proxy_double_backward_bytes(model: nn.Module, sparsity: float, length: int) -> int:
    """Bytes the alignment's proxy pass keeps for one sequence of ``length`` tokens: the forward's
    saved tensors and those its ``create_graph`` backward saves for the second backward (meta device,
    eager attention as the alignment runs it). Replaces ``model``'s projections by factors in place."""
    from .lowrank import FactorizedLinear
    from .models import get_submodule_parent

    factors = []
    for name, mod in compressible_modules(model).items():
        m, k = _shape(mod)
        r = rank_for_sparsity(m, k, sparsity)
        if r is None:
            continue
        f = FactorizedLinear(k, m, r, bias=mod.bias is not None, dtype=mod.weight.dtype, device="meta")
        parent, child = get_submodule_parent(model, name)
        setattr(parent, child, f)
        factors += [f.A.weight, f.B.weight]
    if not factors:
        return 0
    model.set_attn_implementation("eager")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in factors:
        p.requires_grad_(True)
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in weights:
            seen[st._cdata] = st.nbytes()
        return t

    ids = torch.zeros(1, length, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        emb = model.get_input_embeddings()(ids).detach()
        loss = per_example_loss(model(inputs_embeds=emb).logits, ids).mean()
        torch.autograd.grad(loss, factors, create_graph=True)
    return sum(seen.values())


def input_groups(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, str]:
    """Module → the first module that reads the same input tensor (q/k/v, gate/up), from a meta forward."""
    owner: dict[int, tuple[torch.Tensor, str]] = {}
    group: dict[str, str] = {}

    def hook(name):
        def fwd(_m, inputs, _o):
            x = inputs[0]
            if id(x) not in owner:
                owner[id(x)] = (x, name)  # the tensor is held, so its id is not reused in this pass
            group[name] = owner[id(x)][1]
        return fwd

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 4, dtype=torch.long, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return group


def _shape(mod: nn.Module) -> tuple[int, int]:
    w = mod.weight
    return (w.shape[0], w.shape[1]) if isinstance(mod, nn.Linear) else (w.shape[1], w.shape[0])


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelFacts:
    params: int
    weight_bytes: int
    vocab: int
    blocks: int
    layers: dict[str, tuple[int, int]]          # compressible projection → (out, in)
    groups: dict[str, str]                       # projection → owner of its input moment
    saved_per_token: float                       # activation bytes kept per token (batch of 1 × length)
    block_of: dict[str, int]
    hidden: int = 0                              # width of the residual stream (a block's input)


def model_facts(model: nn.Module, length: int) -> ModelFacts:
    mods = compressible_modules(model)
    prefix, blocks = decoder_layers(model)
    cfg = model.config
    vocab = int(getattr(cfg, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
    return ModelFacts(
        params=sum(p.numel() for p in model.parameters()), weight_bytes=param_bytes(model), vocab=vocab,
        blocks=len(blocks), layers={n: _shape(m) for n, m in mods.items()}, groups=input_groups(model, mods),
        saved_per_token=saved_activation_bytes(model, 1, length) / length,
        block_of={n: block_of(prefix, n) for n in mods},
        hidden=int(model.get_input_embeddings().weight.shape[1]))


def _moment_bytes(f: ModelFacts, blocks: set[int], statistics: str = "moments", tokens: int = 0, es: int = 4) -> int:
    """What the probe keeps for the given blocks: float64 moments (one input moment per distinct
    input, one per output: width² each) or the sampled rows (``tokens`` × width, in the model's dtype)."""
    total = 0
    for n, (m, k) in f.layers.items():
        if f.block_of[n] in blocks:
            if statistics == "samples":
                total += es * tokens * (m + (k if f.groups[n] == n else 0))
            else:
                total += 8 * m * m + (8 * k * k if f.groups[n] == n else 0)
    return total


def _ranks(f: ModelFacts, sparsity: float) -> dict[str, int | None]:
    return {n: rank_for_sparsity(m, k, sparsity) for n, (m, k) in f.layers.items()}


def _proxy_params(f: ModelFacts, sparsity: float) -> int:
    removed = 0
    ranks = _ranks(f, sparsity)
    for n, (m, k) in f.layers.items():
        r = ranks[n]
        if r is not None:
            removed += m * k - r * (m + k)
    return f.params - removed


def _store_dim(f: ModelFacts, sparsity: float, trains: str, lora_rank: int, proj_dim: int, total_dim: int) -> int:
    """Feature dimensions per example, from the featurised layers' shapes (as ``features`` splits k)."""
    shapes = []
    ranks = _ranks(f, sparsity)
    for n, (m, k) in f.layers.items():
        r = ranks[n]
        if trains == "lora":
            shapes += [(lora_rank, k), (m, lora_rank)]
        elif r is not None:
            shapes += [(r, k), (m, r)]   # B (r×n) and A (m×r)
        else:
            shapes.append((m, k))
    per = max(1, total_dim // len(shapes)) if total_dim else proj_dim
    return sum(a * b for a, b in (side_dims(m, k, per) for m, k in shapes))


def plan(config: PlanConfig) -> dict:
    """Per-stage peak memory (GiB), FLOPs and store size for the IProX run and the target-only run."""
    px, wc, fc = config.stage_proxy, config.stage_warmup, config.stage_features
    n_probe, _ = px.split_sizes(config.pool)
    dt = DTYPES[config.dtype]
    es = torch.finfo(dt).bits // 8
    model = meta_model(model_config(config.model), dt)
    f = model_facts(model, config.max_length)
    L, B, V = config.max_length, px.batch_size, f.vocab
    W = f.weight_bytes
    P_proxy = _proxy_params(f, px.sparsity)
    W_proxy = P_proxy * es
    ratio = P_proxy / f.params

    def logits(batch):
        # The loss's float32 (B, T, V) tensors alive at once in its backward: the logits, their
        # shifted float32 copy, the saved log-softmax, and the gradients of the last two.
        return 5 * batch * L * V * 4

    def acts(batch, scale=1.0):
        return batch * L * f.saved_per_token * scale

    def fwd_flops(params, examples):
        return 2 * params * examples * L

    # Stage 1: the target, the proxy (its copy refers to the target's weights until factors replace
    # them, so it never holds more than the proxy's own tensors), one pass's moments and the
    # eigendecomposition of the largest moment (float32, a batch of up to 8 same-sized ones: input,
    # vectors and workspace).
    def stage1(per_pass: int) -> float:
        per_pass = per_pass or f.blocks
        passes = [set(range(s, min(s + per_pass, f.blocks))) for s in range(0, f.blocks, per_pass)]
        moments = max(_moment_bytes(f, p, px.probe_statistics, px.probe_tokens, es) for p in passes)
        widest = max(max(m, k) for m, k in f.layers.values())
        if px.probe_statistics == "samples":  # one thin SVD and one whitened core at a time, float32
            eig = 3 * 4 * (px.probe_tokens * widest + max(m * k for m, k in f.layers.values()))
        else:
            eig = 3 * 8 * widest * widest * 4
        return W + W_proxy + moments + max(acts(B) + logits(B), eig)

    budget = config.budget_gib * GIB
    chosen = px.probe_blocks_per_pass
    fits = [p for p in range(f.blocks, 0, -1) if stage1(p) <= budget]
    if stage1(chosen) > budget and fits:
        chosen = fits[0]
    n_train = wc.n_train(config.pool)
    store_dim = _store_dim(f, px.sparsity, wc.proxy_trains, wc.lora_rank, fc.proj_dim, fc.total_dim)
    target_dim = _store_dim(f, 0.0, "lora", wc.lora_rank, fc.proj_dim, fc.total_dim)
    sb = 2 if fc.store_dtype == "float16" else 4
    adam = lambda trained_params: trained_params * (4 + 4 + 4 + (4 if es < 4 else 0))  # noqa: E731  (grad, m, v, master)
    # the factored layers: (rows, columns, rank)
    factored = [(m, k, r) for (m, k), r in zip(f.layers.values(), _ranks(f, px.sparsity).values()) if r]
    factor_params = sum(r * (m + k) for m, k, r in factored)
    lora_params = sum(wc.lora_rank * (m + k) for m, k in f.layers.values())
    target_first = config.warmup_on == "target"
    # target-first, the proxy carries the target's LoRA checkpoints: its features are the LoRA's
    proxy_lora = target_first or wc.proxy_trains == "lora"
    if target_first:
        store_dim = target_dim
    trained_proxy = lora_params if proxy_lora else factor_params
    n_val_target, n_cal = config.target_featurises()
    n_feat_proxy = config.pool + (config.validation if config.resolved_val_model() != "target" else 0)
    n_feat = config.pool + config.validation
    # Alignment, one micro-batch at a time in two phases (of batch_size over the summed gradient, of
    # align_micro_batch per example). Both hold the two models and the optimiser (on the device
    # unless offloaded: then only the factors' gradients). The target phase adds its forward's
    # activations (only the blocks' inputs and one block's recomputation when checkpointed) and its
    # loss; the proxy phase the target's logits, its forward's and create_graph backward's saved
    # tensors and its loss. Over the summed gradient (align_cosine "batch") both
    # phases hold the target's weight gradients G of the factored layers. Per example, G is never
    # formed; instead the target's inputs and output gradients at those layers stay for the proxy
    # phase, which adds the target's token tensors projected through the factors and, per layer, the
    # cheaper of the float32 Gram matrices and the formed per-example gradients (iprox.example_cosines).
    optim = factor_params * es if px.offload_optimizer else adam(factor_params)
    Ba = px.align_micro_batch if px.align_cosine == "example" else B
    if px.align_cosine == "example":
        G = 0
        compare = Ba * sum(L * (m + k + 2 * r) * es + min(6 * L * L * 4, 2 * (m * r + r * k) * (es + 4))
                          for m, k, r in factored)
    else:
        G = sum(m * k for m, k, _ in factored) * es
        compare = 0
    if px.gradient_checkpointing:
        target_acts = Ba * L * (f.blocks * f.hidden * es + f.saved_per_token / f.blocks)
    else:
        target_acts = acts(Ba)
    proxy_acts = Ba * proxy_double_backward_bytes(meta_model(model_config(config.model), dt), px.sparsity, L)
    align_common = W + W_proxy + optim + G
    # (+ 7 float32 vocabulary-sized tensors in the proxy phase: the loss's first and second
    # derivatives, transient, so not among the saved tensors; calibrated against measured peaks)
    align_peak = max(target_acts + logits(Ba),
                     Ba * L * V * es + proxy_acts + 7 * Ba * L * V * 4 + factor_params * es + compare)
    stages = {
        "probe+factorise": {"peak_gib": stage1(chosen) / GIB, "flops": 2 * fwd_flops(f.params, n_probe)},
        # target fwd+bwd with weight gradients (a recomputed forward more when checkpointed), proxy
        # fwd with a double backward (~2 backwards)
        "align": {"peak_gib": (align_common + align_peak) / GIB,
                  "flops": config.align_steps() * B * px.grad_accum * L * 2 * ((3 + px.gradient_checkpointing) * f.params
                                                             + 4 * P_proxy)},
        "warmup (proxy)": {"peak_gib": (W_proxy + adam(trained_proxy) + acts(wc.batch_size, ratio) + logits(wc.batch_size)) / GIB,
                           "flops": wc.epochs * 3 * fwd_flops(P_proxy, n_train)},
        "features (proxy)": {"peak_gib": (W_proxy + 4 * trained_proxy * 2 + acts(fc.batch_size, ratio)
                                          + logits(fc.batch_size)) / GIB,
                             "flops": wc.epochs * 2 * fwd_flops(P_proxy, n_feat_proxy),
                             "store_gib": wc.epochs * n_feat_proxy * store_dim * sb / GIB, "dim": store_dim},
        "warmup (target)": {"peak_gib": (W + adam(lora_params) + acts(wc.batch_size) + logits(wc.batch_size)) / GIB,
                            "flops": wc.epochs * 3 * fwd_flops(f.params, n_train)},
        "features (target)": {"peak_gib": (W + 4 * lora_params * 2 + acts(fc.batch_size) + logits(fc.batch_size)) / GIB,
                              "flops": wc.epochs * 2 * fwd_flops(f.params, n_feat),
                              "store_gib": wc.epochs * n_feat * target_dim * sb / GIB, "dim": target_dim},
    }
    # The IProX run's stages in its order; the target-only run (LESS on the target) warms up and
    # featurises the target alone. Target-first, the warm-up is the target's in both, and the target
    # featurises the validation examples and the calibration subset at each checkpoint, before it goes.
    if target_first:
        extra = n_val_target + n_cal
        stages["features (target, val + calibration)"] = {
            "peak_gib": stages["features (target)"]["peak_gib"],
            "flops": wc.epochs * 2 * fwd_flops(f.params, extra),
            "store_gib": wc.epochs * extra * target_dim * sb / GIB, "dim": target_dim,
            "examples": {"validation": n_val_target, "calibration": n_cal}}
        iprox = ["probe+factorise", "align", "warmup (target)", "features (target, val + calibration)",
                 "features (proxy)"]
        n_rerank = config.rerank_examples()
        if n_rerank:  # the target again, on the proxy's shortlist (its validation stores are reused)
            stages["features (target, rerank)"] = {
                "peak_gib": stages["features (target)"]["peak_gib"],
                "flops": wc.epochs * 2 * fwd_flops(f.params, n_rerank),
                "store_gib": wc.epochs * n_rerank * target_dim * sb / GIB, "dim": target_dim,
                "examples": {"shortlist": n_rerank},
                # where the target's top k reach the shortlist's end it grows (iprox.rerank), to at most
                "max_examples": min(config.pool, math.floor(config.rerank_growth * n_rerank + 1e-9))}
            iprox.append("features (target, rerank)")
            stages["features (proxy)"]["peak_gib"] += W / GIB  # the target stays resident for it
        del stages["warmup (proxy)"]
    else:
        iprox = ["probe+factorise", "align", "warmup (proxy)", "features (proxy)"]
    baseline = ["warmup (target)", "features (target)"]
    return {"model": config.model, "dtype": config.dtype, "params": f.params, "proxy_params": P_proxy,
            "blocks": f.blocks, "weights_gib": W / GIB, "proxy_weights_gib": W_proxy / GIB,
            "probe_blocks_per_pass": chosen, "probe_statistics": px.probe_statistics,
            "probe_fits_budget": stage1(chosen) <= budget,
            "budget_gib": config.budget_gib, "warmup_on": config.warmup_on, "stages": stages,
            "pipelines": {"iprox": iprox, "target-only": baseline},
            "proxy_flops": sum(stages[k]["flops"] for k in iprox),
            "target_flops": sum(stages[k]["flops"] for k in baseline)}


def format_plan(p: dict) -> str:
    width = max(len(n) for n in p["stages"]) + 1
    lines = [f"plan for {p['model']} in {p['dtype']}: {p['params'] / 1e9:.2f}B parameters "
             f"({p['weights_gib']:.1f} GiB), proxy {p['proxy_params'] / 1e9:.2f}B ({p['proxy_weights_gib']:.1f} GiB)",
             f"{'stage':<{width}} {'run':<11} {'peak GiB':>9} {'TFLOPs':>10} {'store GiB':>10}"]
    runs = p["pipelines"]
    for name, s in p["stages"].items():
        store = f"{s['store_gib']:>10.2f}" if "store_gib" in s else f"{'':>10}"
        run = "both" if all(name in r for r in runs.values()) else "IProX" if name in runs["iprox"] else "target-only"
        lines.append(f"{name:<{width}} {run:<11} {s['peak_gib']:>9.1f} {s['flops'] / 1e12:>10.1f} {store}")
    lines.append(f"IProX pipeline ({p['warmup_on']}-first) {p['proxy_flops'] / 1e12:.1f} TFLOPs against the target-only "
                 f"{p['target_flops'] / 1e12:.1f} ({p['proxy_flops'] / max(p['target_flops'], 1):.2f}x)")
    r = p["stages"].get("features (target, rerank)")
    if r and r["max_examples"] > r["examples"]["shortlist"]:
        more = r["flops"] * (r["max_examples"] / r["examples"]["shortlist"] - 1)
        lines.append(f"the rerank's shortlist of {r['examples']['shortlist']} grows to at most {r['max_examples']} where the "
                     f"target's top k reach its end ([rerank] max_growth): up to {more / 1e12:.1f} TFLOPs more "
                     f"({(p['proxy_flops'] + more) / max(p['target_flops'], 1):.2f}x)")
    verdict = "fits" if p["probe_fits_budget"] else "does NOT fit"
    lines.append(f"stage 1 with probe_blocks_per_pass = {p['probe_blocks_per_pass'] or 'all'} and probe_statistics = "
                 f"{p['probe_statistics']}: {verdict} in {p['budget_gib']:g} GiB")
    return "\n".join(lines)


PLAN_SECTIONS = ("proxy", "warmup", "features")


def plan_settings(given: dict, run_config: str = "", sets: list[str] | tuple = ()) -> dict:
    """:class:`PlanConfig`'s arguments for ``iprox plan``: a run config's (its target, ``max_length``,
    stage sections and the pool's sampled size), then ``given`` (the flags), then each
    ``SECTION.KEY=VALUE`` of ``sets`` (a TOML value; a bare word is a string)."""
    import tomllib

    kw = dict(given)
    if run_config:
        from .data import load_examples
        from .runconfig import calibrate as run_calibrate
        from .runconfig import load_config, rerank_fraction, rerank_growth
        from .runconfig import val_model as run_val_model
        from .rerank import shortlist_size
        from .selection import selection_size

        run = load_config(run_config)
        counted = {}
        for key in ("pool", "validation"):
            if key not in kw:  # the sampled size of every source, as the run's pool stage takes it
                counted[key] = sum(s["sample"] or len(load_examples(s["path"])) for s in getattr(run, key))
        # (the pipeline's own keys: the preconditioner is per store, the validation model a few examples)
        features = {k: v for k, v in run.features.items() if k not in ("train_grad", "val_model", "calibrate")}
        n_cal = run_calibrate(run)
        n_pool = kw.get("pool", counted.get("pool"))
        fraction = rerank_fraction(run)
        k = selection_size(run.select.get("fraction", 0.0), run.select.get("top_k", 0), n_pool)
        kw = {"model": run.model, "max_length": run.max_length, **counted,
              "proxy": dict(run.proxy), "warmup": dict(run.warmup), "features": features,
              "warmup_on": run.warmup_on, "val_model": run_val_model(run),
              "calibrate": -1 if n_cal == "auto" else n_cal,
              "rerank": shortlist_size(fraction, n_pool, k) if fraction else 0,
              "rerank_growth": float(rerank_growth(run)), **kw}
    for item in sets:
        key, eq, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not (eq and dot and name) or section not in PLAN_SECTIONS:
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION one of {PLAN_SECTIONS}")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        kw.setdefault(section, {})[name.strip()] = parsed
    return kw
