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
