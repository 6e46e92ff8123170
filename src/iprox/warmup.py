"""Warm-up checkpoints: a short fine-tune on a slice of the pool, saved once per epoch.

TracIn (LESS-style) sums influence over these checkpoints, weighting each by the learning rate in
force during its epoch. Each ``checkpoint-<epoch>/`` folder holds:

* ``trainable.safetensors``: the trained parameters, keyed by parameter name;
* ``optimizer.safetensors``: AdamW's ``exp_avg.<name>`` and ``exp_avg_sq.<name>`` (the state the
  Adam-preconditioned features need), keyed by the same names;
* ``checkpoint.json``: epoch, optimiser step, the mean and final learning rate of the epoch, Adam's
  betas and eps, and what trained;
* for LoRA, the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``): the folder
  loads with ``PeftModel.from_pretrained(base_model, folder)``.

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
import random
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from . import artifacts
from .data import tokenize_examples
from .distributed import barrier, on_rank0, rank_device
from .distributed import world as dist_world
from .loading import (CHECKPOINT_FILE, OPTIMIZER_FILE, TRAINABLE_FILE, checkpoint_dirs, is_proxy_folder, mark_trainable)
from .session import Session
from .models import default_device
from .training import MasterAdamW, TrainingConfig, train_epochs

log = logging.getLogger(__name__)


@dataclass
class WarmupConfig(TrainingConfig):
    """Settings of ``iprox warmup`` (LESS's warm-up by default).

    Attributes:
        model: a proxy folder, or any model spec ``load_model`` accepts.
        data: the candidate pool (files or folders); a seeded ``fraction`` of it is trained on.
        out: the warm-up folder.
        epochs: epochs, one checkpoint each (LESS: 4).
        lr: peak learning rate of the linear schedule (LESS: 2e-5).
        warmup_ratio: share of steps with a linearly rising learning rate (LESS: 0.03).
        weight_decay: AdamW's weight decay (LESS: 0).
        lora_rank / lora_alpha: LoRA shape. LESS uses 128/512 on 7B models; 8/32 suits 135M.
        max_grad_norm: clip the global gradient norm to this (0: no clipping, as LESS's warm-up).
        fraction: share of the pool to train on (LESS: 5%).
        examples: train on exactly this many examples instead (0: use ``fraction``).
        proxy_trains: for a proxy, ``factors`` or ``lora`` (see the module docstring).
    """

    fraction: float = 0.05
    examples: int = 0
    proxy_trains: Literal["factors", "lora"] = "factors"

    stage_words = ("warmup", "the candidate pool", "the warm-up folder")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.examples < 0:
            raise ValueError(f"warmup: examples must be >= 0 (0: use fraction), got {self.examples}")

    def n_train(self, n_pool: int) -> int:
        return min(n_pool, self.examples) if self.examples else max(1, round(self.fraction * n_pool))


def trains_lora(model_spec: str, proxy_trains: str) -> bool:
    return not is_proxy_folder(model_spec) or proxy_trains == "lora"


def _save_epoch(folder: Path, opt: MasterAdamW, info: dict, model=None) -> None:
    """Writes one checkpoint folder atomically: trained tensors (float32 masters), Adam moments, info,
    and for LoRA the peft adapter itself (``adapter_config.json``, ``adapter_model.safetensors``), so
    ``PeftModel.from_pretrained(base, checkpoint)`` and LESS's scripts read it as it is."""
    tmp = folder.parent / f".{folder.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    opt.save(tmp, TRAINABLE_FILE, OPTIMIZER_FILE)
    if info.get("lora") and model is not None:
        model.save_pretrained(tmp)
        artifacts.set_umask_modes(tmp)
    artifacts.atomic_write_json(tmp / CHECKPOINT_FILE, info)
    tmp.rename(folder)  # the folder appears whole or not at all


def run_warmup(config: WarmupConfig, session: Session | None = None) -> list[Path]:
    """Trains and writes one checkpoint per epoch; skips work already done.

    Args:
        config: the stage's settings.
        session: models and data shared with other stages of this process (``iprox run``); the
            model trained here stays resident for the features stage.

    Returns:
        The checkpoint folders, in epoch order.
    """
    out = Path(config.out)
    cfg = asdict(config)
    config.check_inputs()
    # Under torchrun every rank trains the same model on its share of each step (training.train_epochs);
    # rank 0 alone writes the folder.
    rank, _ = dist_world()
    if on_rank0(lambda: artifacts.prepare_stage(out, "warmup", cfg, config.overwrite, resumable=True)):
        return checkpoint_dirs(out)
    session = session or Session(keep=False)
    device = rank_device(config.device or default_device())
    log.info("warmup config: %s", json.dumps(artifacts.comparable(cfg)))
    # A local model path is recorded absolute, so the checkpoints load from any working directory.
    model_spec = str(Path(config.model).resolve()) if Path(config.model).exists() else config.model
    lora = trains_lora(config.model, config.proxy_trains)
    done = checkpoint_dirs(out)
    model, tok, _ = session.trainable_model(
        model_spec, config.dtype, device, config.trust_remote_code,
        (config.lora_rank, config.lora_alpha, config.seed) if lora else None, pristine=not done)
    params = mark_trainable(model, lora)
    pool = session.examples(config.data)
    n = config.n_train(len(pool))
    pick = sorted(random.Random(config.seed).sample(range(len(pool)), n))
    tokd, _ = tokenize_examples(tok, [pool[i] for i in pick], config.max_length)
    if not tokd:
        raise ValueError("no warm-up example has a response token within max_length")
    if rank == 0:
        artifacts.atomic_write_json(out / "train_ids.json", [t.id for t in tokd])
    opt = config.optimizer(params)
    if done:
        info = artifacts.read_json(done[-1] / CHECKPOINT_FILE, "checkpoint description")
        opt.restore(done[-1], TRAINABLE_FILE, OPTIMIZER_FILE, info["step"])
        log.info("warmup: resuming after epoch %d", len(done))
    beta1, beta2 = opt.betas

    def save(epoch: int, step: int, lrs: list[float], loss: float, seconds: float) -> None:
        info = {"epoch": epoch, "step": step, "lr": sum(lrs) / len(lrs), "lr_end": lrs[-1],
                "betas": [beta1, beta2], "eps": opt.eps, "model": model_spec, "lora": lora,
                "lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha, "seed": config.seed,
                "trains": "lora" if lora else "factors", "n_train": len(tokd), "train_loss": loss,
                "dtype": config.dtype, "uid": uuid.uuid4().hex, "seconds": round(seconds, 2)}
        if rank == 0:
            _save_epoch(out / f"checkpoint-{epoch}", opt, info, model)
        barrier()
        log.info("warmup epoch %d/%d: loss %.4f, mean lr %.3g (%.1fs)", epoch, config.epochs, loss, info["lr"], seconds)

    train_epochs(model, opt, tokd, tok.pad_token_id, device, **config.loop(), start_epoch=len(done), on_epoch=save,
                 desc="warmup")
    for p in params.values():
        p.requires_grad_(False)
    on_rank0(lambda: artifacts.mark_complete(out))
    return checkpoint_dirs(out)
