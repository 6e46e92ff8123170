"""Warm-up checkpoints: a short fine-tune on a slice of the pool, saved once per epoch.

TracIn (LESS-style) sums influence over these checkpoints, weighting each by the learning rate in
force during its epoch. Each ``checkpoint-<epoch>/`` folder holds:

* ``trainable.safetensors``: the trained parameters, keyed by parameter name;
* ``optimizer.safetensors``: AdamW's ``exp_avg.<name>`` and ``exp_avg_sq.<name>`` (the state the
  Adam-preconditioned features need), keyed by the same names;
* ``checkpoint.json``: epoch, optimiser step, the mean and final learning rate of the epoch, Adam's
  betas and eps, and what trained.

What trains:

* a plain model (the target, or any causal LM): LoRA (peft) on every compressible projection, as LESS;
* a proxy: by default its factors ``A`` and ``B`` themselves (``proxy_trains="factors"``). They are
  already a low-rank parametrisation, and they are the parameters whose gradients stage 2 aligned
  with the target's; LoRA on top of them (``proxy_trains="lora"``) adds adapters whose gradients no
  stage aligned (``lora_B`` starts at zero). Both are offered; the features benchmark compares them.

Resume: the data order of every epoch is a pure function of (seed, epoch), so an interrupted run
restarts from the last complete epoch checkpoint and reproduces the uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import artifacts
from .alignment import epoch_order
from .data import batches, collate, load_examples, tokenize_examples
from .evaluation import per_example_loss
from .models import compressible_modules
from .proxy import is_proxy_folder, load_model_or_proxy
from .runtime import ModelStageConfig

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class WarmupConfig(ModelStageConfig):
    """Settings of ``iprox warmup``.

    The shared fields (max_length, seed, dtype, device, ...) are :class:`~iprox.runtime.ModelStageConfig`'s.

    Attributes:
        model: a proxy folder, or any model spec ``load_model`` accepts.
        data: the candidate pool (files or folders); a seeded ``fraction`` of it is trained on.
        out: the warm-up folder.
        fraction: share of the pool to train on (LESS: 5%).
        examples: train on exactly this many examples instead (0: use ``fraction``).
        epochs: epochs, one checkpoint each (LESS: 4).
        lr: peak learning rate of the linear schedule (LESS: 2e-5).
        warmup_ratio: share of steps with a linearly rising learning rate (LESS: 0.03).
        lora_rank / lora_alpha: LoRA shape. LESS uses 128/512 on 7B models; 8/32 suits 135M.
        proxy_trains: for a proxy, ``factors`` or ``lora`` (see the module docstring).
        batch_size / grad_accum: micro-batch and accumulation; one optimiser step per group.
    """

    fraction: float = 0.05
    examples: int = 0
    epochs: int = 4
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 32.0
    proxy_trains: str = "factors"
    batch_size: int = 4
    grad_accum: int = 1

    def __post_init__(self):
        self.check_io("warmup", "the candidate pool", "the warm-up folder")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.examples < 0 or self.epochs < 1 or self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("warmup: examples >= 0, epochs >= 1, lr > 0, batch_size >= 1 and grad_accum >= 1")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")
        if self.proxy_trains not in ("factors", "lora"):
            raise ValueError(f"proxy_trains must be 'factors' or 'lora', got {self.proxy_trains!r}")

    def n_train(self, n_pool: int) -> int:
        return min(n_pool, self.examples) if self.examples else max(1, round(self.fraction * n_pool))


def lr_at(step: int, total: int, peak: float, warmup_ratio: float) -> float:
    """Linear warm-up to ``peak`` then linear decay to 0 (the LESS/HF default schedule), 0-based step."""
    n_warm = math.ceil(total * warmup_ratio)
    if step < n_warm:
        return peak * (step + 1) / n_warm
    return peak * max(0.0, (total - step) / max(1, total - n_warm))


def trains_lora(model_spec: str, proxy_trains: str) -> bool:
    return not is_proxy_folder(model_spec) or proxy_trains == "lora"


def apply_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Wraps ``model`` with peft LoRA on every compressible projection (a proxy: its factors)."""
    from peft import LoraConfig, get_peft_model

    mods = compressible_modules(model)
    conv1d = any(not isinstance(m, nn.Linear) for m in mods.values())
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(mods),
                     fan_in_fan_out=conv1d, bias="none")
    return get_peft_model(model, cfg)


def mark_trainable(model: nn.Module, lora: bool) -> dict[str, nn.Parameter]:
    """Freezes everything but what the warm-up trains; returns those parameters by name."""
    if lora:  # peft already froze the base model
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        p.requires_grad_(False)
    names = {f"{n}.weight" for n in compressible_modules(model)}
    out = {n: p for n, p in model.named_parameters() if n in names}
    for p in out.values():
        p.requires_grad_(True)
    return out


@dataclass
class Checkpoint:
    """One loaded warm-up checkpoint: the model at that point and what the features need from it."""

    model: nn.Module
    tokenizer: Any
    info: dict[str, Any]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]


def load_checkpoint(path: str | Path, dtype: str = "float32", device: str = "cpu",
                    trust_remote_code: bool = False) -> Checkpoint:
    """Rebuilds the model of a warm-up checkpoint folder (``<warmup>/checkpoint-<epoch>``).

    Raises:
        FileNotFoundError: not a checkpoint folder.
        ValueError: its tensors do not match the model the warm-up recorded.
    """
    path = Path(path)
    if not (path / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a warm-up checkpoint (no {CHECKPOINT_FILE})")
    info = json.loads((path / CHECKPOINT_FILE).read_text())
    model, tok = load_model_or_proxy(info["model"], dtype, device, trust_remote_code)
    if info["lora"]:
        model = apply_lora(model, info["lora_rank"], info["lora_alpha"]).to(device)
    params = mark_trainable(model, info["lora"])
    state = load_file(str(path / TRAINABLE_FILE), device=str(device))
    if set(state) != set(params):
        raise ValueError(f"{path / TRAINABLE_FILE} does not match the model: "
                         f"{len(set(params) - set(state))} missing, {len(set(state) - set(params))} unexpected tensors")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise ValueError(f"{path / TRAINABLE_FILE}: {n} has shape {tuple(state[n].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[n])
    opt = load_file(str(path / OPTIMIZER_FILE), device=str(device))
    exp_avg = {n: opt[f"exp_avg.{n}"] for n in params}
    exp_avg_sq = {n: opt[f"exp_avg_sq.{n}"] for n in params}
    model.eval()
    return Checkpoint(model, tok, info, exp_avg, exp_avg_sq)


def checkpoint_dirs(warmup_dir: str | Path) -> list[Path]:
    """The checkpoint folders of a warm-up folder, in epoch order."""
    found = sorted(Path(warmup_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return [p for p in found if (p / CHECKPOINT_FILE).is_file()]


def _save_epoch(folder: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer, info: dict) -> None:
    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().contiguous().cpu() for n, p in params.items()}, str(tmp / TRAINABLE_FILE))
    state: dict[str, torch.Tensor] = {}
    for n, p in params.items():
        st = opt.state.get(p, {})
        state[f"exp_avg.{n}"] = st.get("exp_avg", torch.zeros_like(p)).detach().contiguous().cpu()
        state[f"exp_avg_sq.{n}"] = st.get("exp_avg_sq", torch.zeros_like(p)).detach().contiguous().cpu()
    save_file(state, str(tmp / OPTIMIZER_FILE))
    artifacts.atomic_write_json(tmp / CHECKPOINT_FILE, info)
    tmp.rename(folder)  # the folder appears whole or not at all


def _restore(folder: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> dict:
    info = json.loads((folder / CHECKPOINT_FILE).read_text())
    state = load_file(str(folder / TRAINABLE_FILE))
    ost = load_file(str(folder / OPTIMIZER_FILE))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
            opt.state[p] = {"step": torch.tensor(float(info["step"])), "exp_avg": ost[f"exp_avg.{n}"].to(p),
                            "exp_avg_sq": ost[f"exp_avg_sq.{n}"].to(p)}
    return info


def train_epochs(model: nn.Module, opt: torch.optim.Optimizer, tokd, pad_id: int, device: str, *, epochs: int,
                 lr: float, warmup_ratio: float, batch_size: int, grad_accum: int, seed: int, start_epoch: int = 0,
                 on_epoch=None) -> None:
    """AdamW on the mean response-token loss, linear schedule, epochs in a seeded order.

    The order of epoch ``e`` is a pure function of (seed, e), so training can restart at any epoch
    boundary. ``on_epoch(epoch, step, lrs, mean_loss, seconds)`` is called after each epoch.
    """
    per_epoch = max(1, math.ceil(len(tokd) / (batch_size * grad_accum)))
    total = per_epoch * epochs
    model.train()
    for epoch in range(start_epoch, epochs):
        order = epoch_order(len(tokd), epoch, seed)
        micro = batches([tokd[i] for i in order], batch_size)
        lrs, losses, t0 = [], [], time.perf_counter()
        for s in range(per_epoch):
            step = epoch * per_epoch + s
            lr_now = lr_at(step, total, lr, warmup_ratio)
            for g in opt.param_groups:
                g["lr"] = lr_now
            group = micro[s * grad_accum:(s + 1) * grad_accum]
            n_ex = sum(len(b) for b in group)
            for b in group:
                enc = {k: v.to(device) for k, v in collate(b, pad_id).items()}
                logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
                # Mean over examples of each example's mean response-token loss.
                loss = per_example_loss(logits, enc["labels"]).sum() / n_ex
                loss.backward()
                losses.append(loss.item() * n_ex / len(b))
            opt.step()
            opt.zero_grad(set_to_none=True)
            lrs.append(lr_now)
        if on_epoch:
            on_epoch(epoch + 1, (epoch + 1) * per_epoch, lrs, sum(losses) / len(losses), time.perf_counter() - t0)
    model.eval()


def run_warmup(config: WarmupConfig) -> list[Path]:
    """Trains and writes one checkpoint per epoch; skips work already done.

    Returns:
        The checkpoint folders, in epoch order.
    """
    from .models import default_device

    out = Path(config.out)
    cfg = asdict(config)
    if artifacts.prepare_stage(out, "warmup", cfg, config.overwrite, resumable=True):
        return checkpoint_dirs(out)
    device = config.device or default_device()
    log.info("warmup config: %s", json.dumps(artifacts.comparable(cfg)))
    pool = load_examples(config.data)
    n = config.n_train(len(pool))
    pick = sorted(random.Random(config.seed).sample(range(len(pool)), n))
    # A local model path is recorded absolute, so the checkpoints load from any working directory.
    model_spec = str(Path(config.model).resolve()) if Path(config.model).exists() else config.model
    model, tok = load_model_or_proxy(model_spec, config.dtype, device, config.trust_remote_code)
    lora = trains_lora(config.model, config.proxy_trains)
    if lora:
        torch.manual_seed(config.seed)  # LoRA's A is randomly initialised: same seed, same run
        model = apply_lora(model, config.lora_rank, config.lora_alpha).to(device)
    params = mark_trainable(model, lora)
    tokd, _ = tokenize_examples(tok, [pool[i] for i in pick], config.max_length)
    if not tokd:
        raise ValueError("no warm-up example has a response token within max_length")
    artifacts.atomic_write_json(out / "train_ids.json", [t.id for t in tokd])
    opt = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    done = checkpoint_dirs(out)
    if done:
        _restore(done[-1], params, opt)
        log.info("warmup: resuming after epoch %d", len(done))
    beta1, beta2 = opt.param_groups[0]["betas"]

    def save(epoch: int, step: int, lrs: list[float], loss: float, seconds: float) -> None:
        info = {"epoch": epoch, "step": step, "lr": sum(lrs) / len(lrs), "lr_end": lrs[-1],
                "betas": [beta1, beta2], "eps": opt.param_groups[0]["eps"], "model": model_spec, "lora": lora,
                "lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
                "trains": "lora" if lora else "factors", "n_train": len(tokd), "train_loss": loss,
                "seconds": round(seconds, 2)}
        _save_epoch(out / f"checkpoint-{epoch}", params, opt, info)
        log.info("warmup epoch %d/%d: loss %.4f, mean lr %.3g (%.1fs)", epoch, config.epochs, loss, info["lr"], seconds)

    train_epochs(model, opt, tokd, tok.pad_token_id, device, epochs=config.epochs, lr=config.lr,
                 warmup_ratio=config.warmup_ratio, batch_size=config.batch_size, grad_accum=config.grad_accum,
                 seed=config.seed, start_epoch=len(done), on_epoch=save)
    artifacts.mark_complete(out)
    return checkpoint_dirs(out)
