"""A fine-tuned model: the target trained on a selected subset, saved as a plain model folder.

LoRA (peft, on every compressible projection) by default, merged into the weights before saving so
the folder loads anywhere without peft; ``method="full"`` trains every weight instead. The folder
holds the model (safetensors), its config, the tokenizer, ``finetune.json`` (settings, losses,
time), ``stage.json`` and ``COMPLETE``; ``iprox evaluate --model DIR`` evaluates it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from . import artifacts
from .data import load_examples, tokenize_examples
from .loading import apply_lora, is_proxy_folder, load_model_or_proxy, mark_trainable
from .models import default_device
from .training import TrainingConfig, train_epochs

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig(TrainingConfig):
    """Settings of ``iprox finetune`` (defaults suit a 135M model on a few hundred examples).

    Attributes:
        model: the model to fine-tune (the target; not a proxy).
        data: the records to train on, e.g. selected.jsonl.
        out: the model folder to write (a plain Hugging Face folder).
        max_grad_norm: clip the global gradient norm to this, as HF Trainer and TRL do (0: no clipping).
        method: ``lora`` (adapters, merged into the weights before saving) or ``full``.
    """

    # the training loop's defaults for fine-tuning, where the warm-up's are LESS's
    epochs: int = 3
    lr: float = 2e-4
    lora_rank: int = 16
    max_grad_norm: float = 1.0
    method: Literal["lora", "full"] = "lora"

    stage_words = ("finetune", "the records to train on, e.g. selected.jsonl", "the model folder to write")


def finetune(config: FinetuneConfig) -> Path:
    """Trains and saves; a rerun with the same settings is skipped. Returns the model folder."""
    if is_proxy_folder(config.model):
        raise ValueError(f"{config.model} is a proxy; finetune trains a plain model (the target)")
    out = Path(config.out)
    cfg = asdict(config)
    config.check_inputs()
    if artifacts.prepare_stage(out, "finetune", cfg, config.overwrite):
        return out
    device = config.device or default_device()
    model, tok = load_model_or_proxy(config.model, config.dtype, device, config.trust_remote_code)
    tokd, _ = tokenize_examples(tok, load_examples(config.data), config.max_length)
    if not tokd:
        raise ValueError(f"no example in {config.data} has a response token within max_length")
    torch.manual_seed(config.seed)
    lora = config.method == "lora"
    if lora:
        model = apply_lora(model, config.lora_rank, config.lora_alpha).to(device)
        params = mark_trainable(model, True)
    else:
        params = {n: p for n, p in model.named_parameters()}
        for p in params.values():
            p.requires_grad_(True)
    # float32 master weights and moments (a bf16 model's own weights would round small updates away)
    opt = config.optimizer(params)
    losses: list[float] = []
    t0 = time.perf_counter()
    train_epochs(model, opt, tokd, tok.pad_token_id, device, **config.loop(),
                 on_epoch=lambda e, s, lrs, loss, sec: losses.append(loss), desc="finetune")
    if lora:
        model = model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    artifacts.set_umask_modes(out)
    artifacts.atomic_write_json(out / "finetune.json", {"n_train": len(tokd), "epoch_losses": losses,
                                                        "seconds": round(time.perf_counter() - t0, 2),
                                                        "config": artifacts.comparable(cfg)})
    log.info("finetune: %d examples, %d epochs, losses %s", len(tokd), config.epochs,
             ", ".join(f"{x:.3f}" for x in losses))
    artifacts.mark_complete(out)
    return out
