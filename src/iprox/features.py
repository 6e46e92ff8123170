"""Feature stores: per-example projected gradients of a model (or a warm-up checkpoint), in shards.

A store folder holds:

* ``stage.json`` / ``COMPLETE``: the resolved settings and the completion marker (see ``artifacts``);
* ``shard-00000.safetensors``, ...: tensor ``features`` (rows × dim, float16 or float32) for a
  contiguous run of examples, with their ids in the file's metadata. Each is written under a
  temporary name and renamed, so a shard on disk is whole; a rerun skips the shards that exist;
* ``manifest.json``: format version, model identity and weights hash, the checkpoint, projection
  settings and per-layer layout, the example ids, sources and tasks in store order, and the shards.

Under ``torchrun`` each rank computes the shards ``i`` with ``i % world_size == rank``; rank 0 writes
the manifest once every shard exists. Shard boundaries and the projection depend only on the
settings, so the store is the same whatever the number of processes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from . import artifacts
from .data import batches, collate
from .distributed import barrier, on_rank0, rank_device
from .distributed import world as dist_world
from .loading import (CARRIED, MANIFEST_FILE, STORE_FORMAT_VERSION, is_proxy_folder, read_checkpoint_info, read_manifest, shard_name,
                      tensor_crc)
from .session import Session
from .models import EMBEDDED_MODEL, default_device
from .projection import (DenseEngine, KroneckerEngine, feature_modules, make_preconditioners,
                         make_projections)
from .representation import RepresentationEngine
from .runtime import ModelStageConfig, check_data_paths

log = logging.getLogger(__name__)

STORE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class FeatureConfig(ModelStageConfig):
    """Settings of ``iprox features``.

    The shared fields (max_length, seed, dtype, device, ...) are :class:`~iprox.runtime.ModelStageConfig`'s.

    Attributes:
        data: examples to featurise (files or folders).
        out: the store folder.
        model: a proxy folder or any model spec; ignored in favour of the checkpoint's model when
            ``checkpoint`` is given (they must agree if both are set), except that a proxy of the
            checkpoint's model, given a target's LoRA checkpoint, carries that checkpoint's adapters
            (the target-first order: the target's own warm-up, its gradients run through the proxy).
        checkpoint: a warm-up checkpoint folder (LoRA or factors, plus Adam state), or "".
        grad: ``sgd`` (validation features, LESS), ``adam`` (LESS's elementwise Adam, exact on both
            engines) or ``factored-adam`` (a row × column approximation of it, kept for comparison).
        engine: ``kronecker`` (fast, hooks), ``dense`` (per-example reference), or
            ``representation`` (the RDS+ baseline: mean-pooled final hidden states, no gradients).
        proj_dim: projected dimensions per layer (split ≈√k × √k; a side no longer than its share, such as
            a LoRA matrix's rank, is kept whole and exact, and the other side takes the rest).
        total_dim: or a budget for the whole model (0: use proj_dim), shared equally by the layers,
            so the store's size does not grow with the model's depth (LESS keeps 8,192 in all).
        batch_size: examples per forward/backward (kronecker); the dense engine loops within it.
        shard_size: examples per shard (the unit of resume and of distribution).
        store_dtype: ``float16`` (half the bytes) or ``float32``.
        seed: the projection seed; train and validation stores must share it to be comparable.
    """

    checkpoint: str = ""
    grad: Literal["sgd", "adam", "factored-adam"] = "sgd"
    engine: Literal["kronecker", "dense", "representation"] = "kronecker"
    proj_dim: int = 64
    total_dim: int = 0
    batch_size: int = 8
    shard_size: int = 256
    store_dtype: Literal["float16", "float32"] = "float16"

    def __post_init__(self):
        self.check_io("features", "the examples to featurise", "the store folder")
        if self.engine == "representation" and self.grad != "sgd":
            raise ValueError("the representation engine takes no gradient preconditioner (leave --grad sgd)")
        if self.grad != "sgd" and not self.checkpoint:
            raise ValueError(f"--grad {self.grad} needs --checkpoint (a warm-up checkpoint with Adam state)")
        if self.proj_dim < 1 or self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("proj_dim, batch_size and shard_size must be >= 1")
        if self.total_dim < 0:
            raise ValueError(f"total_dim must be >= 0 (0: proj_dim per layer), got {self.total_dim}")
        if self.checkpoint:
            self.checkpoint = str(Path(self.checkpoint).resolve())


def layer_dim(config: FeatureConfig, n_layers: int) -> int:
    """Dimensions per featurised layer: ``proj_dim``, or ``total_dim`` shared equally (at least 1 each)."""
    if config.total_dim:
        if config.total_dim < n_layers:
            log.warning("total_dim %d is below the %d featurised layers: 1 dimension each", config.total_dim, n_layers)
        return max(1, config.total_dim // n_layers)
    return config.proj_dim


# ---------------------------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------------------------


def _shard_ids(path: Path) -> list[str] | None:
    """The ids a shard holds, or None when it cannot be read (a truncated or foreign file: recompute it)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            rows = f.get_slice("features").get_shape()[0]
        ids = json.loads(meta["ids"]) if "ids" in meta else None
        if meta.get("format_version") != str(STORE_FORMAT_VERSION):
            log.warning("features: %s was written by another store format; it will be recomputed", path)
            return None
    except Exception as e:  # noqa: BLE001  (any unreadable shard is recomputed, and the log says why)
        log.warning("features: %s is unreadable (%s); it will be recomputed", path, e)
        return None
    return ids if isinstance(ids, list) and len(ids) == rows else None


def _write_shard(path: Path, feats: torch.Tensor, ids: list[str]) -> None:
    feats = feats.contiguous()
    artifacts.save_tensors({"features": feats}, path, metadata={"ids": json.dumps(ids), "crc32": str(tensor_crc(feats)),
                                                                "format_version": str(STORE_FORMAT_VERSION)})


def _shard_crc(path: Path) -> int | None:
    with safe_open(str(path), framework="pt") as f:
        crc = (f.metadata() or {}).get("crc32")
    return int(crc) if crc is not None else None


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


@dataclass
class FeatureSummary:
    out: str
    n_examples: int
    dim: int
    skipped: bool
    seconds: float
    examples_per_s: float
    bytes_per_example: int

    def format(self) -> str:
        if self.skipped:
            return f"features: {self.out} is complete with the same settings ({self.n_examples} examples); skipped"
        return (f"features: {self.n_examples} examples × {self.dim} dims in {self.out} "
                f"({self.seconds:.1f}s, {self.examples_per_s:.2f} examples/s, {self.bytes_per_example} bytes/example)")


def _load(config: FeatureConfig, device: str, session: Session):
    """Model, tokenizer, identity and optimiser state for the config (checkpoint or plain model)."""
    if config.checkpoint and config.model and is_proxy_folder(config.model) and carries(config.checkpoint):
        ck = session.carried_checkpoint(config.model, config.checkpoint, config.dtype, device, config.trust_remote_code)
        ident = {"model": config.model, "checkpoint": config.checkpoint, "epoch": ck.info["epoch"], "lr": ck.info["lr"],
                 "trains": CARRIED, "model_hash": ck.identity}
        return ck.model, ck.tokenizer, ident, ck
    if config.checkpoint:
        ck = session.checkpoint(config.checkpoint, config.dtype, device, config.trust_remote_code)
        if config.model and config.model != EMBEDDED_MODEL and config.model != ck.info["model"] and \
                Path(config.model).resolve() != Path(ck.info["model"]).resolve():
            raise ValueError(f"--model {config.model} is not the checkpoint's model {ck.info['model']}")
        ident = {"model": ck.info["model"], "checkpoint": config.checkpoint, "epoch": ck.info["epoch"],
                 "lr": ck.info["lr"], "trains": ck.info["trains"], "model_hash": ck.identity}
        return ck.model, ck.tokenizer, ident, ck
    model, tok = session.model(config.model, config.dtype, device, config.trust_remote_code, pristine=True)
    identity = session.identity(config.model, config.dtype, device, config.trust_remote_code)
    return model, tok, {"model": config.model, "checkpoint": "", "epoch": 0, "lr": None, "trains": None,
                        "model_hash": identity}, None


def carries(checkpoint: str | Path) -> bool:
    """Whether a checkpoint is a LoRA warm-up of a plain model (a target), which a proxy of that
    target can carry (the target-first order), rather than a warm-up of a proxy itself."""
    info = read_checkpoint_info(checkpoint)
    return bool(info["lora"]) and not is_proxy_folder(info["model"])


def compute_features(config: FeatureConfig, session: Session | None = None) -> FeatureSummary:
    """Featurises ``config.data`` into the store ``config.out``; resumes at the first missing shard.

    Under torchrun every rank calls this with the same config; each computes its share of shards.

    Args:
        config: the stage's settings.
        session: models and tokenised data shared with other stages of this process (``iprox
            run``): a checkpoint's tensors are copied into the resident model instead of loading it.
    """
    rank, world = dist_world()
    out = Path(config.out)
    cfg = asdict(config)

    def prepare() -> bool:
        if config.checkpoint:
            read_checkpoint_info(config.checkpoint)
            check_data_paths(config.data)
        else:
            config.check_inputs()
        skip = artifacts.prepare_stage(out, "features", cfg, config.overwrite, resumable=True)
        if skip and (out / MANIFEST_FILE).is_file() and \
                artifacts.read_json(out / MANIFEST_FILE, "store manifest").get("format_version") != STORE_FORMAT_VERSION:
            # A complete store of an older format (another projection scheme): made again, not refused.
            log.warning("features: %s holds a store of an older format; recomputing it", out)
            shutil.rmtree(out)
            skip = artifacts.prepare_stage(out, "features", cfg, config.overwrite, resumable=True)
        return skip

    # Decided on rank 0; a refusal there reaches every rank, which raises with its reason (torchrun's
    # agent would end the other ranks anyway, but another launcher might leave them waiting).
    if on_rank0(prepare):
        man = read_manifest(out)
        return FeatureSummary(str(out), man["n_examples"], man["dim"], True, 0.0, 0.0, man["bytes_per_example"])
    if rank == 0:
        log.info("features config: %s", json.dumps(artifacts.comparable(cfg)))
    device = rank_device(config.device or default_device())
    session = session or Session(keep=False)
    model, tok, ident, ck = _load(config, device, session)
    model.eval()
    modules = feature_modules(model)
    # Projections and preconditioners stay float32 whatever the model's dtype: the hooks cast them
    # to the activations' dtype for the projection and accumulate the outer products in float32.
    per_layer = layer_dim(config, len(modules))
    projections = make_projections(modules, per_layer, config.seed, torch.float32, device)
    info = ck.info if ck else {}
    preconds = make_preconditioners(config.grad, modules, ck.exp_avg if ck else None, ck.exp_avg_sq if ck else None,
                                    tuple(info.get("betas", (0.9, 0.999))), info.get("eps", 1e-8))
    if config.engine == "representation":
        engine = RepresentationEngine(model)
        projections = {}
    else:
        engine_cls = KroneckerEngine if config.engine == "kronecker" else DenseEngine
        engine = engine_cls(model, modules, projections, preconds)

    tokd, stats = session.tokenized(tok, config.data, config.max_length)
    if not tokd:
        raise ValueError(f"features: no example in {config.data} has a response token within max_length {config.max_length}")
    ids = [t.id for t in tokd]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"example ids must be unique within a store; {dup!r} repeats")
    n_shards = max(1, -(-len(tokd) // config.shard_size))
    mine = [i for i in range(n_shards) if i % world == rank]
    todo = []
    for i in mine:
        path = out / shard_name(i)
        want = ids[i * config.shard_size:(i + 1) * config.shard_size]
        if path.exists() and _shard_ids(path) == want:
            continue
        todo.append(i)
    if len(todo) < len(mine):
        log.info("features: %d of %d shards already on disk; resuming", len(mine) - len(todo), len(mine))
    store_dtype = STORE_DTYPES[config.store_dtype]
    n_todo = sum(len(ids[i * config.shard_size:(i + 1) * config.shard_size]) for i in todo)
    t0 = time.perf_counter()
    from tqdm import tqdm

    bar = tqdm(total=n_todo, desc=f"features[{rank}]" if world > 1 else "features", unit="ex",
               disable=not config.progress)
    for i in todo:
        items = tokd[i * config.shard_size:(i + 1) * config.shard_size]
        rows: dict[str, torch.Tensor] = {}
        # Similar lengths batched together cut padding; rows go back to store order below.
        for b in batches(items, config.batch_size, sort_by_length=True):
            enc = collate(b, tok.pad_token_id, device)
            f = engine(enc).detach().to("cpu", store_dtype)
            for ex, row in zip(b, f):
                rows[ex.id] = row
            bar.update(len(b))
        _write_shard(out / shard_name(i), torch.stack([rows[t.id] for t in items]), [t.id for t in items])
    bar.close()
    seconds = time.perf_counter() - t0
    barrier()
    dim = engine.dim
    bpe = dim * torch.finfo(store_dtype).bits // 8
    if rank == 0:
        missing = [i for i in range(n_shards) if not (out / shard_name(i)).exists()]
        if missing:
            raise RuntimeError(f"features: shards {missing[:5]} are missing after all ranks finished")
        layout, off = [], 0
        if config.engine == "representation":
            layout.append({"name": "mean-pooled final hidden state", "k_out": 1, "k_in": dim, "offset": 0})
        for name, pr in projections.items():
            k_out, k_in = pr.P_out.shape[0], pr.P_in.shape[0]
            layout.append({"name": name, "k_out": k_out, "k_in": k_in, "offset": off})
            off += k_out * k_in
        manifest = {
            "format_version": STORE_FORMAT_VERSION, **ident,
            "grad": config.grad, "engine": config.engine,
            "proj_dim": per_layer, "total_dim": config.total_dim, "seed": config.seed, "dim": dim, "dtype": config.store_dtype,
            "bytes_per_example": bpe, "n_examples": len(ids), "ids": ids,
            "sources": [t.source for t in tokd], "tasks": [t.task for t in tokd],
            "dropped": stats.dropped_no_response, "layout": layout,
            # This process's compute on the shards it wrote (a resumed run counts only its own).
            "timing": {"rank0_seconds": round(seconds, 3), "rank0_examples": n_todo, "world_size": world},
            "shards": [{"file": shard_name(i), "start": i * config.shard_size,
                        "count": len(ids[i * config.shard_size:(i + 1) * config.shard_size]),
                        "crc32": _shard_crc(out / shard_name(i))} for i in range(n_shards)],
        }
        artifacts.atomic_write_json(out / MANIFEST_FILE, manifest)
        artifacts.mark_complete(out)
    barrier()
    rate = n_todo / seconds if seconds > 0 else 0.0
    return FeatureSummary(str(out), len(ids), dim, False, seconds, rate, bpe)
