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

The moment routes compute in a chosen dtype on the moments' device: float64 is the reference,
float32 (the default of ``build-proxy``) is what an accelerator does fast, and is tested against it
on ill-conditioned moments. The eigendecompositions are batched over same-sized moments, and the
whitened core's SVD is kept rank-free (:class:`Decomposition`) so one probe serves every sparsity.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

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


def _prepare(C: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, float]:
    """Symmetrised ``C / s`` in ``dtype`` and the scale ``s`` (its mean diagonal): eigenvalues near 1
    keep float32 well inside its range whatever the loss scale (gradient moments can be ~1e-12)."""
    C = C.to(dtype)
    C = 0.5 * (C + C.T)
    s = float(torch.diagonal(C).mean())
    s = s if s > 0 and math.isfinite(s) else 1.0
    return C / s, s


def _probed_span(V: torch.Tensor, evals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigenvectors (columns of V) and eigenvalues of the span the probes visited (skinny form)."""
    keep = evals > _SPAN_TOL * evals.max().clamp_min(0)
    if not bool(keep.any()):
        keep = torch.ones_like(keep)
    return V[:, keep], evals[keep]


def _basis_from_eig(evals: torch.Tensor, V: torch.Tensor, scale: float, ridge: float, form: str):
    evals = evals * scale
    lam = _relative_ridge(evals, ridge, V.shape[0])
    if form == "skinny":
        V, evals = _probed_span(V, evals)
    elif form != "full":
        raise ValueError(f"form must be 'full' or 'skinny', got {form!r}")
    return V, torch.sqrt(evals.clamp_min(0) + lam)


def whitening_basis(C: torch.Tensor, ridge: float = 1e-3, form: str = "full",
                    dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenbasis ``V`` (d×k) and ``D = sqrt(eig + λ)`` (k,) of a ridged second moment.

    ``V diag(D) Vᵀ`` is the square root of ``C + λI`` (restricted to the probed span when
    ``form="skinny"``). Projections that read the same input share this; compute it once.
    Computed on ``C``'s device in ``dtype``.
    """
    return whitening_bases([C], ridge, form, dtype)[0]


def whitening_bases(moments: list[torch.Tensor], ridge: float = 1e-3, form: str = "full",
                    dtype: torch.dtype = torch.float64, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`whitening_basis` of many moments: same-sized ones are eigendecomposed together, ``batch``
    at a time (one batched ``eigh`` launch instead of many small ones on a GPU)."""
    out: list = [None] * len(moments)
    by_size: dict[tuple, list[int]] = {}
    for i, C in enumerate(moments):
        by_size.setdefault((tuple(C.shape), str(C.device)), []).append(i)
    for idx in by_size.values():
        for a in range(0, len(idx), batch):
            chunk = idx[a:a + batch]
            prepared = [_prepare(moments[i], dtype) for i in chunk]
            evals, V = torch.linalg.eigh(torch.stack([c for c, _ in prepared]))
            for j, i in enumerate(chunk):
                out[i] = _basis_from_eig(evals[j], V[j], prepared[j][1], ridge, form)
    return out


@dataclass
class Decomposition:
    """IPSVD of one layer at every rank at once: ``A_r = left[:, :r] S_r^{1/2}``, ``B_r = S_r^{1/2} right[:r]``.

    The whitened core's SVD does not depend on the rank, so one decomposition serves every sparsity
    of a probe (:func:`truncate`). Shapes: left (m, k), s (k,), right (k, n).
    """

    left: torch.Tensor
    s: torch.Tensor
    right: torch.Tensor


def ipsvd_decomposition(W: torch.Tensor, basis_h: tuple[torch.Tensor, torch.Tensor],
                        basis_d: tuple[torch.Tensor, torch.Tensor]) -> Decomposition:
    """The rank-free IPSVD of ``W`` (m, n) from both sides' :func:`whitening_basis`, in the bases' dtype."""
    (Vh, Dh), (Vd, Dd) = basis_h, basis_d
    W = W.detach().to(Vh.dtype)
    core = (Dd[:, None] * (Vd.T @ W @ Vh)) * Dh[None, :]
    P, S, Qt = torch.linalg.svd(core, full_matrices=False)
    return Decomposition((Vd / Dd[None, :]) @ P, S, Qt @ (Vh / Dh[None, :]).T)


@dataclass
class SampleBasis:
    """The ridged square roots of a second moment known only from its samples (the bounded-memory probe).

    With the samples' thin SVD ``X = Q diag(σ) Uᵀ`` (N×d, N tokens), ``C = XᵀX/N = U diag(e) Uᵀ``
    with ``e = σ²/N``, and ``(C + λI)^p = U diag((e + λ)^p − λ^p) Uᵀ + λ^p I`` for ``p = ±½``: the
    full-ridge form, ``λ^p`` on the complement the probe never visited. The skinny form keeps only
    the span term. Nothing d×d is ever formed: memory is the samples and U (d × min(N, d)).
    """

    U: torch.Tensor
    e: torch.Tensor
    lam: float
    form: str

    def apply(self, X: torch.Tensor, power: float) -> torch.Tensor:
        """``(C + λI)^power X`` for a (d, p) matrix ``X`` (the pseudo-inverse on the span when skinny)."""
        d = (self.e + self.lam) ** power
        if self.form == "skinny":
            return self.U @ (d[:, None] * (self.U.T @ X))
        base = self.lam ** power
        return self.U @ ((d - base)[:, None] * (self.U.T @ X)) + base * X


def sample_bases(samples: list[torch.Tensor], ridge: float = 1e-3, form: str = "full",
                 dtype: torch.dtype = torch.float64) -> list[SampleBasis]:
    """:class:`SampleBasis` of each (N, d) sample matrix, from its thin SVD in ``dtype`` on its device."""
    if form not in ("full", "skinny"):
        raise ValueError(f"form must be 'full' or 'skinny', got {form!r}")
    out = []
    for X in samples:
        X = X.to(dtype)
        scale = float(X.pow(2).mean().sqrt())  # singular values near 1: float32 keeps tiny gradients
        scale = scale if scale > 0 and math.isfinite(scale) else 1.0
        _, S, Vt = torch.linalg.svd(X / scale, full_matrices=False)
        e = (S * scale) ** 2 / X.shape[0]
        U = Vt.T
        lam = _relative_ridge(e, ridge, X.shape[1])
        if form == "skinny":
            U, e = _probed_span(U, e)
        out.append(SampleBasis(U, e, lam, form))
    return out


def ipsvd_decomposition_from_samples(W: torch.Tensor, basis_h: SampleBasis, basis_d: SampleBasis) -> Decomposition:
    """The rank-free IPSVD of ``W`` (m, n) from both sides' :class:`SampleBasis`: the SVD ``P S Qᵀ`` of
    the whitened core ``C_δ^{½} W C_h^{½}`` and ``left = C_δ^{-½} P``, ``right = Qᵀ C_h^{-½}`` (the
    moments route's result, computed without any d×d matrix)."""
    W = W.detach().to(basis_h.U.dtype)
    core = basis_d.apply(basis_h.apply(W.T, 0.5).T, 0.5)
    P, S, Qt = torch.linalg.svd(core, full_matrices=False)
    return Decomposition(basis_d.apply(P, -0.5), S, basis_h.apply(Qt.T, -0.5).T)


def truncate(dec: Decomposition, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced rank-``rank`` factors ``(A, B)`` of a :class:`Decomposition` (zero-padded when the
    probed span is smaller than the rank)."""
    r = min(rank, dec.s.shape[0])
    if r < rank:
        log.warning("probed span has dimension %d < requested rank %d; factors padded with zeros", r, rank)
    sq = torch.sqrt(dec.s[:r])
    A, B = balance_factors(dec.left[:, :r] * sq[None, :], sq[:, None] * dec.right[:r])
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
    tiny = torch.finfo(A.dtype).tiny
    s = torch.where((na > 0) & (nb > 0), torch.sqrt(nb / na.clamp_min(tiny)), torch.ones_like(na))
    return A * s[None, :], B / s[:, None]


def ipsvd_from_moments(
    W: torch.Tensor,
    C_h: torch.Tensor,
    C_d: torch.Tensor,
    rank: int,
    ridge: float = 1e-3,
    form: str = "full",
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IPSVD factors from second moments.

    Args:
        W: (m, n) weight.
        C_h: (n, n) input second moment ``E[h hᵀ]``.
        C_d: (m, m) output-gradient second moment ``E[δ δᵀ]``.
        rank: r.
        ridge: relative ridge (fraction of the mean eigenvalue added to every eigenvalue).
        form: ``"full"`` (full-ridge) or ``"skinny"`` (restricted to the probed span).
        dtype: compute dtype (float32 on an accelerator keeps the factors; see the tests).

    Returns:
        ``(A, B)`` in ``dtype``, shapes (m, r) and (r, n).
    """
    return ipsvd_from_bases(W, whitening_basis(C_h, ridge, form, dtype), whitening_basis(C_d, ridge, form, dtype), rank)


def ipsvd_from_bases(W: torch.Tensor, basis_h: tuple[torch.Tensor, torch.Tensor],
                     basis_d: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IPSVD factors from precomputed :func:`whitening_basis` results of both sides."""
    return truncate(ipsvd_decomposition(W, basis_h, basis_d), rank)


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
    return truncate(ipsvd_decomposition(W, (Uh, Dh), (Ud, Dd)), rank)


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
