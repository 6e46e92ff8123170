"""Stage 2 of IProX: align the proxy's factor gradients and logits with the target's.

Minimises the objective of :mod:`~iprox.align_objective` (``L = L_GA + λ_KL · L_KL``, in the
factor space or the LoRA space) over the proxy's factors only, with AdamW on float32 master copies.

Runs are checkpointed every K optimiser steps (factors, optimiser state, step, RNG state; the data
order is a pure function of the seed and the epoch, so the step fixes the data position) and resume
from the last checkpoint to the same final factors as an uninterrupted run. Under torchrun the ranks
share each step's examples and sum their gradients.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from . import artifacts
from .align_objective import alignment_loss, carrying, layer_pairs, require_pair_grads
from .data import TokenizedExample, collate, load_examples, probe_split, tokenize_examples
from .distributed import all_reduce_sum_, barrier, on_rank0, rank_device, world
from .loading import (ALIGN_CHECKPOINT_DIR, PROXY_FILE, STAGE1_DONE, complete_proxy, read_lora_state,
                      target_lora_checkpoint)
from .models import default_device
from .session import Session
from .training import MasterAdamW, epoch_order

if TYPE_CHECKING:
    from .proxy import ProxyConfig

log = logging.getLogger(__name__)

# The settings of ProxyConfig that are the alignment's alone (stage 1 ignores them), and those both
# stages read: together, what the align stage records.
ALIGN_FIELDS = ("align_steps", "align_epochs", "align_examples", "align_min_steps", "align_cosine",
                "align_micro_batch", "align_space",
                "align_checkpoint", "lambda_kl", "temperature", "lr", "weight_decay", "grad_accum", "checkpoint_every",
                "gradient_checkpointing", "offload_optimizer")
SHARED_FIELDS = ("model", "data", "seed", "max_length", "dtype", "batch_size", "probe_examples", "trust_remote_code")
# where and how an align stage runs, never taken from the compressed proxy's record
RUN_FIELDS = ("out", "device", "overwrite", "progress")
LOG_FILE = "align_log.csv"
LOG_FIELDS = ["step", "epoch", "loss", "grad_align", "kl", "lr", "seconds"]


# ---------------------------------------------------------------------------------------------
# Training loop with checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass
class AlignSettings:
    """Stage-2 settings (a view of :class:`~iprox.proxy.ProxyConfig`)."""

    steps: int
    batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    lambda_kl: float
    temperature: float
    checkpoint_every: int
    seed: int
    gradient_checkpointing: bool = False   # recompute the target's blocks in its backward
    offload_optimizer: bool = False        # master factors and moments in host memory
    per_example: bool = False              # the cosine of each example's own gradients
    micro_batch: int = 1                   # per example: the examples of one pass


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    return max(1, math.ceil(n_examples / (batch_size * grad_accum)))


def _micro_batches(examples, step: int, s: AlignSettings, rank: int = 0,
                   n_ranks: int = 1) -> tuple[int, list[list[TokenizedExample]], list[float]]:
    """The step's epoch, this rank's micro-batches of it and each one's share of the step's loss.

    Per example (each example's loss stands alone), the step's examples are dealt to the ranks one
    by one and each rank takes its own in micro-batches of ``micro_batch``; a micro-batch weighs its
    examples' share of the step. Otherwise a micro-batch's loss is a function of the whole
    micro-batch: the step's ``grad_accum`` micro-batches are dealt to the ranks in turn, each
    weighing 1/grad_accum.
    """
    per_epoch = steps_per_epoch(len(examples), s.batch_size, s.grad_accum)
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(len(examples), epoch, s.seed)
    span = s.batch_size * s.grad_accum
    idx = order[k * span : (k + 1) * span]
    if s.per_example:
        mine = idx[rank::n_ranks]
        chunks = [mine[j : j + s.micro_batch] for j in range(0, len(mine), s.micro_batch)]
        shares = [len(c) / len(idx) for c in chunks]
    else:
        every = [idx[j : j + s.batch_size] for j in range(0, len(idx), s.batch_size)]
        chunks = every[rank::n_ranks]
        shares = [1 / len(every)] * len(chunks)
    return epoch, [[examples[i] for i in c] for c in chunks], shares


def _factor_params(pairs) -> dict[str, nn.Parameter]:
    return {f"{p.name}.{f}.weight": getattr(p.proxy, f).weight for p in pairs for f in ("A", "B")}


def save_checkpoint(folder: Path, step: int, opt: MasterAdamW) -> None:
    """Factors (float32 masters), AdamW's moments by name, step and RNG state; written atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    opt.save(tmp, "factors.safetensors", "optimizer.safetensors")
    artifacts.save_tensors({"cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step}))  # written last: marks the folder whole
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_checkpoint(folder: Path, opt: MasterAdamW) -> int:
    """Restores a checkpoint written by :func:`save_checkpoint`; returns the step to continue from."""
    step = int(json.loads((folder / "state.json").read_text())["step"])
    try:
        opt.restore(folder, "factors.safetensors", "optimizer.safetensors", step)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{folder}: the alignment checkpoint does not match the proxy's layers ({e})") from None
    torch.set_rng_state(load_file(str(folder / "rng.safetensors"))["cpu"])
    return step


def run_alignment(
    proxy: nn.Module,
    target: nn.Module,
    examples: Sequence[TokenizedExample],
    settings: AlignSettings,
    out: Path,
    pad_id: int,
    progress: bool = True,
    lora: tuple[dict[str, torch.Tensor], float] | None = None,
) -> dict[str, float]:
    """Trains the proxy's factors in place; checkpoints into ``out/align_checkpoint``.

    ``lora``: ``(adapter state, alpha)`` of a target's LoRA checkpoint (canonical names, as
    :func:`~iprox.loading.read_lora_state` reads them) to align in the LoRA space; both models
    carry the adapters during the run only.

    Resumes from that checkpoint when it exists. Per-step losses are appended to
    ``out/align_log.csv`` (rows past the checkpoint are dropped on resume, so the file always matches
    the factors).

    Returns:
        Final-step losses and timing: ``loss``, ``grad_align``, ``kl``, ``steps``, ``seconds_per_step``,
        ``attention`` (the kernel the proxy ran with).
    """
    if not examples:
        raise ValueError("the alignment set is empty")
    rank, n_ranks = world()
    pairs = layer_pairs(proxy, target)
    params = _factor_params(pairs)
    target_req = [p.requires_grad for p in target.parameters()]
    require_pair_grads(proxy, target, pairs, target_weights=lora is None)
    proxy.eval()   # no dropout: the loss is deterministic, which resume relies on
    target.eval()
    # The loss differentiates through the proxy's backward pass; fused CPU/GPU attention kernels
    # have no double backward, the eager one does.
    attn_before = getattr(proxy.config, "_attn_implementation", None)
    if attn_before not in (None, "eager"):
        proxy.set_attn_implementation("eager")
    # float32 master factors and moments, whatever the proxy's dtype
    opt = MasterAdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, offload=settings.offload_optimizer)
    ckpt = out / ALIGN_CHECKPOINT_DIR
    log_path = out / LOG_FILE
    start = 0
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if rank == 0 and not ckpt.exists() and (tmp / "state.json").exists():
        # Killed between removing the old checkpoint and renaming the new one into place; the new
        # one is complete (state.json is written last).
        tmp.rename(ckpt)
    barrier()
    if (ckpt / "state.json").exists():
        start = load_checkpoint(ckpt, opt)
        log.info("resuming alignment at step %d of %d from %s", start, settings.steps, ckpt)
    rows = _read_log(log_path)[:start]
    device = next(proxy.parameters()).device
    last = {"loss": float("nan"), "grad_align": float("nan"), "kl": float("nan")}
    t_run = time.perf_counter()
    bar = tqdm(range(start, settings.steps), desc="align", unit="step", disable=not progress or rank > 0,
               initial=start, total=settings.steps)
    adapters = ExitStack()
    try:
        space = adapters.enter_context(carrying(proxy, target, *lora)) if lora is not None else None
        for step in bar:
            t0 = time.perf_counter()
            # Under torchrun the ranks share the step (see _micro_batches) and sum what they got.
            epoch, micro, shares = _micro_batches(examples, step, settings, rank, n_ranks)
            opt.zero_grad()
            sums = torch.zeros(3, dtype=torch.float64)  # loss, grad_align, kl summed over micro-batches
            for mb, share in zip(micro, shares):
                enc = collate(mb, pad_id, device)
                loss, l_ga, l_kl = alignment_loss(proxy, target, pairs, enc, settings.lambda_kl, settings.temperature,
                                                  settings.gradient_checkpointing, space, settings.per_example)
                (loss * share).backward()
                sums += torch.tensor([float(loss.detach()), float(l_ga), float(l_kl)], dtype=torch.float64) * share
            # Target weights only served to produce G (and the carried adapters to take gradients
            # at); drop any gradient that leaked into them.
            for pr in pairs:
                pr.target.weight.grad = None
            for a in (space.proxy + space.target) if space else ():
                a.lora_A["default"].weight.grad = a.lora_B["default"].weight.grad = None
            if n_ranks > 1:
                for prm in params.values():
                    if prm.grad is None:
                        prm.grad = torch.zeros_like(prm)
                    all_reduce_sum_(prm.grad)
                all_reduce_sum_(sums)
            opt.step()
            tot, ga, kl = (float(x) for x in sums)
            last = {"loss": tot, "grad_align": ga, "kl": kl}
            rows.append({"step": step + 1, "epoch": epoch, **last, "lr": settings.lr,
                         "seconds": time.perf_counter() - t0})
            bar.set_postfix(ga=f"{ga:.4f}", kl=f"{kl:.4f}")
            if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
                if rank == 0:
                    save_checkpoint(ckpt, step + 1, opt)
                    _write_log(log_path, rows)
                barrier()
    finally:
        bar.close()
        adapters.close()   # the models' own layers back in place
        opt.zero_grad()  # the proxy stays resident for the warm-up: no stale gradients on its factors
        for p, r in zip(target.parameters(), target_req):   # leave the caller's target as it was
            p.requires_grad_(r)
        if attn_before not in (None, "eager"):
            proxy.set_attn_implementation(attn_before)
    done = len(rows) - start
    if n_ranks > 1:
        n_step, unit = ((settings.batch_size * settings.grad_accum, "examples") if settings.per_example
                        else (settings.grad_accum, "micro-batches"))
        log.info("alignment: rank %d of %d took every %d-th of the %d %s per step", rank, n_ranks, n_ranks,
                 n_step, unit)
    per_step = (time.perf_counter() - t_run) / done if done else float("nan")
    if rows:
        last = {k: rows[-1][k] for k in ("loss", "grad_align", "kl")}
    return {**last, "steps": settings.steps, "seconds_per_step": per_step, "attention": "eager"}


def _read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k in ("step", "epoch") else float(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def _write_log(path: Path, rows: list[dict]) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
    w.writeheader()
    w.writerows(rows)
    artifacts.atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def lora_space_checkpoint(config: "ProxyConfig", target_spec: str | None) -> dict | None:
    """The checked ``checkpoint.json`` of the LoRA checkpoint ``align_space = "lora"`` aligns in
    (None in the factor space, or when nothing aligns).

    Args:
        target_spec: the target's model spec, which the checkpoint must be a warm-up of (None: not
            checked, for a target passed in as a module).

    Raises:
        ValueError: no checkpoint named, one that trained a proxy's factors, or a warm-up of
            another model.
        FileNotFoundError: the folder is not a warm-up checkpoint.
    """
    if config.align_space != "lora" or not config.aligns:
        return None
    if not config.align_checkpoint:
        raise ValueError('align_space = "lora" needs align_checkpoint: a LoRA warm-up checkpoint of the target '
                         '(<warmup>/checkpoint-<epoch>, from iprox warmup --model <the target>)')
    return target_lora_checkpoint(config.align_checkpoint, target_spec)


def align_in_place(proxy: nn.Module, target: nn.Module, tokenizer, examples, config: "ProxyConfig", out: Path) -> dict:
    """Aligns ``proxy``'s factors with ``target`` on the alignment set of ``examples`` (the slice
    after the probe set of :func:`~iprox.data.probe_split`), checkpointing into ``out``; returns
    the record ``proxy.json`` keeps of it (``stage2``)."""
    t0 = time.perf_counter()
    order = probe_split(len(examples), config.seed)
    n_probe, n_align = config.split_sizes(len(examples))
    align_ex = [examples[i] for i in order[n_probe : n_probe + n_align]]
    if len(align_ex) < n_align:
        log.warning("only %d examples left for an alignment set of %d", len(align_ex), n_align)
    align_tok, _ = tokenize_examples(tokenizer, align_ex, config.max_length)
    per_epoch = steps_per_epoch(len(align_tok), config.batch_size, config.grad_accum)
    steps = config.alignment_steps(per_epoch)
    settings = AlignSettings(steps=steps, batch_size=config.batch_size, grad_accum=config.grad_accum,
                             lr=config.lr, weight_decay=config.weight_decay, lambda_kl=config.lambda_kl,
                             temperature=config.temperature, checkpoint_every=config.checkpoint_every,
                             seed=config.seed, gradient_checkpointing=config.gradient_checkpointing,
                             offload_optimizer=config.offload_optimizer,
                             per_example=config.align_cosine == "example", micro_batch=config.align_micro_batch)
    info = lora_space_checkpoint(config, None)
    lora = None if info is None else (read_lora_state(config.align_checkpoint, next(proxy.parameters()).device),
                                      float(info["lora_alpha"]))
    res = run_alignment(proxy, target, align_tok, settings, out, tokenizer.pad_token_id, config.progress, lora)
    return {"examples": len(align_tok), "ids": [t.id for t in align_tok], "space": config.align_space,
            **({"checkpoint": config.align_checkpoint, "checkpoint_uid": info.get("uid")} if info else {}),
            "steps": steps, "steps_per_epoch": per_epoch, "batch_size": config.batch_size,
            "grad_accum": config.grad_accum, "lr": config.lr, "weight_decay": config.weight_decay,
            "lambda_kl": config.lambda_kl, "temperature": config.temperature,
            "final_loss": res["loss"], "final_grad_align": res["grad_align"], "final_kl": res["kl"],
            "seconds_per_step": res["seconds_per_step"], "attention": res["attention"],
            "seconds": time.perf_counter() - t0}


@dataclass
class AlignSummary:
    out: str
    stage2: dict | None   # None: nothing to align (the compressed proxy is the proxy)
    skipped: bool

    def format(self) -> str:
        head = f"proxy {'(already aligned) ' if self.skipped else ''}in {self.out}"
        if not self.stage2:
            return head + ": no factors to align (layer-drop, sparsity 0) or no alignment asked for"
        s = self.stage2
        return (head + f": aligned {s['steps']} steps on {s['examples']} examples; final L_GA "
                f"{s['final_grad_align']:.4f}, L_KL {s['final_kl']:.4f}")


def align_config(source: str | Path, **settings) -> "ProxyConfig":
    """Settings for aligning the compressed proxy in ``source``: the ones it was built with (its
    target, data, seed, probe set, max_length, dtype, ...) under ``settings`` (``out`` and the
    alignment's own). The alignment set is then the slice after the probe set the compression used."""
    from .proxy import ProxyConfig  # (the compress stage's settings class; ALIGN_FIELDS are its)

    source = Path(source)
    if not (source / PROXY_FILE).is_file():
        raise FileNotFoundError(f"{source} is not a proxy folder (no {PROXY_FILE})")
    built = artifacts.read_json(source / PROXY_FILE, "proxy description").get("config", {})
    names = {f.name for f in fields(ProxyConfig)}
    inherited = {k: v for k, v in built.items()
                 if k in names and k not in ALIGN_FIELDS + RUN_FIELDS}
    return ProxyConfig(**{**inherited, **settings})


def align_proxy(config: "ProxyConfig", source: str | Path, session: Session | None = None) -> AlignSummary:
    """The align stage of ``iprox run``: the compressed proxy in ``source`` aligned with its target
    into ``config.out``, a proxy folder of its own (``source`` is left as it was).

    Resumes from its checkpoint; a finished folder with the same settings and the same compressed
    proxy is skipped. Without factors to align (layer-drop, sparsity 0) or with no alignment asked
    for, ``config.out`` holds the compressed proxy unchanged (hard links where the file system has them).
    """
    out, source = Path(config.out), Path(source)
    src_meta = artifacts.read_json(source / PROXY_FILE, "proxy description")
    full = asdict(config)
    info = lora_space_checkpoint(config, config.model)
    settings = {"source_uid": src_meta.get("uid"), **{k: full[k] for k in ALIGN_FIELDS + SHARED_FIELDS}}
    examples = load_examples(config.data) if config.aligns else []
    if not config.floor_binds(len(examples)):  # the same steps as before 0.11's floor: such a proxy still matches
        del settings["align_min_steps"]
    if info:  # the adapters' identity: a warm-up rerun into the same folder is another space
        settings["align_checkpoint_uid"] = info.get("uid")
    if on_rank0(lambda: artifacts.prepare_stage(out, "align", settings, overwrite=config.overwrite, resumable=True)):
        meta = artifacts.read_json(out / PROXY_FILE, "proxy description")
        return AlignSummary(str(out), meta.get("stage2"), skipped=True)
    session = session or Session(keep=False)
    if not config.aligns:
        def link() -> None:
            for f in source.iterdir():
                if f.is_file() and f.name not in (artifacts.STAGE_FILE, artifacts.COMPLETE_FILE, STAGE1_DONE):
                    dest = out / f.name
                    dest.unlink(missing_ok=True)
                    try:
                        os.link(f, dest)
                    except OSError:
                        shutil.copy2(f, dest)
            artifacts.mark_complete(out)
        on_rank0(link)
        log.info("align: nothing to align; %s is the compressed proxy of %s", out, source)
        return AlignSummary(str(out), None, skipped=False)
    device = rank_device(config.device or default_device())
    proxy, tokenizer = session.model(str(source), config.dtype, device, config.trust_remote_code)
    target, _ = session.model(config.model, config.dtype, device, config.trust_remote_code)
    meta = dict(src_meta)
    meta["stage2"] = align_in_place(proxy, target, tokenizer, examples, config, out)
    session.drop(str(source))  # the resident copy now holds the aligned factors, not source's

    meta["uid"] = on_rank0(lambda: complete_proxy(proxy, tokenizer, out, meta))
    session.register(str(out), proxy, tokenizer, config.dtype, device)
    return AlignSummary(str(out), meta["stage2"], skipped=False)
