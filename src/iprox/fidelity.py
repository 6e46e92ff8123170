"""How faithfully a proxy reproduces its target: factor-space gradient cosines and output KL.

For each held-out example (its own forward and backward pass, so the figures are per example as
influence is), and each compressed layer: the cosine between the proxy's factor gradients and the
target's weight gradient projected into factor space (``G Bᵀ`` for A, ``Aᵀ G`` for B), and the
target-to-proxy KL on response tokens. Works on any proxy folder, so a stage-1-only proxy and its
aligned version can be compared on the same examples.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .alignment import (factor_space_cosines, layer_pairs, projected_target_grads, proxy_factor_grads,
                        require_pair_grads, response_kl, target_weight_grads)
from .data import TokenizedExample, collate

log = logging.getLogger(__name__)


def gradient_fidelity(proxy: torch.nn.Module, target: torch.nn.Module, examples: Sequence[TokenizedExample],
                      pad_id: int, temperature: float = 1.0, progress: bool = True) -> dict:
    """Per-layer and overall gradient cosines and the KL, averaged over ``examples``.

    Returns:
        ``grad_cosine`` (mean over layers and examples of ½(cos_A + cos_B)), ``grad_cosine_global``
        (cosine of all layers' factor-space gradients concatenated, mean over examples), ``kl``
        (mean target-to-proxy KL over response tokens at ``temperature``, not τ²-scaled), ``layers``
        (name → ``cos_A``, ``cos_B``), ``n_examples``.
    """
    if not examples:
        raise ValueError("no examples for the fidelity report")
    pairs = layer_pairs(proxy, target)
    req_t = [p.requires_grad for p in target.parameters()]
    req_p = [p.requires_grad for p in proxy.parameters()]
    require_pair_grads(proxy, target, pairs)
    target.eval()
    proxy.eval()
    device = next(proxy.parameters()).device
    sum_a = torch.zeros(len(pairs), dtype=torch.float64)
    sum_b = torch.zeros(len(pairs), dtype=torch.float64)
    glob, kls = [], []
    try:
        for ex in tqdm(examples, desc="fidelity", unit="ex", disable=not progress):
            enc = {k: v.to(device) for k, v in collate([ex], pad_id).items()}
            G, t_logits, _ = target_weight_grads(target, pairs, enc)
            gAB, p_logits, _ = proxy_factor_grads(proxy, pairs, enc, create_graph=False)
            with torch.no_grad():
                tAB = projected_target_grads(pairs, G)
                ca, cb = factor_space_cosines(gAB, tAB)
                sum_a += ca.double().cpu()
                sum_b += cb.double().cpu()
                num, na, nb = 0.0, 0.0, 0.0
                for (gA, gB), (tA, tB) in zip(gAB, tAB):
                    num += float((gA * tA).sum() + (gB * tB).sum())
                    na += float(gA.pow(2).sum() + gB.pow(2).sum())
                    nb += float(tA.pow(2).sum() + tB.pow(2).sum())
                glob.append(num / max(math.sqrt(na * nb), 1e-30))
                kls.append(float(response_kl(t_logits, p_logits, enc["labels"], temperature)) / temperature**2)
    finally:
        for p, r in zip(target.parameters(), req_t):
            p.requires_grad_(r)
        for p, r in zip(proxy.parameters(), req_p):
            p.requires_grad_(r)
    n = len(examples)
    layers = {pr.name: {"cos_A": float(sum_a[i] / n), "cos_B": float(sum_b[i] / n)} for i, pr in enumerate(pairs)}
    return {
        "grad_cosine": float(((sum_a + sum_b) / (2 * n)).mean()),
        "grad_cosine_global": sum(glob) / n,
        "kl": sum(kls) / n,
        "temperature": temperature,
        "n_examples": n,
        "layers": layers,
    }


def format_report(rep: dict, max_rows: int = 12) -> str:
    """A printed table: overall figures, then the layers (first and last few when there are many)."""
    lines = [f"gradient cosine (mean over layers): {rep['grad_cosine']:.4f}",
             f"gradient cosine (all layers concatenated): {rep['grad_cosine_global']:.4f}",
             f"KL(target || proxy) on response tokens: {rep['kl']:.4f}   ({rep['n_examples']} examples)",
             "", f"{'layer':<48} {'cos A':>8} {'cos B':>8}"]
    items = list(rep["layers"].items())
    shown = items if len(items) <= max_rows else items[: max_rows // 2] + [("...", None)] + items[-max_rows // 2 :]
    for name, v in shown:
        lines.append(f"{name:<48}" if v is None else f"{name:<48} {v['cos_A']:>8.4f} {v['cos_B']:>8.4f}")
    return "\n".join(lines)
