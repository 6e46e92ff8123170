"""How faithfully a proxy reproduces its target: gradient cosines and output KL, and score agreement.

Score agreement (:func:`score_agreement`): the same selection run once with the target and once with
a proxy; Spearman and Kendall correlation of their scores over the pool, top-1/5/10% overlap and
Jaccard, and the same per subtask.

Gradient fidelity:

For each held-out example (its own forward and backward pass, so the figures are per example as
influence is), and each compressed layer: the cosine between the proxy's factor gradients and the
target's weight gradient projected into factor space (``G Bᵀ`` for A, ``Aᵀ G`` for B), and the
target-to-proxy KL on response tokens. Works on any proxy folder, so a stage-1-only proxy and its
aligned version can be compared on the same examples.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .agreement import kendall, overlap_at, spearman
from .alignment import (factor_space_cosines, layer_pairs, projected_target_grads, proxy_factor_grads, response_kl,
                        target_weight_grads)
from .data import TokenizedExample, collate
from .models import frozen

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
    target.eval()
    proxy.eval()
    device = next(proxy.parameters()).device
    sum_a = torch.zeros(len(pairs), dtype=torch.float64)
    sum_b = torch.zeros(len(pairs), dtype=torch.float64)
    glob, kls = [], []
    # Only the paired layers need gradients (the target's weights for G, the proxy's factors);
    # both models get their caller's flags back afterwards.
    trainable = [t for pr in pairs for t in (pr.target.weight, pr.proxy.A.weight, pr.proxy.B.weight)]
    with frozen(target, proxy, trainable=trainable):
        for ex in tqdm(examples, desc="fidelity", unit="ex", disable=not progress):
            enc = collate([ex], pad_id, device)
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


# ---------------------------------------------------------------------------------------------
# Score agreement: the same selection run with the target and with a proxy
# ---------------------------------------------------------------------------------------------


def scores_path(path: str | Path) -> Path:
    """A scores table from a ``scores.csv``, a scores folder, or a run folder (``scores/scores.csv``)."""
    path = Path(path)
    for cand in (path, path / "scores.csv", path / "scores" / "scores.csv"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no scores table at {path} (a scores.csv, a scores folder or an iprox run folder)")


def score_agreement(target_rows: list[dict], proxy_rows: list[dict]) -> tuple[dict, list[float], list[float]]:
    """Spearman, Kendall and top-1/5/10% overlap and Jaccard of two score tables over the same ids,
    overall and per subtask column they share.

    Returns:
        The report, and the target's and proxy's aggregate scores in id order (for a scatter).

    Raises:
        ValueError: the tables score different pools.
    """
    t = {r["id"]: r for r in target_rows}
    p = {r["id"]: r for r in proxy_rows}
    if set(t) != set(p):
        raise ValueError(f"the two score tables cover different pools ({len(set(t) - set(p))} ids only in the "
                         f"target's, {len(set(p) - set(t))} only in the proxy's)")
    ids = sorted(t)
    a = [t[i]["score"] for i in ids]
    b = [p[i]["score"] for i in ids]
    rep = {"n": len(ids), "spearman": spearman(a, b), "kendall": kendall(a, b),
           # keyed "1", "5", "10" (percent), as they read back from REPORT.json
           "overlap_at": {str(k): overlap_at(a, b, k) for k in (1, 5, 10)}}
    fixed = {"id", "source", "task", "score"}
    shared = [c for c in target_rows[0] if c not in fixed and c in proxy_rows[0]]
    rep["subtasks"] = {}
    for c in shared:
        ca, cb = [float(t[i][c]) for i in ids], [float(p[i][c]) for i in ids]
        rep["subtasks"][c] = {"spearman": spearman(ca, cb), "kendall": kendall(ca, cb),
                              "overlap_at_5": overlap_at(ca, cb, 5)["overlap"]}
    return rep, a, b


def plot_scatter(a: list[float], b: list[float], path: str | Path, title: str) -> None:
    """PNG scatter of proxy against target scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.scatter(a, b, s=6, alpha=0.6)
    ax.set_xlabel("target score")
    ax.set_ylabel("proxy score")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_agreement(rep: dict) -> str:
    o = rep["overlap_at"]
    lines = [f"score agreement over {rep['n']} pool examples: Spearman {rep['spearman']:.4f}, Kendall {rep['kendall']:.4f}",
             "top-k overlap / Jaccard: " + ", ".join(f"{k}% {o[k]['overlap']:.2f} / {o[k]['jaccard']:.2f}" for k in ("1", "5", "10"))]
    for name, v in rep["subtasks"].items():
        lines.append(f"  subtask {name}: Spearman {v['spearman']:.4f}, Kendall {v['kendall']:.4f}, top-5% overlap {v['overlap_at_5']:.2f}")
    return "\n".join(lines)
