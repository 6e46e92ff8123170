"""Per-example gradient cosines of linear layers, for a whole batch in one pass.

A linear layer's weight gradient for one example is ``g = Σ_t D_t X_tᵀ`` over its tokens, with ``X_t``
the layer's input and ``D_t`` the loss's gradient at its output (padding has ``D = 0``: nothing
attends to it and it has no label). One forward and one backward of the batch's *summed* per-example
losses therefore yield every example's own gradient, as token-level pairs ``(D, X)``, without a pass
per example. Two such gradients meet without being formed:

    ⟨Σ_t D_t X_tᵀ, Σ_s D'_s X'_sᵀ⟩ = Σ_{t,s} (D_t·D'_s)(X_t·X'_s)

(the "Gram form", a (T×T) product per example), or by forming both (``einsum``) where that is
cheaper: ``T·(m+n)`` against ``m·n`` multiply-adds per token pair decides, layer by layer. Both are
exact. The alignment's per-example cosine takes its gradients this way (since 0.15; before, it formed
both models' weight gradients, one example per pass), ``align_micro_batch`` examples per pass.

The forward hooks record each watched module's input and output once per forward (the first call:
a recomputed block, see :func:`~iprox.models.recomputed_blocks`, calls its modules again during the
backward with the same values).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from .evaluation import per_example_loss

TokenGrad = tuple[torch.Tensor, torch.Tensor]  # (D, X): (b, T, m) output gradients and (b, T, n) inputs


@contextmanager
def watched(modules: Sequence[nn.Module]):
    """Records the first input and output of each module in the forwards inside the block, and how
    often each ran."""
    ins: dict[nn.Module, torch.Tensor] = {}
    outs: dict[nn.Module, torch.Tensor] = {}
    calls: dict[nn.Module, int] = {}

    def hook(mod, args, out):
        calls[mod] = calls.get(mod, 0) + 1
        if mod not in outs:
            ins[mod], outs[mod] = args[0], out

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield ins, outs, calls
    finally:
        for h in handles:
            h.remove()


def token_grads(model: nn.Module, modules: Sequence[nn.Module], enc: dict[str, torch.Tensor],
                create_graph: bool) -> tuple[list[TokenGrad], torch.Tensor]:
    """One forward and backward of the batch's summed per-example losses (each example's mean
    response-token loss, :func:`~iprox.evaluation.per_example_loss`).

    Returns:
        Per module its ``(D, X)``: the loss's gradient at its output and its input, shapes (b, T, ·);
        an example's weight gradient is ``Σ_t D_t X_tᵀ`` over its row. And the logits. ``D``
        carries a graph when ``create_graph``. Every module's output must depend on something that
        requires a gradient (its own weight, say).
    """
    with watched(modules) as (ins, outs, calls):
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False).logits
        missing = [m for m in modules if m not in outs]
        if missing:
            raise RuntimeError(f"{len(missing)} watched module(s) did not run in the forward")
        if max(calls.values()) > 1:   # (a recomputed block runs them again, but only in the backward)
            raise RuntimeError("a watched module ran more than once in one forward (shared weights?): its "
                               "per-example gradient is not its first call's alone")
        loss = per_example_loss(logits, enc["labels"]).sum()
        D = torch.autograd.grad(loss, [outs[m] for m in modules], create_graph=create_graph)
    return [(d, ins[m]) for m, d in zip(modules, D)], logits


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(b, ..., d) → (b, T, d)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _up(t: torch.Tensor) -> torch.Tensor:
    """float32 at least: the products are taken in the model's dtype (a bf16 matrix product
    accumulates in float32, and no float32 copy of the token tensors is kept for the backward),
    their sums of products in float32."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _inner_gram(a: TokenGrad, b: TokenGrad) -> torch.Tensor:
    (Da, Xa), (Db, Xb) = a, b
    return (_up(Da @ Db.transpose(1, 2)) * _up(Xa @ Xb.transpose(1, 2))).sum((1, 2))


def example_cosines(a: TokenGrad, b: TokenGrad, form: str = "auto") -> torch.Tensor:
    """Per example the cosine of the two weight gradients ``Σ_t Da_t Xa_tᵀ`` and ``Σ_t Db_t Xb_tᵀ``, (b,).

    ``form``: ``gram`` (never forms a gradient), ``dense`` (forms both, (b, m, n) each) or ``auto``
    (whichever takes fewer multiply-adds for this layer and length). Differentiable in all inputs.
    """
    a = (_flat(a[0]), _flat(a[1]))
    b = (_flat(b[0]), _flat(b[1]))
    T = max(a[0].shape[1], b[0].shape[1])
    m, n = a[0].shape[-1], a[1].shape[-1]
    if form == "auto":
        form = "gram" if T * (m + n) < m * n else "dense"
    if form == "gram":
        ab, aa, bb = _inner_gram(a, b), _inner_gram(a, a), _inner_gram(b, b)
    elif form == "dense":
        ga = _up(torch.einsum("btm,btn->bmn", *a))
        gb = _up(torch.einsum("btm,btn->bmn", *b))
        ab, aa, bb = (ga * gb).sum((1, 2)), (ga * ga).sum((1, 2)), (gb * gb).sum((1, 2))
    else:
        raise ValueError(f"form must be auto, gram or dense, not {form!r}")
    # (aa, bb ≥ 0 up to rounding: sums of Hadamard products of positive semi-definite Gram matrices)
    return ab / (aa.clamp_min(0) * bb.clamp_min(0)).clamp_min(1e-40).sqrt()
