"""The one training loop (warm-up and fine-tuning) and the optimiser that keeps float32 master weights.

Low-precision models (bfloat16, float16) run their forward and backward passes in their own dtype, but
an update of lr 2e-5 times an Adam step of about 1 is below bfloat16's resolution for any weight
above ~0.004: applied to bf16 weights directly it rounds away. :class:`MasterAdamW` therefore keeps
a float32 copy of every low-precision trainable tensor and AdamW's moments in float32, steps the
copies, and writes them back (rounded) into the model. Float32 and float64 parameters are stepped
in place as usual. Its state is saved and restored by parameter *name* (``exp_avg.<name>``,
``exp_avg_sq.<name>``) so that the gradient features can read the Adam moments of a checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .data import batches, collate
from .evaluation import per_example_loss
from .runtime import ModelStageConfig

log = logging.getLogger(__name__)

_FULL = (torch.float32, torch.float64)


@dataclass
class TrainingConfig(ModelStageConfig):
    """The training loop's settings, shared by the warm-up and fine-tuning (each sets its defaults).

    Attributes:
        epochs: passes over the training examples.
        lr: peak learning rate of the linear schedule.
        warmup_ratio: share of steps with a linearly rising learning rate.
        weight_decay: AdamW's weight decay.
        lora_rank / lora_alpha: LoRA shape.
        batch_size / grad_accum: micro-batch and accumulation; one optimiser step per group.
        max_grad_norm: clip the global gradient norm to this (0: no clipping).
    """

    epochs: int = 4
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 32.0
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 0.0

    # what the stage calls itself and its paths in error messages
    stage_words = ("train", "the records to train on", "the output folder")

    def __post_init__(self):
        stage = self.stage_words[0]
        self.check_io(*self.stage_words)
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1 or self.lora_rank < 1:
            raise ValueError(f"{stage}: epochs, batch_size, grad_accum, lora_rank >= 1 and lr > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0: no clipping), got {self.max_grad_norm}")

    def optimizer(self, params: dict[str, nn.Parameter]) -> "MasterAdamW":
        return MasterAdamW(params, lr=self.lr, weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm)

    def loop(self) -> dict:
        """:func:`train_epochs`'s settings."""
        return {"epochs": self.epochs, "lr": self.lr, "warmup_ratio": self.warmup_ratio, "batch_size": self.batch_size,
                "grad_accum": self.grad_accum, "seed": self.seed, "progress": self.progress}


class MasterAdamW:
    """AdamW over float32 master copies of low-precision parameters, state keyed by name.

    Args:
        params: the trainable parameters by name (their ``.grad`` is read at :meth:`step`).
        lr, weight_decay, betas, eps: AdamW's settings.
        max_grad_norm: clip the global gradient norm to this before the step (0: no clipping).
        offload: keep the master copies and the moments in host memory and step there; the device
            then holds only the model's own tensors and their gradients (the float32 master copy,
            its gradient and two moments leave it: up to 16 bytes per trained parameter), for one
            host round trip of the gradients and weights per step.
    """

    def __init__(self, params: dict[str, nn.Parameter], lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, max_grad_norm: float = 0.0,
                 offload: bool = False):
        self.params = dict(params)
        self.master: dict[str, torch.Tensor] = {}
        pin = offload and torch.cuda.is_available()
        for n, p in self.params.items():
            if offload:  # a host copy even of a float32 parameter: the state lives beside it
                m = p.detach().to("cpu", torch.float64 if p.dtype == torch.float64 else torch.float32, copy=True)
                self.master[n] = (m.pin_memory() if pin else m).requires_grad_(True)
            else:
                self.master[n] = p if p.dtype in _FULL else p.detach().float().clone().requires_grad_(True)
        self.opt = torch.optim.AdamW(list(self.master.values()), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        self.max_grad_norm = max_grad_norm

    @property
    def betas(self) -> tuple[float, float]:
        return tuple(self.opt.param_groups[0]["betas"])

    @property
    def eps(self) -> float:
        return float(self.opt.param_groups[0]["eps"])

    def set_lr(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr

    def zero_grad(self) -> None:
        for n, p in self.params.items():
            p.grad = None
            self.master[n].grad = None

    def step(self) -> None:
        """Moves the gradients to the master copies (float32), clips, steps, writes the weights back."""
        for n, p in self.params.items():
            m = self.master[n]
            if m is not p:
                m.grad = None if p.grad is None else p.grad.to(m.device, m.dtype)
                p.grad = None
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([self.master[n] for n in self.params], self.max_grad_norm)
        self.opt.step()
        with torch.no_grad():
            for n, p in self.params.items():
                if self.master[n] is not p:
                    p.copy_(self.master[n])

    # -- state by name ---------------------------------------------------------------------------

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """The trained tensors at full precision (the master copies), by name."""
        return {n: m.detach() for n, m in self.master.items()}

    def moments(self) -> dict[str, torch.Tensor]:
        """``exp_avg.<name>`` and ``exp_avg_sq.<name>`` (float32; zeros before the first step)."""
        out = {}
        for n, m in self.master.items():
            st = self.opt.state.get(m, {})
            out[f"exp_avg.{n}"] = st.get("exp_avg", torch.zeros_like(m)).detach()
            out[f"exp_avg_sq.{n}"] = st.get("exp_avg_sq", torch.zeros_like(m)).detach()
        return out

    def load(self, tensors: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step: int) -> None:
        """Restores trained tensors (into the master copies and the model) and the Adam moments.

        Raises:
            ValueError: names or shapes do not match the parameters.
        """
        if set(tensors) != set(self.params):
            raise ValueError(f"saved tensors do not match the trainable parameters: "
                             f"{len(set(self.params) - set(tensors))} missing, {len(set(tensors) - set(self.params))} unexpected")
        with torch.no_grad():
            for n, p in self.params.items():
                if tuple(tensors[n].shape) != tuple(p.shape):
                    raise ValueError(f"saved tensor {n} has shape {tuple(tensors[n].shape)}, expected {tuple(p.shape)}")
                m = self.master[n]
                m.copy_(tensors[n])
                if m is not p:
                    p.copy_(m)
                self.opt.state[m] = {"step": torch.tensor(float(step)),
                                     "exp_avg": moments[f"exp_avg.{n}"].to(m.device, m.dtype).clone(),
                                     "exp_avg_sq": moments[f"exp_avg_sq.{n}"].to(m.device, m.dtype).clone()}

    def save(self, folder: Path, tensors_file: str, moments_file: str) -> None:
        """Writes the trained tensors and the moments as two safetensors files in ``folder``."""
        from .artifacts import save_tensors

        save_tensors({n: t.contiguous().cpu() for n, t in self.named_tensors().items()}, folder / tensors_file)
        save_tensors({n: t.contiguous().cpu() for n, t in self.moments().items()}, folder / moments_file)

    def restore(self, folder: Path, tensors_file: str, moments_file: str, step: int) -> None:
        self.load(load_file(str(folder / tensors_file)), load_file(str(folder / moments_file)), step)


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up to ``peak`` then linear decay to 0 (the LESS/HF default schedule), 0-based step."""
    n_warm = math.ceil(total * warmup_ratio)
    if step < n_warm:
        return peak * (step + 1) / n_warm
    return peak * max(0.0, (total - step) / max(1, total - n_warm))


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """Example order of one epoch: a pure function of (seed, epoch), so a step fixes the position."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train_epochs(model: nn.Module, opt: MasterAdamW, tokd, pad_id: int, device: str, *, epochs: int,
                 lr: float, warmup_ratio: float, batch_size: int, grad_accum: int, seed: int, start_epoch: int = 0,
                 on_epoch=None, progress: bool = False, desc: str = "train") -> None:
    """AdamW on the mean response-token loss, linear schedule, epochs in a seeded order.

    The order of epoch ``e`` is a pure function of (seed, e), so training can restart at any epoch
    boundary. ``on_epoch(epoch, step, lrs, mean_loss, seconds)`` is called after each epoch.

    Under torchrun the examples of every optimiser step are dealt to the ranks in turn (data
    parallel): each rank backpropagates its share of the step's loss (normalised by the step's whole
    example count), the gradients are summed over ranks, and every rank takes the same step. The
    result is the one-process run's, up to float rounding.
    """
    from tqdm.auto import tqdm

    from .distributed import all_reduce_sum_, world

    rank, n_ranks = world()

    per_epoch = max(1, math.ceil(len(tokd) / (batch_size * grad_accum)))
    total = per_epoch * epochs
    # A resident model may carry gradients from an earlier stage (alignment's last backward): they
    # must not leak into the first step.
    opt.zero_grad()
    model.train()
    bar = tqdm(total=(epochs - start_epoch) * len(tokd), desc=desc, unit="ex", disable=not progress or rank > 0)
    for epoch in range(start_epoch, epochs):
        order = epoch_order(len(tokd), epoch, seed)
        micro = batches([tokd[i] for i in order], batch_size)
        lrs, losses, t0, n_mine = [], [], time.perf_counter(), 0
        for s in range(per_epoch):
            step = epoch * per_epoch + s
            lr_now = lr_at(step, total, lr, warmup_ratio)
            opt.set_lr(lr_now)
            group = micro[s * grad_accum:(s + 1) * grad_accum]
            n_ex = sum(len(b) for b in group)
            if n_ranks > 1:  # this rank's share of the step's examples, in batches of batch_size
                mine = [ex for b in group for ex in b][rank::n_ranks]
                group = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
            step_loss = torch.zeros(1, dtype=torch.float64)
            for b in group:
                enc = collate(b, pad_id, device)
                logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
                # Mean over examples of each example's mean response-token loss.
                loss = per_example_loss(logits, enc["labels"]).sum() / n_ex
                loss.backward()
                step_loss += loss.item()
                n_mine += len(b)
                bar.update(len(b))
            if n_ranks > 1:
                for prm in opt.params.values():
                    if prm.grad is None:
                        prm.grad = torch.zeros_like(prm)
                    all_reduce_sum_(prm.grad)
                all_reduce_sum_(step_loss)
            losses.append(float(step_loss))
            opt.step()
            opt.zero_grad()
            lrs.append(lr_now)
        bar.set_postfix(epoch=epoch + 1, loss=f"{sum(losses) / len(losses):.4f}")
        if n_ranks > 1:
            log.info("%s epoch %d: rank %d of %d trained on %d of %d examples", desc, epoch + 1, rank, n_ranks,
                     n_mine, len(tokd))
        if on_epoch:
            on_epoch(epoch + 1, (epoch + 1) * per_epoch, lrs, sum(losses) / len(losses), time.perf_counter() - t0)
    bar.close()
    model.eval()
