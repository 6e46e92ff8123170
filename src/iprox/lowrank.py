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


def max_saving_rank(m: int, n: int) -> int:
    """The largest rank whose factors hold fewer parameters than the dense (m×n) layer."""
    return max(1, min(min(m, n), (m * n - 1) // (m + n)))


def depth_ranks(shapes: dict[str, tuple[int, int]], blocks: dict[str, int], n_blocks: int, sparsity: float,
                slope: float, multiple: int = 1) -> dict[str, int]:
    """Per-layer ranks that keep more of the lower decoder blocks and less of the upper ones.

    Block ``b`` of ``L`` keeps the fraction ``(1 − ρ)(1 + slope·(1 − 2b/(L − 1)))`` of its layers'
    parameters: a linear profile over depth with the uniform mean (``slope`` 0 is
    :func:`rank_for_sparsity`'s; 0.6 keeps 1.6× the uniform share in the first block and 0.4× in
    the last). A compressed layer's error reaches every layer above it in the forward pass, so the
    lower blocks' errors weigh most on a stage-1 proxy's gradients (BENCHMARKS.md, "rank
    allocation"; alignment evens this out).
    Ranks are clipped to ``[multiple, max_saving_rank]`` (so a layer stays factored; the clipped
    share is not spent elsewhere) and rounded to ``multiple``.

    Args:
        shapes: each layer's (m, n).
        blocks: each layer's decoder block index.
        n_blocks: decoder blocks in the model.
        sparsity, multiple: as :func:`rank_for_sparsity`.
        slope: in [-1, 1]; positive keeps the lower blocks more.

    Returns:
        ``{name: rank}`` for the layers that :func:`rank_for_sparsity` compresses.
    """
    if not -1.0 <= slope <= 1.0:
        raise ValueError(f"depth slope must be in [-1, 1], got {slope}")
    out = {}
    for name, (m, n) in shapes.items():
        if rank_for_sparsity(m, n, sparsity, multiple) is None:
            continue
        pos = 2.0 * blocks[name] / (n_blocks - 1) - 1.0 if n_blocks > 1 else 0.0
        keep = (1.0 - sparsity) * (1.0 - slope * pos)
        r = math.floor(keep * m * n / (m + n) + 1e-9)
        r = math.ceil(r / multiple) * multiple if multiple > 1 else r
        top = max(multiple, (max_saving_rank(m, n) // multiple) * multiple)
        out[name] = min(max(r, multiple), top)
    return out


def allocate_ranks(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], sparsity: float,
                   multiple: int = 1) -> dict[str, int]:
    """Per-layer ranks that spend the uniform allocation's parameters where the weighted error falls most.

    Layer ``l`` truncated to rank ``r`` leaves the error ``Σ_{i>r} s_{l,i}²`` (for IPSVD's whitened
    core, the expected squared first-order change of the loss's local term ``δᵀ W h``, comparable
    across layers). Each rank unit costs ``m_l + n_l`` parameters, so the greedy choice by
    ``s²/(m + n)`` over all layers' singular values minimises the summed error under the budget
    (the continuous relaxation's optimum; the values of each layer decrease, so the greedy takes
    prefixes). The budget is what :func:`rank_for_sparsity` would give the same layers; every layer
    keeps at least ``multiple`` ranks and at most :func:`max_saving_rank` (it stays factored).

    Args:
        spectra: each layer's singular values, in decreasing order.
        shapes: each layer's (m, n); layers absent from ``spectra`` are not allocated.
        sparsity, multiple: as :func:`rank_for_sparsity`.

    Returns:
        ``{name: rank}`` for the layers of ``spectra`` that :func:`rank_for_sparsity` compresses.
    """
    names = [n for n in spectra if rank_for_sparsity(*shapes[n], sparsity, multiple) is not None]
    if not names:
        return {}
    cost = {n: shapes[n][0] + shapes[n][1] for n in names}
    budget = sum(rank_for_sparsity(*shapes[n], sparsity, multiple) * cost[n] for n in names)
    ranks = {n: multiple for n in names}
    budget -= sum(multiple * cost[n] for n in names)
    gains, owners = [], []
    for i, n in enumerate(names):
        s2 = spectra[n].detach().double().cpu().pow(2)
        top = (min(max_saving_rank(*shapes[n]), s2.numel()) // multiple) * multiple
        units = s2[multiple:top]
        if units.numel() == 0:
            continue
        units = units[: (units.numel() // multiple) * multiple].view(-1, multiple).sum(dim=1)
        gains.append(units / cost[n])
        owners.append(torch.full((units.numel(),), i, dtype=torch.long))
    if gains:
        g, o = torch.cat(gains), torch.cat(owners)
        order = torch.argsort(g, descending=True, stable=True)
        unit_cost = torch.tensor([cost[names[i]] * multiple for i in o[order].tolist()], dtype=torch.long)
        take = order[torch.cumsum(unit_cost, 0) <= budget]
        counts = torch.bincount(o[take], minlength=len(names))
        for i, n in enumerate(names):
            ranks[n] += int(counts[i]) * multiple
    return ranks


class AdaptedLinear(nn.Module):
    """A projection (dense, Conv1D or factored) with a LoRA adapter beside it, laid out as peft lays
    out its own: ``base_layer``, ``lora_A.default`` (n→r) and ``lora_B.default`` (r→m), so a
    target's LoRA tensors keep their names (less peft's ``base_model.model.`` prefix) on a proxy.

    ``y = base(x) + (α/r) · lora_B(lora_A(x))``; the adapters stay float32 under a bf16/fp16 base
    (as peft keeps them), with the input cast to their dtype and the sum cast back.
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int, rank: int, alpha: float,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base_layer = base
        self.scaling = alpha / rank
        kw = dict(bias=False, device=device, dtype=dtype)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(in_features, rank, **kw)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, out_features, **kw)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        a, b = self.lora_A["default"], self.lora_B["default"]
        return y + (b(a(x.to(a.weight.dtype))) * self.scaling).to(y.dtype)


def adapter_layers(state: dict[str, torch.Tensor]) -> list[str]:
    """The layers a LoRA state adapts (``<layer>.lora_A/B...`` keys), sorted."""
    return sorted({k.rsplit(".lora_", 1)[0] for k in state})


def attach_adapters(model: nn.Module, state: dict[str, torch.Tensor], alpha: float,
                    device: torch.device | str | None = None) -> dict[str, AdaptedLinear]:
    """Puts an :class:`AdaptedLinear` around each layer a LoRA state names, holding its tensors.

    Args:
        model: a target or a proxy; a layer already adapted keeps its wrapper (its tensors are
            overwritten).
        state: ``<layer>.lora_A.default.weight`` (r, n) and ``<layer>.lora_B.default.weight`` (m, r)
            by canonical name (without peft's prefix), as a target's LoRA checkpoint holds them.
        alpha: the adapters' LoRA alpha (scaling ``alpha / r``).

    Returns:
        The wrappers by layer name, in sorted order.

    Raises:
        ValueError: the model has no layer of that name, or a tensor's shape does not fit it.
    """
    out = {}
    for layer in adapter_layers(state):
        try:
            mod = model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"the model has no layer {layer} for the checkpoint's adapter") from None
        a, b = state[f"{layer}.lora_A.default.weight"], state[f"{layer}.lora_B.default.weight"]
        if not isinstance(mod, AdaptedLinear):
            parent, _, child = layer.rpartition(".")
            # float32 at least, as peft keeps adapters (a float64 state stays float64)
            mod = AdaptedLinear(mod, a.shape[1], b.shape[0], a.shape[0], alpha, device=device,
                                dtype=torch.promote_types(a.dtype, torch.float32))
            setattr(model.get_submodule(parent), child, mod)
        for dst, src in ((mod.lora_A["default"].weight, a), (mod.lora_B["default"].weight, b)):
            if dst.shape != src.shape:
                raise ValueError(f"{layer}: the adapter tensor has shape {tuple(src.shape)}, the layer takes {tuple(dst.shape)}")
            with torch.no_grad():
                dst.copy_(src)
        out[layer] = mod
    return out


def detach_adapters(model: nn.Module, layers) -> None:
    """Puts each named layer's base module back in place of its :class:`AdaptedLinear` (a name the
    model lacks, or a layer not adapted, is passed over)."""
    for layer in layers:
        try:
            mod = model.get_submodule(layer)
        except AttributeError:
            continue
        if isinstance(mod, AdaptedLinear):
            parent, _, child = layer.rpartition(".")
            setattr(model.get_submodule(parent), child, mod.base_layer)
