"""The alignment objective: the proxy's gradients and logits compared with the target's, batch by batch.

For a batch, with the target's weight gradient ``G = ∇_W loss_target`` of each compressed layer
(no graph) and the proxy's factor gradients ``g_A``, ``g_B`` (with a graph), the target's gradient
seen in factor space is ``G Bᵀ`` for A and ``Aᵀ G`` for B (chain rule through ``W = AB``). The loss

    L_GA = mean over layers of ½[(1 − cos(g_A, sg(G) Bᵀ)) + (1 − cos(g_B, Aᵀ sg(G)))]
    L_KL = τ² · mean over response tokens of KL(softmax(z_target/τ) ‖ softmax(z_proxy/τ))
    L    = L_GA + λ_KL · L_KL

depends on the factors through ``g_A``, ``g_B`` (a second-order backward) and through the
projections ``G Bᵀ``, ``Aᵀ G``.

In the LoRA space (``align_space = "lora"``, given a target's LoRA warm-up checkpoint), both models
carry that checkpoint's adapters (:func:`carrying`) and ``L_GA`` compares the gradients of the
adapters instead: ``cos(∇_{L_A} loss_proxy, ∇_{L_A} loss_target)`` and the same for ``L_B``, per
adapted layer. These are the gradients the target-first order's features are taken from
(``s·L_Bᵀ G`` and ``s·G L_Aᵀ`` with ``G`` each model's gradient at the adapted layer), so the
alignment fits the proxy where its features are read rather than in its own factors' subspaces. The
KL term then compares the two adapted models.

The training loop that minimises ``L`` is :mod:`~iprox.alignment`; :mod:`~iprox.fidelity` reports
the same cosines and KL on held-out examples.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .evaluation import per_example_loss
from .example_cosines import example_cosines, token_grads
from .lowrank import AdaptedLinear, FactorizedLinear, adapter_layers, attach_adapters, detach_adapters
from .models import projection_weight, recomputed_blocks

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
