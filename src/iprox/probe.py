"""Stage-1 probing: second moments of each projection's inputs and output gradients.

One forward and backward pass over a small probe set (loss on response tokens, each example's
mean loss weighing the same). For every compressible projection, hooks accumulate

    C_h = Σ h hᵀ / N      (n×n, inputs)
    C_δ = Σ δ δᵀ / N      (m×m, output gradients)

over N sampled token positions. Positions are sampled *per sequence* (the same number from each
example, all of them when it is shorter), so long examples do not dominate. Moments are accumulated
in float64 in fixed memory (one input moment per distinct input: q/k/v and gate/up share theirs),
which lets the probe use as many tokens as it likes — in particular at
least as many as the widest layer, so that no input direction goes unvisited (see ``ipsvd``).

``keep="samples"`` is the bounded-memory route: the sampled rows themselves are kept (N × width in
the activations' dtype, where a moment takes width² in float64), and stage 1 factorises them by thin
SVDs (:func:`~iprox.ipsvd.sample_bases`), to the same factors in both IPSVD forms.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import TokenizedExample, batches, collate
from .distributed import all_gather_rows, all_reduce_sum_, world
from .evaluation import per_example_loss
from .models import frozen

log = logging.getLogger(__name__)


@dataclass
class Samples:
    """Probe samples of one projection (the bounded-memory route: ``collect_moments(keep="samples")``).

    Attributes:
        X_h: (N, n) sampled inputs, one tensor shared by projections that read the same input.
        X_d: (N, m) output gradients at the same positions.
        n_tokens: N. Both in the activations' dtype (bf16 on a bf16 model): memory is N × width
            per distinct input, where the moments take width² in float64.
    """

    X_h: torch.Tensor
    X_d: torch.Tensor
    n_tokens: int


@dataclass
class Moments:
    """Probe statistics of one projection.

    Attributes:
        C_h: (n, n) float64 input second moment.
        C_d: (m, m) float64 output-gradient second moment.
        n_tokens: number of sampled token positions N.
    """

    C_h: torch.Tensor
    C_d: torch.Tensor
    n_tokens: int


def sample_positions(attention_mask: torch.Tensor, per_sequence: int, generator: torch.Generator) -> torch.Tensor:
    """(B, T) bool mask choosing up to ``per_sequence`` random real (non-pad) positions per row."""
    mask = torch.zeros_like(attention_mask, dtype=torch.bool)
    for i in range(attention_mask.shape[0]):
        pos = attention_mask[i].nonzero().flatten().cpu()
        if len(pos) > per_sequence:
            pos = pos[torch.randperm(len(pos), generator=generator)[:per_sequence]]
        mask[i, pos.to(mask.device)] = True
    return mask


def _equal_energy(g: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """``g`` (B, T, m) with each sequence's sampled rows scaled to unit total squared norm, so that
    every probe example weighs the same in the output-gradient moment whatever its length (the
    moment's overall scale does not matter to IPSVD, whose ridge is relative to its mean eigenvalue)."""
    w = (g.detach().float().pow(2).sum(-1) * sel).sum(-1)                 # (B,) energy per sequence
    scale = torch.where(w > 0, w.clamp_min(1e-30).rsqrt(), torch.zeros_like(w))
    return g * scale.to(g.dtype)[:, None, None]


def collect_moments(
    model: nn.Module,
    modules: dict[str, nn.Module],
    examples: Sequence[TokenizedExample],
    probe_tokens: int,
    batch_size: int = 4,
    pad_id: int = 0,
    seed: int = 0,
    progress: bool = True,
    keep: str = "moments",
    balance: str = "loss",
) -> dict[str, Moments] | dict[str, Samples]:
    """Runs the probe set through ``model`` and returns the moments of every module in ``modules``.

    Args:
        model: the target causal LM (its parameters' gradients are not needed and not kept).
        modules: projections to probe, by name (``nn.Linear`` or ``Conv1D``).
        examples: tokenised probe examples.
        probe_tokens: total token positions to sample, spread evenly over the examples.
        batch_size: sequences per forward/backward pass.
        pad_id: padding token id.
        seed: seeds the position sampling.
        keep: ``moments`` (float64 second moments, width² per distinct input and per output) or
            ``samples`` (the sampled rows themselves, N × width, for :func:`~iprox.ipsvd.sample_bases`).
            The positions sampled are the same either way.
        balance: ``loss`` (output gradients as the per-example mean loss makes them) or ``example``
            (each example's sampled output gradients scaled to unit energy per module).

    Returns:
        ``{name: Moments}`` or ``{name: Samples}``.
    """
    if keep not in ("moments", "samples"):
        raise ValueError(f"keep must be 'moments' or 'samples', got {keep!r}")
    if balance not in ("loss", "example"):
        raise ValueError(f"balance must be 'loss' or 'example', got {balance!r}")
    if not examples:
        raise ValueError("the probe set is empty")
    per_seq = max(1, math.ceil(probe_tokens / len(examples)))
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    acc_h: dict[str, torch.Tensor] = {}
    acc_d: dict[str, torch.Tensor] = {}
    group: dict[str, str] = {}  # module -> the module whose input accumulator it shares
    state: dict[str, torch.Tensor] = {}
    total = 0

    def gram(x: torch.Tensor):
        # One batch's Σ x xᵀ in the model's precision (at least float32; float64 costs ~3x on CPU
        # and one batch sums only a few hundred tokens), accumulated across batches in float64.
        # Or, for samples, the rows themselves (a list per module, joined at the end).
        x = x.detach()
        if keep == "samples":
            return [x.clone()]
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        return (x.T @ x).to(torch.float64)

    def add(acc: dict, name: str, part) -> None:
        # in place: a sum of new tensors would hold each accumulator twice for a moment
        if name not in acc:
            acc[name] = part
        elif keep == "samples":
            acc[name] += part
        else:
            acc[name].add_(part)

    def fwd_hook(name):
        def hook(mod, inputs, output):
            sel = state["mask"]
            x = inputs[0]
            # Projections that read the same tensor (q/k/v, gate/up) share one input product.
            # The cache holds the tensor itself, so its address cannot be reused by another
            # tensor while the batch runs.
            key = (x.data_ptr(), tuple(x.shape))
            cache = state["h_cache"]
            if key not in cache or cache[key][0] is not x:
                # The first module to read this tensor owns the group's one accumulator.
                cache[key] = (x, name)
                add(acc_h, name, gram(x[sel]))
            group[name] = cache[key][1]

            def grad_hook(g):
                if balance == "example":
                    g = _equal_energy(g, sel)
                add(acc_d, name, gram(g[sel]))

            output.register_hook(grad_hook)

        return hook

    handles = [m.register_forward_hook(fwd_hook(n)) for n, m in modules.items()]
    # Only activations need gradients; parameter gradients would cost memory for nothing. The
    # embeddings' output must require grad so that the backward pass reaches the first block.
    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_hook(lambda mod, i, o: o.requires_grad_(True)))
    model.eval()  # no dropout: the moments describe the deterministic model
    # Under torchrun each rank runs every n-th batch, but draws every batch's positions, so the
    # positions (and the sums, up to their order) are the one-process run's.
    rank, n_ranks = world()
    all_batches = batches(examples, batch_size)
    if len(all_batches) < n_ranks:
        raise ValueError(f"the probe set makes {len(all_batches)} batches for {n_ranks} ranks; "
                         f"raise probe_examples or lower batch_size")
    try:
        with frozen(model):
            for i, batch in enumerate(tqdm(all_batches, desc="probe fwd+bwd", unit="batch",
                                           disable=not progress or rank > 0)):
                enc = collate(batch, pad_id, device)
                state["mask"] = sample_positions(enc["attention_mask"], per_seq, gen)
                total += int(state["mask"].sum())
                if i % n_ranks != rank:
                    continue
                state["h_cache"] = {}
                logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
                per_example_loss(logits, enc["labels"]).sum().backward()
                state["h_cache"] = {}
    finally:
        for h in handles:
            h.remove()
    if n_ranks > 1:  # every rank ends with the sums over all ranks' batches
        log.info("probe: rank %d of %d ran %d of %d batches", rank, n_ranks,
                 len(range(rank, len(all_batches), n_ranks)), len(all_batches))
        # (in sorted key order: every rank issues the same collectives in the same order)
        if keep == "samples":
            acc_h = {g: [all_gather_rows(torch.cat(acc_h[g]))] for g in sorted(acc_h)}
            acc_d = {n: [all_gather_rows(torch.cat(acc_d[n]))] for n in sorted(acc_d)}
        else:
            for acc in (acc_h, acc_d):
                for k in sorted(acc):
                    all_reduce_sum_(acc[k])
    missing = [n for n in modules if n not in acc_d]
    if missing:
        raise RuntimeError(f"no output gradient reached {missing[0]} (and {len(missing) - 1} more); is it used by the loss?")
    if keep == "samples":
        acc_h = {g: torch.cat(acc_h[g]) for g in set(group.values())}
        acc_d = {n: torch.cat(acc_d[n]) for n in modules}
    bad = [n for n in modules if not bool(torch.isfinite(acc_d[n]).all()) or not bool(torch.isfinite(acc_h[group[n]]).all())]
    if bad:
        raise RuntimeError(f"the probe's activations or output gradients are not finite in {bad[0]} (and {len(bad) - 1} "
                           f"more modules): the model's forward or backward pass overflows on these examples; "
                           f"try float32, or check the model's weights")
    log.info("probed %d token positions from %d examples (%d per sequence at most)", total, len(examples), per_seq)
    if keep == "samples":
        return {n: Samples(acc_h[group[n]], acc_d[n], total) for n in modules}
    # Modules that read the same input (q/k/v, gate/up) share one C_h tensor object, so memory holds
    # one per distinct input and the factorisation can eigendecompose it once.
    # Divided in place: new tensors beside the sums would hold every moment twice at the end of the
    # probe (at 1B, 2.0 GiB of weights plus twice 27.1 GiB of moments is 56.1 GiB: the 56.5 GiB peak an
    # H200 measured against 37.9 planned).
    for acc in (acc_h, acc_d):
        for v in acc.values():
            v.div_(total)
    return {n: Moments(acc_h[group[n]], acc_d[n], total) for n in modules}
