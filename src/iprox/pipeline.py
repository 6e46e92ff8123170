"""``iprox run CONFIG.toml``: pool → compress → align → warm-up → features → scores → rerank → selection, resumably.

Every stage writes its own folder under the run directory (``pool/``, ``compressed/`` (stage 1),
``proxy/`` (the aligned proxy), ``warmup/``, ``features/train-<epoch>/`` and ``val-<epoch>/``
(``val-target-<epoch>/``: the target's validation gradients, with ``val_model``), ``scores/``,
``rerank/`` (the target's scores of the proxy's shortlist, and the reranked table), ``selection/``);
a stage complete
with the same settings is skipped, an unfinished one resumes (the stages themselves resume from
their last shard, checkpoint or epoch).

A changed setting invalidates its stage and every stage after it (:mod:`iprox.lineage`). The config's
TOML form and its checks are :mod:`iprox.runconfig`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import artifacts
from .distributed import barrier, on_rank0
from .distributed import world as dist_world
from .alignment import ALIGN_FIELDS, align_proxy
from .calibration import DEFAULT_RIDGE, calibration_size, calibration_subset
from .features import FeatureConfig, compute_features
from .lineage import FINGERPRINT_VERSION, PIPELINE_FILE, check_lineage, stage_dirs, start_from
from .loading import LOADS, read_manifest
from .session import Session
from .monitor import PeakRSS
from .pool import PoolConfig, write_pool
from .proxy import ProxyConfig, build_proxy
from .rerank import format_rerank, rerank_rounds, shortlist_size, warn_if_short, write_shortlist
from .runconfig import (DEFAULT_TRAIN_GRAD, RunConfig, aligns_in_own_warmup, calibrate, load_config,
                        rerank_fraction, rerank_growth, rerank_options, rerank_recalibrate, rerank_rest, val_model)
from .scores import ScoreConfig, compute_scores, random_scores, read_score_result, score, write_scores_folder
from .selection import SelectConfig, format_selection, select_into, selection_size
from .warmup import WarmupConfig, run_warmup

log = logging.getLogger(__name__)


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


def _reset_accelerator_peak() -> bool:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    return False


def _accelerator_peak() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


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
            start_from(cfg, out, reuse)
        fps = check_lineage(cfg, out, overwrite)
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
    done_before = {st: all(artifacts.is_complete(d) for d in ds) for st, ds in stage_dirs(out).items()}
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
    subset_file = ctx.out / "features" / "calibration.jsonl"
    if ctx.calibrate:
        n_cal = on_rank0(lambda: _calibration_count(ctx.calibrate, ctx.pool_file, subset_file))
    if n_cal:
        subset = on_rank0(lambda: calibration_subset(ctx.pool_file, n_cal, ctx.cfg.seed, subset_file))
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


def _calibration_count(given: int | str, pool_file: Path, subset_file: Path) -> int:
    """The run's number of calibration examples: ``given``, or for ``"auto"`` the default of the pool's
    size (:func:`calibration_size`). A run whose features stage began before keeps the count it began
    with (its ``calibration.jsonl``), so that a run resumed by a version of another default neither
    mixes two subsets in its calibration stores nor rescores with stores its subset no longer names
    (an explicit count enters the run's fingerprint instead)."""
    n_pool = sum(1 for ln in Path(pool_file).open(encoding="utf-8") if ln.strip())
    n_cal = calibration_size(None if given == "auto" else given, n_pool)
    if given == "auto" and subset_file.is_file():
        kept = sum(1 for ln in subset_file.open(encoding="utf-8") if ln.strip())
        if kept != n_cal:
            log.warning("calibration: keeping the %d examples this run began with (%s); the default for its pool "
                        "is now %d: set [features] calibrate = %d and pass --overwrite to recompute them (the "
                        "features stage runs again)", kept, subset_file, n_cal, n_cal)
        n_cal = kept
    log.info("calibration: the target featurises %d of the %d pool examples too", n_cal, n_pool)
    return n_cal


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


def _recalibrated(ctx: _Context, val: list[str], target_stores: dict[str, list[str]], settings: dict):
    """The rerank's ``recalibrate``: the pool's proxy stores scored against the target's validation
    stores ``val`` (one per checkpoint), each corrected from the target's stores of everything the
    rerank has scored at its checkpoint (``target_stores``, by epoch, filled in by the rerank's
    rounds) and the run's calibration store."""
    trains, calibs = [], []
    for t, c in zip(ctx.train_stores, ctx.calib_stores):
        if t not in trains:
            trains.append(t)
            calibs.append(c)
    ridge = ctx.cfg.score.get("calibration_ridge", DEFAULT_RIDGE)

    def recalibrate(ids: list[str]):
        own = [target_stores[ck.name.split("-")[1]] for ck in ctx.checkpoints]
        have = {i for s in own[0] for i in read_manifest(s)["ids"]}
        if have != set(ids):
            raise ValueError(f"the rerank's target stores hold {len(have)} examples, its rounds scored {len(ids)}")
        # the target's rows of what the rerank scored first: an example in the calibration as well was
        # featurised again in other batches (a rounding step apart in fp16), and its recalibrated
        # score must be the one its target-scores table holds
        stores = [o + ([c] if c else []) for c, o in zip(calibs, own)]
        # (every rank scores its share of the pool, as the scores stage does)
        return compute_scores(ScoreConfig(**{
            **settings, "train": trains, "val": val, "calibration": stores, "calibration_ridge": ridge,
            "out": str(ctx.out / "rerank" / "unused"), "progress": ctx.cfg.progress}), report_agreement=False)
    return recalibrate


def _rerank(ctx: _Context) -> None:
    """The target featurises the proxy's shortlist at each checkpoint (and, without its validation
    stores from the features stage, the validation examples), LESS scores it, and the shortlist goes
    above the rest of the pool in the target's order (:mod:`iprox.rerank`); the shortlist grows where
    the target's top k reach its end, and (``recalibrate``) by the examples the recalibrated scores
    predict would enter its top k (round r > 1 in ``shortlist-r.jsonl``, ``target-<epoch>-r``,
    ``target-scores-r``)."""
    cfg, folder = ctx.cfg, ctx.out / "rerank"
    proxy = on_rank0(lambda: read_score_result(Path(ctx.scores_csv).parent))
    n = len(proxy.ids)
    k = selection_size(cfg.select.get("fraction", 0.0), cfg.select.get("top_k", 0), n)
    m = shortlist_size(rerank_fraction(cfg), n, k)
    growth = rerank_growth(cfg)
    settings = {"fraction": rerank_fraction(cfg), "shortlist": m, "k": k, "scores": str(ctx.scores_csv),
                **rerank_options(cfg)}
    if not on_rank0(lambda: artifacts.prepare_stage(folder, "rerank", settings, ctx.overwrite, resumable=True)):
        epoch = lambda ck: ck.name.split("-")[1]  # noqa: E731
        val = ctx.target_val_stores or [_store(ctx, folder / f"val-target-{epoch(ck)}", cfg.model, ck, ctx.val_file,
                                               "sgd") for ck in ctx.checkpoints]
        settings_score = {k_: v for k_, v in cfg.score.items() if k_ != "calibration_ridge"}
        target_stores: dict[str, list[str]] = {epoch(ck): [] for ck in ctx.checkpoints}

        def score_target(ids: list[str], r: int):
            sfx = f"-{r + 1}" if r else ""
            log.info("rerank%s: the target featurises %s, %d of %d pool examples (%.1f%%)", f" round {r + 1}" if r else "",
                     "more examples" if r else "the proxy's shortlist (the head of each subtask's column)", len(ids), n,
                     100 * len(ids) / n)
            short = on_rank0(lambda: write_shortlist(ctx.pool_file, ids, folder / f"shortlist{sfx}.jsonl"))
            train = [_store(ctx, folder / f"target-{epoch(ck)}{sfx}", cfg.model, ck, short, ctx.train_grad)
                     for ck in ctx.checkpoints]
            for ck, t in zip(ctx.checkpoints, train):
                target_stores[epoch(ck)].append(t)
            scores_dir = folder / f"target-scores{sfx}"
            score(ScoreConfig(**{**settings_score, "train": train, "val": val, "out": str(scores_dir),
                                 "progress": cfg.progress, "overwrite": ctx.overwrite}))
            return on_rank0(lambda: read_score_result(scores_dir))

        if rerank_recalibrate(cfg):
            recalibrate = _recalibrated(ctx, val, target_stores, settings_score)
            res, rep = rerank_rounds(proxy, k, m, growth, score_target, recalibrate=recalibrate)
            rep["rest_order"] = "recalibrated"
        else:
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
