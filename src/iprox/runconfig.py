"""The config of ``iprox run``: its TOML form, :class:`RunConfig` (each section checked by its stage's
settings class when the config is read, before any work starts) and the settings a run resolves from
it where the config leaves them to the order (the validation model, calibration, the rerank).

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
                # proxy's pool features; target-first order; default min(128, a tenth of the pool); 0: off)
    [score]     # method, aggregate, checkpoint_weights, damping
    [rerank]    # fraction: the share of the pool, the head of each subtask's column of the proxy's
                # scores, that the target scores again, placed above the rest in the target's order
                # ("auto", the default in the target-first order with tracin: 3 times the selection;
                # 0: off); max_growth: where the target's top k reach the shortlist's last fifth, it
                # doubles, up to this many times its first length (default 2; 1: never); recalibrate
                # (default true): within that budget, the target also scores the examples that the
                # calibration refitted on its rows of the shortlist predicts would enter its top k, and
                # those scores order the pool below; rest_order (recalibrate = false only): the scores
                # that order the pool below it ("target": against the target's validation gradients
                # alone, the default with val_model "both"; "run": the run's); see iprox.rerank
    [select]    # fraction or top_k
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .data import find_shared_data
from .features import FeatureConfig
from .models import EMBEDDED_MODEL, resolve_dtype
from .pool import PoolConfig, source_spec
from .projection import GRADS
from .proxy import ProxyConfig
from .rerank import DEFAULT_GROWTH, check_fraction, check_growth
from .runtime import check_types, section_config
from .scores import ScoreConfig
from .selection import SelectConfig
from .warmup import WarmupConfig

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
        unknown = sorted(set(self.rerank) - {"fraction", "max_growth", "recalibrate", "rest_order"})
        if unknown:
            raise ValueError(f"[rerank] has unknown settings {unknown}; it takes fraction, max_growth, recalibrate and "
                             "rest_order")
        if not isinstance(self.rerank.get("recalibrate", True), bool):
            raise ValueError(f"[rerank] recalibrate must be true or false, got {self.rerank['recalibrate']!r}")
        if self.rerank.get("rest_order", "run") not in ("run", "target"):
            raise ValueError(f'[rerank] rest_order must be "target" (the pool below the shortlist ordered by its scores '
                             f'against the target\'s validation gradients) or "run" (by the run\'s scores), got '
                             f'{self.rerank["rest_order"]!r}')
        if self.rerank.get("rest_order") == "target" and val_model(self) == "proxy":
            raise ValueError('[rerank] rest_order = "target" orders the pool below the shortlist by its scores against the '
                             'target\'s validation gradients, which need [features] val_model = "both" or "target"')
        if "rest_order" in self.rerank and rerank_recalibrate(self):
            raise ValueError("[rerank] rest_order applies with recalibrate = false only: the recalibrated scores order "
                             "the pool below the rerank's examples otherwise")
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


def rerank_recalibrate(cfg: RunConfig) -> bool:
    """Whether the rerank adds the rounds of the recalibrated scores (``[rerank] recalibrate``,
    default true since 0.19)."""
    return cfg.rerank.get("recalibrate", True)


def rerank_options(cfg: RunConfig) -> dict:
    """The rerank's settings since 0.14, each only where it differs from what the stage did before
    (so that ``max_growth = 1`` and ``rest_order = "run"`` keep a run made with 0.12 or 0.13 as it was,
    and ``recalibrate = false`` one made with 0.14 to 0.18)."""
    growth = {"max_growth": rerank_growth(cfg)} if rerank_growth(cfg) != 1 else {}
    if rerank_recalibrate(cfg):
        return {**growth, "recalibrate": True}
    return {**growth, **({"rest_order": rerank_rest(cfg)} if rerank_rest(cfg) != "run" else {})}


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
