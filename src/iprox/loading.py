"""Loading models and artifacts for the stages, and keeping them resident between stages.

Stages never import each other to read an artifact; they come here. :class:`Session` holds what
the stages of one process share:

* **models**, loaded once per (model, dtype, device) and handed from stage to stage. ``iprox run``
  loads the target once for stage 1 and 2, hands the proxy it built to the warm-up, and the warm-up's
  model to every checkpoint's train and validation features: loading a checkpoint copies its trained
  tensors into the resident model in place. A stage that needs the untouched model (a warm-up
  starting from scratch) asks for it ``pristine``, and a model that a stage has changed is reloaded
  for it;
* the **identity** of each model (the weight hash of a plain model, computed once before anything
  changes it; a proxy's or checkpoint's ``uid``, written when it was saved), so stores record which
  weights made them without hashing the weights per store;
* **tokenised data**, per (files, max length, tokenizer), so a pool featurised at every checkpoint
  is read and tokenised once.

Every load from disk goes through :func:`load_model_or_proxy`, which counts it in :data:`LOADS`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .artifacts import read_json
from .data import load_examples, tokenize_examples
from .models import compressible_modules, load_model, weights_hash

log = logging.getLogger(__name__)

PROXY_FILE = "proxy.json"
CHECKPOINT_FILE = "checkpoint.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"

#: Loads from disk by model spec (resolved path or name), since the process started.
LOADS: Counter = Counter()


def model_key(spec: str) -> str:
    """A model spec as the session keys it: an existing path made absolute, anything else as typed."""
    p = Path(str(spec)).expanduser()
    return str(p.resolve()) if p.exists() else str(spec)


def load_model_or_proxy(spec: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """Loads a proxy folder or any model spec from disk; returns ``(model, tokenizer)``."""
    from .proxy import load_proxy

    LOADS[model_key(spec)] += 1
    if is_proxy_folder(spec):
        return load_proxy(spec, dtype, device, with_tokenizer=True)
    model, tok, _ = load_model(spec, dtype, device, trust_remote_code)
    return model, tok


PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """A parameter or module name without peft's wrapper prefix: a target's LoRA layer and the same
    adapter carried by a proxy then share a name (and so a projection seed)."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def is_proxy_folder(path: str | Path) -> bool:
    return (Path(path) / PROXY_FILE).is_file()


def proxy_uid(spec: str) -> str | None:
    """The ``uid`` a proxy folder was saved with (None for a plain model or an old proxy)."""
    if not is_proxy_folder(spec):
        return None
    return read_json(Path(spec) / PROXY_FILE, "proxy description").get("uid")


# ---------------------------------------------------------------------------------------------
# What a warm-up trains: LoRA adapters or a proxy's factors
# ---------------------------------------------------------------------------------------------


def apply_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Wraps ``model`` with peft LoRA on every compressible projection (a proxy: its factors).

    peft keeps the adapters in float32 when the model is in bfloat16 or float16 (its
    ``autocast_adapter_dtype``): they are the trained tensors, and must not round away small updates.
    """
    from peft import LoraConfig, get_peft_model

    mods = compressible_modules(model)
    conv1d = any(not isinstance(m, nn.Linear) for m in mods.values())
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(mods),
                     fan_in_fan_out=conv1d, bias="none")
    return get_peft_model(model, cfg, autocast_adapter_dtype=True)


def mark_trainable(model: nn.Module, lora: bool) -> dict[str, nn.Parameter]:
    """Freezes everything but what the warm-up trains; returns those parameters by name."""
    if lora:
        for n, p in model.named_parameters():
            p.requires_grad_(".lora_" in n)
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
    """One loaded warm-up checkpoint: the model at that point and what the features need from it.

    Attributes:
        model: the model with the checkpoint's trained tensors in place.
        tokenizer: its tokenizer.
        info: ``checkpoint.json``.
        exp_avg, exp_avg_sq: AdamW's moments by parameter name (float32).
        identity: a string naming exactly these weights (base model identity and checkpoint uid).
    """

    model: nn.Module
    tokenizer: Any
    info: dict[str, Any]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    identity: str = ""


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a warm-up checkpoint (no {CHECKPOINT_FILE})")
    return read_json(path / CHECKPOINT_FILE, "checkpoint description")


def checkpoint_dirs(warmup_dir: str | Path) -> list[Path]:
    """The checkpoint folders of a warm-up folder, in epoch order."""
    found = [p for p in Path(warmup_dir).glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    found.sort(key=lambda p: int(p.name.split("-")[1]))
    return [p for p in found if (p / CHECKPOINT_FILE).is_file()]


# ---------------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------------


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
        the Adam moments come with them. The proxy's features are then gradients of the same
        parameters the target's are, run through the compressed network, and share the target's
        projections (see :func:`canonical_name`).

        Raises:
            ValueError: the checkpoint trained factors, or its model is not the proxy's target.
        """
        path = Path(path)
        info = read_checkpoint_info(path)
        if not info["lora"]:
            raise ValueError(f"{path} trained a proxy's factors; only a target's LoRA checkpoint can be carried by a proxy")
        target = read_json(Path(proxy) / PROXY_FILE, "proxy description")["target"]["model"]
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
        state = {canonical_name(k): v for k, v in load_file(str(path / TRAINABLE_FILE), device=str(device)).items()}
        from .lowrank import AdaptedLinear

        for layer in sorted({k.rsplit(".lora_", 1)[0] for k in state}):
            try:
                mod = e.model.get_submodule(layer)
            except AttributeError:
                raise ValueError(f"{path}: the proxy has no layer {layer} for the checkpoint's adapter") from None
            if not isinstance(mod, AdaptedLinear):
                r, n = state[f"{layer}.lora_A.default.weight"].shape
                m = state[f"{layer}.lora_B.default.weight"].shape[0]
                parent, _, child = layer.rpartition(".")
                setattr(e.model.get_submodule(parent), child,
                        AdaptedLinear(mod, n, m, r, info["lora_alpha"], device=device))
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


def _fill(params: dict[str, nn.Parameter], path: Path, device: str, rename=lambda n: n):
    """Copies a checkpoint's trained tensors into ``params`` (names passed through ``rename``), freezes
    them, and returns its Adam moments ``(exp_avg, exp_avg_sq)`` by the same names, in float32.

    Raises:
        ValueError: the checkpoint's tensors are not the parameters' (names or shapes).
    """
    state = {rename(k): v for k, v in load_file(str(path / TRAINABLE_FILE), device=str(device)).items()}
    if set(state) != set(params):
        raise ValueError(f"{path / TRAINABLE_FILE} does not match the model: "
                         f"{len(set(params) - set(state))} missing, {len(set(state) - set(params))} unexpected tensors")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise ValueError(f"{path / TRAINABLE_FILE}: {n} has shape {tuple(state[n].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[n])
            p.requires_grad_(False)
    opt = load_file(str(path / OPTIMIZER_FILE), device=str(device))
    moments = []
    for kind in ("exp_avg", "exp_avg_sq"):
        got = {rename(k[len(kind) + 1:]): v.float() for k, v in opt.items() if k.startswith(f"{kind}.")}
        missing = set(params) - set(got)
        if missing:
            raise ValueError(f"{path / OPTIMIZER_FILE} has no {kind} for {sorted(missing)[:3]}")
        moments.append({n: got[n] for n in params})
    return moments[0], moments[1]


def load_checkpoint(path: str | Path, dtype: str = "float32", device: str = "cpu",
                    trust_remote_code: bool = False) -> Checkpoint:
    """Loads a warm-up checkpoint folder (``<warmup>/checkpoint-<epoch>``) on its own."""
    return Session(keep=False).checkpoint(path, dtype, device, trust_remote_code)
