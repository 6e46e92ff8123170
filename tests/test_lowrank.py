import itertools

import pytest
import torch

from iprox.lowrank import FactorizedLinear, allocate_ranks, depth_ranks, max_saving_rank, rank_for_sparsity


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


def _tail(spectra, ranks):
    return sum(float(spectra[n][ranks[n]:].pow(2).sum()) for n in ranks)


def test_influence_allocation_is_the_brute_force_optimum_for_equal_shapes():
    # Equal shapes: every rank unit costs the same, so the greedy is the exact optimum of the
    # summed tail energy under the uniform budget; checked against every feasible allocation.
    gen = torch.Generator().manual_seed(0)
    shapes = {f"l{i}": (12, 12) for i in range(3)}
    spectra = {n: torch.sort(torch.rand(12, generator=gen) * (3.0 ** i), descending=True).values
               for i, n in enumerate(shapes)}
    ranks = allocate_ranks(spectra, shapes, 0.5)
    uniform = rank_for_sparsity(12, 12, 0.5)
    budget = 3 * uniform
    assert sum(ranks.values()) <= budget
    best = min(_tail(spectra, dict(zip(shapes, r)))
               for r in itertools.product(range(1, max_saving_rank(12, 12) + 1), repeat=3) if sum(r) <= budget)
    assert _tail(spectra, ranks) == pytest.approx(best)
    assert _tail(spectra, ranks) < _tail(spectra, {n: uniform for n in shapes})
    # the layer with the largest spectrum gets the most rank
    assert ranks["l2"] > ranks["l0"]


def test_influence_allocation_keeps_the_budget_and_the_bounds():
    gen = torch.Generator().manual_seed(1)
    shapes = {"a": (64, 16), "b": (32, 32), "c": (48, 24), "d": (8, 8)}
    spectra = {n: torch.sort(torch.rand(min(s), generator=gen) ** 4 * (10 if n == "a" else 1), descending=True).values
               for n, s in shapes.items()}
    for sparsity, multiple in ((0.5, 1), (0.3, 1), (0.7, 1), (0.5, 2)):
        ranks = allocate_ranks(spectra, shapes, sparsity, multiple)
        compressed = [n for n in shapes if rank_for_sparsity(*shapes[n], sparsity, multiple) is not None]
        assert sorted(ranks) == sorted(compressed)
        budget = sum(rank_for_sparsity(*shapes[n], sparsity, multiple) * sum(shapes[n]) for n in compressed)
        assert sum(r * sum(shapes[n]) for n, r in ranks.items()) <= budget
        for n, r in ranks.items():
            assert multiple <= r <= max_saving_rank(*shapes[n]) and r % multiple == 0
        uniform = {n: rank_for_sparsity(*shapes[n], sparsity, multiple) for n in compressed}
        assert _tail(spectra, ranks) <= _tail(spectra, uniform) + 1e-12


def test_depth_ranks_follow_a_linear_profile_with_the_uniform_mean():
    shapes = {f"b{b}.{p}": (576, 576) if p == "q" else (1536, 576) for b in range(30) for p in ("q", "up")}
    blocks = {n: int(n[1:].split(".")[0]) for n in shapes}
    flat = depth_ranks(shapes, blocks, 30, 0.5, 0.0)
    assert flat == {n: rank_for_sparsity(*s, 0.5) for n, s in shapes.items()}
    ranks = depth_ranks(shapes, blocks, 30, 0.5, 0.6)
    params = lambda rk: sum(r * sum(shapes[n]) for n, r in rk.items())  # noqa: E731
    assert abs(params(ranks) - params(flat)) <= 0.01 * params(flat)
    m, n = shapes["b0.q"]
    assert ranks["b0.q"] == int(0.5 * 1.6 * m * n / (m + n)) and ranks["b29.q"] == int(0.5 * 0.4 * m * n / (m + n))
    assert all(ranks[f"b{b}.up"] >= ranks[f"b{b + 1}.up"] for b in range(29))
    reverse = depth_ranks(shapes, blocks, 30, 0.5, -0.6)
    assert reverse["b0.q"] == ranks["b29.q"] and reverse["b29.q"] == ranks["b0.q"]
    # a kept share above what saves parameters is clipped, never left dense
    steep = depth_ranks(shapes, blocks, 30, 0.2, 1.0)
    assert steep["b0.q"] == max_saving_rank(576, 576) and steep["b29.q"] == 1
    with pytest.raises(ValueError, match="slope"):
        depth_ranks(shapes, blocks, 30, 0.5, 1.2)
