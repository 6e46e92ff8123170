"""Which stages of a run folder still hold this run's work: one fingerprint per stage in the run's record
(``pipeline.json``), checked before a run starts, and starting a new run folder from an earlier one.

A changed setting invalidates its stage and every stage after it. ``pipeline.json`` in the run
folder holds a fingerprint per stage, each hashing the stage's settings and the fingerprint of the
stage before (compress chains from the pool's content instead, and the validation set enters
between the pool's features and score, so another target task keeps the proxy); a rerun whose
fingerprints differ from the folders on disk is refused unless ``overwrite`` is set, in which case
the changed stage and the ones after it are rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from . import artifacts
from .alignment import ALIGN_FIELDS
from .loading import STORE_FORMAT_VERSION
from .pool import PoolConfig, content_digests
from .runconfig import STAGES, RunConfig, aligns_in_own_warmup, calibrate, rerank_fraction, rerank_options, val_model

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
# 2 (0.13): the stages that read only the pool hash its content, not the validation set's sources,
# and the validation set enters at its own key; 1: the validation set was part of the pool stage.
FINGERPRINT_VERSION = 2


def fingerprints(cfg: RunConfig, run: Path, version: int = FINGERPRINT_VERSION) -> dict[str, str]:
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
        "rerank": {"fraction": rerank_fraction(cfg), "select": cfg.select, **rerank_options(cfg)}
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


def stage_dirs(run: Path) -> dict[str, list[Path]]:
    return {"pool": [run / "pool"], "compress": [run / "compressed"], "align": [run / "proxy"], "warmup": [run / "warmup"],
            "features": [run / "features"], "score": [run / "scores"], "rerank": [run / "rerank"],
            "select": [run / "selection"]}


def validation_stores(run: Path) -> list[Path]:
    """The features stage's validation stores (the proxy's and the target's): what other validation
    examples change in it, beside the pool stores and the calibration stores they keep."""
    return sorted((run / "features").glob("val-*"))


def holds_work(d: Path) -> bool:
    """A folder with only a stage's settings holds nothing to protect."""
    return d.exists() and (artifacts.is_complete(d) or any(
        p.name not in (artifacts.STAGE_FILE, "train_ids.json") and not p.name.startswith(".") for p in d.iterdir()))


def check_lineage(cfg: RunConfig, run: Path, overwrite: bool) -> dict[str, str]:
    """Compares the run's fingerprints with the folder's record and removes what changed settings
    invalidate (with ``overwrite``; refused without). Returns the fingerprints to record.

    Other validation examples over the same pool invalidate only the validation stores and the
    stages from score on: the proxy, the warm-up and the pool's features are kept. A record of
    fingerprint version 1 (before 0.13) is compared in its own version, then recorded in this one."""
    new = fingerprints(cfg, run)
    meta_path = run / PIPELINE_FILE
    record = artifacts.read_json(meta_path, "run record") if meta_path.exists() else {}
    old = record.get("fingerprints", {})
    cmp = new if record.get("fingerprint_version", 1) >= 2 or not old else fingerprints(cfg, run, version=1)
    dirs = stage_dirs(run)
    changed = [st for st in STAGES if old.get(st) not in (None, cmp[st]) and any(holds_work(d) for d in dirs[st])]
    legacy = "proxy" in old and "compress" not in old  # before 0.5: one proxy stage, no compressed/
    if legacy and any(holds_work(d) for st in STAGES[STAGES.index("align"):] for d in dirs[st]):
        if not overwrite:
            raise artifacts.ConfigMismatchError(
                f"{run} was made by iprox before 0.5, whose proxy was one stage (now compress and align); pass "
                f"--overwrite to rebuild it from the proxy on, or choose another [run] out")
        changed = ["compress"]
    # the validation stores sit between the features stage's pool stores and the score stage
    order = [*STAGES[:STAGES.index("score")], "validation", *STAGES[STAGES.index("score"):]]
    dirs["validation"] = validation_stores(run)
    if old.get("validation") not in (None, cmp.get("validation")) and any(holds_work(d) for d in dirs["validation"]):
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
            what = ("other validation examples: pass --overwrite to score the pool against them (the proxy, the "
                    "warm-up and the pool's features are kept)" if first == "validation" else
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


def start_from(cfg: RunConfig, out: Path, src: Path) -> list[str]:
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
    theirs, mine = record.get("fingerprints", {}), fingerprints(cfg, out)
    src_dirs, out_dirs = stage_dirs(src), stage_dirs(out)
    reused = []
    for st in STAGES:
        if theirs.get(st) != mine[st]:
            continue
        if st == "features":  # one folder per store
            keep_val = theirs.get("validation") == mine["validation"]
            stores = [d for d in sorted((src / "features").glob("*")) if d.is_dir() and artifacts.is_complete(d)
                      and (keep_val or d not in validation_stores(src))]
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
