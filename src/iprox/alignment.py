"""Stage 2 of IProX: align the proxy's factor gradients and logits with the target's.

For a batch, with the target's weight gradient ``G = ∇_W loss_target`` of each compressed layer
(no graph) and the proxy's factor gradients ``g_A``, ``g_B`` (with a graph), the target's gradient
seen in factor space is ``G Bᵀ`` for A and ``Aᵀ G`` for B (chain rule through ``W = AB``). The loss

    L_GA = mean over layers of ½[(1 − cos(g_A, sg(G) Bᵀ)) + (1 − cos(g_B, Aᵀ sg(G)))]
    L_KL = τ² · mean over response tokens of KL(softmax(z_target/τ) ‖ softmax(z_proxy/τ))
    L    = L_GA + λ_KL · L_KL

is minimised over the factors only, with AdamW. ``L_GA`` depends on the factors through ``g_A``,
``g_B`` (a second-order backward) and through the projections ``G Bᵀ``, ``Aᵀ G``.

In the LoRA space (``align_space = "lora"``, given a target's LoRA warm-up checkpoint), both models
carry that checkpoint's adapters and ``L_GA`` compares the gradients of the adapters instead:
``cos(∇_{L_A} loss_proxy, ∇_{L_A} loss_target)`` and the same for ``L_B``, per adapted layer. These
are the gradients the target-first order's features are taken from (``s·L_Bᵀ G`` and ``s·G L_Aᵀ``
with ``G`` each model's gradient at the adapted layer), so the alignment fits the proxy where its
features are read rather than in its own factors' subspaces. The KL term then compares the two
adapted models.

Runs are checkpointed every K optimiser steps (factors, optimiser state, step, RNG state; the data
order is a pure function of the seed and the epoch, so the step fixes the data position) and resume
from the last checkpoint to the same final factors as an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from . import artifacts
from .data import TokenizedExample, collate, load_examples, probe_split, tokenize_examples
from .distributed import all_reduce_sum_, barrier, on_rank0, rank_device, world
from .evaluation import per_example_loss
from .example_cosines import example_cosines, token_grads
from .loading import (ALIGN_CHECKPOINT_DIR, PROXY_FILE, STAGE1_DONE, complete_proxy, read_lora_state,
                      target_lora_checkpoint)
from .lowrank import AdaptedLinear, FactorizedLinear, adapter_layers, attach_adapters, detach_adapters
from .models import default_device, projection_weight, recomputed_blocks
from .session import Session
from .training import MasterAdamW, epoch_order

if TYPE_CHECKING:
    from .proxy import ProxyConfig

log = logging.getLogger(__name__)

# The settings of ProxyConfig that are the alignment's alone (stage 1 ignores them), and those both
# stages read: together, what the align stage records.
ALIGN_FIELDS = ("align_steps", "align_epochs", "align_examples", "align_min_steps", "align_cosine",
                "align_micro_batch", "align_space",
                "align_checkpoint", "lambda_kl", "temperature", "lr", "weight_decay", "grad_accum", "checkpoint_every",
                "gradient_checkpointing", "offload_optimizer")
SHARED_FIELDS = ("model", "data", "seed", "max_length", "dtype", "batch_size", "probe_examples", "trust_remote_code")
# where and how an align stage runs, never taken from the compressed proxy's record
RUN_FIELDS = ("out", "device", "overwrite", "progress")
LOG_FILE = "align_log.csv"
LOG_FIELDS = ["step", "epoch", "loss", "grad_align", "kl", "lr", "seconds"]


@dataclass
class LayerPair:
    """A compressed layer: the proxy's factored module and the target's dense one."""

    name: str
    proxy: FactorizedLinear
    target: nn.Module


def layer_pairs(proxy: nn.Module, target: nn.Module) -> list[LayerPair]:
    """Pairs every :class:`FactorizedLinear` of ``proxy`` with the target module of the same name."""
    pairs = []
    for name, mod in proxy.named_modules():
        if isinstance(mod, FactorizedLinear):
            tmod = target.get_submodule(name)
            if tuple(projection_weight(tmod).shape) != (mod.out_features, mod.in_features):
                raise ValueError(f"{name}: target is {tuple(projection_weight(tmod).shape)}, proxy factors "
                                 f"multiply to {(mod.out_features, mod.in_features)}; is this the proxy's target?")
            pairs.append(LayerPair(name, mod, tmod))
    if not pairs:
        raise ValueError("the proxy has no factored layers (layer-drop or sparsity 0): nothing to align")
    return pairs


def require_pair_grads(proxy: nn.Module, target: nn.Module, pairs: Sequence[LayerPair],
                       target_weights: bool = True) -> None:
    """Freezes both models except the paired layers: the proxy's factors and the target's weights
    (``target_weights``: the factor space needs ``G``; the LoRA space takes the adapters' gradients).

    The target then keeps parameter gradients only where ``G`` is needed, and nothing but the
    factors can train.
    """
    for p in list(proxy.parameters()) + list(target.parameters()):
        p.requires_grad_(False)
    for pr in pairs:
        pr.target.weight.requires_grad_(target_weights)
        pr.proxy.A.weight.requires_grad_(True)
        pr.proxy.B.weight.requires_grad_(True)


def target_weight_grads(target: nn.Module, pairs: Sequence[LayerPair], enc: dict[str, torch.Tensor]):
    """Target forward + backward: per-layer ``G`` as (m, n) matrices (detached) and the logits.

    Only the paired layers' weights get gradients; everything else is frozen for this pass.
    """
    weights = [p.target.weight for p in pairs]
    logits = target(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
    loss = per_example_loss(logits, enc["labels"]).mean()
    grads = torch.autograd.grad(loss, weights)
    G = [g.detach() if isinstance(p.target, nn.Linear) else g.detach().t() for p, g in zip(pairs, grads)]
    return G, logits.detach(), loss.detach()


def proxy_factor_grads(proxy: nn.Module, pairs: Sequence[LayerPair], enc: dict[str, torch.Tensor], create_graph: bool):
    """Proxy forward + backward: per-layer ``(g_A, g_B)`` and the logits."""
    params = [t for p in pairs for t in (p.proxy.A.weight, p.proxy.B.weight)]
    logits = proxy(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
    loss = per_example_loss(logits, enc["labels"]).mean()
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return [(grads[2 * i], grads[2 * i + 1]) for i in range(len(pairs))], logits, loss


def projected_target_grads(pairs: Sequence[LayerPair], G: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the target's gradient seen in factor space: ``(G Bᵀ, Aᵀ G)``, shapes (m, r), (r, n)."""
    out = []
    for p, g in zip(pairs, G):
        A, B = p.proxy.A.weight, p.proxy.B.weight
        out.append((g.to(A.dtype) @ B.T, A.T @ g.to(A.dtype)))
    return out


def factor_space_cosines(gAB, tAB) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer ``cos(g_A, G Bᵀ)`` and ``cos(g_B, Aᵀ G)`` as two (L,) tensors (differentiable).

    Args:
        gAB: per layer ``(g_A, g_B)``, the proxy's factor gradients.
        tAB: per layer ``(G Bᵀ, Aᵀ G)`` from :func:`projected_target_grads`.
    """
    def cos(a, b):
        # float32 at least: a bf16 model's gradients are cast up before the sums of squares.
        acc = torch.promote_types(a.dtype, torch.float32)
        return F.cosine_similarity(a.flatten().to(acc), b.flatten().to(acc), dim=0, eps=1e-20)

    cos_a = [cos(gA, tA) for (gA, _), (tA, _) in zip(gAB, tAB)]
    cos_b = [cos(gB, tB) for (_, gB), (_, tB) in zip(gAB, tAB)]
    return torch.stack(cos_a), torch.stack(cos_b)


def response_kl(target_logits: torch.Tensor, proxy_logits: torch.Tensor, labels: torch.Tensor,
                temperature: float, per_example: bool = False) -> torch.Tensor:
    """``τ² · mean over response tokens of KL(softmax(z_t/τ) ‖ softmax(z_p/τ))``; with
    ``per_example``, that mean for each example over its own tokens, shape (B,).

    Logits at position t predict token t+1, so the response positions are where ``labels[:, 1:]``
    is not -100.
    """
    mask = labels[:, 1:] != -100
    acc = torch.promote_types(proxy_logits.dtype, torch.float32)  # float32 at least
    zt = target_logits[:, :-1][mask].to(acc) / temperature
    zp = proxy_logits[:, :-1][mask].to(acc) / temperature
    lt, lp = F.log_softmax(zt, -1), F.log_softmax(zp, -1)
    kl = (lt.exp() * (lt - lp)).sum(-1)
    if not per_example:
        return temperature**2 * kl.mean()
    # each example's mean over its own response tokens, (B,)
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(mask.shape[0], dtype=kl.dtype, device=kl.device).index_add(0, rows, kl)
    return temperature**2 * sums / mask.sum(1).clamp_min(1).to(kl.dtype)


def adapter_grads(model: nn.Module, adapters: Sequence[AdaptedLinear], enc: dict[str, torch.Tensor],
                  create_graph: bool):
    """Forward + backward through a model carrying LoRA adapters: per adapter ``(g_{L_A}, g_{L_B})``
    (shapes (r, n), (m, r)), the logits and the loss."""
    params = [t for a in adapters for t in (a.lora_A["default"].weight, a.lora_B["default"].weight)]
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
    loss = per_example_loss(logits, enc["labels"]).mean()
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    if not create_graph:
        grads = [g.detach() for g in grads]
    return [(grads[2 * i], grads[2 * i + 1]) for i in range(len(adapters))], logits, loss


@dataclass
class LoraSpace:
    """The adapters both models carry when the alignment runs in the LoRA space: the target's
    wrappers and the proxy's, layer by layer (see :func:`carrying`)."""

    target: list[AdaptedLinear]
    proxy: list[AdaptedLinear]


def compared_grads(proxy, target, pairs, enc, create_graph: bool, lora: LoraSpace | None = None,
                   recompute_target: bool = False):
    """The gradients the alignment and the fidelity report compare, for one batch.

    Returns:
        ``(gAB, tAB, target logits, proxy logits)``: per layer the proxy's pair of gradients and the
        target's counterpart; in the factor space ``(g_A, g_B)`` against ``(G Bᵀ, Aᵀ G)``, in the LoRA
        space (``lora``) both models' ``(g_{L_A}, g_{L_B})`` of the carried adapters. The proxy's side
        carries a graph when ``create_graph``; the target's never does.
    """
    with recomputed_blocks(target, recompute_target):
        if lora is None:
            G, t_logits, _ = target_weight_grads(target, pairs, enc)
        else:
            tAB, t_logits, _ = adapter_grads(target, lora.target, enc, create_graph=False)
    if lora is None:
        gAB, p_logits, _ = proxy_factor_grads(proxy, pairs, enc, create_graph=create_graph)
        tAB = projected_target_grads(pairs, G)
    else:
        gAB, p_logits, _ = adapter_grads(proxy, lora.proxy, enc, create_graph=create_graph)
    return gAB, tAB, t_logits.detach(), p_logits


def alignment_loss(proxy, target, pairs, enc, lambda_kl: float, temperature: float, recompute_target: bool = False,
                   lora: LoraSpace | None = None, per_example: bool = False):
    """``(L, L_GA, L_KL)`` for one batch; ``L`` carries the graph back to the factors.

    ``recompute_target``: checkpoint the target's blocks (its backward is a plain one, so their
    activations need not all be kept; the proxy's double backward holds its own graph regardless).
    ``lora``: compare the carried adapters' gradients instead of the factor-space ones.
    ``per_example``: the cosines of each example's own gradients, and the KL over each example's
    tokens, averaged over the batch's examples (:func:`example_alignment_loss`); otherwise the cosines
    of the batch's summed gradients and the KL over all its response tokens.
    """
    if per_example:
        return example_alignment_loss(proxy, target, pairs, enc, lambda_kl, temperature, recompute_target, lora)
    gAB, tAB, t_logits, p_logits = compared_grads(proxy, target, pairs, enc, True, lora, recompute_target)
    cos_a, cos_b = factor_space_cosines(gAB, tAB)
    l_ga = (0.5 * ((1 - cos_a) + (1 - cos_b))).mean()
    return _with_kl(l_ga, t_logits, p_logits, enc["labels"], lambda_kl, temperature, per_example=False)


def _with_kl(l_ga, t_logits, p_logits, labels, lambda_kl: float, temperature: float, per_example: bool):
    """``(L, L_GA, L_KL)`` from ``L_GA`` and the two models' logits, each term's mean over the
    examples when ``per_example`` (both terms per example then), else as given."""
    if lambda_kl > 0:
        l_kl = response_kl(t_logits, p_logits, labels, temperature, per_example)
        return (l_ga + lambda_kl * l_kl).mean(), l_ga.mean().detach(), l_kl.mean().detach()
    with torch.no_grad():  # still reported, but no graph for a term that does not train
        l_kl = response_kl(t_logits, p_logits.detach(), labels, temperature, per_example)
    return l_ga.mean(), l_ga.mean().detach(), l_kl.mean()


def example_alignment_loss(proxy, target, pairs, enc, lambda_kl: float, temperature: float,
                           recompute_target: bool = False, lora: LoraSpace | None = None, form: str = "auto"):
    """``(L, L_GA, L_KL)`` of a batch as the mean over its examples of what each example alone gives
    (a batch of one in :func:`alignment_loss`), from one pass of each model.

    Each example's gradients stay in token form (:mod:`~iprox.example_cosines`): the proxy's factor
    ``A`` as (``δ_y``, ``B x``) and ``B`` as (``Aᵀ δ_y``, ``x``), the target's ``G Bᵀ`` as (``δ_y'``,
    ``x' Bᵀ``) and ``Aᵀ G`` as (``δ_y' A``, ``x'``), with ``x``, ``δ_y`` each model's input and output
    gradient at the layer; in the LoRA space each model's adapters alike. The target's weight
    gradients ``G`` are never formed. ``form``: see :func:`~iprox.example_cosines.example_cosines`.
    """
    if lora is None:
        p_mods = [m for p in pairs for m in (p.proxy.A, p.proxy.B)]
        t_mods = [p.target for p in pairs]
    else:
        p_mods = [m for a in lora.proxy for m in (a.lora_A["default"], a.lora_B["default"])]
        t_mods = [m for a in lora.target for m in (a.lora_A["default"], a.lora_B["default"])]
    with recomputed_blocks(target, recompute_target):
        t_grads, t_logits = token_grads(target, t_mods, enc, create_graph=False)
    t_grads = [(d.detach(), x.detach()) for d, x in t_grads]
    p_grads, p_logits = token_grads(proxy, p_mods, enc, create_graph=True)
    cos_a, cos_b = [], []
    for i in range(len(p_mods) // 2):
        ga, gb = p_grads[2 * i], p_grads[2 * i + 1]
        if lora is None:   # the target's gradient seen in factor space
            A, B = pairs[i].proxy.A.weight, pairs[i].proxy.B.weight
            (d, x) = t_grads[i]
            ta, tb = (d, x.to(B.dtype) @ B.T), (d.to(A.dtype) @ A, x)
        else:
            ta, tb = t_grads[2 * i], t_grads[2 * i + 1]
        cos_a.append(example_cosines(ga, ta, form))
        cos_b.append(example_cosines(gb, tb, form))
    # per example: the mean over layers, as a batch of one has it
    l_ga = (0.5 * ((1 - torch.stack(cos_a)) + (1 - torch.stack(cos_b)))).mean(0)
    return _with_kl(l_ga, t_logits.detach(), p_logits, enc["labels"], lambda_kl, temperature, per_example=True)


@contextmanager
def carrying(proxy: nn.Module, target: nn.Module, state: dict[str, torch.Tensor], alpha: float):
    """Both models carry the LoRA adapters of ``state`` (frozen, but differentiable) for the
    duration; each layer's own module is put back on exit.

    Yields:
        A :class:`LoraSpace` with the wrappers, in the same layer order for both models.
    """
    layers = adapter_layers(state)

    def adapted(model: nn.Module) -> set[str]:
        found = set()
        for layer in layers:
            try:
                if isinstance(model.get_submodule(layer), AdaptedLinear):
                    found.add(layer)
            except AttributeError:
                pass
        return found

    # layers adapted before (none, in the stages) keep their wrappers; the rest are unwrapped on
    # exit, also after a failure half-way through wrapping
    before = [adapted(m) for m in (proxy, target)]
    try:
        wrapped = [attach_adapters(m, state, alpha, next(m.parameters()).device) for m in (proxy, target)]
        for mods in wrapped:
            for a in mods.values():
                a.lora_A["default"].weight.requires_grad_(True)
                a.lora_B["default"].weight.requires_grad_(True)
        yield LoraSpace(target=list(wrapped[1].values()), proxy=list(wrapped[0].values()))
    finally:
        for model, kept in zip((proxy, target), before):
            detach_adapters(model, [layer for layer in layers if layer not in kept])


# ---------------------------------------------------------------------------------------------
# Training loop with checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass
class AlignSettings:
    """Stage-2 settings (a view of :class:`~iprox.proxy.ProxyConfig`)."""

    steps: int
    batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    lambda_kl: float
    temperature: float
    checkpoint_every: int
    seed: int
    gradient_checkpointing: bool = False   # recompute the target's blocks in its backward
    offload_optimizer: bool = False        # master factors and moments in host memory
    per_example: bool = False              # the cosine of each example's own gradients
    micro_batch: int = 1                   # per example: the examples of one pass


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(n_examples / (batch_size * grad_accum)))


def _micro_batches(examples, step: int, s: AlignSettings, rank: int = 0,
                   n_ranks: int = 1) -> tuple[int, list[list[TokenizedExample]], list[float]]:
    """The step's epoch, this rank's micro-batches of it and each one's share of the step's loss.

    Per example (each example's loss stands alone), the step's examples are dealt to the ranks one
    by one and each rank takes its own in micro-batches of ``micro_batch``; a micro-batch weighs its
    examples' share of the step. Otherwise a micro-batch's loss is a function of the whole
    micro-batch: the step's ``grad_accum`` micro-batches are dealt to the ranks in turn, each
    weighing 1/grad_accum.
    """
    per_epoch = steps_per_epoch(len(examples), s.batch_size, s.grad_accum)
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(len(examples), epoch, s.seed)
    span = s.batch_size * s.grad_accum
    idx = order[k * span : (k + 1) * span]
    if s.per_example:
        mine = idx[rank::n_ranks]
        chunks = [mine[j : j + s.micro_batch] for j in range(0, len(mine), s.micro_batch)]
        shares = [len(c) / len(idx) for c in chunks]
    else:
        every = [idx[j : j + s.batch_size] for j in range(0, len(idx), s.batch_size)]
        chunks = every[rank::n_ranks]
        shares = [1 / len(every)] * len(chunks)
    return epoch, [[examples[i] for i in c] for c in chunks], shares


def _factor_params(pairs) -> dict[str, nn.Parameter]:
    return {f"{p.name}.{f}.weight": getattr(p.proxy, f).weight for p in pairs for f in ("A", "B")}


def save_checkpoint(folder: Path, step: int, opt: MasterAdamW) -> None:
    """Factors (float32 masters), AdamW's moments by name, step and RNG state; written atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt.save(tmp, "factors.safetensors", "optimizer.safetensors")
    artifacts.save_tensors({"cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step}))  # written last: marks the folder whole
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_checkpoint(folder: Path, opt: MasterAdamW) -> int:
    """Restores a checkpoint written by :func:`save_checkpoint`; returns the step to continue from."""
    step = int(json.loads((folder / "state.json").read_text())["step"])
    try:
        opt.restore(folder, "factors.safetensors", "optimizer.safetensors", step)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{folder}: the alignment checkpoint does not match the proxy's layers ({e})") from None
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["cpu"])
    return step


def run_alignment(
    proxy: nn.Module,
    target: nn.Module,
    examples: Sequence[TokenizedExample],
    settings: AlignSettings,
    out: Path,
    pad_id: int,
    progress: bool = True,
    lora: tuple[dict[str, torch.Tensor], float] | None = None,
) -> dict[str, float]:
    """Trains the proxy's factors in place; checkpoints into ``out/align_checkpoint``.

    ``lora``: ``(adapter state, alpha)`` of a target's LoRA checkpoint (canonical names, as
    :func:`~iprox.loading.read_lora_state` reads them) to align in the LoRA space; both models
    carry the adapters during the run only.

    Resumes from that checkpoint when it exists. Per-step losses are appended to
    ``out/align_log.csv`` (rows past the checkpoint are dropped on resume, so the file always matches
    the factors).

    Returns:
        Final-step losses and timing: ``loss``, ``grad_align``, ``kl``, ``steps``, ``seconds_per_step``,
        ``attention`` (the kernel the proxy ran with).
    """
    if not examples:
        raise ValueError("the alignment set is empty")
    rank, n_ranks = world()
    pairs = layer_pairs(proxy, target)
    params = _factor_params(pairs)
    target_req = [p.requires_grad for p in target.parameters()]
    require_pair_grads(proxy, target, pairs, target_weights=lora is None)
    proxy.eval()   # no dropout: the loss is deterministic, which resume relies on
    target.eval()
    # The loss differentiates through the proxy's backward pass; fused CPU/GPU attention kernels
    # have no double backward, the eager one does.
    attn_before = getattr(proxy.config, "_attn_implementation", None)
    if attn_before not in (None, "eager"):
        proxy.set_attn_implementation("eager")
    # float32 master factors and moments, whatever the proxy's dtype
    opt = MasterAdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, offload=settings.offload_optimizer)
    ckpt = out / ALIGN_CHECKPOINT_DIR
    log_path = out / LOG_FILE
    start = 0
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if rank == 0 and not ckpt.exists() and (tmp / "state.json").exists():
        # Killed between removing the old checkpoint and renaming the new one into place; the new
        # one is complete (state.json is written last).
        tmp.rename(ckpt)
    barrier()
    if (ckpt / "state.json").exists():
        start = load_checkpoint(ckpt, opt)
        log.info("resuming alignment at step %d of %d from %s", start, settings.steps, ckpt)
    rows = _read_log(log_path)[:start]
    device = next(proxy.parameters()).device
    last = {"loss": float("nan"), "grad_align": float("nan"), "kl": float("nan")}
    t_run = time.perf_counter()
    bar = tqdm(range(start, settings.steps), desc="align", unit="step", disable=not progress or rank > 0,
               initial=start, total=settings.steps)
    adapters = ExitStack()
    try:
        space = adapters.enter_context(carrying(proxy, target, *lora)) if lora is not None else None
        for step in bar:
            t0 = time.perf_counter()
            # Under torchrun the ranks share the step (see _micro_batches) and sum what they got.
            epoch, micro, shares = _micro_batches(examples, step, settings, rank, n_ranks)
            opt.zero_grad()
            sums = torch.zeros(3, dtype=torch.float64)  # loss, grad_align, kl summed over micro-batches
            for mb, share in zip(micro, shares):
                enc = collate(mb, pad_id, device)
                loss, l_ga, l_kl = alignment_loss(proxy, target, pairs, enc, settings.lambda_kl, settings.temperature,
                                                  settings.gradient_checkpointing, space, settings.per_example)
                (loss * share).backward()
                sums += torch.tensor([float(loss.detach()), float(l_ga), float(l_kl)], dtype=torch.float64) * share
            # Target weights only served to produce G (and the carried adapters to take gradients
            # at); drop any gradient that leaked into them.
            for pr in pairs:
                pr.target.weight.grad = None
            for a in (space.proxy + space.target) if space else ():
                a.lora_A["default"].weight.grad = a.lora_B["default"].weight.grad = None
            if n_ranks > 1:
                for prm in params.values():
                    if prm.grad is None:
                        prm.grad = torch.zeros_like(prm)
                    all_reduce_sum_(prm.grad)
                all_reduce_sum_(sums)
            opt.step()
            tot, ga, kl = (float(x) for x in sums)
            last = {"loss": tot, "grad_align": ga, "kl": kl}
            rows.append({"step": step + 1, "epoch": epoch, **last, "lr": settings.lr,
                         "seconds": time.perf_counter() - t0})
            bar.set_postfix(ga=f"{ga:.4f}", kl=f"{kl:.4f}")
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                if rank == 0:
                    save_checkpoint(ckpt, step + 1, opt)
                    _write_log(log_path, rows)
                barrier()
    finally:
        bar.close()
        adapters.close()   # the models' own layers back in place
        opt.zero_grad()  # the proxy stays resident for the warm-up: no stale gradients on its factors
        for p, r in zip(target.parameters(), target_req):   # leave the caller's target as it was
            p.requires_grad_(r)
        if attn_before not in (None, "eager"):
            proxy.set_attn_implementation(attn_before)
    done = len(rows) - start
    if n_ranks > 1:
        n_step, unit = ((settings.batch_size * settings.grad_accum, "examples") if settings.per_example
                        else (settings.grad_accum, "micro-batches"))
        log.info("alignment: rank %d of %d took every %d-th of the %d %s per step", rank, n_ranks, n_ranks,
                 n_step, unit)
    per_step = (time.perf_counter() - t_run) / done if done else float("nan")
    if rows:
        last = {k: rows[-1][k] for k in ("loss", "grad_align", "kl")}
    return {**last, "steps": settings.steps, "seconds_per_step": per_step, "attention": "eager"}


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k in ("step", "epoch") else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def _write_log(path: Path, rows: list[dict]) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
    w.writeheader()
    w.writerows(rows)
    artifacts.atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def lora_space_checkpoint(config: "ProxyConfig", target_spec: str | None) -> dict | None:
    """The checked ``checkpoint.json`` of the LoRA checkpoint ``align_space = "lora"`` aligns in
    (None in the factor space, or when nothing aligns).

    Args:
        target_spec: the target's model spec, which the checkpoint must be a warm-up of (None: not
            checked, for a target passed in as a module).

    Raises:
        ValueError: no checkpoint named, one that trained a proxy's factors, or a warm-up of
            another model.
        FileNotFoundError: the folder is not a warm-up checkpoint.
    """
    if config.align_space != "lora" or not config.aligns:
        return None
    if not config.align_checkpoint:
        raise ValueError('align_space = "lora" needs align_checkpoint: a LoRA warm-up checkpoint of the target '
                         '(<warmup>/checkpoint-<epoch>, from iprox warmup --model <the target>)')
    return target_lora_checkpoint(config.align_checkpoint, target_spec)


def align_in_place(proxy: nn.Module, target: nn.Module, tokenizer, examples, config: "ProxyConfig", out: Path) -> dict:
    """Aligns ``proxy``'s factors with ``target`` on the alignment set of ``examples`` (the slice
    after the probe set of :func:`~iprox.data.probe_split`), checkpointing into ``out``; returns
    the record ``proxy.json`` keeps of it (``stage2``)."""
    t0 = time.perf_counter()
    order = probe_split(len(examples), config.seed)
    n_probe, n_align = config.split_sizes(len(examples))
    align_ex = [examples[i] for i in order[n_probe : n_probe + n_align]]
    if len(align_ex) < n_align:
        log.warning("only %d examples left for an alignment set of %d", len(align_ex), n_align)
    align_tok, _ = tokenize_examples(tokenizer, align_ex, config.max_length)
    per_epoch = steps_per_epoch(len(align_tok), config.batch_size, config.grad_accum)
    steps = config.alignment_steps(per_epoch)
    settings = AlignSettings(steps=steps, batch_size=config.batch_size, grad_accum=config.grad_accum,
                             lr=config.lr, weight_decay=config.weight_decay, lambda_kl=config.lambda_kl,
                             temperature=config.temperature, checkpoint_every=config.checkpoint_every,
                             seed=config.seed, gradient_checkpointing=config.gradient_checkpointing,
                             offload_optimizer=config.offload_optimizer,
                             per_example=config.align_cosine == "example", micro_batch=config.align_micro_batch)
    info = lora_space_checkpoint(config, None)
    lora = None if info is None else (read_lora_state(config.align_checkpoint, next(proxy.parameters()).device),
                                      float(info["lora_alpha"]))
    res = run_alignment(proxy, target, align_tok, settings, out, tokenizer.pad_token_id, config.progress, lora)
    return {"examples": len(align_tok), "ids": [t.id for t in align_tok], "space": config.align_space,
            **({"checkpoint": config.align_checkpoint, "checkpoint_uid": info.get("uid")} if info else {}),
            "steps": steps, "steps_per_epoch": per_epoch, "batch_size": config.batch_size,
            "grad_accum": config.grad_accum, "lr": config.lr, "weight_decay": config.weight_decay,
            "lambda_kl": config.lambda_kl, "temperature": config.temperature,
            "final_loss": res["loss"], "final_grad_align": res["grad_align"], "final_kl": res["kl"],
            "seconds_per_step": res["seconds_per_step"], "attention": res["attention"],
            "seconds": time.perf_counter() - t0}


@dataclass
class AlignSummary:
    out: str
    stage2: dict | None   # None: nothing to align (the compressed proxy is the proxy)
    skipped: bool

    def format(self) -> str:
        head = f"proxy {'(already aligned) ' if self.skipped else ''}in {self.out}"
        if not self.stage2:
            return head + ": no factors to align (layer-drop, sparsity 0) or no alignment asked for"
        s = self.stage2
        return (head + f": aligned {s['steps']} steps on {s['examples']} examples; final L_GA "
                f"{s['final_grad_align']:.4f}, L_KL {s['final_kl']:.4f}")


def align_config(source: str | Path, **settings) -> "ProxyConfig":
    """Settings for aligning the compressed proxy in ``source``: the ones it was built with (its
    target, data, seed, probe set, max_length, dtype, ...) under ``settings`` (``out`` and the
    alignment's own). The alignment set is then the slice after the probe set the compression used."""
    from .proxy import ProxyConfig  # (the compress stage's settings class; ALIGN_FIELDS are its)

    source = Path(source)
    if not (source / PROXY_FILE).is_file():
        raise FileNotFoundError(f"{source} is not a proxy folder (no {PROXY_FILE})")
    built = artifacts.read_json(source / PROXY_FILE, "proxy description").get("config", {})
    names = {f.name for f in fields(ProxyConfig)}
    inherited = {k: v for k, v in built.items()
                 if k in names and k not in ALIGN_FIELDS + RUN_FIELDS}
    return ProxyConfig(**{**inherited, **settings})


def align_proxy(config: "ProxyConfig", source: str | Path, session: Session | None = None) -> AlignSummary:
    """The align stage of ``iprox run``: the compressed proxy in ``source`` aligned with its target
    into ``config.out``, a proxy folder of its own (``source`` is left as it was).

    Resumes from its checkpoint; a finished folder with the same settings and the same compressed
    proxy is skipped. Without factors to align (layer-drop, sparsity 0) or with no alignment asked
    for, ``config.out`` holds the compressed proxy unchanged (hard links where the file system has them).
    """
    out, source = Path(config.out), Path(source)
    src_meta = artifacts.read_json(source / PROXY_FILE, "proxy description")
    full = asdict(config)
    info = lora_space_checkpoint(config, config.model)
    settings = {"source_uid": src_meta.get("uid"), **{k: full[k] for k in ALIGN_FIELDS + SHARED_FIELDS}}
    examples = load_examples(config.data) if config.aligns else []
    if not config.floor_binds(len(examples)):  # the same steps as before 0.11's floor: such a proxy still matches
        del settings["align_min_steps"]
    if info:  # the adapters' identity: a warm-up rerun into the same folder is another space
        settings["align_checkpoint_uid"] = info.get("uid")
    if on_rank0(lambda: artifacts.prepare_stage(out, "align", settings, overwrite=config.overwrite, resumable=True)):
        meta = artifacts.read_json(out / PROXY_FILE, "proxy description")
        return AlignSummary(str(out), meta.get("stage2"), skipped=True)
    session = session or Session(keep=False)
    if not config.aligns:
        def link() -> None:
            for f in source.iterdir():
                if f.is_file() and f.name not in (artifacts.STAGE_FILE, artifacts.COMPLETE_FILE, STAGE1_DONE):
                    dest = out / f.name
                    dest.unlink(missing_ok=True)
                    try:
                        os.link(f, dest)
                    except OSError:
                        shutil.copy2(f, dest)
            artifacts.mark_complete(out)
        on_rank0(link)
        log.info("align: nothing to align; %s is the compressed proxy of %s", out, source)
        return AlignSummary(str(out), None, skipped=False)
    device = rank_device(config.device or default_device())
    proxy, tokenizer = session.model(str(source), config.dtype, device, config.trust_remote_code)
    target, _ = session.model(config.model, config.dtype, device, config.trust_remote_code)
    meta = dict(src_meta)
    meta["stage2"] = align_in_place(proxy, target, tokenizer, examples, config, out)
    session.drop(str(source))  # the resident copy now holds the aligned factors, not source's

    meta["uid"] = on_rank0(lambda: complete_proxy(proxy, tokenizer, out, meta))
    session.register(str(out), proxy, tokenizer, config.dtype, device)
    return AlignSummary(str(out), meta["stage2"], skipped=False)
