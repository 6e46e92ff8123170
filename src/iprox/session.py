"""Models, identities and tokenised data kept resident between the stages of one process.

``iprox run`` loads the target once for stage 1 and 2, hands the proxy it built to the warm-up, and
the warm-up's model to every checkpoint's train and validation features: loading a checkpoint copies
its trained tensors into the resident model in place. A stage that needs the untouched model (a
warm-up starting from scratch) asks for it ``pristine``, and a model that a stage has changed is
reloaded for it. Each model's **identity** (the weight hash of a plain model, computed once before
anything changes it; a proxy's or checkpoint's ``uid``) lets stores record which weights made them
without hashing per store; **tokenised data** is kept per (files, max length, tokenizer), so a pool
featurised at every checkpoint is read and tokenised once. The loads themselves are
:mod:`iprox.loading`'s.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .artifacts import read_json
from .data import load_examples, tokenize_examples
from .loading import (PROXY_FILE, Checkpoint, _fill, apply_lora, canonical_name, load_model_or_proxy, mark_trainable,
                      model_key, proxy_uid, read_checkpoint_info, read_lora_state,
                      target_lora_checkpoint)
from .models import restore_depth, weights_hash

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    model: nn.Module
    tokenizer: Any
    spec: str
    dirty: bool = False            # a stage changed trainable tensors since the load
    identity: str | None = None    # weights hash / proxy uid of the pristine model
    lora: tuple | None = None      # (rank, alpha, seed) when wrapped with LoRA


class Session:
    """Models, identities and tokenised data shared by the stages of one process.

    Args:
        keep: keep models resident between requests (``False``: every request loads, as separate
            CLI calls do; the identity of a model is then still computed only once per request).
    """

    def __init__(self, keep: bool = True):
        self.keep = keep
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        self._data: dict[tuple, tuple] = {}
        #: seconds spent loading models and computing their identities: fixed costs, whatever the pool
        self.overhead_s = 0.0

    # -- models --------------------------------------------------------------------------------

    def _entry(self, spec: str, dtype: str, device: str, trust_remote_code: bool, pristine: bool) -> _Entry:
        key = (model_key(spec), dtype, str(device))
        e = self._entries.get(key)
        if e is not None and pristine and (e.dirty or e.lora is not None):
            log.info("reloading %s: an earlier stage changed the resident copy", spec)
            e = None
        if e is None:
            t0 = time.perf_counter()
            model, tok = load_model_or_proxy(spec, dtype, device, trust_remote_code)
            self.overhead_s += time.perf_counter() - t0
            e = _Entry(model, tok, spec)
            if self.keep:
                self._entries[key] = e
        return e

    def model(self, spec: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
              pristine: bool = False):
        """``(model, tokenizer)`` for a model spec or proxy folder, loaded on first use.

        Args:
            pristine: the caller needs the weights as saved (not changed by an earlier stage).
        """
        e = self._entry(spec, dtype, device, trust_remote_code, pristine)
        if e.lora is not None:
            # Wrapped for a warm-up; the plain model is no longer what it holds.
            key = (model_key(spec), dtype, str(device))
            self._entries.pop(key, None)
            e = self._entry(spec, dtype, device, trust_remote_code, pristine)
        return e.model, e.tokenizer

    def register(self, spec: str, model: nn.Module, tokenizer, dtype: str, device: str) -> None:
        """Makes a model built in this process (a proxy) the resident copy of ``spec``."""
        if self.keep:
            self._entries[(model_key(spec), dtype, str(device))] = _Entry(model, tokenizer, spec)

    def drop(self, spec: str) -> None:
        """Forgets every resident copy of ``spec`` (frees its memory once nothing else holds it)."""
        k = model_key(spec)
        for key in [key for key in self._entries if key[0] == k]:
            del self._entries[key]

    def identity(self, spec: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> str:
        """A string naming the pristine weights of ``spec``: a proxy's uid, else a weight hash (once)."""
        e = self._entry(spec, dtype, device, trust_remote_code, pristine=False)
        return self._identity_of(e)

    def _identity_of(self, e: _Entry) -> str:
        if e.identity is None:
            if e.dirty or e.lora is not None:
                raise RuntimeError(f"the identity of {e.spec} was asked after a stage changed it")
            t0 = time.perf_counter()
            uid = proxy_uid(e.spec)
            e.identity = f"proxy:{uid}" if uid else weights_hash(e.model)
            self.overhead_s += time.perf_counter() - t0
        return e.identity

    def trainable_model(self, spec: str, dtype: str, device: str, trust_remote_code: bool, lora: tuple | None,
                        pristine: bool):
        """The model a warm-up trains (or a checkpoint fills): the plain model, or LoRA-wrapped.

        Args:
            lora: ``(rank, alpha, seed)`` for LoRA (the seed draws its initialisation), None to train
                the model's own tensors (a proxy's factors).
            pristine: the caller trains from scratch and needs the saved weights and a fresh LoRA.

        Returns:
            ``(model, tokenizer, identity of the base model)``; the model is marked as changed.
        """
        key = (model_key(spec), dtype, str(device))
        e = self._entries.get(key)
        reuse = e is not None and (
            (lora is None and e.lora is None and not (pristine and e.dirty))
            or (lora is not None and e.lora is not None and e.lora[:2] == lora[:2]
                and not (pristine and (e.dirty or e.lora != lora))))
        if not reuse:
            e = self._entry(spec, dtype, device, trust_remote_code, pristine=True)
            ident = self._identity_of(e)
            if lora is not None:
                torch.manual_seed(lora[2])  # LoRA's A is randomly initialised: same seed, same run
                wrapped = apply_lora(e.model, lora[0], lora[1]).to(device)
                e = _Entry(wrapped, e.tokenizer, spec, identity=ident, lora=lora)
                if self.keep:
                    self._entries[key] = e
        ident = self._identity_of(e)
        e.dirty = True
        return e.model, e.tokenizer, ident

    def checkpoint(self, path: str | Path, dtype: str = "float32", device: str = "cpu",
                   trust_remote_code: bool = False) -> Checkpoint:
        """The model of a warm-up checkpoint: the resident model with the checkpoint's tensors copied in.

        Raises:
            FileNotFoundError: not a checkpoint folder.
            ValueError: its tensors do not match the model the warm-up recorded.
        """
        path = Path(path)
        info = read_checkpoint_info(path)
        lora = (info["lora_rank"], info["lora_alpha"], info.get("seed", 0)) if info["lora"] else None
        model, tok, base = self.trainable_model(info["model"], dtype, device, trust_remote_code, lora, pristine=False)
        params = mark_trainable(model, info["lora"])
        exp_avg, exp_avg_sq = _fill(params, path, device)
        model.eval()
        uid = info.get("uid") or f"{path.resolve()}@{info.get('step')}"
        return Checkpoint(model, tok, info, exp_avg, exp_avg_sq, identity=f"{base}+{uid}")

    def carried_checkpoint(self, proxy: str, path: str | Path, dtype: str = "float32", device: str = "cpu",
                           trust_remote_code: bool = False) -> Checkpoint:
        """A target's LoRA warm-up checkpoint carried by a proxy of that target (the target-first order).

        Each projection of the proxy that the target's LoRA adapted (a factored layer, or one left
        dense) gets an :class:`~iprox.lowrank.AdaptedLinear` with the checkpoint's adapter tensors;
        the Adam moments come with them. A layer-drop proxy first gets its blocks back at the target's
        indices (:func:`~iprox.models.restore_depth`); the adapters of the blocks it dropped are held and
        never run. The proxy's features are then gradients of the same
        parameters the target's are, run through the compressed network, and share the target's
        projections (see :func:`canonical_name`).

        Raises:
            ValueError: the checkpoint trained factors, or its model is not the proxy's target.
        """
        path = Path(path)
        info = target_lora_checkpoint(path)
        desc = read_json(Path(proxy) / PROXY_FILE, "proxy description")
        target = desc["target"]["model"]
        if model_key(target) != model_key(info["model"]):
            raise ValueError(f"{path} is a warm-up of {info['model']}, but {proxy} was built from {target}")
        key = (model_key(proxy), dtype, str(device))
        e = self._entry(proxy, dtype, device, trust_remote_code, pristine=False)
        # The resident proxy serves as it is when it carries adapters already (an earlier checkpoint's,
        # overwritten below); one another stage changed (its own warm-up) is reloaded.
        if (e.lora is not None and e.lora[0] != "carried") or (e.lora is None and e.dirty):
            self._entries.pop(key, None)
            e = self._entry(proxy, dtype, device, trust_remote_code, pristine=True)
        ident = self._identity_of(e) if e.identity is None else e.identity
        from .lowrank import attach_adapters

        if desc.get("kept_blocks"):  # layer-drop: its blocks back at the target's indices, by the target's names
            restore_depth(e.model, desc["kept_blocks"], [r["name"] for r in desc["layers"]])
        try:
            attach_adapters(e.model, read_lora_state(path, device), info["lora_alpha"], device)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        e.lora, e.dirty = ("carried", info["lora_rank"], info["lora_alpha"]), True
        if self.keep:
            self._entries[key] = e
        for p in e.model.parameters():
            p.requires_grad_(False)
        params = {n: p for n, p in e.model.named_parameters() if ".lora_" in n}
        exp_avg, exp_avg_sq = _fill(params, path, device, canonical_name)
        e.model.eval()
        uid = info.get("uid") or f"{path.resolve()}@{info.get('step')}"
        return Checkpoint(e.model, e.tokenizer, info, exp_avg, exp_avg_sq, identity=f"{ident}+{uid}")

    # -- data ----------------------------------------------------------------------------------

    def examples(self, data: list[str]):
        """The examples of data files, read once per session."""
        key = tuple(str(d) for d in data)
        if key in self._data:
            return self._data[key]
        examples = load_examples(list(data))
        if self.keep:
            self._data[key] = examples
        return examples

    def tokenized(self, tokenizer, data: list[str], max_length: int):
        """``(tokenised, stats)`` of data files, read and tokenised once per session."""
        key = (tuple(str(d) for d in data), max_length, id(tokenizer))
        if key in self._data:
            return self._data[key][:2]
        tokd, stats = tokenize_examples(tokenizer, self.examples(data), max_length)
        if self.keep:
            self._data[key] = (tokd, stats, tokenizer)  # the tokenizer kept alive, so its id() stays unique
        return tokd, stats
