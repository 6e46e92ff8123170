"""How far two score vectors over the same pool agree: rank correlations and top-k overlap."""

from __future__ import annotations

import math

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 0-based."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rho: the Pearson correlation of the (tie-averaged) ranks."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def kendall(a, b, block: int = 2048) -> float:
    """Kendall's tau-b over all pairs (O(n²) time, O(block·n) memory)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = len(a)
    conc = disc = ties_a = ties_b = 0.0
    for s in range(0, n, block):
        da = np.sign(a[s:s + block, None] - a[None, :])
        db = np.sign(b[s:s + block, None] - b[None, :])
        prod = da * db
        conc += (prod > 0).sum()
        disc += (prod < 0).sum()
        ties_a += ((da == 0) & (db != 0)).sum()
        ties_b += ((db == 0) & (da != 0)).sum()
    # Every unordered pair was seen twice (i, j) and (j, i); the ratio is unaffected.
    den = math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return float((conc - disc) / den) if den > 0 else float("nan")


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
