"""Reading every artifact a stage leaves for another: models and proxies, warm-up checkpoints,
feature stores and score tables.

Stages never import each other to read an artifact; they come here. A stage that writes one takes
its format's names and checks from here too, and proxy folders, which two stages write (compress and
align), are also written here (:func:`save_proxy`). Every load of a model from disk goes through
:func:`load_model_or_proxy`, which counts it in :data:`LOADS`; :mod:`iprox.session` keeps loaded
models resident between the stages of one process.
"""

from __future__ import annotations

import csv
import json
import logging
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from . import artifacts
from .artifacts import read_json
from .lowrank import FactorizedLinear
from .models import DTYPES, compressible_modules, get_submodule_parent, load_model, resolve_dtype

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
    LOADS[model_key(spec)] += 1
    if is_proxy_folder(spec):
        return load_proxy(spec, dtype, device, with_tokenizer=True)
    model, tok, _ = load_model(spec, dtype, device, trust_remote_code)
    return model, tok


PEFT_PREFIX = "base_model.model."
# a feature store's "trains" when a proxy carried a target's LoRA checkpoint (the target-first order)
CARRIED = "target lora, carried"


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


def target_lora_checkpoint(path: str | Path, target_spec: str | None = None) -> dict[str, Any]:
    """``checkpoint.json`` of a target's LoRA warm-up checkpoint, checked.

    Args:
        target_spec: the model it must be a warm-up of (None: not checked).

    Raises:
        FileNotFoundError: not a warm-up checkpoint.
        ValueError: it trained a proxy's factors, or it is a warm-up of another model.
    """
    info = read_checkpoint_info(path)
    if not info["lora"]:
        raise ValueError(f"{path} trained a proxy's factors; only a target's LoRA checkpoint can be carried by a proxy")
    if target_spec is not None and model_key(info["model"]) != model_key(target_spec):
        raise ValueError(f"{path} is a warm-up of {info['model']}, not of the target {target_spec}")
    return info


def read_lora_state(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A LoRA warm-up checkpoint's adapter tensors by canonical name (without peft's prefix).

    Raises:
        ValueError: the checkpoint trained a proxy's factors, not LoRA adapters.
    """
    path = Path(path)
    target_lora_checkpoint(path)
    return {canonical_name(k): v for k, v in load_file(str(path / TRAINABLE_FILE), device=str(device)).items()}


def checkpoint_dirs(warmup_dir: str | Path) -> list[Path]:
    """The checkpoint folders of a warm-up folder, in epoch order."""
    found = [p for p in Path(warmup_dir).glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    found.sort(key=lambda p: int(p.name.split("-")[1]))
    return [p for p in found if (p / CHECKPOINT_FILE).is_file()]


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
    from .session import Session

    return Session(keep=False).checkpoint(path, dtype, device, trust_remote_code)


# ---------------------------------------------------------------------------------------------
# Proxy folders (written by the compress and align stages)
# ---------------------------------------------------------------------------------------------

PROXY_FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)   # 1: the dense target's config.json beside the factors (before 0.3)
TARGET_CONFIG_FILE = "target_config.json"
# config.json of a proxy folder names this model type, which transformers does not know: a plain
# from_pretrained fails with that name instead of silently building a randomly initialised dense
# model from the target's config. iprox.load_proxy reads target_config.json instead.
PROXY_MODEL_TYPE = "iprox_proxy"
WEIGHTS_FILE = "model.safetensors"
STAGE1_DONE = "STAGE1_DONE"   # stage 1 of build_proxy finished (its resume point before alignment)
ALIGN_CHECKPOINT_DIR = "align_checkpoint"  # the alignment's resume point: factors and Adam moments


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (the first name wins), contiguous and cloned."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in model.state_dict().items():
        ptr = v.data_ptr()
        if ptr in seen and v.numel() > 0:
            continue
        seen[ptr] = k
        out[k] = v.detach().contiguous().clone()
    return out


def save_proxy(model: nn.Module, tokenizer, out: str | Path, meta: dict[str, Any]) -> None:
    """Writes weights (safetensors), the model config, the tokenizer and ``proxy.json`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _unique_state(model)
    artifacts.save_tensors(state, out / WEIGHTS_FILE,
                           metadata={"format": "pt", "iprox_format_version": str(PROXY_FORMAT_VERSION)})
    model.config.to_json_file(out / TARGET_CONFIG_FILE)
    artifacts.atomic_write_json(out / "config.json", {
        "model_type": PROXY_MODEL_TYPE, "architectures": ["IProxFactoredProxy"],
        "iprox": f"an IProX proxy of a {type(model).__name__}: load it with iprox.load_proxy('{out.name}'); "
                 f"the model's own config is {TARGET_CONFIG_FILE}"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    artifacts.set_umask_modes(out)
    artifacts.atomic_write_json(out / PROXY_FILE, meta)


def complete_proxy(model: nn.Module, tokenizer, out: str | Path, meta: dict[str, Any], save_weights: bool = True) -> str:
    """Finishes a proxy folder: a fresh ``uid`` in ``meta`` (it names these exact weights for the
    feature stores made from them), the weights unless ``save_weights`` is off (already saved),
    ``proxy.json`` and ``COMPLETE``; the alignment's resume point goes (the factors are saved, and
    their two Adam moments would triple the folder's size for nothing). Returns the uid."""
    import shutil
    import uuid

    out = Path(out)
    meta["uid"] = uuid.uuid4().hex
    if save_weights:
        save_proxy(model, tokenizer, out, meta)
    artifacts.atomic_write_json(out / PROXY_FILE, meta)
    artifacts.mark_complete(out)
    shutil.rmtree(out / ALIGN_CHECKPOINT_DIR, ignore_errors=True)
    return meta["uid"]


def load_proxy(path: str | Path, dtype: str | None = None, device: str = "cpu", with_tokenizer: bool = False):
    """Rebuilds a proxy from its folder, without the target.

    Args:
        path: proxy folder written by :func:`iprox.build_proxy` (or ``iprox run``'s compress and align stages).
        dtype: load in this dtype (default: the dtype it was saved in).
        device: torch device.
        with_tokenizer: also return the tokenizer saved beside it.

    Returns:
        The model (eval mode), or ``(model, tokenizer)`` when ``with_tokenizer``.

    Raises:
        ValueError: unknown format version, or the weights file has missing or extra tensors or
            tensors of the wrong shape.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not is_proxy_folder(path):
        raise FileNotFoundError(f"{path} is not a proxy folder (no {PROXY_FILE})")
    meta = artifacts.read_json(path / PROXY_FILE, "proxy description")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: proxy format version {meta.get('format_version')} is not one of "
                         f"{READABLE_VERSIONS}; rebuild it")
    # Read onto the device and build there: an 8B proxy never passes through host memory whole.
    state = load_file(str(path / WEIGHTS_FILE), device=str(device))
    saved_dtype = next(iter(state.values())).dtype
    torch_dtype = DTYPES[resolve_dtype(dtype, device)] if dtype else saved_dtype
    trust = meta.get("config", {}).get("trust_remote_code", False)
    if (path / TARGET_CONFIG_FILE).is_file():
        from transformers import CONFIG_MAPPING

        raw = artifacts.read_json(path / TARGET_CONFIG_FILE, "model config")
        if raw.get("model_type") not in CONFIG_MAPPING:
            raise ValueError(f"{path / TARGET_CONFIG_FILE}: model type {raw.get('model_type')!r} is not one "
                             f"transformers knows; custom-code models are not supported as proxies")
        cfg = CONFIG_MAPPING[raw["model_type"]].from_dict(raw)
    else:  # format 1
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype, trust_remote_code=trust)
        for rec in meta["layers"]:
            if rec["rank"]:  # None: left dense; 0: block dropped (layer-drop)
                parent, child = get_submodule_parent(model, rec["name"])
                setattr(parent, child, FactorizedLinear(rec["in_features"], rec["out_features"], rec["rank"],
                                                        bias=rec["bias"], dtype=torch_dtype))
    expected = _unique_state(model)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{path / WEIGHTS_FILE} does not match the proxy's structure: "
                         f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    bad = [k for k in expected if expected[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"{path / WEIGHTS_FILE}: tensor {bad[0]} has shape {tuple(state[bad[0]].shape)}, "
                         f"expected {tuple(expected[bad[0]].shape)}")
    model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, strict=False)
    # strict=False only because tied copies are stored once; every stored key was checked above.
    model.tie_weights()
    model.to(device).eval()
    if with_tokenizer:
        from transformers import AutoTokenizer
        from .models import prepare_tokenizer

        return model, prepare_tokenizer(AutoTokenizer.from_pretrained(path, config=cfg))  # (not config.json: the proxy stub)
    return model


# ---------------------------------------------------------------------------------------------
# Feature stores (written by iprox.features) and score tables (written by iprox.scores)
# ---------------------------------------------------------------------------------------------

MANIFEST_FILE = "manifest.json"
# 2: projections seeded by the layer's name without peft's prefix (a target's LoRA and a proxy
# carrying it share them); shards record the version, so a resume never mixes schemes.
# 3: a layer side the budget covers whole (a LoRA matrix's rank side) is kept exactly, not
# multiplied by a square Gaussian; the budget a kept side leaves goes to the other side.
STORE_FORMAT_VERSION = 3
SCORES_FILE = "scores.csv"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"

def tensor_crc(x: torch.Tensor, value: int = 0) -> int:
    """CRC-32 of a tensor's bytes (continuing from ``value``): catches damage the file format cannot see."""
    return zlib.crc32(x.contiguous().view(torch.uint8).numpy().tobytes(), value)

def read_manifest(store: str | Path) -> dict:
    store = Path(store)
    if not artifacts.is_complete(store) or not (store / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"{store} is not a complete feature store (run `iprox features` into it)")
    man = artifacts.read_json(store / MANIFEST_FILE, "store manifest")
    missing = [k for k in ("format_version", "ids", "shards", "dim", "layout", "seed", "proj_dim") if k not in man] \
        if isinstance(man, dict) else ["everything"]
    if missing:
        raise artifacts.ArtifactError(f"{store / MANIFEST_FILE} lacks {', '.join(missing)}; recompute the store")
    if man.get("format_version") != STORE_FORMAT_VERSION:
        raise ValueError(f"{store}: store format {man.get('format_version')} is not {STORE_FORMAT_VERSION}; recompute it")
    return man

def iter_features(store: str | Path, chunk_rows: int = 4096, dtype=torch.float32) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Streams a store in store order: ``(ids, features)`` chunks of at most ``chunk_rows`` rows.

    Only one shard is open at a time, so memory stays bounded whatever the store's size.
    """
    for _, ids, x in iter_feature_rows(store, chunk_rows, dtype):
        yield ids, x


def iter_feature_rows(store: str | Path, chunk_rows: int = 4096, dtype=torch.float32,
                      part: tuple[int, int] = (0, 1)) -> Iterator[tuple[int, list[str], torch.Tensor]]:
    """:func:`iter_features` with each chunk's first row index in the store; ``part = (i, n)`` reads
    only shards ``i, i + n, i + 2n, ...`` (one rank's share of a store split over ``n`` ranks)."""
    store = Path(store)
    man = read_manifest(store)
    for k, sh in enumerate(man["shards"]):
        if k % part[1] != part[0]:
            continue
        path = store / sh["file"]
        want = man["ids"][sh["start"]:sh["start"] + sh["count"]]
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                ids = json.loads(meta.get("ids", "null"))
                if meta.get("format_version") != str(STORE_FORMAT_VERSION):
                    raise artifacts.ArtifactError(f"{path}: its header does not name store format {STORE_FORMAT_VERSION} "
                                                  f"(a damaged, foreign or older shard); recompute the store")
                if sh.get("crc32") is not None and meta.get("crc32") != str(sh["crc32"]):
                    raise artifacts.ArtifactError(f"{path}: its checksum is not the one the manifest recorded "
                                                  f"(a damaged or foreign shard); recompute the store")
                sl = f.get_slice("features")
                shape = sl.get_shape()
                # Verified on read: the shard holds the manifest's ids in order, one row each, of the
                # manifest's width; a swapped, truncated or foreign shard never scores the wrong examples.
                if ids != want or shape[0] != len(want) or shape[1] != man["dim"]:
                    raise artifacts.ArtifactError(
                        f"{path} does not hold the rows the manifest lists ({len(want)} ids from {want[:1]}); "
                        f"the store is damaged: recompute it (iprox features --overwrite)")
                crc = 0
                for a in range(0, len(ids), chunk_rows):
                    b = min(len(ids), a + chunk_rows)
                    raw = sl[a:b]
                    crc = tensor_crc(raw, crc)
                    if b == len(ids) and sh.get("crc32") is not None and crc != sh["crc32"]:
                        # checked before the last chunk is handed out, so a damaged shard never scores
                        raise artifacts.ArtifactError(f"{path}: its values do not match the checksum the manifest "
                                                      f"recorded (the file was damaged); recompute the store")
                    x = raw.to(dtype)
                    if not bool(torch.isfinite(x).all()):
                        bad = ids[a + int((~torch.isfinite(x)).any(dim=1).nonzero()[0])]
                        raise artifacts.ArtifactError(f"{path}: the features of {bad!r} are not finite (NaN or inf); "
                                                      f"recompute the store, in float32 if this came from float16")
                    yield sh["start"] + a, ids[a:b], x
        except artifacts.ArtifactError:
            raise
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types; name the file)
            raise artifacts.ArtifactError(f"{path} is unreadable ({e}); recompute the store") from None

def load_features(store: str | Path, dtype=torch.float32) -> tuple[list[str], torch.Tensor]:
    """The whole store in memory: example ids and the (n, dim) feature matrix, one row per id."""
    ids, chunks = [], []
    for i, x in iter_features(store, chunk_rows=1 << 30, dtype=dtype):
        ids += i
        chunks.append(x)
    dim = read_manifest(store)["dim"]
    return ids, (torch.cat(chunks) if chunks else torch.zeros(0, dim, dtype=dtype))

def scores_table(path: str | Path) -> Path:
    """The ``scores.csv`` a path names: the file itself, the folder holding it, or an ``iprox run``
    folder, for which the scores its selection takes: the rerank's where the run reranks
    (``rerank/scores``), else ``scores`` (as its finished selection records, else as its folders say).

    Raises:
        FileNotFoundError: no table there, or a run folder whose scores (or rerank) stage has not
            finished (its proxy's scores before an unfinished rerank are not what it selects by).
    """
    path = Path(path)
    if path.is_dir() and not (path / SCORES_FILE).is_file() and (path / "pipeline.json").is_file():
        reranked = (path / "rerank").is_dir()
        took = path / "selection" / "stage.json"
        if (path / "selection" / "COMPLETE").exists() and took.is_file():  # what the selection read (a rerank
            # folder may outlive a rerank turned off since)
            reranked = Path(read_json(took, "selection record")["config"]["scores"]).parent.parent.name == "rerank"
        stage = path / ("rerank" if reranked else "scores")
        table = (stage / "scores" if stage.name == "rerank" else stage) / SCORES_FILE
        if not (table.parent / "COMPLETE").exists() or not table.is_file():
            raise FileNotFoundError(f"the run {path} has not finished its {stage.name} stage: resume it with `iprox run`"
                                    + (f", or name {path / 'scores'} for the proxy's scores before the rerank"
                                       if stage.name == "rerank" else ""))
        return table
    table = path / SCORES_FILE if path.is_dir() else path
    if not table.is_file():
        raise FileNotFoundError(f"no scores table at {path} (a scores.csv, the folder holding it, or an iprox run "
                                "folder; run `iprox score` first)")
    return table


def read_scores(path: str | Path) -> list[dict]:
    """Rows of a scores table (a ``scores.csv``, the folder holding it, or a run folder: see
    :func:`scores_table`); ``score`` as float."""
    path = scores_table(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a UTF-8 scores table") from None
    if rows and not {"id", "score"} <= set(rows[0]):
        raise ValueError(f"{path} is not a scores table: it needs columns id and score")
    for i, r in enumerate(rows, 2):
        try:
            r["score"] = float(r["score"])
        except (TypeError, ValueError):
            raise ValueError(f"{path}:{i}: score {r['score']!r} is not a number") from None
    return rows
