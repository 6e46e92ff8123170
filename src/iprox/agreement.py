"""How far two score vectors over the same pool agree: rank correlations and top-k overlap."""

from __future__ import annotations

import math

import numpy as np


def spearman(a, b) -> float:
    """Spearman's rho (tie-averaged ranks), O(n log n) by scipy."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def kendall(a, b) -> float:
    """Kendall's tau-b, O(n log n) by scipy (a pool of 1M is seconds, not 10^12 pair comparisons)."""
    from scipy.stats import kendalltau

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(kendalltau(a, b, variant="b").statistic)


def top_k(scores, k: int) -> set[int]:
    """Indices of the k highest scores; ties go to the lower index (a stable, deterministic cut)."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(s)), -s))
    return set(order[:k].tolist())


def overlap_at(a, b, percent: float) -> dict[str, float]:
    """Top-p% agreement: ``overlap`` = |A∩B|/k, ``jaccard`` = |A∩B|/|A∪B|, with k = ceil(p% of n)."""
    n = len(a)
    k = max(1, math.ceil(n * percent / 100.0))
    A, B = top_k(a, k), top_k(b, k)
    inter = len(A & B)
    return {"k": k, "overlap": inter / k, "jaccard": inter / len(A | B)}


def head_spearman(ref, other, fraction: float = 0.2) -> float:
    """Spearman over the head of ``ref``'s ranking: its top ``fraction`` of the pool (where selection
    happens), so the order of the unrelated bulk does not dominate the figure."""
    ref, other = np.asarray(ref, dtype=np.float64), np.asarray(other, dtype=np.float64)
    k = max(2, math.ceil(len(ref) * fraction))
    head = sorted(top_k(ref, k))
    return spearman(ref[head], other[head])


def task_share(scores, tasks, task: str, percent: float = 5.0) -> float:
    """Share of the top ``percent`` of ``scores`` whose task tag is ``task``."""
    k = max(1, math.ceil(len(scores) * percent / 100.0))
    return sum(tasks[i] == task for i in top_k(scores, k)) / k


def agreement(ref, other) -> dict:
    """Every figure of how ``other`` ranks the pool like ``ref``: Spearman and Kendall over the pool,
    Spearman over ``ref``'s top 20% (``head_spearman``) and the top-1/5/10% overlap and Jaccard."""
    return {"spearman": spearman(ref, other), "kendall": kendall(ref, other),
            "head_spearman": head_spearman(ref, other),
            # keyed "1", "5", "10" (percent), as they read back from JSON
            "overlap_at": {str(p): overlap_at(ref, other, p) for p in (1, 5, 10)}}
