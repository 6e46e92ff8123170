"""IPSVD closed form against an independent float64 route, and against plain SVD."""

import pytest
import torch

from iprox.ipsvd import (ipsvd_from_moments, ipsvd_from_samples, random_factors, svd_factors,
                         weighted_error)



@pytest.fixture(autouse=True)
def _float64():
    """These oracles compare to 1e-8: float64 for this module's tests only."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _problem(m=12, n=9, N=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    # Anisotropic probe data, as real activations are: a few directions dominate.
    H = torch.randn(n, n, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, n)) @ torch.randn(n, N, generator=g, dtype=torch.float64)
    D = torch.randn(m, m, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, m)) @ torch.randn(m, N, generator=g, dtype=torch.float64)
    return W, H, D


def _ridged(X, ridge):
    C = X @ X.T / X.shape[1]
    return C + ridge * torch.trace(C) / C.shape[0] * torch.eye(C.shape[0])


def _msqrt(C, power):
    e, V = torch.linalg.eigh(C)
    return V @ torch.diag(e ** power) @ V.T


def _oracle(W, C_h, C_d, r):
    """Independent route: explicit C_δ^{1/2} W C_h^{1/2}, truncate, map back."""
    M = _msqrt(C_d, 0.5) @ W @ _msqrt(C_h, 0.5)
    U, S, Vt = torch.linalg.svd(M)
    Mr = U[:, :r] @ torch.diag(S[:r]) @ Vt[:r]
    return _msqrt(C_d, -0.5) @ Mr @ _msqrt(C_h, -0.5), S


@pytest.mark.parametrize("r", [1, 3, 6])
def test_closed_form_matches_independent_route(r):
    W, H, D = _problem()
    ridge = 1e-3
    C_h, C_d = _ridged(H, ridge), _ridged(D, ridge)
    oracle, _ = _oracle(W, C_h, C_d, r)
    A, B = ipsvd_from_moments(W, H @ H.T / H.shape[1], D @ D.T / D.shape[1], r, ridge=ridge, form="full")
    assert A.shape == (12, r) and B.shape == (r, 9)
    torch.testing.assert_close(A @ B, oracle, rtol=1e-8, atol=1e-8)
    # The paper's skinny sample route equals it when N >= both widths.
    A2, B2 = ipsvd_from_samples(W, H, D, r, ridge=ridge)
    torch.testing.assert_close(A2 @ B2, oracle, rtol=1e-8, atol=1e-8)


def test_optimal_for_weighted_objective_and_beats_svd():
    W, H, D = _problem(seed=1)
    ridge, r = 1e-3, 4
    C_h, C_d = _ridged(H, ridge), _ridged(D, ridge)
    _, S = _oracle(W, C_h, C_d, r)
    A, B = ipsvd_from_moments(W, H @ H.T / 40, D @ D.T / 40, r, ridge=ridge)
    err_ipsvd = weighted_error(W, A @ B, C_h, C_d)
    # Eckart-Young: the optimum's error is the norm of the discarded singular values of the core.
    assert err_ipsvd == pytest.approx(float(S[r:].pow(2).sum().sqrt()), rel=1e-9)
    As, Bs = svd_factors(W, r)
    err_svd = weighted_error(W, As @ Bs, C_h, C_d)
    assert err_ipsvd < 0.9 * err_svd
    # Plain SVD wins on the unweighted Frobenius error it optimises.
    assert torch.linalg.norm(W - As @ Bs) < torch.linalg.norm(W - A @ B)
    # No random rank-r perturbation of the optimum does better.
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        dA = 1e-3 * torch.randn(A.shape, generator=g)
        dB = 1e-3 * torch.randn(B.shape, generator=g)
        assert weighted_error(W, (A + dA) @ (B + dB), C_h, C_d) >= err_ipsvd - 1e-12


def test_identity_weighting_reduces_to_svd():
    W, _, _ = _problem(seed=2)
    I_n, I_m = torch.eye(9), torch.eye(12)
    A, B = ipsvd_from_moments(W, I_n, I_m, 3, ridge=1e-3)
    As, Bs = svd_factors(W, 3)
    torch.testing.assert_close(A @ B, As @ Bs, rtol=1e-9, atol=1e-9)


def test_full_rank_reproduces_weight():
    W, H, D = _problem(seed=3)
    A, B = ipsvd_from_moments(W, H @ H.T / 40, D @ D.T / 40, 9)
    torch.testing.assert_close(A @ B, W, rtol=1e-9, atol=1e-9)


def test_skinny_form_stays_in_probe_span():
    """With fewer probe tokens than the layer is wide, the skinny form drops unprobed directions."""
    W, H, D = _problem(m=12, n=9, N=5, seed=4)
    A, B = ipsvd_from_samples(W, H, D, 3)
    A2, B2 = ipsvd_from_moments(W, H @ H.T / 5, D @ D.T / 5, 3, form="skinny")
    torch.testing.assert_close(A @ B, A2 @ B2, rtol=1e-7, atol=1e-9)
    Q, _ = torch.linalg.qr(H)                    # span of the 5 probe inputs
    outside = torch.eye(9) - Q @ Q.T             # projector onto the unprobed directions
    assert torch.linalg.norm(A @ B @ outside) < 1e-9
    Af, Bf = ipsvd_from_moments(W, H @ H.T / 5, D @ D.T / 5, 3, form="full")
    assert torch.linalg.norm(Af @ Bf @ outside) > 1e-3


def test_ridge_is_scale_invariant():
    """Scaling the gradients (e.g. sum vs mean loss) must not change the factors."""
    W, H, D = _problem(seed=6)
    A, B = ipsvd_from_moments(W, H @ H.T, D @ D.T, 4)
    A2, B2 = ipsvd_from_moments(W, H @ H.T, 1e-8 * D @ D.T, 4)
    torch.testing.assert_close(A @ B, A2 @ B2, rtol=1e-8, atol=1e-8)


def test_random_factors_shape_and_scale():
    W = torch.randn(30, 20, generator=torch.Generator().manual_seed(0))
    A, B = random_factors(W, 5, torch.Generator().manual_seed(1))
    assert A.shape == (30, 5) and B.shape == (5, 20)
    ratio = float(torch.linalg.norm(A @ B) / torch.linalg.norm(W))
    assert 0.5 < ratio < 2.0


def test_factors_are_balanced_whatever_the_gradient_scale():
    """‖A[:, i]‖ = ‖B[i, :]‖, so optimisers and factor gradients do not see the loss scale."""
    W, H, D = _problem(seed=7)
    A, B = ipsvd_from_moments(W, H @ H.T / 40, 1e-8 * D @ D.T / 40, 4)
    torch.testing.assert_close(A.norm(dim=0), B.norm(dim=1), rtol=1e-10, atol=0)
    A2, B2 = ipsvd_from_moments(W, H @ H.T / 40, D @ D.T / 40, 4)
    torch.testing.assert_close(A, A2, rtol=1e-7, atol=1e-10)       # the factors themselves, not just AB
    torch.testing.assert_close(B, B2, rtol=1e-7, atol=1e-10)
    As, Bs = ipsvd_from_samples(W, H, 1e-4 * D, 4)
    torch.testing.assert_close(As.norm(dim=0), Bs.norm(dim=1), rtol=1e-10, atol=0)
