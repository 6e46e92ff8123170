import pytest
import torch

from iprox.lowrank import FactorizedLinear, rank_for_sparsity


def test_rank_arithmetic_on_smollm_shapes():
    assert rank_for_sparsity(576, 576, 0.5) == 144
    assert rank_for_sparsity(192, 576, 0.5) == 72
    assert rank_for_sparsity(1536, 576, 0.5) == 209      # floor(0.5*1536*576/2112) = floor(209.45)
    assert rank_for_sparsity(1536, 576, 0.7) == 125
    # Parameters of the factors never exceed the budget (1 - rho) * m * n.
    for m, n, rho in [(576, 576, 0.3), (1536, 576, 0.5), (192, 576, 0.7)]:
        r = rank_for_sparsity(m, n, rho)
        assert r * (m + n) <= (1 - rho) * m * n < (r + 1) * (m + n)


def test_rank_multiple_rounds_up_and_can_erase_compression():
    assert rank_for_sparsity(576, 576, 0.5, multiple=128) == 256
    assert rank_for_sparsity(64, 64, 0.1, multiple=32) is None      # 32 * 128 >= 64 * 64
    assert rank_for_sparsity(576, 576, 0.0) is None                  # sparsity 0: stays dense
    assert rank_for_sparsity(10, 10, 0.99) == 1                     # clipped to at least 1


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_sparsity_is_refused(bad):
    with pytest.raises(ValueError, match="sparsity"):
        rank_for_sparsity(8, 8, bad)


def test_factorized_linear_computes_abx_plus_bias():
    f = FactorizedLinear(5, 7, 3, bias=True, dtype=torch.float64)
    A, B, b = torch.randn(7, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    f.set_factors(A, B, b)
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(f(x), x @ (A @ B).T + b)
    torch.testing.assert_close(f.dense_weight(), A @ B)
