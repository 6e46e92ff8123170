"""Per-example projected gradients: random Kronecker projections, preconditioners and two engines.

For one linear layer ``y = W h`` an example's weight gradient is ``G = Σ_t δ_t h_tᵀ`` (m×n), summed
over its tokens. Each layer gets two matrices ``P_out`` (k_out×m) and ``P_in`` (k_in×n), and an
example's feature for the layer is ``P_out G P_inᵀ`` (k_out×k_in, flattened), which is
``(P_out ⊗ P_in) vec(G)``. A side that the layer's budget covers whole (a LoRA matrix's rank side:
8 rows of ``lora_A``, 8 columns of ``lora_B``) is kept exactly (identity); the other side gets a
seeded Gaussian matrix with entries N(0, 1/k), which preserves inner products in expectation. (Until
store format 3 the whole side was a square Gaussian too: an 8×8 Gaussian's singular values spread
over about [0, 2], so every LoRA matrix's inner products were distorted by a random metric, and two
projection seeds of one target ranked the pool's head at only 0.58-0.82 Spearman.) The example's
feature is the concatenation over layers.

* :class:`KroneckerEngine` (fast path, LoGra): hooks project each token's input and output
  gradient first and sum their outer products, ``Σ_t (P_out δ_t)(P_in h_t)ᵀ``, for a whole padded
  batch in one forward and backward. No per-example gradient is ever formed and no weight gradient
  is computed (the weights are frozen; the backward runs from the input embeddings).
* :class:`DenseEngine` (reference, LESS): one backward per example, materialise ``G``, precondition
  it elementwise, project with the same ``P_out``, ``P_in``. Both engines therefore share one
  feature space; what differs is cost and which preconditioners they can apply.

Preconditioners (``grad``), with the checkpoint's Adam moments ``m``, ``v`` (LESS's formula, no
bias correction): ``sgd`` is ``G``; ``adam`` is ``(β1 m + (1−β1) G) / sqrt(β2 v + (1−β2) G² + eps)``
(the elementwise division breaks the Kronecker structure: see below for how the fast engine still
applies it exactly); ``factored-adam`` replaces
the denominator by a rank-one, Adafactor-style ``sqrt((β2 R_i/√S + ε)(C_j/√S + ε))`` with ``R``, ``C``
the row and column sums of ``v`` and ``S`` its total, ``ε = sqrt(eps)``, and drops the example's own
``(1−β2) G²`` term. It becomes a row and a column scaling, folded into ``P_out`` and ``P_in``, and
``β1 m`` becomes a constant offset per layer; so it runs on the Kronecker engine.

``adam`` on the Kronecker engine is exact, not approximated: the hooks form each example's gradient
of the layer from the same batched forward and backward, ``G_b = Σ_t δ_bt h_btᵀ`` (one einsum over the
batch, in float32, a bounded number of examples at a time), apply the elementwise formula, project and
drop it. No per-example backward runs; the extra work is one weight-gradient-sized product per layer,
which for LoRA matrices (what the warm-up trains) is a small fraction of the forward. Its features
equal the dense engine's to float rounding.

Projections depend only on (seed, layer name, layer shape, k): not on device, batch or shard.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .evaluation import per_example_loss
from .loading import canonical_name
from .models import compressible_modules, frozen, projection_weight

GRADS = ("sgd", "adam", "factored-adam")
ENGINES = ("kronecker", "dense")
_LORA = re.compile(r"\.lora_[AB]\.[^.]+$")


def feature_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights are featurised, by qualified name, in model order.

    A model with LoRA adapters: their ``lora_A``/``lora_B`` matrices (what the warm-up trained).
    Otherwise every compressible projection: a plain model's weights, a proxy's factors ``A`` and
    ``B`` (two ``nn.Linear`` each) and any projection it left dense.
    """
    mods = compressible_modules(model)
    lora = {n: m for n, m in mods.items() if _LORA.search(n)}
    return lora or mods


def out_in(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor of ``module`` (its gradient, an Adam moment) as an (out, in) matrix."""
    return t if isinstance(module, nn.Linear) else t.t()  # Conv1D stores (in, out)


def side_dims(m: int, n: int, k: int) -> tuple[int, int]:
    """Splits a per-layer dimension ``k`` into ``(k_out, k_in)``: about √k each, except that a side
    no longer than its √k share is kept whole and the other side takes the rest of the budget."""
    if k < 1:
        raise ValueError(f"proj_dim must be >= 1, got {k}")
    share = 2 ** (int(math.log2(k)) // 2)
    if n <= share:
        return min(m, max(1, k // n)), n
    if m <= share:
        return m, min(n, max(1, k // m))
    return share, min(n, max(1, k // share))


def _seed(seed: int, name: str, side: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class LayerProjection:
    """The Kronecker projection of one layer: ``P_out`` (k_out×m) and ``P_in`` (k_in×n)."""

    name: str
    P_out: torch.Tensor
    P_in: torch.Tensor

    @property
    def dim(self) -> int:
        return self.P_out.shape[0] * self.P_in.shape[0]


def make_projection(name: str, m: int, n: int, k: int, seed: int, dtype=torch.float32,
                    device="cpu") -> LayerProjection:
    """``P_out``, ``P_in`` of one layer: the identity on a side kept whole, else seeded Gaussian with
    N(0, 1/k) entries, drawn on the CPU in float64.

    Drawing on the CPU in float64, then casting, makes them identical on every device and dtype.
    """
    k_out, k_in = side_dims(m, n, k)
    mats = []
    for side, rows, cols in (("out", k_out, m), ("in", k_in, n)):
        if rows == cols:  # the whole side fits: exact, no random metric on it
            mats.append(torch.eye(rows, dtype=dtype, device=device))
            continue
        g = torch.Generator().manual_seed(_seed(seed, name, side))
        mats.append((torch.randn(rows, cols, generator=g, dtype=torch.float64) / math.sqrt(rows)).to(dtype=dtype, device=device))
    return LayerProjection(name, mats[0], mats[1])


def layer_shape(module: nn.Module) -> tuple[int, int]:
    m, n = projection_weight(module).shape
    return int(m), int(n)


def make_projections(modules: dict[str, nn.Module], k: int, seed: int, dtype=torch.float32,
                     device="cpu") -> dict[str, LayerProjection]:
    """One projection per layer, seeded by the layer's name without peft's wrapper prefix, so a
    target's LoRA adapter and the same adapter carried by a proxy are projected alike."""
    return {name: make_projection(canonical_name(name), *layer_shape(mod), k, seed, dtype, device)
            for name, mod in modules.items()}


@dataclass
class Preconditioner:
    """How one layer's gradient is transformed before projection (see the module docstring).

    Attributes:
        kind: ``sgd``, ``adam`` or ``factored-adam``.
        m, v: the checkpoint's Adam moments as (out, in) matrices (None for ``sgd``).
        beta1, beta2, eps: the optimiser's settings.
    """

    kind: str
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column scalings ``d_out`` (m,), ``d_in`` (n,) of ``factored-adam``."""
        R, C = self.v.sum(1), self.v.sum(0)
        root_s = self.v.sum().clamp_min(torch.finfo(self.v.dtype).tiny).sqrt()
        e = math.sqrt(self.eps)
        return (self.beta2 * R / root_s + e).rsqrt(), (C / root_s + e).rsqrt()

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        """The preconditioned (out, in) gradient, elementwise (the dense engine's path)."""
        if self.kind == "sgd":
            return g
        mixed = self.beta1 * self.m + (1 - self.beta1) * g
        if self.kind == "adam":
            return mixed / (self.beta2 * self.v + (1 - self.beta2) * g * g + self.eps).sqrt()
        d_out, d_in = self.factors()
        return d_out[:, None] * mixed * d_in[None, :]


def make_preconditioners(kind: str, modules: dict[str, nn.Module], exp_avg=None, exp_avg_sq=None,
                         betas=(0.9, 0.999), eps: float = 1e-8) -> dict[str, Preconditioner]:
    """One :class:`Preconditioner` per layer; the Adam moments are keyed by ``<layer>.weight``."""
    if kind not in GRADS:
        raise ValueError(f"grad must be one of {GRADS}, got {kind!r}")
    if kind == "sgd":
        return {n: Preconditioner("sgd") for n in modules}
    if exp_avg is None or exp_avg_sq is None:
        raise ValueError(f"--grad {kind} needs the Adam state of a warm-up checkpoint (--checkpoint)")
    out = {}
    for n, mod in modules.items():
        key = f"{n}.weight"
        if key not in exp_avg:
            raise ValueError(f"the checkpoint's optimizer state has no entry for {key}")
        # Adam's moments stay in (at least) float32: v spans many orders of magnitude.
        ref = projection_weight(mod)
        acc = torch.promote_types(ref.dtype, torch.float32)
        out[n] = Preconditioner(kind, out_in(mod, exp_avg[key]).to(ref.device, acc),
                                out_in(mod, exp_avg_sq[key]).to(ref.device, acc), betas[0], betas[1], eps)
    return out


def _loss_sum(model: nn.Module, enc: dict[str, torch.Tensor], inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over the batch of each example's mean response-token loss: its backward gives every
    example its own loss gradient (examples do not interact in a causal LM)."""
    kwargs = {"attention_mask": enc["attention_mask"]}
    if inputs_embeds is None:
        kwargs["input_ids"] = enc["input_ids"]
    else:
        kwargs["inputs_embeds"] = inputs_embeds
    logits = model(**kwargs).logits
    return per_example_loss(logits, enc["labels"]).sum()


class KroneckerEngine:
    """Projected per-example gradients of a padded batch from one forward and one backward.

    Args:
        model: the model (its parameters are frozen while the engine runs and restored after).
        modules: layers to featurise (:func:`feature_modules`).
        projections: one :class:`LayerProjection` per layer.
        preconds: ``sgd`` or ``factored-adam`` preconditioners per layer.
    """

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], projections: dict[str, LayerProjection],
                 preconds: dict[str, Preconditioner]):
        self.model, self.modules = model, modules
        self.P_out, self.P_in, self.scale, self.offset = {}, {}, {}, {}
        self.exact: dict[str, Preconditioner] = {}  # layers whose per-example gradient is formed (adam)
        self._cast: dict[tuple[str, str, torch.dtype], torch.Tensor] = {}
        for name in modules:
            pr, pc = projections[name], preconds[name]
            if pc.kind == "adam":
                self.exact[name] = pc
                self.P_out[name], self.P_in[name], self.scale[name], self.offset[name] = pr.P_out, pr.P_in, 1.0, None
            elif pc.kind == "sgd":
                self.P_out[name], self.P_in[name], self.scale[name], self.offset[name] = pr.P_out, pr.P_in, 1.0, None
            else:
                d_out, d_in = pc.factors()
                P_out, P_in = pr.P_out * d_out[None, :].to(pr.P_out), pr.P_in * d_in[None, :].to(pr.P_in)
                self.P_out[name], self.P_in[name] = P_out, P_in
                self.scale[name] = 1 - pc.beta1
                self.offset[name] = pc.beta1 * (P_out.double() @ pc.m.to(P_out.device).double() @ P_in.double().T)

    def _as(self, name: str, side: str, dtype: torch.dtype) -> torch.Tensor:
        """``P_out``/``P_in`` of a layer in the activations' dtype (cast once, then cached)."""
        key = (name, side, dtype)
        if key not in self._cast:
            P = (self.P_out if side == "out" else self.P_in)[name]
            self._cast[key] = P if P.dtype == dtype else P.to(dtype)
        return self._cast[key]

    @property
    def dim(self) -> int:
        return sum(self.P_out[n].shape[0] * self.P_in[n].shape[0] for n in self.modules)

    # Bytes of one float32 (examples × out × in) block of per-example gradients: the elementwise
    # Adam formula makes a few temporaries of that size, so examples go through in chunks.
    exact_chunk_bytes = 256 << 20

    def _exact_features(self, name: str, grad: torch.Tensor, xm: torch.Tensor) -> torch.Tensor:
        """(B, k_out, k_in) features of one layer with the elementwise Adam preconditioner.

        ``grad`` (B, T, m) is the loss gradient at the layer's output, ``xm`` (B, T, n) its masked
        input. Each example's ``G = gradᵀ xm`` is formed in float32 (float64 for a float64 model).
        """
        pc = self.exact[name]
        acc = torch.promote_types(grad.dtype, torch.float32)
        P_out, P_in = self.P_out[name].to(acc), self.P_in[name].to(acc)
        B, _, m = grad.shape
        n = xm.shape[-1]
        step = max(1, self.exact_chunk_bytes // max(1, m * n * torch.finfo(acc).bits // 8))
        out = []
        for a in range(0, B, step):
            G = torch.einsum("btm,btn->bmn", grad[a:a + step].to(acc), xm[a:a + step].to(acc))
            out.append(P_out @ pc.apply(G) @ P_in.T)
        return torch.cat(out)

    def _unused_features(self, name: str, B: int) -> torch.Tensor:
        """(B, k_out, k_in) features of a layer whose gradient is zero (its hook never ran): zero, or
        under the elementwise Adam preconditioner the projected formula at ``G = 0``."""
        P_out, P_in = self.P_out[name], self.P_in[name]
        acc = torch.promote_types(P_out.dtype, torch.float32)
        if name not in self.exact:
            return torch.zeros(B, P_out.shape[0], P_in.shape[0], dtype=acc, device=P_out.device)
        zero = torch.zeros(1, P_out.shape[1], P_in.shape[1], dtype=acc, device=P_out.device)
        return (P_out.to(acc) @ self.exact[name].apply(zero) @ P_in.to(acc).T).expand(B, -1, -1)

    def __call__(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features of a batch.

        Args:
            enc: ``input_ids``, ``attention_mask``, ``labels`` (B, T), right-padded.

        Returns:
            (B, dim) float32 features (float64 for a float64 model). The per-token projections run
            in the activations' dtype (bfloat16 on a bf16 model: they are most of the engine's
            work); their outer products are summed over tokens in float32.
        """
        feats: dict[str, torch.Tensor] = {}
        mask = enc["attention_mask"][..., None]
        handles = []

        def hook(name):
            def fwd(_mod, inputs, output):
                x = inputs[0]
                if name in self.exact:
                    xm = x * mask.to(x.dtype)

                    def bwd_exact(grad):
                        feats[name] = self._exact_features(name, grad, xm)

                    output.register_hook(bwd_exact)
                    return
                # Padding positions carry no loss; masking their projected inputs zeroes their outer
                # products. (Masking after the projection touches k_in values per token, not n.)
                ph = (x @ self._as(name, "in", x.dtype).T) * mask.to(x.dtype)  # (B, T, k_in)

                def bwd(grad):
                    pd = grad @ self._as(name, "out", grad.dtype).T  # (B, T, k_out)
                    acc = torch.promote_types(pd.dtype, torch.float32)
                    feats[name] = torch.einsum("bto,bti->boi", pd.to(acc), ph.to(acc))

                output.register_hook(bwd)
            return fwd

        with frozen(self.model):
            try:
                for name, mod in self.modules.items():
                    handles.append(mod.register_forward_hook(hook(name)))
                embeds = self.model.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_(True)
                _loss_sum(self.model, enc, embeds).backward()
            finally:
                for h in handles:
                    h.remove()
        B = enc["input_ids"].shape[0]
        parts = []
        for name in self.modules:
            if name not in feats:  # a layer the forward never ran (a layer-drop proxy's skipped block)
                feats[name] = self._unused_features(name, B)
            f = feats[name] * self.scale[name]
            if self.offset[name] is not None:
                f = f + self.offset[name].to(f)
            parts.append(f.reshape(B, -1))
        return torch.cat(parts, dim=1)


class DenseEngine:
    """The reference: one backward per example, its full gradient preconditioned, then projected."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], projections: dict[str, LayerProjection],
                 preconds: dict[str, Preconditioner]):
        self.model, self.modules, self.projections, self.preconds = model, modules, projections, preconds

    @property
    def dim(self) -> int:
        return sum(p.dim for p in self.projections.values())

    def gradients(self, enc: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Each example's (out, in) weight gradients, by layer: one unpadded backward per example."""
        weights = [mod.weight for mod in self.modules.values()]
        out = []
        with frozen(self.model, trainable=weights):
            for i in range(enc["input_ids"].shape[0]):
                n = int(enc["attention_mask"][i].sum())
                one = {k: v[i:i + 1, :n] for k, v in enc.items()}
                # (a layer the forward never runs, in a layer-drop proxy's skipped block: a zero gradient)
                grads = torch.autograd.grad(_loss_sum(self.model, one), weights, allow_unused=True)
                out.append({name: out_in(mod, torch.zeros_like(w) if g is None else g)
                            for (name, mod), w, g in zip(self.modules.items(), weights, grads)})
        return out

    def __call__(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = []
        for grads in self.gradients(enc):
            parts = []
            for name, g in grads.items():
                pr = self.projections[name]
                # Preconditioning and projection in float32 (or the model's float64): a bf16 model's
                # gradient is upcast once, and the Adam moments are float32 already.
                acc = torch.promote_types(g.dtype, torch.float32)
                g = self.preconds[name].apply(g.to(acc))
                parts.append((pr.P_out.to(acc) @ g @ pr.P_in.to(acc).T).reshape(-1))
            rows.append(torch.cat(parts))
        return torch.stack(rows)
