"""Closed-form low-rank factors for one projection: IPSVD and the baselines.

For a layer ``y = W h`` (W is m×n) with probe input second moment ``C_h = E[h hᵀ]`` and output-
gradient second moment ``C_δ = E[δ δᵀ]``, IPSVD minimises ``‖C_δ^{1/2} (W − AB) C_h^{1/2}‖_F`` over
rank-r products ``AB``: the expected change of the local influence term ``δᵀ W h``. The closed form
is a truncated SVD of the whitened core ``C_δ^{1/2} W C_h^{1/2}`` mapped back with the inverse square
roots.

Two routes compute it:

* :func:`ipsvd_from_samples`: the paper's skinny route from the probe matrices ``H`` (n×N) and
  ``Δ`` (m×N) via their thin SVDs. ``AB`` then lies in the span of the probe vectors.
* :func:`ipsvd_from_moments`: from accumulated second moments via eigendecompositions, which is how
  the pipeline runs (moments accumulate in fixed memory however many probe tokens are used). Its
  ``form="full"`` is the full-ridge solution (``C + λI`` over the whole space), ``form="skinny"``
  restricts each side to the probed span and equals the sample route.

The ridge is *relative*: ``λ = ridge · tr(C)/dim``. Output gradients of a mean loss are orders of
magnitude smaller than activations, so an absolute ridge would swamp ``C_δ`` and silently turn
IPSVD into an input-only weighting; a relative one makes the factors independent of loss scaling.

All functions compute in float64 and return float64 factors ``A`` (m×r) and ``B`` (r×n).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Eigenvalues below this fraction of the largest count as "not visited by the probes" (skinny form).
_SPAN_TOL = 1e-10


def _relative_ridge(eigvals: torch.Tensor, ridge: float, dim: int) -> float:
    total = float(eigvals.clamp_min(0).sum())
    if total <= 0.0:
        # The probes never moved this side of the layer (all-zero inputs or gradients): no
        # information to weight by, so fall back to the identity weighting on that side.
        log.warning("second moment is zero; using an identity weighting for this side")
        return 1.0
    return ridge * total / dim


def whitening_basis(C: torch.Tensor, ridge: float = 1e-3, form: str = "full") -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenbasis ``V`` (d×k) and ``D = sqrt(eig + λ)`` (k,) of a ridged second moment.

    ``V diag(D) Vᵀ`` is the square root of ``C + λI`` (restricted to the probed span when
    ``form="skinny"``). Projections that read the same input share this; compute it once.
    """
    C = C.to(torch.float64)
    C = 0.5 * (C + C.T)
    evals, V = torch.linalg.eigh(C)
    lam = _relative_ridge(evals, ridge, C.shape[0])
    if form == "skinny":
        keep = evals > _SPAN_TOL * evals.max().clamp_min(0)
        if not bool(keep.any()):
            keep = torch.ones_like(keep)
        V, evals = V[:, keep], evals[keep]
    elif form != "full":
        raise ValueError(f"form must be 'full' or 'skinny', got {form!r}")
    return V, torch.sqrt(evals.clamp_min(0) + lam)


def _factors_from_core(Vd, Dd, W, Vh, Dh, rank):
    core = (Dd[:, None] * (Vd.T @ W @ Vh)) * Dh[None, :]
    P, S, Qt = torch.linalg.svd(core, full_matrices=False)
    r = min(rank, S.shape[0])
    if r < rank:
        log.warning("probed span has dimension %d < requested rank %d; factors padded with zeros", r, rank)
    sq = torch.sqrt(S[:r])
    A = (Vd / Dd[None, :]) @ (P[:, :r] * sq[None, :])
    B = (sq[:, None] * Qt[:r]) @ (Vh / Dh[None, :]).T
    A, B = balance_factors(A, B)
    if r < rank:
        A = torch.cat([A, A.new_zeros(A.shape[0], rank - r)], dim=1)
        B = torch.cat([B, B.new_zeros(rank - r, B.shape[1])], dim=0)
    return A, B


def balance_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescales each rank-one component so that ``‖A[:, i]‖ = ‖B[i, :]‖``; ``AB`` is unchanged.

    The whitened closed form splits ``AB`` as ``diag(1/D_δ)…`` on the left and ``…diag(1/D_h)`` on
    the right, and ``D_δ`` scales with the loss's gradients (tiny for a mean loss), so A comes out
    orders of magnitude larger than B. The product does not care, but everything that trains or
    differentiates the factors does: Adam moves every entry by about the learning rate, which
    wrecks the small factor, and the factor gradients ``g_A = δ (Bh)ᵀ`` and ``g_B = (Aᵀδ) hᵀ`` inherit
    the imbalance. Balanced factors make stage 2 and the gradient features independent of the
    arbitrary loss scale.
    """
    na = A.norm(dim=0)
    nb = B.norm(dim=1)
    s = torch.where((na > 0) & (nb > 0), torch.sqrt(nb / na.clamp_min(1e-300)), torch.ones_like(na))
    return A * s[None, :], B / s[:, None]


def ipsvd_from_moments(
    W: torch.Tensor,
    C_h: torch.Tensor,
    C_d: torch.Tensor,
    rank: int,
    ridge: float = 1e-3,
    form: str = "full",
) -> tuple[torch.Tensor, torch.Tensor]:
    """IPSVD factors from second moments.

    Args:
        W: (m, n) weight.
        C_h: (n, n) input second moment ``E[h hᵀ]``.
        C_d: (m, m) output-gradient second moment ``E[δ δᵀ]``.
        rank: r.
        ridge: relative ridge (fraction of the mean eigenvalue added to every eigenvalue).
        form: ``"full"`` (full-ridge) or ``"skinny"`` (restricted to the probed span).

    Returns:
        ``(A, B)``, float64, shapes (m, r) and (r, n).
    """
    return ipsvd_from_bases(W, whitening_basis(C_h, ridge, form), whitening_basis(C_d, ridge, form), rank)


def ipsvd_from_bases(W: torch.Tensor, basis_h: tuple[torch.Tensor, torch.Tensor],
                     basis_d: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IPSVD factors from precomputed :func:`whitening_basis` results of both sides."""
    W = W.detach().to(torch.float64)
    (Vh, Dh), (Vd, Dd) = basis_h, basis_d
    return _factors_from_core(Vd, Dd, W, Vh, Dh, rank)


def ipsvd_from_samples(
    W: torch.Tensor, H: torch.Tensor, Delta: torch.Tensor, rank: int, ridge: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """IPSVD factors by the paper's skinny route from probe samples.

    ``H = U_H S_H V_Hᵀ``, ``Δ = U_D S_D V_Dᵀ`` (thin SVDs), ``D = sqrt(S²/N + λ)``, then the SVD
    ``P S Qᵀ`` of ``diag(D_D) U_Dᵀ W U_H diag(D_H)`` gives ``A = U_D diag(1/D_D) P_r S_r^{1/2}``,
    ``B = S_r^{1/2} Q_rᵀ diag(1/D_H) U_Hᵀ``.

    Args:
        W: (m, n) weight.
        H: (n, N) probe inputs, one column per token.
        Delta: (m, N) output gradients of the same tokens.
        rank: r.
        ridge: relative ridge, as in :func:`ipsvd_from_moments`.
    """
    W = W.detach().to(torch.float64)
    N = H.shape[1]

    def side(X):
        U, S, _ = torch.linalg.svd(X.to(torch.float64), full_matrices=False)
        ev = S**2 / N
        keep = ev > _SPAN_TOL * ev.max().clamp_min(0)
        lam = _relative_ridge(ev, ridge, X.shape[0])
        return U[:, keep], torch.sqrt(ev[keep] + lam)

    Uh, Dh = side(H)
    Ud, Dd = side(Delta)
    return _factors_from_core(Ud, Dd, W, Uh, Dh, rank)


def svd_factors(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain truncated SVD ``A = U_r S_r^{1/2}``, ``B = S_r^{1/2} V_rᵀ`` (float64)."""
    W = W.detach().to(torch.float64)
    U, S, Vt = torch.linalg.svd(W, full_matrices=False)
    sq = torch.sqrt(S[:rank])
    return U[:, :rank] * sq[None, :], sq[:, None] * Vt[:rank]


def random_factors(W: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian factors of rank r scaled so that ``E‖AB‖_F = ‖W‖_F`` (the no-information baseline)."""
    m, n = W.shape
    norm2 = float(W.detach().to(torch.float64).pow(2).sum())
    scale = (max(norm2, 1e-30) / (m * n * rank)) ** 0.25
    A = torch.randn(m, rank, generator=generator, dtype=torch.float64) * scale
    B = torch.randn(rank, n, generator=generator, dtype=torch.float64) * scale
    return A, B


def weighted_error(W: torch.Tensor, AB: torch.Tensor, C_h: torch.Tensor, C_d: torch.Tensor) -> float:
    """``‖C_δ^{1/2} (W − AB) C_h^{1/2}‖_F`` computed as ``sqrt(tr(C_δ E C_h Eᵀ))`` (no square roots)."""
    E = W.to(torch.float64) - AB.to(torch.float64)
    val = torch.trace(C_d.to(torch.float64) @ E @ C_h.to(torch.float64) @ E.T)
    return float(val.clamp_min(0).sqrt())
