"""``iprox run CONFIG.toml``: pool → compress → align → warm-up → features → scores → rerank → selection, resumably.

Every stage writes its own folder under the run directory (``pool/``, ``compressed/`` (stage 1),
``proxy/`` (the aligned proxy), ``warmup/``, ``features/train-<epoch>/`` and ``val-<epoch>/``
(``val-target-<epoch>/``: the target's validation gradients, with ``val_model``), ``scores/``,
``rerank/`` (the target's scores of the proxy's shortlist, and the reranked table), ``selection/``);
a stage complete
with the same settings is skipped, an unfinished one resumes (the stages themselves resume from
their last shard, checkpoint or epoch).

A changed setting invalidates its stage and every stage after it. ``pipeline.json`` in the run
folder holds a fingerprint per stage, each hashing the stage's settings and the fingerprint of the
stage before (compress chains from the pool's content instead, and the validation set enters
between the pool's features and score, so another target task keeps the proxy); a rerun whose
fingerprints differ from the folders on disk is refused unless ``overwrite`` is set, in which case
the changed stage and the ones after it are rebuilt.

Config (TOML; relative data paths are relative to the config file, ``{data}`` expands to the
shared data folder, ``out`` is relative to the working directory)::

    [run]
    out = "runs/demo"
    model = "smollm2-135m-instruct"   # the target
    selector = "proxy"                # proxy (IProX) | model (LESS) | representation (RDS+) | random
    selector_model = ""               # model / representation: featurise this model (default: the target)
    warmup_on = "target"              # target (default): the target warms up (LoRA, as LESS) and the
                                      # proxy carries its checkpoints (the paper's order); proxy: the
                                      # proxy warms up itself ([warmup] proxy_trains)
    seed = 0
    dtype = "auto"                    # every model-running stage: float32 | bfloat16 (bf16) | float16 | auto
                                      # (auto: bf16 on a GPU that has it, else float32); a section's own
                                      # dtype wins
    [data]
    pool = [{path = "{data}/gsm8k/train.jsonl", sample = 120}, "{data}/bbh/tasks"]
    validation = [{path = "{data}/bbh/tasks/navigate.json", sample = 4}]
    max_length = 384
    [proxy]     # ProxyConfig fields: the compress stage's (sparsity, init, probe_*, ...) and the align
                # stage's (align_steps, lambda_kl, ...); changing only the latter keeps compressed/
    [warmup]    # WarmupConfig fields (fraction, epochs, lr, ...)
    [features]  # FeatureConfig fields, plus train_grad (default adam: LESS's elementwise Adam, exact)
                # and val_model (proxy | target | both: which model's gradients of the validation
                # examples score the pool; target and both need the target-first order) and
                # calibrate (N pool examples featurised by the target too, whose errors correct the
                # proxy's pool features; target-first order; default min(32, a tenth of the pool); 0: off)
    [score]     # method, aggregate, checkpoint_weights, damping
    [rerank]    # fraction: the share of the pool, the head of each subtask's column of the proxy's
                # scores, that the target scores again, placed above the rest in the target's order
                # ("auto", the default in the target-first order with tracin: 3 times the selection;
                # 0: off); max_growth: where the target's top k reach the shortlist's last fifth, it
                # doubles, up to this many times its first length (default 2; 1: never); rest_order:
                # the scores that order the pool below it ("target": against the target's validation
                # gradients alone, the default with val_model "both"; "run": the run's); see iprox.rerank
    [select]    # fraction or top_k
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from . import artifacts
from .data import find_shared_data
from .distributed import barrier, on_rank0
from .distributed import world as dist_world
from .alignment import ALIGN_FIELDS, align_proxy
from .calibration import calibration_size, calibration_subset
from .features import FeatureConfig, compute_features
from .projection import GRADS
from .loading import LOADS, STORE_FORMAT_VERSION
from .session import Session
from .models import EMBEDDED_MODEL, resolve_dtype
from .runtime import check_types, section_config
from .monitor import PeakRSS
from .pool import PoolConfig, content_digests, source_spec, write_pool
from .proxy import ProxyConfig, build_proxy
from .rerank import (DEFAULT_GROWTH, check_fraction, check_growth, format_rerank, rerank_rounds, shortlist_size,
                     warn_if_short, write_shortlist)
from .scores import ScoreConfig, compute_scores, random_scores, read_score_result, score, write_scores_folder
from .selection import SelectConfig, format_selection, select_into, selection_size
from .warmup import WarmupConfig, run_warmup

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
# The pool's features: LESS's elementwise Adam, exact on the fast engine (the row × column
# factored-adam ranked the pool at Spearman 0.85 against it; see BENCHMARKS.md).
DEFAULT_TRAIN_GRAD = "adam"
# Whose gradients of the validation examples the proxy's pool features are compared with: the proxy's
# own, the target's (it carries the same LoRA checkpoint in the target-first order, so both are
# gradients of one adapter in one projection: only the pool, where the cost is, goes through the
# proxy), or both (the two scores summed).
VAL_MODELS = ("proxy", "target", "both")
DEFAULT_VAL_MODEL = "both"
# proxy: IProX (or, with [proxy] init/align settings, the svd / layer-drop / unaligned baselines);
# model: LESS on a model itself (the target, or an off-the-shelf smaller model in selector_model);
# representation: RDS+ (cosine of mean-pooled final hidden states of selector_model); random.
SELECTORS = ("proxy", "model", "representation", "random")
STAGES = ("pool", "compress", "align", "warmup", "features", "score", "rerank", "select")
SECTIONS = {"run", "data", "proxy", "warmup", "features", "score", "rerank", "select"}


@dataclass
class RunConfig:
    """A resolved pipeline config (see the module docstring for the TOML form)."""

    out: str
    model: str = EMBEDDED_MODEL
    selector: str = "proxy"
    selector_model: str = ""
    warmup_on: Literal["proxy", "target"] = "target"
    seed: int = 0
    pool: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    max_length: int = 512
    proxy: dict = field(default_factory=dict)
    warmup: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)
    score: dict = field(default_factory=dict)
    rerank: dict = field(default_factory=dict)
    select: dict = field(default_factory=lambda: {"fraction": 0.05})
    device: str = ""
    dtype: str = "float32"
    progress: bool = True

    def __post_init__(self):
        try:
            check_types(self)
        except ValueError as e:
            raise ValueError(f"[run] {e}") from None
        self.dtype = resolve_dtype(self.dtype, self.device)
        if self.selector not in SELECTORS:
            raise ValueError(f"[run] selector must be one of {SELECTORS}, got {self.selector!r}")
        if not str(self.out).strip():
            raise ValueError("[run] out must name the run folder")
        pool = PoolConfig(pool=self.pool, validation=self.validation, seed=self.seed)  # checks [data]
        self.pool, self.validation = pool.pool, pool.validation
        # Let each stage config check its own section now, before any work starts.
        if self.max_length < 8:
            raise ValueError(f"[data] max_length must be >= 8 (a prompt and a response), got {self.max_length}")
        feats = dict(self.features)
        train_grad = feats.pop("train_grad", DEFAULT_TRAIN_GRAD)
        if train_grad not in GRADS:
            raise ValueError(f"[features] train_grad must be one of {GRADS}, got {train_grad!r}")
        given_val = feats.pop("val_model", None)
        if given_val is not None and given_val not in VAL_MODELS:
            raise ValueError(f"[features] val_model must be one of {VAL_MODELS}, got {given_val!r}")
        if given_val not in (None, "proxy") and not (self.selector == "proxy" and self.warmup_on == "target"):
            raise ValueError(f'[features] val_model = "{given_val}" compares the proxy\'s pool gradients with the '
                             f'target\'s, which needs selector = "proxy" and warmup_on = "target" (the proxy then '
                             f'carries the target\'s LoRA checkpoints); leave val_model out otherwise')
        n_cal = feats.pop("calibrate", None)
        if n_cal is not None and (isinstance(n_cal, bool) or not isinstance(n_cal, int) or n_cal < 0):
            raise ValueError(f"[features] calibrate must be a number of pool examples (0: off), got {n_cal!r}")
        if n_cal and not (self.selector == "proxy" and self.warmup_on == "target"):
            raise ValueError('[features] calibrate corrects the proxy\'s pool features with the target\'s on a few '
                             'pool examples, which needs selector = "proxy" and warmup_on = "target" (the proxy then '
                             'carries the target\'s LoRA checkpoints); leave calibrate out otherwise')
        if n_cal and self.score.get("method", "tracin") != "tracin":
            raise ValueError("[features] calibrate corrects the features of cosine scores; it needs [score] method = "
                             "\"tracin\"")
        if "calibration" in self.score:
            raise ValueError("[score] calibration is the pipeline's (its calibration stores); set [features] calibrate "
                             "instead, and [score] calibration_ridge for the correction's ridge")
        if "grad" in feats:
            raise ValueError("[features] grad is set per store by the pipeline; use train_grad for the pool's stores")
        unknown = sorted(set(self.rerank) - {"fraction", "max_growth", "rest_order"})
        if unknown:
            raise ValueError(f"[rerank] has unknown settings {unknown}; it takes fraction, max_growth and rest_order")
        if self.rerank.get("rest_order", "run") not in ("run", "target"):
            raise ValueError(f'[rerank] rest_order must be "target" (the pool below the shortlist ordered by its scores '
                             f'against the target\'s validation gradients) or "run" (by the run\'s scores), got '
                             f'{self.rerank["rest_order"]!r}')
        if self.rerank.get("rest_order") == "target" and val_model(self) == "proxy":
            raise ValueError('[rerank] rest_order = "target" orders the pool below the shortlist by its scores against the '
                             'target\'s validation gradients, which need [features] val_model = "both" or "target"')
        fraction = self.rerank.get("fraction")
        if fraction is not None:
            check_fraction(fraction)
        if "max_growth" in self.rerank:
            check_growth(self.rerank["max_growth"])
        if fraction and not (self.selector == "proxy" and self.warmup_on == "target"):
            raise ValueError('[rerank] scores the proxy\'s shortlist again with the target at the same LoRA checkpoints, '
                             'which needs selector = "proxy" and warmup_on = "target"; leave [rerank] out otherwise')
        if fraction and self.score.get("method", "tracin") != "tracin":
            raise ValueError('[rerank] needs [score] method = "tracin" (the influence-function variant\'s second moment '
                             'is the whole pool\'s, which the target does not featurise)')
        checks = (("proxy", ProxyConfig, {"data": ["x"]}, self.proxy),
                  ("warmup", WarmupConfig, {"data": ["x"], "out": "x"}, self.warmup),
                  # checkpoint_weights are checked against the warm-up's epochs below
                  ("score", ScoreConfig, {"train": ["x"], "val": ["x"], "out": "x"},
                   {k: v for k, v in self.score.items() if k != "checkpoint_weights"}),
                  ("features", FeatureConfig, {"data": ["x"], "out": "x", "checkpoint": "x", "grad": train_grad}, feats),
                  ("select", SelectConfig, {"scores": "x", "data": ["x"], "out": "x"}, self.select))
        built = {name: section_config(name, cls, values, **given) for name, cls, given, values in checks}
        if self.selector == "proxy" and built["proxy"].align_space == "lora" and not built["proxy"].align_checkpoint \
                and self.warmup_on != "target":
            raise ValueError('[proxy] align_space = "lora" aligns in the adapters of the target\'s LoRA warm-up, '
                             'which needs [run] warmup_on = "target" (or an align_checkpoint of its own)')
        if self.selector == "proxy" and self.warmup_on == "target" and built["proxy"].init == "layer-drop":
            raise ValueError('[proxy] init = "layer-drop" drops whole blocks, which cannot carry the target\'s LoRA '
                             'warm-up; set [run] warmup_on = "proxy" for this baseline')
        weights = self.score.get("checkpoint_weights", "auto")
        n_ckpt = built["warmup"].epochs if self.selector in ("proxy", "model") else 1
        try:
            ScoreConfig(train=["x"] * n_ckpt, val=["x"] * n_ckpt, out="x", checkpoint_weights=weights)
        except (ValueError, TypeError) as e:
            raise ValueError(f"[score] {e}") from None
        if isinstance(weights, list) and self.selector in ("proxy", "model") and len(weights) != built["warmup"].epochs:
            raise ValueError(f"[score] checkpoint_weights has {len(weights)} weights but [warmup] epochs = "
                             f"{built['warmup'].epochs} makes {built['warmup'].epochs} checkpoints")


def aligns_in_own_warmup(cfg: RunConfig) -> bool:
    """Whether the proxy aligns in the LoRA space of the run's own target warm-up, which then runs
    before the proxy is built."""
    return (cfg.selector == "proxy" and cfg.proxy.get("align_space") == "lora"
            and not cfg.proxy.get("align_checkpoint"))


def stages(cfg: RunConfig) -> tuple[Stage, ...]:
    """The run's stages, in order: its selector's; the target's warm-up first when the alignment
    runs in its adapters' space (:func:`aligns_in_own_warmup`); the rerank before the selection
    when it is on (:func:`rerank_fraction`)."""
    order = PIPELINES[cfg.selector]
    if aligns_in_own_warmup(cfg):
        rest = [st for st in order if st is not WARMUP]
        i = rest.index(COMPRESS)
        order = tuple(rest[:i] + [WARMUP] + rest[i:])
    if rerank_fraction(cfg):
        i = order.index(SELECT)
        order = order[:i] + (RERANK,) + order[i:]
    return order


def val_model(cfg: RunConfig) -> str:
    """The run's validation model: ``[features] val_model``, or the default where the order allows it."""
    given = cfg.features.get("val_model")
    if given is not None:
        return given
    return DEFAULT_VAL_MODEL if cfg.selector == "proxy" and cfg.warmup_on == "target" else "proxy"


def calibrate(cfg: RunConfig) -> int | str:
    """The run's calibration examples: ``[features] calibrate``, or where the order allows it
    ``"auto"`` (:func:`iprox.calibration.calibration_size` of the pool, at the features stage; TracIn
    scores only: the correction is of the cosine's unit features)."""
    given = cfg.features.get("calibrate")
    if given is not None:
        return given
    on = cfg.selector == "proxy" and cfg.warmup_on == "target" and cfg.score.get("method", "tracin") == "tracin"
    return "auto" if on else 0


def rerank_fraction(cfg: RunConfig) -> float | str:
    """The run's ``[rerank] fraction``, or where the order allows it ``"auto"``; 0: no rerank stage."""
    given = cfg.rerank.get("fraction")
    if given is not None:
        return given
    on = cfg.selector == "proxy" and cfg.warmup_on == "target" and cfg.score.get("method", "tracin") == "tracin"
    return "auto" if on else 0


def rerank_rest(cfg: RunConfig) -> str:
    """Which scores order the pool below the rerank's shortlist (``[rerank] rest_order``): by default
    ``"target"`` (the pool's scores against the target's validation gradients alone) where the run
    scores against both models' (``val_model = "both"``), else ``"run"`` (the run's own scores)."""
    given = cfg.rerank.get("rest_order")
    if given is not None:
        return given
    return "target" if val_model(cfg) == "both" else "run"


def rerank_growth(cfg: RunConfig) -> float:
    """How many times its first length the rerank's shortlist may grow to (``[rerank] max_growth``)."""
    return cfg.rerank.get("max_growth", DEFAULT_GROWTH)


def _rerank_options(cfg: RunConfig) -> dict:
    """The rerank's settings since 0.14, each only where it differs from what the stage did before
    (so that ``max_growth = 1`` and ``rest_order = "run"`` keep a run made with 0.12 or 0.13 as it was)."""
    return {**({"max_growth": rerank_growth(cfg)} if rerank_growth(cfg) != 1 else {}),
            **({"rest_order": rerank_rest(cfg)} if rerank_rest(cfg) != "run" else {})}


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Reads a TOML config: resolves data paths against its folder and ``{data}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    unknown = sorted(set(raw) - SECTIONS)
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; known: {sorted(SECTIONS)}")
    for name in SECTIONS & set(raw):
        if not isinstance(raw[name], dict):
            raise ValueError(f"{path}: {name} must be a section [{name}], got {raw[name]!r}")
    run, data = raw.get("run", {}), raw.get("data", {})
    for key in ("pool", "validation"):
        if key in data and not isinstance(data[key], list):
            raise ValueError(f"{path}: [data] {key} must be a list of paths or {{path = ..., sample = N}}")
    if "out" not in run:
        raise ValueError(f"{path}: [run] needs out = \"<run folder>\"")
    bad = sorted(set(data) - {"pool", "validation", "max_length"})
    if bad:
        raise ValueError(f"{path}: [data] has unknown settings {bad}")

    def resolve(spec):
        spec = source_spec(spec, "data")
        p = spec["path"]
        if "{data}" in p:
            p = p.replace("{data}", str(find_shared_data()))
        if not p.startswith("hf:") and not Path(p).is_absolute():
            p = str((path.parent / p).resolve())
        return {**spec, "path": p}

    unknown_run = sorted(set(run) - {"out", "model", "selector", "selector_model", "warmup_on", "seed", "device", "dtype"})
    if unknown_run:
        raise ValueError(f"{path}: [run] has unknown settings {unknown_run}")
    kw = dict(run, pool=[resolve(s) for s in data.get("pool", [])],
              validation=[resolve(s) for s in data.get("validation", [])],
              max_length=data.get("max_length", 512),
              **{k: raw.get(k, {}) for k in ("proxy", "warmup", "features", "score", "rerank")})
    if "select" in raw:
        kw["select"] = raw["select"]
    kw.update(overrides or {})
    try:
        return RunConfig(**kw)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------------


# 2 (0.13): the stages that read only the pool hash its content, not the validation set's sources,
# and the validation set enters at its own key; 1: the validation set was part of the pool stage.
FINGERPRINT_VERSION = 2


def _fingerprints(cfg: RunConfig, run: Path, version: int = FINGERPRINT_VERSION) -> dict[str, str]:
    """One hash per stage over its settings and everything upstream of it.

    Version 2 chains compress, align, warm-up and features from the pool's content (the records the
    pool stage writes), so that other validation examples leave them as they are; the validation
    set's content enters at the key ``validation`` (the validation stores), which score and the
    stages after it chain from. Version 1 is how runs made before it were fingerprinted."""
    # settings that change only how a stage runs (device, recomputation, ...) stay out
    proxy = artifacts.comparable(cfg.proxy) if cfg.selector == "proxy" else None
    sections = {
        "pool": PoolConfig(pool=cfg.pool, validation=cfg.validation, seed=cfg.seed).settings(),
        "compress": {"model": cfg.model, "selector": cfg.selector, "selector_model": cfg.selector_model,
                     "proxy": proxy and {k: v for k, v in proxy.items() if k not in ALIGN_FIELDS},
                     "max_length": cfg.max_length,
                     # only a non-default dtype enters the hash
                     **({"dtype": cfg.dtype} if cfg.dtype != "float32" else {})},
        "align": proxy and {k: v for k, v in proxy.items() if k in ALIGN_FIELDS},
        # the proxy-first order (the only one before warmup_on existed) stays out of the hash, so runs
        # made then still match when they ask for it
        "warmup": cfg.warmup if cfg.warmup_on == "proxy" or cfg.selector != "proxy" else {**cfg.warmup, "on": "target"},
        # the resolved validation model, when not the proxy itself (the only one before it was a choice)
        "features": {**{k: v for k, v in cfg.features.items() if k not in ("val_model", "calibrate")},
                     **({"val_model": val_model(cfg)} if val_model(cfg) != "proxy" else {}),
                     # (only when on: a proxy-first or LESS run made before it existed still matches)
                     **({"calibrate": calibrate(cfg)} if calibrate(cfg) else {}),
                     # a run whose stores an older format wrote (another projection) is refused
                     # here, so its scores are never mixed with new stores
                     "store_format": STORE_FORMAT_VERSION},
        "score": cfg.score,
        # (only when on, so that a run without it keeps its selection's fingerprint)
        "rerank": {"fraction": rerank_fraction(cfg), "select": cfg.select, **_rerank_options(cfg)}
        if rerank_fraction(cfg) else None,
        "select": cfg.select,
    }
    if aligns_in_own_warmup(cfg):  # the alignment reads the warm-up's last checkpoint
        sections["align"] = {**sections["align"], "warmup": sections["warmup"]}

    def chain(prev: str, section) -> str:
        return hashlib.sha256((prev + json.dumps(section, sort_keys=True)).encode()).hexdigest()[:16]

    out, prev = {}, ""
    if version >= 2:
        pool_digest, val_digest = content_digests(PoolConfig(pool=cfg.pool, validation=cfg.validation, seed=cfg.seed),
                                                  run / "pool")
    for st in STAGES:
        if version >= 2 and st == "compress":
            prev = pool_digest[:16]  # the pool stage's settings name the validation set too
        if version >= 2 and st == "score":
            prev = out["validation"] = chain(prev, {"validation": val_digest})
        if sections[st] is not None or st != "rerank":
            prev = chain(prev, sections[st])
        out[st] = prev
    return out


def _reset_accelerator_peak() -> bool:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    return False


def _accelerator_peak() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def _stage_dirs(run: Path) -> dict[str, list[Path]]:
    return {"pool": [run / "pool"], "compress": [run / "compressed"], "align": [run / "proxy"], "warmup": [run / "warmup"],
            "features": [run / "features"], "score": [run / "scores"], "rerank": [run / "rerank"],
            "select": [run / "selection"]}


def _validation_stores(run: Path) -> list[Path]:
    """The features stage's validation stores (the proxy's and the target's): what other validation
    examples change in it, beside the pool stores and the calibration stores they keep."""
    return sorted((run / "features").glob("val-*"))


def _holds_work(d: Path) -> bool:
    """A folder with only a stage's settings holds nothing to protect."""
    return d.exists() and (artifacts.is_complete(d) or any(
        p.name not in (artifacts.STAGE_FILE, "train_ids.json") and not p.name.startswith(".") for p in d.iterdir()))


def _check_lineage(cfg: RunConfig, run: Path, overwrite: bool) -> dict[str, str]:
    """Compares the run's fingerprints with the folder's record and removes what changed settings
    invalidate (with ``overwrite``; refused without). Returns the fingerprints to record.

    Other validation examples over the same pool invalidate only the validation stores and the
    stages from score on: the proxy, the warm-up and the pool's features are kept. A record of
    fingerprint version 1 (before 0.13) is compared in its own version, then recorded in this one."""
    new = _fingerprints(cfg, run)
    meta_path = run / PIPELINE_FILE
    record = artifacts.read_json(meta_path, "run record") if meta_path.exists() else {}
    old = record.get("fingerprints", {})
    cmp = new if record.get("fingerprint_version", 1) >= 2 or not old else _fingerprints(cfg, run, version=1)
    dirs = _stage_dirs(run)
    changed = [st for st in STAGES if old.get(st) not in (None, cmp[st]) and any(_holds_work(d) for d in dirs[st])]
    legacy = "proxy" in old and "compress" not in old  # before 0.5: one proxy stage, no compressed/
    if legacy and any(_holds_work(d) for st in STAGES[STAGES.index("align"):] for d in dirs[st]):
        if not overwrite:
            raise artifacts.ConfigMismatchError(
                f"{run} was made by iprox before 0.5, whose proxy was one stage (now compress and align); pass "
                f"--overwrite to rebuild it from the proxy on, or choose another [run] out")
        changed = ["compress"]
    # the validation stores sit between the features stage's pool stores and the score stage
    order = [*STAGES[:STAGES.index("score")], "validation", *STAGES[STAGES.index("score"):]]
    dirs["validation"] = _validation_stores(run)
    if old.get("validation") not in (None, cmp.get("validation")) and any(_holds_work(d) for d in dirs["validation"]):
        changed.append("validation")
    if changed:
        first = min(changed, key=order.index)
        remove = order[order.index(first):]
        if cmp is new and first == "pool":
            # in version 2 nothing chains from the pool stage's settings: the stages after it go only
            # where their own fingerprints (over the pool's content) changed
            rest = [st for st in changed if st != "pool"]
            first = min(rest, key=order.index) if rest else "pool"
            remove = ["pool"] + (order[order.index(first):] if rest else [])
        if not overwrite:
            what = (f"other validation examples: pass --overwrite to score the pool against them (the proxy, the "
                    f"warm-up and the pool's features are kept)" if first == "validation" else
                    f"other settings from stage '{first}' on; pass --overwrite to rebuild '{first}' and the stages "
                    f"after it")
            raise artifacts.ConfigMismatchError(f"{run} holds a run made with {what}, or choose another [run] out")
        for st in remove:
            for d in dirs[st]:
                if d.exists():
                    log.warning("run: removing %s (settings changed upstream or here)", d)
                    shutil.rmtree(d)
        if first == "validation" and "features" in record.get("timings", {}):
            # the features stage runs again (its validation stores): its time is this run's, not the record's
            record["timings"].pop("features")
            artifacts.atomic_write_json(meta_path, record)
    return new


def _reuse(cfg: RunConfig, out: Path, src: Path) -> list[str]:
    """Starts the new run folder ``out`` from the run folder ``src``: every finished stage there
    whose fingerprint equals this run's is copied in (:func:`artifacts.copy_finished`), the
    features stage's pool and calibration stores when only the validation examples differ. Returns
    the stages copied (``features`` when only its pool stores were)."""
    rec_path = src / PIPELINE_FILE
    if not rec_path.is_file():
        raise FileNotFoundError(f"--from {src}: no {PIPELINE_FILE} there; name the folder of an earlier `iprox run`")
    record = artifacts.read_json(rec_path, "run record")
    if record.get("fingerprint_version", 1) < 2:
        raise artifacts.ConfigMismatchError(
            f"--from {src}: its record predates iprox 0.13; run `iprox run` on its own config once (every stage is "
            f"skipped) to bring its record up to date (a run that reranked, made with 0.12: with [rerank] max_growth "
            f"= 1 and rest_order = \"run\" added to that config, as it was made)")
    theirs, mine = record.get("fingerprints", {}), _fingerprints(cfg, out)
    src_dirs, out_dirs = _stage_dirs(src), _stage_dirs(out)
    reused = []
    for st in STAGES:
        if theirs.get(st) != mine[st]:
            continue
        if st == "features":  # one folder per store
            keep_val = theirs.get("validation") == mine["validation"]
            stores = [d for d in sorted((src / "features").glob("*")) if d.is_dir() and artifacts.is_complete(d)
                      and (keep_val or d not in _validation_stores(src))]
            extra = list((src / "features").glob("*.jsonl"))  # the calibration subset
            for d in stores + extra:
                artifacts.copy_finished(d, out / "features" / d.name, src, out)
            if stores:
                reused.append(st)
            continue
        if all(artifacts.is_complete(d) for d in src_dirs[st]):
            for a, b in zip(src_dirs[st], out_dirs[st]):
                artifacts.copy_finished(a, b, src, out)
            reused.append(st)
    if reused:
        artifacts.atomic_write_json(out / PIPELINE_FILE, {
            "fingerprints": {st: mine[st] for st in reused} | ({"validation": mine["validation"]}
                                                               if "score" in reused else {}),
            "fingerprint_version": FINGERPRINT_VERSION, "reused_from": str(src.resolve()), "reused": reused})
        log.info("run: reusing %s from %s", ", ".join(reused), src)
    else:
        log.warning("run: nothing in %s matches this run's settings and data; every stage runs", src)
    return reused


@dataclass
class RunResult:
    out: Path
    selection: dict
    timings: dict[str, float]
    agreement: dict | None = None  # scores.json's calibration estimate, when the run is calibrated
    rerank: dict | None = None     # the rerank's report, when the run reranks (iprox.rerank)
    reused: tuple[str, list[str]] | None = None  # (the run folder it started from, the stages copied)

    def format(self) -> str:
        lines = [format_selection(self.selection), "stage times: " +
                 ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items())]
        a = self.agreement
        if a:
            fmt = lambda d: ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in d.items())  # noqa: E731
            lines.append(f"agreement with the target, estimated over the {a['examples']} calibration examples (whole "
                         f"pool, Spearman): {fmt(a['spearman'])} (uncalibrated {fmt(a['uncalibrated_spearman'])})")
        if self.rerank:
            lines.append(format_rerank(self.rerank))
        if self.reused:
            lines.append(f"started from {self.reused[0]}: its {', '.join(self.reused[1])} reused")
        lines.append(f"selected records: {self.out / 'selection' / 'selected.jsonl'}")
        lines.append(f"scores:           {self.out / ('rerank/scores' if self.rerank else 'scores') / 'scores.csv'}")
        return "\n".join(lines)


def run(config: RunConfig | str | Path, overwrite: bool = False, session: Session | None = None,
        reuse: str | Path | None = None) -> RunResult:
    """Runs (or resumes) the whole pipeline; returns the selection manifest and stage times.

    ``reuse``: an earlier run folder to start a new one from (``iprox run --from``): its finished
    stages whose settings and inputs equal this run's are copied, not recomputed; with the same pool
    and other validation examples, that is the proxy, the warm-up and the pool's features.

    Each model is loaded once: the target for stage 1 and 2 (then released), the proxy (or the
    selector model) from the warm-up through every checkpoint's features, with each checkpoint's
    trained tensors copied into it in place; the pool is read and tokenised once. With the rerank the
    target stays resident beside the proxy until it has scored the shortlist (the two together take
    less memory than the target's own feature passes, which come first).
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    out = Path(cfg.out)
    rank, _ = dist_world()
    # One run per folder at a time: a second is refused with the holder's PID, not left to race.
    # Under torchrun the ranks are one run: rank 0 holds the lock for all of them.
    lock = artifacts.FolderLock(out)

    def acquire() -> None:
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"[run] out {out} is a file; choose a folder")
        out.mkdir(parents=True, exist_ok=True)
        lock.__enter__()

    on_rank0(acquire)
    try:
        return _run_locked(cfg, out, overwrite, session or Session(), rank, Path(reuse) if reuse else None)
    finally:
        if rank == 0:
            lock.__exit__(None, None, None)


def _run_locked(cfg: RunConfig, out: Path, overwrite: bool, session: Session, rank: int = 0,
                reuse: Path | None = None) -> RunResult:
    def start():
        # Under the lock no other process writes here, so a temporary file is what a killed run left
        # between writing and renaming it. (Temporary *folders* are the stages' own resume points.)
        for tmp in out.rglob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink()
        if reuse is not None:
            if (out / PIPELINE_FILE).exists():
                raise artifacts.ConfigMismatchError(
                    f"--from {reuse}: {out} holds a run already; --from starts a new run folder")
            _reuse(cfg, out, reuse)
        fps = _check_lineage(cfg, out, overwrite)
        old = artifacts.read_json(out / PIPELINE_FILE, "run record") if (out / PIPELINE_FILE).exists() else {}
        artifacts.atomic_write_json(out / PIPELINE_FILE, {
            "fingerprints": fps, "fingerprint_version": FINGERPRINT_VERSION, "config": dataclasses.asdict(cfg),
            **{k: old[k] for k in ("reused_from", "reused") if k in old}})
        return old

    old = on_rank0(start)
    # Stages finished by an earlier invocation keep the time and memory they took then, so the
    # record describes the run, not the last (skipping) invocation.
    # A stage counts as done before this invocation when its folder is complete; features, whose
    # stores are one folder each, when every store there is. (A stage's time is kept from an earlier
    # invocation only if that invocation recorded it, i.e. finished the stage.)
    done_before = {st: all(artifacts.is_complete(d) for d in ds) for st, ds in _stage_dirs(out).items()}
    stores = [d for d in (out / "features").glob("*") if d.is_dir()]
    done_before["features"] = bool(stores) and all(artifacts.is_complete(d) for d in stores)
    timings: dict[str, float] = {}
    peaks: dict[str, float] = {}
    accel_peaks: dict[str, float] = dict(old.get("peak_accelerator_gib", {}))
    overheads: dict[str, float] = dict(old.get("model_load_s", {}))
    loads_at_start = Counter(LOADS)

    def LOADS_IN_RUN():  # noqa: N802  (model loads from disk during this invocation)
        return {k: v - loads_at_start.get(k, 0) for k, v in LOADS.items() if v > loads_at_start.get(k, 0)}
    # --overwrite reaches every stage: a folder whose settings differ only in where it lives (a moved
    # run) is rebuilt rather than refused.
    common = {"device": cfg.device, "progress": cfg.progress, "overwrite": overwrite}
    dtype = {"dtype": cfg.dtype}  # a section's own dtype overrides it

    def timed(name, fn):
        t0 = time.perf_counter()
        accel = _reset_accelerator_peak()
        overhead0 = session.overhead_s
        with PeakRSS() as mem:
            res = fn()
        if done_before[name] and name in old.get("timings", {}):
            timings[name], peaks[name] = old["timings"][name], old.get("peak_rss_gib", {}).get(name, 0.0)
        else:
            timings[name] = round(time.perf_counter() - t0, 2)
            peaks[name] = round(mem.peak, 3)
            overheads[name] = round(session.overhead_s - overhead0, 2)
            if accel:
                accel_peaks[name] = round(_accelerator_peak(), 3)
        meta = json.loads((out / PIPELINE_FILE).read_text()) if rank == 0 else {}
        # peak RSS during each stage (a skipped stage keeps its earlier figure)
        # model_load_s: the part of each stage's time spent loading models and hashing their
        # weights (a fixed cost: it does not grow with the pool)
        meta.update(timings=timings, model_load_s=overheads, peak_rss_gib=peaks, loads=dict(LOADS_IN_RUN()))
        if accel_peaks:
            meta["peak_accelerator_gib"] = accel_peaks
        if rank == 0:  # (rank 0's own time and memory stand for the run's)
            artifacts.atomic_write_json(out / PIPELINE_FILE, meta)  # after every stage: survives interruption
        barrier()
        return res

    feats = dict(cfg.features)
    train_grad = feats.pop("train_grad", DEFAULT_TRAIN_GRAD)
    feats.pop("val_model", None)
    feats.pop("calibrate", None)
    feats.setdefault("seed", cfg.seed)
    feats.setdefault("max_length", cfg.max_length)
    ctx = _Context(cfg, out, session, overwrite, common, dtype, feats, train_grad, val_model(cfg), calibrate(cfg))
    for stage in stages(cfg):
        timed(stage.name, lambda: stage.run(ctx))
    summary = Path(ctx.scores_csv).parent / "scores.json" if ctx.scores_csv else None
    meta = json.loads(summary.read_text()) if summary and summary.exists() else {}
    reused = (old["reused_from"], old["reused"]) if old.get("reused_from") else None
    return RunResult(out, ctx.manifest, timings, meta.get("calibration"), meta.get("rerank"), reused)


# ---------------------------------------------------------------------------------------------
# The stages of a run: each reads what the stages before it left in the context, runs its library
# stage (which prepares, skips or resumes its own folder) and leaves its outputs for the next.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Context:
    cfg: RunConfig
    out: Path
    session: Session
    overwrite: bool
    common: dict
    dtype: dict
    feats: dict
    train_grad: str
    val_model: str
    calibrate: int | str         # a number of pool examples, or "auto"
    pool_file: Path | None = None
    val_file: Path | None = None
    feature_model: str = ""      # the model whose features score the pool
    warm_model: str = ""         # the model the warm-up trains (the target in the target-first order)
    checkpoints: list[Path] = field(default_factory=list)
    train_stores: list[str] = field(default_factory=list)
    val_stores: list[str] = field(default_factory=list)
    calib_stores: list[str] = field(default_factory=list)  # per pair: the target's calibration store, or ""
    target_val_stores: list[str] = field(default_factory=list)  # per checkpoint: the target's validation store
    scores_csv: Path | None = None
    manifest: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """One step of ``iprox run``: its name (the key of its time, memory and fingerprint in
    ``pipeline.json``) and what it does."""

    name: str
    run: Callable[[_Context], None]


def _pool(ctx: _Context) -> None:
    cfg = PoolConfig(pool=ctx.cfg.pool, validation=ctx.cfg.validation, seed=ctx.cfg.seed, out=str(ctx.out / "pool"))
    ctx.pool_file, ctx.val_file = on_rank0(lambda: write_pool(cfg))


def _proxy_config(ctx: _Context, out: str, **over) -> ProxyConfig:
    cfg = ctx.cfg
    return ProxyConfig(**{"seed": cfg.seed, "max_length": cfg.max_length, **ctx.dtype, **cfg.proxy, "model": cfg.model,
                          "data": [str(ctx.pool_file)], "out": str(ctx.out / out), **ctx.common, **over})


def _compress(ctx: _Context) -> None:
    """Stage 1 alone: the alignment's settings are left at their defaults here (they are the align
    stage's), so changing one of them keeps the compressed proxy."""
    defaults = {f.name: f.default for f in dataclasses.fields(ProxyConfig) if f.name in ALIGN_FIELDS}
    build_proxy(_proxy_config(ctx, "compressed", **{**defaults, "align_steps": 0, "align_epochs": 0.0}),
                session=ctx.session)


def _align(ctx: _Context) -> None:
    cfg = ctx.cfg
    # in the LoRA space of the run's own warm-up (which ran first): its last checkpoint's adapters
    own = {"align_checkpoint": str(ctx.checkpoints[-1])} if aligns_in_own_warmup(cfg) else {}
    log.info("%s", align_proxy(_proxy_config(ctx, "proxy", **own), ctx.out / "compressed", ctx.session).format())
    ctx.feature_model = str(ctx.out / "proxy")
    # target-first: the target's LoRA warm-up, carried by the proxy for the features
    ctx.warm_model = cfg.model if cfg.warmup_on == "target" else ctx.feature_model
    if cfg.warmup_on == "proxy":
        ctx.session.drop(cfg.model)  # the target is not needed past stage 2


def _warmup(ctx: _Context) -> None:
    cfg = ctx.cfg
    if cfg.selector == "proxy" and not ctx.warm_model:  # the target's, before the proxy is built
        ctx.warm_model = cfg.model
    elif not ctx.feature_model:  # LESS on a model itself
        ctx.feature_model = ctx.warm_model = cfg.selector_model or cfg.model
    wcfg = WarmupConfig(**{"seed": cfg.seed, "max_length": cfg.max_length, **ctx.dtype, **cfg.warmup,
                           "model": ctx.warm_model, "data": [str(ctx.pool_file)], "out": str(ctx.out / "warmup"),
                           **ctx.common})
    ctx.checkpoints = run_warmup(wcfg, ctx.session)  # (a target warmed up here is released by _features)


def _features(ctx: _Context) -> None:
    """Each checkpoint's pool store, and validation stores from the proxy, the target or both; a
    pool store is paired with each of its checkpoint's validation stores (``both``: two pairs, whose
    scores add up). With ``calibrate``, the target's features of a seeded subset of the pool too
    (``calib-target-<epoch>``), which correct the proxy's pool store when it is scored."""
    def store(kind: str, model: str, ck: Path, data: Path, grad: str) -> str:
        return _store(ctx, ctx.out / "features" / f"{kind}-{ck.name.split('-')[1]}", model, ck, data, grad)

    # the target's validation stores first, while it is resident from its warm-up; then it goes
    target_val = [store("val-target", ctx.cfg.model, ck, ctx.val_file, "sgd") for ck in ctx.checkpoints] \
        if ctx.val_model in ("target", "both") else []
    ctx.target_val_stores = target_val
    calib = []
    n_cal = 0
    if ctx.calibrate:
        n_pool = on_rank0(lambda: sum(1 for ln in Path(ctx.pool_file).open(encoding="utf-8") if ln.strip()))
        n_cal = calibration_size(None if ctx.calibrate == "auto" else ctx.calibrate, n_pool)
        log.info("calibration: the target featurises %d of the %d pool examples too", n_cal, n_pool)
    if n_cal:
        subset = on_rank0(lambda: calibration_subset(ctx.pool_file, n_cal, ctx.cfg.seed,
                                                     ctx.out / "features" / "calibration.jsonl"))
        calib = [store("calib-target", ctx.cfg.model, ck, subset, ctx.train_grad) for ck in ctx.checkpoints]
    if ctx.warm_model != ctx.feature_model and not rerank_fraction(ctx.cfg):  # (the rerank needs it again)
        ctx.session.drop(ctx.cfg.model)
    for i, ck in enumerate(ctx.checkpoints):
        train = store("train", ctx.feature_model, ck, ctx.pool_file, ctx.train_grad)
        vals = [store("val", ctx.feature_model, ck, ctx.val_file, "sgd")] if ctx.val_model != "target" else []
        vals += target_val[i:i + 1]
        ctx.train_stores += [train] * len(vals)
        ctx.val_stores += vals
        ctx.calib_stores += [calib[i] if calib else ""] * len(vals)


def _store(ctx: _Context, out: Path, model: str, ck: Path, data: Path, grad: str) -> str:
    """One feature store: ``model`` at checkpoint ``ck`` on ``data``, in folder ``out``."""
    fc = FeatureConfig(**{**ctx.dtype, **ctx.feats, "model": model, "checkpoint": str(ck),
                          "data": [str(data)], "out": str(out), "grad": grad, **ctx.common})
    log.info("%s", compute_features(fc, ctx.session).format())
    return str(out)


def _represent(ctx: _Context) -> None:
    """RDS+: mean-pooled final hidden states of the selector model, no gradients."""
    cfg = ctx.cfg
    for data, kind, dest in ((ctx.pool_file, "train", ctx.train_stores), (ctx.val_file, "val", ctx.val_stores)):
        fc = FeatureConfig(**{**ctx.dtype, **ctx.feats, "model": cfg.selector_model or cfg.model, "data": [str(data)],
                              "out": str(ctx.out / "features" / kind), "engine": "representation", **ctx.common})
        log.info("%s", compute_features(fc, ctx.session).format())
        dest.append(str(ctx.out / "features" / kind))


def _score_config(ctx: _Context, out: Path, keep: list[int] | None = None) -> ScoreConfig:
    """The scoring of the run's (pool store, validation store) pairs, or of the pairs ``keep`` alone."""
    cfg = ctx.cfg
    # representation scores take only the aggregate from [score]: cosine similarity has no method
    settings = cfg.score if cfg.selector != "representation" else {"aggregate": cfg.score.get("aggregate", "max")}
    pairs = len(ctx.val_stores) // max(len(ctx.checkpoints), 1)
    weights = settings.get("checkpoint_weights", "auto")
    if weights != "auto" and pairs > 1:  # each checkpoint's weight on each of its pairs
        weights = [float(w) for w in weights.split(",")] if isinstance(weights, str) else weights
        settings = {**settings, "checkpoint_weights": [w for w in weights for _ in range(pairs)]}
    train, val, calib = ctx.train_stores, ctx.val_stores, ctx.calib_stores
    if keep is not None:
        train, val, calib = [train[i] for i in keep], [val[i] for i in keep], [calib[i] for i in keep]
        if isinstance(settings.get("checkpoint_weights"), list):
            settings = {**settings, "checkpoint_weights": [settings["checkpoint_weights"][i] for i in keep]}
    if any(calib):
        settings = {**settings, "calibration": calib}
    return ScoreConfig(**{**settings, "train": train, "val": val, "out": str(out), "progress": cfg.progress,
                          "overwrite": ctx.overwrite})


def _score(ctx: _Context) -> None:
    ctx.scores_csv = score(_score_config(ctx, ctx.out / "scores"))  # streaming, each rank its share of the shards


def _rest_scores(ctx: _Context):
    """With ``[rerank] rest_order = "target"`` and validation stores of both models: the pool scored
    against the target's validation gradients alone, the order the rerank keeps below its shortlist;
    else ``None`` (the run's own scores order it)."""
    if rerank_rest(ctx.cfg) != "target" or ctx.val_model != "both":
        return None
    keep = [i for i, v in enumerate(ctx.val_stores) if v in set(ctx.target_val_stores)]
    return compute_scores(_score_config(ctx, ctx.out / "rerank" / "unused", keep), report_agreement=False)


def _rerank(ctx: _Context) -> None:
    """The target featurises the proxy's shortlist at each checkpoint (and, without its validation
    stores from the features stage, the validation examples), LESS scores it, and the shortlist goes
    above the rest of the pool in the target's order (:mod:`iprox.rerank`); the shortlist grows where
    the target's top k reach its end (round r > 1 of it in ``shortlist-r.jsonl``, ``target-<epoch>-r``,
    ``target-scores-r``)."""
    cfg, folder = ctx.cfg, ctx.out / "rerank"
    proxy = on_rank0(lambda: read_score_result(Path(ctx.scores_csv).parent))
    n = len(proxy.ids)
    k = selection_size(cfg.select.get("fraction", 0.0), cfg.select.get("top_k", 0), n)
    m = shortlist_size(rerank_fraction(cfg), n, k)
    growth = rerank_growth(cfg)
    settings = {"fraction": rerank_fraction(cfg), "shortlist": m, "k": k, "scores": str(ctx.scores_csv),
                **_rerank_options(cfg)}
    if not on_rank0(lambda: artifacts.prepare_stage(folder, "rerank", settings, ctx.overwrite, resumable=True)):
        epoch = lambda ck: ck.name.split("-")[1]  # noqa: E731
        val = ctx.target_val_stores or [_store(ctx, folder / f"val-target-{epoch(ck)}", cfg.model, ck, ctx.val_file,
                                               "sgd") for ck in ctx.checkpoints]
        settings_score = {k_: v for k_, v in cfg.score.items() if k_ != "calibration_ridge"}

        def score_target(ids: list[str], r: int):
            sfx = f"-{r + 1}" if r else ""
            log.info("rerank%s: the target featurises %s, %d of %d pool examples (%.1f%%: the head of each subtask's "
                     "column)", f" round {r + 1}" if r else "", "more of the proxy's order" if r else
                     "the proxy's shortlist", len(ids), n, 100 * len(ids) / n)
            short = on_rank0(lambda: write_shortlist(ctx.pool_file, ids, folder / f"shortlist{sfx}.jsonl"))
            train = [_store(ctx, folder / f"target-{epoch(ck)}{sfx}", cfg.model, ck, short, ctx.train_grad)
                     for ck in ctx.checkpoints]
            scores_dir = folder / f"target-scores{sfx}"
            score(ScoreConfig(**{**settings_score, "train": train, "val": val, "out": str(scores_dir),
                                 "progress": cfg.progress, "overwrite": ctx.overwrite}))
            return on_rank0(lambda: read_score_result(scores_dir))

        rest = _rest_scores(ctx)
        res, rep = rerank_rounds(proxy, k, m, growth, score_target, rest=rest)
        rep["rest_order"] = "target" if rest is not None else "run"

        def write() -> None:
            meta = artifacts.read_json(Path(ctx.scores_csv).parent / "scores.json", "scores summary")
            keep = {key: v for key, v in meta.items() if key not in ("subtasks", "n") and not key.startswith("score_")}
            (folder / "scores").mkdir(exist_ok=True)
            write_scores_folder(folder / "scores", res, {**keep, "rerank": rep})
            artifacts.mark_complete(folder)

        on_rank0(write)
    ctx.session.drop(cfg.model)  # (kept resident for this stage by the features stage)
    rep = artifacts.read_json(folder / "scores" / "scores.json", "scores summary")["rerank"]
    log.info("%s", format_rerank(rep))
    warning = warn_if_short(rep)
    if warning:
        log.warning("%s", warning)
    ctx.scores_csv = folder / "scores" / "scores.csv"


def _random(ctx: _Context) -> None:
    ctx.scores_csv = on_rank0(lambda: random_scores(ctx.pool_file, ctx.out / "scores", ctx.cfg.seed))


def _select(ctx: _Context) -> None:
    sel = SelectConfig(**{**ctx.cfg.select, "scores": str(ctx.scores_csv), "data": [s["path"] for s in ctx.cfg.pool],
                          "out": str(ctx.out / "selection" / "selected.jsonl")})
    ctx.manifest = on_rank0(lambda: select_into(sel))


POOL, WARMUP, FEATURES = Stage("pool", _pool), Stage("warmup", _warmup), Stage("features", _features)
COMPRESS, ALIGN = Stage("compress", _compress), Stage("align", _align)
SCORE, RERANK, SELECT = Stage("score", _score), Stage("rerank", _rerank), Stage("select", _select)
# A selector is the list of its stages, in order.
PIPELINES: dict[str, tuple[Stage, ...]] = {
    "proxy": (POOL, COMPRESS, ALIGN, WARMUP, FEATURES, SCORE, SELECT),   # IProX
    "model": (POOL, WARMUP, FEATURES, SCORE, SELECT),               # LESS on the target or any model
    "representation": (POOL, Stage("features", _represent), SCORE, SELECT),   # RDS+
    "random": (POOL, Stage("score", _random), SELECT),
}
