"""The factored projection a proxy puts in place of each compressed layer, and rank arithmetic."""

from __future__ import annotations

import math

import torch
from torch import nn


class FactorizedLinear(nn.Module):
    """``y = A (B x) + b``: a rank-r stand-in for an (m×n) projection.

    Both factors are plain ``nn.Linear`` submodules (``B``: n→r, no bias; ``A``: r→m, with the
    original bias if any). That keeps every later stage simple: per-example gradients of ``A`` and
    ``B`` come from the same hooks as any linear layer (``∇_A = Σ_t δ_t (B h_t)ᵀ``,
    ``∇_B = Σ_t (Aᵀ δ_t) h_tᵀ``), and LoRA can target them by name.

    Attributes:
        A: ``nn.Linear(r, m)``; ``A.weight`` is the (m, r) left factor.
        B: ``nn.Linear(n, r, bias=False)``; ``B.weight`` is the (r, n) right factor.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.B = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.A = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(self.B(x))

    @torch.no_grad()
    def set_factors(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copies (m, r) ``A``, (r, n) ``B`` and optionally the (m,) bias into the module."""
        self.A.weight.copy_(A)
        self.B.weight.copy_(B)
        if bias is not None:
            self.A.bias.copy_(bias)

    def dense_weight(self) -> torch.Tensor:
        """The (m, n) product ``A B``."""
        return self.A.weight @ self.B.weight

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, bias={self.A.bias is not None}"


def rank_for_sparsity(m: int, n: int, sparsity: float, multiple: int = 1) -> int | None:
    """Rank of the factors that remove a fraction ``sparsity`` of an (m×n) layer's parameters.

    ``r = (1 − ρ)·m·n / (m + n)``, floored so the budget is not exceeded, then rounded *up* to a
    multiple of ``multiple`` (the reference rounds to 128 for GPU kernels; on small models that can
    erase the compression, hence a setting) and clipped to ``[1, min(m, n)]``.

    Returns:
        The rank, or None when factors of that rank would not hold fewer parameters than the dense
        layer (the layer then stays dense).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if multiple < 1:
        raise ValueError(f"rank multiple must be >= 1, got {multiple}")
    if sparsity == 0.0:
        # Nothing to remove. (The floor below could otherwise still cut a layer whose m·n/(m+n)
        # is not an integer by a fraction of a rank.)
        return None
    r = math.floor((1.0 - sparsity) * m * n / (m + n) + 1e-9)
    r = max(1, r)
    if multiple > 1:
        r = math.ceil(r / multiple) * multiple
    r = min(r, min(m, n))
    if r * (m + n) >= m * n:
        return None
    return r


class AdaptedLinear(nn.Module):
    """A projection (dense, Conv1D or factored) with a LoRA adapter beside it, laid out as peft lays
    out its own: ``base_layer``, ``lora_A.default`` (n→r) and ``lora_B.default`` (r→m), so a
    target's LoRA tensors keep their names (less peft's ``base_model.model.`` prefix) on a proxy.

    ``y = base(x) + (α/r) · lora_B(lora_A(x))``; the adapters stay float32 under a bf16/fp16 base
    (as peft keeps them), with the input cast to their dtype and the sum cast back.
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int, rank: int, alpha: float,
                 device: torch.device | str | None = None):
        super().__init__()
        self.base_layer = base
        self.scaling = alpha / rank
        self.lora_A = nn.ModuleDict({"default": nn.Linear(in_features, rank, bias=False, device=device)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, out_features, bias=False, device=device)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        a, b = self.lora_A["default"], self.lora_B["default"]
        return y + (b(a(x.to(a.weight.dtype))) * self.scaling).to(y.dtype)
