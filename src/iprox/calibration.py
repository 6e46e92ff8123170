"""Calibration: the proxy's pool features corrected by the target's on a few pool examples.

The proxy's per-example gradient errors are not independent noise: examples alike (the same task, the
same answer format) share much of their error, so the errors compound in the scores and shift whole
blocks of the pool (``BENCHMARKS.md``, "validation model" and "calibration"). A few pool examples
featurised by the target as well (``c`` target passes) show that error, and its shared part can be
predicted for every other example from how alike their proxy features are.

With ``P`` and ``T`` the proxy's and the target's unit feature rows of the calibration examples (the
same coordinates: in the target-first order the proxy carries the target's LoRA checkpoint and both
are projected alike), kernel ridge regression of the error on the proxy's features gives, for a pool
example with unit proxy feature ``x``::

    x' = normalise(x + (x Pᵀ) M),   M = (P Pᵀ + λ I)⁻¹ (T − P)      (c × dim)

A calibration example's own row is replaced by the target's. ``λ`` (``ridge``) trades how far the
correction reaches from the calibration examples against fitting their noise; ``P Pᵀ`` has ones on its
diagonal (unit rows), so ``λ`` is on the scale of a cosine.

The correction is linear in ``x``, so it is applied chunk by chunk while the pool is streamed past
the scores (:func:`iprox.scores.compute_scores`); it reads the proxy's rows of the calibration
examples from the pool store (one pass) and the target's from the calibration store.

The same examples give an estimate of how well the run's scores agree with the target's, for free
(:func:`estimate_agreement`): each calibration example is scored from its corrected row as if it had
not been calibrated on (the correction fitted on the others: ridge regression's leave-one-out
residual, in closed form), beside the target's own score of it (its row against the target's
validation gradients). The Spearman of the two over the calibration examples, a random sample of the
pool, estimates the whole-pool Spearman of the run with the target's run. Over 32 examples it is a
noisy estimate: on the fidelity study's proxies it read 0.07 low on average, with a mean absolute
difference of 0.10 (BENCHMARKS.md). It says nothing reliable about the head of the ranking.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from . import artifacts
from .loading import iter_feature_rows, read_manifest

log = logging.getLogger(__name__)

DEFAULT_RIDGE = 0.01
# The default calibration size: 128 examples, at most a tenth of the pool (a proxy whose pool is mostly
# featurised by the target saves little). What orders the bulk is mostly the count, not the share of
# the pool: in a pool of 1,000, 30 examples left hyperbaton's bulk at Spearman 0.74 against the target,
# 120 at 0.83 (BENCHMARKS.md, "Calibration size at today's defaults"). Until 0.18 it was 32.
DEFAULT_SIZE = 128
MAX_DEFAULT_SHARE = 0.1
# An estimated Spearman with the target's scores below this is reported as a warning.
AGREEMENT_WARNING = 0.5


def estimate_spread(n: int) -> float:
    """How far the agreement estimate over ``n`` calibration examples typically lies from the
    whole-pool figure, as the warning states it: ``0.8 / sqrt(n)`` (0.15 at 30, 0.07 at 128). It
    sits above the mean absolute error measured and below the largest: at 30-32 examples 0.08-0.10
    and 0.36; at 100-128, 0.03 and 0.10 (BENCHMARKS.md, "The run's own estimate" and "Calibration
    size at today's defaults")."""
    return 0.8 / max(n, 1) ** 0.5


def calibration_size(given: int | None, n_pool: int) -> int:
    """How many pool examples to calibrate on: ``given`` (capped at the pool), or by default
    ``min(128, n_pool // 10)``."""
    if given is None:
        return min(DEFAULT_SIZE, int(n_pool * MAX_DEFAULT_SHARE))
    return min(given, n_pool)


def calibration_subset(pool_file: str | Path, n: int, seed: int, out: str | Path) -> Path:
    """Writes ``n`` records of the pool file (seeded choice, in pool order; all of them when the pool
    is smaller) to ``out`` as JSON lines and returns its path. The records keep their ids, so the
    target's store of them lines up with the proxy's pool store.

    Raises:
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"a calibration subset needs at least one example, got {n}")
    lines = [ln for ln in Path(pool_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
    keep = sorted(random.Random(seed).sample(range(len(lines)), min(n, len(lines))))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(lines[i] + "\n" for i in keep)
    if not out.exists() or out.read_text(encoding="utf-8") != text:
        artifacts.atomic_write_text(out, text)
    return out


def _unit(X: torch.Tensor) -> torch.Tensor:
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-30)


@dataclass
class Correction:
    """The fitted correction of one pool store (float64).

    Attributes:
        ids: the calibration examples' ids, in the order of the rows below.
        P: (c, dim) the proxy's unit rows of them.
        T: (c, dim) the target's unit rows of them.
        M: (c, dim) ``(P Pᵀ + λI)⁻¹ (T − P)``.
        ridge: λ.
    """

    ids: list[str]
    P: torch.Tensor
    T: torch.Tensor
    M: torch.Tensor
    ridge: float = DEFAULT_RIDGE

    def __post_init__(self):
        self._row = {i: k for k, i in enumerate(self.ids)}  # id -> its row in T

    def apply(self, ids: list[str], X: torch.Tensor) -> torch.Tensor:
        """Corrected unit rows of a chunk of unit pool features ``X`` (n, dim) with ``ids``."""
        Y = _unit(X + (X @ self.P.T) @ self.M)
        rows = [(r, self._row[i]) for r, i in enumerate(ids) if i in self._row]
        if rows:
            Y[[r for r, _ in rows]] = self.T[[k for _, k in rows]]
        return Y

    def held_out_rows(self) -> torch.Tensor:
        """(c, dim) each calibration example's corrected unit row from the correction fitted on the
        others: with ``A = (K + λI)⁻¹`` and ``H = K A``, the leave-one-out error prediction is
        ``E − (E − K M) / (1 − diag H)`` (``E = T − P``; exact for ridge regression)."""
        K = self.P @ self.P.T
        A = torch.linalg.inv(K + self.ridge * torch.eye(len(K), dtype=K.dtype))
        E = self.T - self.P
        fitted = K @ self.M
        left = (1 - (K @ A).diagonal()).clamp_min(1e-12)
        return _unit(self.P + E - (E - fitted) / left[:, None])


def check_calibration_store(train: str, calib: str, tm: dict, cm: dict) -> None:
    """Refuses a calibration store whose features do not share the pool store's coordinates: the
    checks of a scoring pair (:func:`iprox.scores._check_pair`), and the same preconditioner."""
    from .scores import _check_pair

    try:
        _check_pair(tm, cm, train, calib)
    except ValueError as e:
        raise ValueError(f"calibration: {e}; calibration needs the target-first order (the target and the proxy "
                         f"carrying its LoRA checkpoint, featurised alike)") from None
    if tm.get("grad") != cm.get("grad"):
        raise ValueError(f"calibration store {calib} and pool store {train} differ in grad ({cm.get('grad')!r} against "
                         f"{tm.get('grad')!r}); featurise the calibration examples with the pool's preconditioner")


def fit_correction(train: str | Path, calib: str | Path | list, ridge: float = DEFAULT_RIDGE,
                   chunk_rows: int = 4096) -> Correction:
    """Fits the correction of pool store ``train`` (the proxy's) from calibration store ``calib``
    (the target's features of some of the same examples), or from several such stores together (an
    example in more than one: its first row).

    Raises:
        ValueError: the stores do not share coordinates, ``ridge <= 0``, or a calibration example is
            not in the pool store.
    """
    if ridge <= 0:
        raise ValueError(f"calibration_ridge must be > 0, got {ridge}")
    stores = [calib] if isinstance(calib, (str, Path)) else list(calib)
    if not stores:
        raise ValueError("fit_correction needs at least one calibration store")
    tm = read_manifest(train)
    in_pool = set(tm["ids"])
    cal_ids: list[str] = []
    rows: list[torch.Tensor] = []
    for store in stores:
        cm = read_manifest(store)
        check_calibration_store(str(train), str(store), tm, cm)
        missing = [i for i in cm["ids"] if i not in in_pool]
        if missing:
            raise ValueError(f"calibration store {store} holds {len(missing)} examples that pool store {train} does "
                             f"not (first: {missing[0]!r}); calibrate on examples of the pool")
        seen = set(cal_ids)
        for _, chunk_ids, X in iter_feature_rows(store, chunk_rows, torch.float64):
            keep = [r for r, i in enumerate(chunk_ids) if i not in seen]
            cal_ids += [chunk_ids[r] for r in keep]
            rows.append(X[keep])
            seen.update(chunk_ids)
    want = {i: k for k, i in enumerate(cal_ids)}
    T = torch.cat(rows)
    P = torch.zeros_like(T)
    for _, ids, X in iter_feature_rows(train, chunk_rows, torch.float64):
        for r, i in enumerate(ids):
            if i in want:
                P[want[i]] = X[r]
    corr = correction_from_rows(cal_ids, P, T, ridge)
    cos = (corr.P * corr.T).sum(1)
    log.info("calibration of %s: %d examples, proxy-target cosine %.3f (min %.3f), ridge %g",
             Path(train).name, len(T), float(cos.mean()), float(cos.min()), ridge)
    return corr


def correction_from_rows(ids: list[str], P: torch.Tensor, T: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> Correction:
    """The correction from the proxy's rows ``P`` and the target's rows ``T`` (c, dim) of the
    calibration examples ``ids`` (any scale: rows are normalised here)."""
    P, T = _unit(P.double()), _unit(T.double())
    K = P @ P.T
    M = torch.linalg.solve(K + ridge * torch.eye(len(K), dtype=K.dtype), T - P)
    return Correction(list(ids), P, T, M, ridge)


def estimate_agreement(pairs: list[tuple[Correction, torch.Tensor, float, bool]], subtasks: list[str]) -> dict | None:
    """How well a calibrated run's scores agree with the target's, estimated on the calibration examples.

    Args:
        pairs: per scored store pair, its correction, its validation matrix ``U`` (dim, subtasks: each
            subtask's mean unit validation feature), its checkpoint weight, and whether its validation
            store is the target's.
        subtasks: the columns of ``U``.

    Returns:
        ``None`` when no pair's validation store is the target's (no reference) or the pairs'
        calibration examples differ; else ``{"examples", "cosine", "held_out_cosine", "spearman",
        "uncalibrated_spearman"}``: the proxy's and the target's rows' mean cosine before correction
        and after it (held out), and per subtask the Spearman over the calibration examples of the
        run's held-out scores (and of the uncorrected ones) with the target's own scores (``None``
        where a column is constant).
    """
    from .agreement import spearman

    if not any(is_target for *_, is_target in pairs):
        return None
    ids = pairs[0][0].ids
    if any(c.ids != ids for c, *_ in pairs):
        return None
    n = len(ids)
    est, raw, ref = (torch.zeros(n, len(subtasks), dtype=torch.float64) for _ in range(3))
    held: dict[int, torch.Tensor] = {}
    for corr, U, w, is_target in pairs:
        if id(corr) not in held:
            held[id(corr)] = corr.held_out_rows()
        est += w * held[id(corr)] @ U
        raw += w * corr.P @ U
        if is_target:
            ref += w * corr.T @ U
    corrs = {id(c): c for c, *_ in pairs}
    cos = [float((c.P * c.T).sum(1).mean()) for c in corrs.values()]
    held_cos = [float((held[k] * c.T).sum(1).mean()) for k, c in corrs.items()]
    return {"examples": n, "cosine": sum(cos) / len(cos), "held_out_cosine": sum(held_cos) / len(held_cos),
            "spearman": {s: _finite(spearman(est[:, j], ref[:, j])) for j, s in enumerate(subtasks)},
            "uncalibrated_spearman": {s: _finite(spearman(raw[:, j], ref[:, j])) for j, s in enumerate(subtasks)}}


def _finite(x: float) -> float | None:
    """``None`` for NaN (a constant column has no rank correlation): JSON has no NaN."""
    return None if x != x else x
