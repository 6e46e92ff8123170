"""Stage 1 of IProX: build a compressed proxy of a target causal LM, save it, load it back.

``build_proxy`` replaces every compressible projection (attention and MLP projections inside the
decoder blocks) by a rank-r :class:`~iprox.lowrank.FactorizedLinear`, with r set by the sparsity.
The factors come from one of four initialisations:

* ``ipsvd``: influence-preserving SVD from probe moments (the method);
* ``svd``: plain truncated SVD of W (ignores which directions the data uses);
* ``random``: random factors of the same rank (no information at all);
* ``layer-drop``: no factorisation; keep evenly spaced decoder blocks to the same parameter budget
  (the paper's structural baseline).

The proxy folder holds ``model.safetensors`` (factored weights), the model's ``config.json``, the
tokenizer and ``proxy.json`` (format version, method, per-layer ranks, parameter counts, the
target's identity and weight hash, the resolved config). :func:`load_proxy` rebuilds a working
causal LM from it without the target.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from . import artifacts
from .runtime import check_types
from .data import load_examples, probe_split, tokenize_examples
from .ipsvd import (Decomposition, ipsvd_decomposition, ipsvd_decomposition_from_samples, random_factors, sample_bases,
                    svd_factors, truncate, whitening_bases)
from .loading import PROXY_FILE, PROXY_FORMAT_VERSION, STAGE1_DONE, complete_proxy, load_proxy, save_proxy  # noqa: F401  (load_proxy: the API)
from .session import Session
from .lowrank import FactorizedLinear, depth_ranks, rank_for_sparsity
from .models import (
    DTYPES,
    EMBEDDED_MODEL,
    block_of,
    compressible_modules,
    count_parameters,
    decoder_layers,
    get_submodule_parent,
    projection_weight,
    default_device,
    resolve_dtype,
    resolve_model,
    set_block_index,
    weights_hash,
)
from .distributed import barrier, on_rank0, rank_device
from .distributed import world as dist_world
from .probe import Samples, collect_moments

log = logging.getLogger(__name__)



@dataclass
class ProxyConfig:
    """Settings of stage 1 (``iprox build-proxy``).

    Attributes:
        model: target model (``smollm2-135m-instruct``, a ``.gguf`` file, a folder or a hub id).
        data: data files/folders; the probe set is drawn from them.
        out: proxy folder to write.
        sparsity: fraction of each compressed layer's parameters removed, in [0, 1).
        init: ``ipsvd``, ``svd``, ``random`` or ``layer-drop``.
        probe_examples: examples in the probe set, the head of a seeded shuffle of the data (0: as
            in the paper, a tenth of the alignment set's size, at least 16).
        probe_tokens: token positions sampled over the probe set, spread evenly per sequence. Use at
            least the widest layer's width so that no input direction goes unprobed.
        probe_blocks_per_pass: collect the probe statistics of this many decoder blocks per pass over
            the probe set (0: all in one pass). Memory then holds a few blocks' moments instead of
            all of them (an 8B model's take ~190 GB in float64), for one probe pass per group.
        probe_statistics: what the probe keeps: ``moments`` (float64 second moments, width² per
            distinct input and per output: an 8B model's are ~6 GB per decoder block) or ``samples``
            (the probed rows in the model's dtype, probe_tokens × width, and thin SVDs instead of
            eigendecompositions: ~0.6 GB per 8B block at 4,096 tokens in bf16). Same factors up to
            float rounding, in both forms (tested).
        probe_balance: how probe examples weigh in the output-gradient moment: ``loss`` (as the
            loss's gradient makes them: a long answer's tokens share one example's mean loss, so
            its gradients are small) or ``example`` (each example's probed gradients scaled to the
            same total energy, per layer, whatever its length).
        rank_multiple: round ranks up to this multiple (128 suits GPU kernels on big models; 1 keeps
            the compression exact on small ones).
        depth_slope: how the parameters kept are spread over depth, in [-1, 1]: 0 keeps the same
            fraction of every layer; s > 0 keeps ``(1 − sparsity)(1 + s)`` of the first decoder
            block's, ``(1 − sparsity)(1 − s)`` of the last's, linearly in between (about the same
            total; see :func:`~iprox.lowrank.depth_ranks`). A lower block's error reaches every block
            above it: slope 0.6 raises a stage-1 proxy's gradient cosine with the target (0.26 → 0.32
            on SmolLM2-135M at 0.5), but after the default alignment the gain was gone and the
            pool's ranking agreed less with the target's (BENCHMARKS.md), hence 0.
        ridge: relative ridge added to the probe moments (fraction of their mean eigenvalue).
        ipsvd_form: ``full`` (full-ridge solution) or ``skinny`` (the paper's span-restricted form).
        factor_dtype: dtype of the eigendecompositions and SVDs, on the model's device: float32
            (fast on accelerators; tested against float64 on ill-conditioned moments) or float64.
        max_length: token budget per example; longer ones lose prompt tokens first.
        batch_size: sequences per forward/backward pass (probe and alignment).
        seed: seeds the probe slice, the token sampling and random factors.
        dtype: dtype the target is loaded in and the proxy saved in.
        device: torch device; empty picks cuda when available.
        trust_remote_code: passed to transformers.
        align_steps: stage-2 optimiser steps; when set, they replace align_epochs.
        align_epochs: passes over the alignment set (default 5, as in the paper; 0 with align_steps 0:
            stage 1 only). Stage 2 is skipped, with a log line, for a proxy without factors
            (layer-drop, sparsity 0).
        align_examples: size of the alignment set, the slice after the probe set (0: 1% of the
            data, at least 16; the paper takes 1%).
        align_min_steps: the fewest optimiser steps ``align_epochs`` counts to (0: no floor; not
            applied to ``align_steps``). A pool under 1,600 examples has an alignment set of 16:
            5 epochs at 4 examples a step are 20 steps, and 40 ranked a GSM8K target task's pool
            closer to the target's on 3 of 3 seeds (BENCHMARKS.md). From a set of 32 (a pool of
            3,200) up, 5 epochs are 40 steps or more and the floor changes nothing.
        lambda_kl: weight of the KL anchor against the gradient-alignment term.
        temperature: softmax temperature τ of the KL term (scaled by τ²).
        lr, weight_decay: AdamW settings for the factors.
        grad_accum: micro-batches of ``batch_size`` per optimiser step.
        align_cosine: where the alignment takes its gradient cosine: over each micro-batch's summed
            gradient (``batch``), or over each example's own gradient (``example``: the same
            ``batch_size × grad_accum`` examples per step, taken ``align_micro_batch`` at a time),
            as influence is per example. Per micro-batch, short answers' large gradients dominate
            the sum and long answers go unaligned.
        align_micro_batch: under ``align_cosine = "example"``, the examples of one forward and
            backward pass: every example's gradients come from it in token form, never formed
            (:mod:`iprox.example_cosines`). The objective does not depend on it; more examples per
            pass hold that many examples' activations, for an accelerator's sake (on the CPU one pass
            of 4 was slower than 4 passes of one).
        align_space: which gradients the alignment compares: ``factors`` (the proxy's factor
            gradients with the target's weight gradient projected on the factors' subspaces, as the
            paper) or ``lora`` (the gradients of a target's LoRA warm-up adapters, carried by both
            models: the space the target-first order's features are read in; needs
            ``align_checkpoint``, which ``iprox run`` fills with its own warm-up's last checkpoint).
        align_checkpoint: the target's LoRA warm-up checkpoint folder (``<warmup>/checkpoint-<epoch>``)
            whose adapters ``align_space = "lora"`` aligns in.
        checkpoint_every: save factors and optimiser state every K steps (resume point).
        gradient_checkpointing: in the alignment, recompute the target's decoder blocks in its
            backward instead of keeping their activations (the proxy's double backward keeps its
            own either way): less memory for about a third more target compute.
        offload_optimizer: keep the alignment's float32 master factors and Adam moments in host
            memory and step there: up to 16 bytes per factor parameter off the accelerator.
        overwrite: replace an existing proxy made with other settings.
        progress: show progress bars.
    """

    model: str = EMBEDDED_MODEL
    data: list[str] = field(default_factory=list)
    out: str = "proxy"
    sparsity: float = 0.5
    init: Literal["ipsvd", "svd", "random", "layer-drop"] = "ipsvd"
    probe_examples: int = 0
    probe_tokens: int = 4096
    probe_blocks_per_pass: int = 0
    probe_statistics: Literal["moments", "samples"] = "moments"
    probe_balance: Literal["loss", "example"] = "example"
    rank_multiple: int = 1
    depth_slope: float = 0.0
    ridge: float = 1e-3
    ipsvd_form: Literal["full", "skinny"] = "full"
    factor_dtype: Literal["float32", "float64"] = "float32"
    max_length: int = 512
    batch_size: int = 4
    seed: int = 0
    dtype: str = "float32"
    device: str = ""
    trust_remote_code: bool = False
    align_steps: int = 0
    align_epochs: float = 5.0
    align_examples: int = 0
    align_min_steps: int = 40
    lambda_kl: float = 0.1
    temperature: float = 2.0
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_accum: int = 1
    checkpoint_every: int = 10
    align_cosine: Literal["batch", "example"] = "example"
    align_micro_batch: int = 1
    align_space: Literal["factors", "lora"] = "factors"
    align_checkpoint: str = ""
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    overwrite: bool = False
    progress: bool = True

    def split_sizes(self, n_data: int) -> tuple[int, int]:
        """``(probe, alignment)`` set sizes for ``n_data`` examples.

        Defaults follow the paper: the alignment set is about 1% of the data, the probe set a tenth
        of that; both at least 16 examples. The probe set is the head of the seeded shuffle, the
        alignment set the slice right after it, so the two never overlap.
        """
        n_align = self.align_examples or max(16, round(0.01 * n_data))
        n_probe = self.probe_examples or max(16, round(0.1 * n_align))
        return n_probe, n_align

    def alignment_steps(self, per_epoch: int) -> int:
        """Stage 2's optimiser steps for an alignment set of ``per_epoch`` steps per pass:
        ``align_steps`` when given, else ``align_epochs`` passes, at least ``align_min_steps``
        (0 when no alignment is asked for)."""
        if self.align_steps:
            return self.align_steps
        if self.align_epochs <= 0:
            return 0
        return max(self.align_min_steps, math.ceil(self.align_epochs * per_epoch))

    def floor_binds(self, n_examples: int) -> bool:
        """Whether ``align_min_steps`` raises the steps ``align_epochs`` counts for ``n_examples``
        of data (counted before tokenisation, which drops an example without response tokens).
        Only then is it among the settings a stage records: a proxy made before the floor
        existed matches wherever the floor changes nothing."""
        if self.align_steps or not self.aligns:
            return False
        per_epoch = self.steps_per_pass(n_examples)
        return self.alignment_steps(per_epoch) > math.ceil(self.align_epochs * per_epoch)

    def steps_per_pass(self, n_examples: int) -> int:
        """Optimiser steps of one pass over the alignment set of ``n_examples`` of data: the slice
        after the probe set (counted before tokenisation)."""
        from .alignment import steps_per_epoch

        n_probe, n_align = self.split_sizes(n_examples)
        return steps_per_epoch(max(1, min(n_align, n_examples - n_probe)), self.batch_size, self.grad_accum)

    @property
    def has_factors(self) -> bool:
        return self.init != "layer-drop" and self.sparsity > 0

    @property
    def aligns(self) -> bool:
        """Whether stage 2 runs: asked for (steps or epochs) and there are factors to align."""
        return (self.align_steps > 0 or self.align_epochs > 0) and self.has_factors

    def __post_init__(self):
        check_types(self)
        if isinstance(self.data, str):
            self.data = [self.data]
        self.data = [str(d) for d in self.data]
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) (fraction of parameters removed), got {self.sparsity}")
        if self.init == "ipsvd" and not self.data:
            raise ValueError("ipsvd needs probe data: pass --data FILE_OR_FOLDER")
        if self.probe_blocks_per_pass < 0:
            raise ValueError(f"probe_blocks_per_pass must be >= 0 (0: all blocks in one pass), got {self.probe_blocks_per_pass}")
        if self.probe_examples < 0 or self.probe_tokens < 1:
            raise ValueError("probe_examples must be >= 0 (0: automatic) and probe_tokens >= 1")
        if not -1.0 <= self.depth_slope <= 1.0:
            raise ValueError(f"depth_slope must be in [-1, 1] (0: the same fraction of every layer), got {self.depth_slope}")
        if self.depth_slope and self.init == "layer-drop":
            raise ValueError("depth_slope spreads ranks over the factored layers; layer-drop has none (leave it 0)")
        if self.rank_multiple < 1:
            raise ValueError("rank_multiple must be >= 1")
        if self.ridge <= 0:
            raise ValueError(f"ridge must be > 0 (it keeps the inverse square roots finite), got {self.ridge}")
        self.dtype = resolve_dtype(self.dtype, self.device)
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.align_steps < 0 or self.align_epochs < 0:
            raise ValueError("align_steps and align_epochs must be >= 0")
        if self.align_steps and self.init == "layer-drop":
            raise ValueError("a layer-drop proxy has no factors to align; leave --align-steps 0")
        if self.align_steps and self.sparsity == 0:
            raise ValueError("sparsity 0 leaves every layer dense: nothing to align; leave --align-steps 0")
        if self.lambda_kl < 0 or self.temperature <= 0 or self.lr <= 0:
            raise ValueError("need lambda_kl >= 0, temperature > 0 and lr > 0")
        if self.grad_accum < 1 or self.checkpoint_every < 1:
            raise ValueError("grad_accum and checkpoint_every must be >= 1")
        if self.align_examples < 0:
            raise ValueError("align_examples must be >= 0 (0: 1% of the data)")
        if self.align_micro_batch < 1:
            raise ValueError(f"align_micro_batch must be >= 1, got {self.align_micro_batch}")
        if self.align_micro_batch > 1 and self.align_cosine != "example":
            raise ValueError('align_micro_batch sets the passes of align_cosine = "example"; over the summed '
                             'gradient (align_cosine = "batch") each pass is a micro-batch of batch_size')
        if self.align_min_steps < 0:
            raise ValueError(f"align_min_steps must be >= 0 (0: no floor), got {self.align_min_steps}")
        if self.align_checkpoint and self.align_space != "lora":
            raise ValueError('align_checkpoint is the LoRA checkpoint of align_space = "lora"; set that too, '
                             'or leave align_checkpoint out')
        if self.align_checkpoint:
            self.align_checkpoint = str(Path(self.align_checkpoint).expanduser().resolve())


@dataclass
class ProxySummary:
    """What :func:`build_proxy` did, for printing and tests."""

    out: str
    method: str
    sparsity: float
    target_params: int
    proxy_params: int
    layers_total: int
    layers_compressed: int
    timings: dict[str, float]
    skipped: bool = False
    stage2: dict[str, Any] | None = None

    def format(self) -> str:
        ratio = self.proxy_params / max(self.target_params, 1)
        lines = [
            f"proxy: {self.out}" + ("  (already complete; skipped)" if self.skipped else ""),
            f"  method {self.method}, sparsity {self.sparsity:g}",
            f"  layers compressed: {self.layers_compressed} of {self.layers_total}",
            f"  parameters: {self.target_params:,} -> {self.proxy_params:,} ({ratio:.1%} of the target)",
        ]
        if self.timings:
            lines.append("  stage-1 time: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items()))
        if self.stage2:
            s2 = self.stage2
            lines.append(f"  stage 2: {s2['steps']} steps on {s2['examples']} examples in {s2['seconds']:.0f}s; "
                         f"final L_GA {s2['final_grad_align']:.4f}, L_KL {s2['final_kl']:.4f}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def _layer_record(name: str, mod: nn.Module, rank: int | None) -> dict[str, Any]:
    W = projection_weight(mod)
    m, n = W.shape
    bias = getattr(mod, "bias", None) is not None
    before = m * n + (m if bias else 0)
    after = before if rank is None else rank * (m + n) + (m if bias else 0)
    return {"name": name, "kind": type(mod).__name__, "out_features": m, "in_features": n, "bias": bias,
            "rank": rank, "params_before": before, "params_after": after}


def decompose_layers(mods: dict[str, nn.Module], moments: dict[str, Any], ridge: float, ipsvd_form: str,
                     factor_dtype: str, decompositions: dict[str, Decomposition]) -> tuple[int, float]:
    """The rank-free IPSVD of each projection in ``mods`` (name → module) from its probe statistics,
    into ``decompositions``; returns how many bases it computed and in how many seconds."""
    # One basis per distinct statistic (q/k/v and gate/up share their input's), computed once:
    # eigendecompositions of moments, batched over same-sized ones, or thin SVDs of probe samples
    # (the bounded-memory route, nothing width² formed).
    samples = isinstance(next(iter(moments.values())), Samples)
    sides = (lambda st: (st.X_h, st.X_d)) if samples else (lambda st: (st.C_h, st.C_d))
    make_bases, decompose = ((sample_bases, ipsvd_decomposition_from_samples) if samples
                             else (whitening_bases, ipsvd_decomposition))
    todo = list(mods)
    distinct: dict[int, torch.Tensor] = {}
    for n in todo:
        for X in sides(moments[n]):
            distinct.setdefault(id(X), X)
    t0 = time.perf_counter()
    bases = dict(zip(distinct, make_bases(list(distinct.values()), ridge, ipsvd_form, DTYPES[factor_dtype])))
    seconds = time.perf_counter() - t0
    for n in todo:
        h, d = sides(moments[n])
        W = projection_weight(mods[n]).detach().to(h.device)
        decompositions[n] = decompose(W, bases[id(h)], bases[id(d)])
    del bases
    return len(distinct), seconds


def factorize_model(
    model: nn.Module,
    sparsity: float,
    init: str,
    moments: dict[str, Any] | None = None,
    rank_multiple: int = 1,
    ridge: float = 1e-3,
    ipsvd_form: Literal["full", "skinny"] = "full",
    seed: int = 0,
    progress: bool = False,
    factor_dtype: Literal["float32", "float64"] = "float32",
    decompositions: dict[str, Decomposition] | None = None,
    names: set[str] | None = None,
    ranks: dict[str, int] | None = None,
    release_moments: bool = False,
) -> list[dict[str, Any]]:
    """Replaces the compressible projections of ``model`` by factored ones, in place, one decoder
    block at a time.

    Args:
        model: the model to compress (modified in place).
        sparsity: fraction of each layer's parameters removed.
        init: ``ipsvd``, ``svd`` or ``random``.
        moments: ``{name: Moments}`` from :func:`~iprox.probe.collect_moments` (ipsvd only).
        rank_multiple, ridge, ipsvd_form, seed: see :class:`ProxyConfig`.
        factor_dtype: ``float32`` or ``float64``, the dtype of the eigendecompositions and SVDs (on
            the moments' device).
        decompositions: a dict to keep each layer's rank-free IPSVD in (and to reuse it from when
            it is already there): building the same probe at another sparsity then costs no
            eigendecomposition or SVD.
        names: factorise only these modules (their records alone are returned); None: all.
        ranks: explicit ranks of some of the layers ``sparsity`` compresses, in place of its uniform
            ones (:func:`~iprox.lowrank.depth_ranks`).
        release_moments: drop each block's entries from ``moments`` once its layers are factorised
            (the caller's dict shrinks as the blocks are done, and its tensors are freed with it).

    Returns:
        One record per compressible layer (name, shape, rank or None when left dense, parameters).
    """
    gen = torch.Generator().manual_seed(seed)
    mods = compressible_modules(model)
    if names is not None:
        mods = {n: m for n, m in mods.items() if n in names}
    shapes = {name: tuple(projection_weight(mod).shape) for name, mod in mods.items()}
    explicit = ranks or {}
    ranks = {name: rank_for_sparsity(m, n, sparsity, rank_multiple) for name, (m, n) in shapes.items()}
    ranks.update({n: r for n, r in explicit.items() if ranks.get(n) is not None})
    keep = decompositions is not None
    decompositions = {} if decompositions is None else decompositions
    if init not in ("ipsvd", "svd", "random"):
        raise ValueError(f"factorize_model does not handle init {init!r}")
    if init == "ipsvd" and moments is None and any(
            ranks[n] is not None and n not in decompositions for n in mods):
        raise ValueError("ipsvd needs probe moments")
    records = [_layer_record(name, mod, ranks[name]) for name, mod in mods.items()]
    # Block by block: one block's eigenbases and decompositions live at a time beside the moments.
    # All of them at once hold a float32 eigenbasis per moment, half the moments' bytes again, and
    # every layer's rank-free decomposition (at 1B about 13.5 and 5 GiB beside 27 GiB of moments,
    # which the plan does not count). With ``release_moments`` each block's moments go too.
    prefix = decoder_layers(model)[0]
    by_block: dict[int, list[str]] = {}
    for name in mods:
        by_block.setdefault(block_of(prefix, name), []).append(name)
    n_bases, seconds = 0, 0.0
    samples = bool(moments) and isinstance(next(iter(moments.values())), Samples)
    for names_b in tqdm(list(by_block.values()), desc=f"factorise ({init})", unit="block", disable=not progress):
        if init == "ipsvd":
            todo = {n: mods[n] for n in names_b if ranks[n] is not None and n not in decompositions}
            if todo:
                done = decompose_layers(todo, moments, ridge, ipsvd_form, factor_dtype, decompositions)
                n_bases, seconds = n_bases + done[0], seconds + done[1]
        for name in names_b:
            rank = ranks[name]
            if rank is not None:
                _install_factors(model, name, mods[name], rank, init, decompositions, gen, keep)
        if release_moments and moments is not None:
            for name in names_b:
                moments.pop(name, None)
    if n_bases:
        log.info("%s of %d distinct %s in %.1fs (%s)", "thin SVDs" if samples else "eigendecompositions", n_bases,
                 "sample matrices" if samples else "moments", seconds, factor_dtype)
    return records


def _install_factors(model: nn.Module, name: str, mod: nn.Module, rank: int, init: str,
                     decompositions: dict[str, Decomposition], gen: torch.Generator, keep: bool) -> None:
    """Replaces projection ``name`` of ``model`` by its rank-``rank`` factors (the decomposition is
    dropped once used unless ``keep``)."""
    W = projection_weight(mod).detach()
    m, n = W.shape
    if init == "ipsvd":
        dec = decompositions[name] if keep else decompositions.pop(name)
        A, B = truncate(dec, rank)
    elif init == "svd":
        A, B = svd_factors(W, rank)
    else:
        A, B = random_factors(W, rank, gen)
    bias = getattr(mod, "bias", None)
    new = FactorizedLinear(n, m, rank, bias=bias is not None, dtype=W.dtype, device=W.device)
    new.set_factors(A.to(W), B.to(W), None if bias is None else bias.detach())
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def drop_layers(model: nn.Module, sparsity: float) -> tuple[list[int], list[dict[str, Any]]]:
    """Keeps ``round((1 − ρ)·L)`` evenly spaced decoder blocks (at least one), in place.

    Returns:
        ``(kept_block_indices, layer_records)``; records of dropped blocks' projections have rank 0
        and zero parameters after.
    """
    prefix, layers = decoder_layers(model)
    L = len(layers)
    k = max(1, round((1.0 - sparsity) * L))
    keep = sorted({round(i * (L - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]
    records = []
    for name, mod in compressible_modules(model).items():
        idx = int(name[len(prefix) + 1 :].split(".")[0])
        rec = _layer_record(name, mod, None)
        if idx not in keep:
            rec.update(rank=0, params_after=0)
        records.append(rec)
    new_list = nn.ModuleList([layers[i] for i in keep])
    # Attention modules carry their block index for the KV cache; renumber the kept ones.
    for new_i, block in enumerate(new_list):
        set_block_index(block, new_i)
    parent, child = get_submodule_parent(model, prefix)
    setattr(parent, child, new_list)
    model.config.num_hidden_layers = len(keep)
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == L:
        model.config.layer_types = [layer_types[i] for i in keep]
    return keep, records


def build_proxy(config: ProxyConfig, model: nn.Module | None = None, tokenizer=None,
                session: Session | None = None) -> ProxySummary:
    """Runs stage 1 (and stage 2 when ``align_steps``/``align_epochs`` ask for it) into ``config.out``.

    An interrupted run resumes: a finished stage 1 is loaded from the folder instead of rebuilt, and
    alignment continues from its last checkpoint.

    Args:
        config: stage settings.
        model, tokenizer: an already loaded target (tests, benchmarks); loaded from
            ``config.model`` when None. The passed model's weights are not modified (it is moved
            to ``config.device``).
        session: models shared with other stages of this process: the target comes from it, and
            the finished proxy is left in it for the warm-up.

    Returns:
        A summary; ``skipped`` is True when ``config.out`` already held this exact proxy.
    """
    out = Path(config.out)
    resolved = asdict(config)
    # Fail on bad input before touching the output folder.
    examples = load_examples(config.data) if config.data else None
    if config.aligns and not examples:
        raise ValueError("alignment needs data: pass --data (or --align-epochs 0 for stage 1 only)")
    if not config.floor_binds(len(examples or [])):  # (as ``align_proxy`` records it)
        del resolved["align_min_steps"]
    if (config.align_steps or config.align_epochs) and not config.has_factors:
        log.info("build-proxy: a %s proxy has no factors; stage 2 (alignment) does not apply",
                 "layer-drop" if config.init == "layer-drop" else "sparsity-0")
    if model is None:
        resolve_model(config.model)
    if config.align_space == "lora":
        from .alignment import lora_space_checkpoint

        info = lora_space_checkpoint(config, config.model if model is None else None)
        if info:  # the adapters' identity: a warm-up rerun into the same folder is another space
            resolved["align_checkpoint_uid"] = info.get("uid")
    # Under torchrun every rank builds the same proxy (the probe and the alignment split their
    # batches over the ranks and sum); rank 0 alone writes the folder.
    rank, _ = dist_world()
    if on_rank0(lambda: artifacts.prepare_stage(out, "build-proxy", resolved, overwrite=config.overwrite,
                                                resumable=True)):
        return _summary_from_folder(out, skipped=True)
    log.info("build-proxy config: %s", json.dumps(artifacts.comparable(resolved)))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    device = rank_device(config.device or default_device())
    session = session or Session(keep=False)
    if model is None:
        target, tokenizer = session.model(config.model, config.dtype, device, config.trust_remote_code)
        target_identity = lambda: session.identity(config.model, config.dtype, device, config.trust_remote_code)  # noqa: E731
    else:
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        target = model.to(device)
        target_identity = lambda: weights_hash(target)  # noqa: E731
    timings["load"] = time.perf_counter() - t0
    order = probe_split(len(examples), config.seed) if examples else []

    if (out / STAGE1_DONE).exists():
        log.info("stage 1 already done in %s; loading it", out)
        meta = artifacts.read_json(out / PROXY_FILE, "proxy description")
        proxy = load_proxy(out, config.dtype, device)
    else:
        proxy, meta = _stage1(config, target, target_identity, tokenizer, examples, order, timings)
        if rank == 0:
            save_proxy(proxy, tokenizer, out, meta)
            artifacts.atomic_write_text(out / STAGE1_DONE, "ok\n")
        barrier()

    if config.aligns:
        from .alignment import align_in_place

        meta["stage2"] = align_in_place(proxy, target, tokenizer, examples, config, out)

    # (without alignment, the weights were saved with stage 1's resume point)
    meta["uid"] = on_rank0(lambda: complete_proxy(proxy, tokenizer, out, meta, save_weights=config.aligns))
    session.register(str(out), proxy, tokenizer, config.dtype, device)
    return _summary_from_meta(str(out), meta, skipped=False)


def _stage1(config: ProxyConfig, target: nn.Module, target_identity, tokenizer, examples, order,
            timings) -> tuple[nn.Module, dict]:
    """Builds the stage-1 proxy (a modified copy of ``target``) and its metadata."""
    t0 = time.perf_counter()
    target_hash = target_identity()
    target_params = count_parameters(target)
    timings["hash"] = time.perf_counter() - t0

    probe_info: dict[str, Any] = {"examples": 0, "tokens": 0, "ids": []}
    ranks = _depth_profile(target, config) if config.depth_slope else None
    proxy = _skeleton_copy(target, config) if config.init != "layer-drop" else copy.deepcopy(target)
    kept = None
    timings["probe"] = timings["factorise"] = 0.0
    if config.init == "ipsvd":
        n_probe, _ = config.split_sizes(len(examples))
        probe = [examples[i] for i in order[:n_probe]]
        if len(probe) < n_probe:
            log.warning("only %d examples available for a probe set of %d", len(probe), n_probe)
        tok, stats = tokenize_examples(tokenizer, probe, config.max_length)
        mods = compressible_modules(target)
        records_by_name = {}
        # Probe statistics for a few decoder blocks per pass (all in one pass by default): memory
        # holds the moments of those blocks only, and each pass is factorised before the next.
        # Every pass samples the same token positions (same seed), so the moments equal one pass's.
        for chunk in _block_chunks(target, mods, config.probe_blocks_per_pass):
            t0 = time.perf_counter()
            moments = collect_moments(target, chunk, tok, config.probe_tokens, batch_size=config.batch_size,
                                      pad_id=tokenizer.pad_token_id, seed=config.seed, progress=config.progress,
                                      keep=config.probe_statistics, balance=config.probe_balance)
            timings["probe"] += time.perf_counter() - t0
            n_tok = next(iter(moments.values())).n_tokens
            t0 = time.perf_counter()
            for rec in factorize_model(proxy, config.sparsity, config.init, moments, config.rank_multiple, config.ridge,
                                       config.ipsvd_form, config.seed, config.progress, config.factor_dtype,
                                       names=set(chunk), ranks=ranks, release_moments=True):
                records_by_name[rec["name"]] = rec
            del moments
            timings["factorise"] += time.perf_counter() - t0
        records = [records_by_name[n] for n in mods]
        widest = max(projection_weight(m).shape[1] for m in mods.values())
        if n_tok < widest and config.ipsvd_form == "skinny":
            log.warning("probe used %d tokens, fewer than the widest layer's %d inputs: the skinny form "
                        "drops the unprobed directions; raise --probe-tokens or use ipsvd_form=full", n_tok, widest)
        probe_info = {"examples": len(tok), "tokens": n_tok, "ids": [t.id for t in tok],
                      "prompt_truncated": stats.prompt_truncated, "response_truncated": stats.response_truncated,
                      "dropped": stats.dropped_no_response}
    else:
        t0 = time.perf_counter()
        if config.init == "layer-drop":
            kept, records = drop_layers(proxy, config.sparsity)
        else:
            records = factorize_model(proxy, config.sparsity, config.init, None, config.rank_multiple,
                                      config.ridge, config.ipsvd_form, config.seed, config.progress, config.factor_dtype,
                                      ranks=ranks)
        timings["factorise"] = time.perf_counter() - t0
    meta = {
        "format_version": PROXY_FORMAT_VERSION,
        "method": config.init,
        "sparsity": config.sparsity,
        "rank_multiple": config.rank_multiple,
        "depth_slope": config.depth_slope,
        "ipsvd_form": config.ipsvd_form if config.init == "ipsvd" else None,
        "ridge": config.ridge if config.init == "ipsvd" else None,
        "factor_dtype": config.factor_dtype if config.init == "ipsvd" else None,
        "target": {"model": config.model, "class": type(target).__name__, "weights_sha256": target_hash,
                   "params": target_params},
        "proxy_params": count_parameters(proxy),
        "layers": records,
        "kept_blocks": kept,
        "probe": probe_info,
        "stage1_seconds": timings,
        "stage2": None,
        "config": asdict(config),
    }
    return proxy, meta


def _depth_profile(target: nn.Module, config: ProxyConfig) -> dict[str, int]:
    """:func:`~iprox.lowrank.depth_ranks` of the target's compressible layers under ``config``."""
    prefix, layers = decoder_layers(target)
    mods = compressible_modules(target)
    shapes = {n: tuple(projection_weight(m).shape) for n, m in mods.items()}
    blocks = {n: block_of(prefix, n) for n in mods}
    return depth_ranks(shapes, blocks, len(layers), config.sparsity, config.depth_slope, config.rank_multiple)


def _skeleton_copy(target: nn.Module, config: ProxyConfig) -> nn.Module:
    """A copy of ``target`` that does not copy the weights of the projections stage 1 will replace:
    the copy refers to the target's own tensors there (read, never written) until factors take their
    place, so stage 1 holds the target and the proxy, not the target twice. Layers left dense are
    copied as usual. The copy's own tensors are frozen; the shared ones keep the target's flags."""
    shared = {}
    for name, mod in compressible_modules(target).items():
        m, n = projection_weight(mod).shape
        if rank_for_sparsity(m, n, config.sparsity, config.rank_multiple) is not None:
            shared[id(mod.weight)] = mod.weight
    proxy = copy.deepcopy(target, memo=dict(shared))
    for p in proxy.parameters():
        if id(p) not in shared:
            p.requires_grad_(False)
    return proxy


def _block_chunks(model: nn.Module, mods: dict[str, nn.Module], per_pass: int) -> list[dict[str, nn.Module]]:
    """The compressible modules grouped ``per_pass`` decoder blocks at a time (0: one group)."""
    if per_pass <= 0:
        return [mods]
    prefix, layers = decoder_layers(model)
    chunks: list[dict[str, nn.Module]] = []
    for start in range(0, len(layers), per_pass):
        blocks = range(start, min(start + per_pass, len(layers)))
        chunk = {n: m for n, m in mods.items() if block_of(prefix, n) in blocks}
        if chunk:
            chunks.append(chunk)
    return chunks


def _summary_from_meta(out: str, meta: dict[str, Any], skipped: bool) -> ProxySummary:
    recs = meta["layers"]
    return ProxySummary(
        out=out, method=meta["method"], sparsity=meta["sparsity"], target_params=meta["target"]["params"],
        proxy_params=meta["proxy_params"], layers_total=len(recs),
        layers_compressed=sum(1 for r in recs if r["rank"] is not None),
        timings=meta.get("stage1_seconds", {}), skipped=skipped, stage2=meta.get("stage2"),
    )


def _summary_from_folder(out: Path, skipped: bool) -> ProxySummary:
    return _summary_from_meta(str(out), artifacts.read_json(out / PROXY_FILE, "proxy description"), skipped)
