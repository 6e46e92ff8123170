"""Influence scores of every pool example on a target task, from feature stores.

TracIn (LESS): ``Inf(z, z') = Σ_c η_c cos(φ_c(z), φ_c(z'))`` over warm-up checkpoints ``c`` with
learning-rate weights ``η_c``; train features ``φ_c(z)`` are (Adam-preconditioned) and validation
features plain gradients, both projected alike. The influence-function variant replaces the cosine
by ``φ_c(z')ᵀ (F_c + λI)⁻¹ φ_c(z)`` with ``F_c`` the k×k second moment of the train features and
``λ = damping · tr(F_c)/k``.

Subtasks are the validation examples' task tags. A subtask's score is the mean over its validation
examples; the aggregate is the max (LESS) or mean over subtasks. Both scores are linear in the
validation features, so a subtask reduces to one vector (the mean of its normalised validation
features, or ``(F+λI)⁻¹`` times their mean) and the pool is streamed past it in chunks: memory is
one chunk plus the (n_pool × n_subtasks) result, however large the pool.

Output folder: ``scores.csv`` (``id, source, task, score, <one column per subtask>`` in store order),
``scores.parquet`` (the same table), ``scores.json`` (method, weights, subtasks, summary), ``stage.json``
and ``COMPLETE``.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from . import artifacts
from .calibration import (AGREEMENT_WARNING, DEFAULT_RIDGE, Correction, estimate_agreement, estimate_spread,
                          fit_correction)
from .data import load_examples
from .distributed import all_reduce_sum_, on_every_rank, on_rank0, world
from .loading import CARRIED, SCORES_FILE, canonical_name, iter_feature_rows, iter_features, read_manifest, read_scores
from .runtime import check_types

log = logging.getLogger(__name__)

RESERVED = ("id", "source", "task", "score")


@dataclass
class ScoreConfig:
    """Settings of ``iprox score``.

    Attributes:
        train: pool feature stores, one per checkpoint.
        val: validation feature stores, one per checkpoint, in the same order.
        out: the scores folder.
        method: ``tracin`` or ``if``.
        aggregate: ``max`` (LESS) or ``mean`` over subtasks.
        checkpoint_weights: ``auto`` (each checkpoint's mean learning rate; 1 without checkpoints)
            or explicit weights, one per checkpoint.
        damping: ``if`` only: λ as a fraction of the mean eigenvalue of F.
        calibration: per train store, the target's store of some of its examples (``""``: none), or
            a list of such stores fitted together: the proxy's pool features are corrected from them
            (:mod:`iprox.calibration`); tracin only.
        calibration_ridge: the correction's ridge λ (on the scale of a cosine).
        chunk_rows: pool rows scored at once.
        overwrite: replace a scores folder made with other settings.
        progress: show progress (unused: scoring logs one line per checkpoint).
    """

    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    out: str = ""
    method: Literal["tracin", "if"] = "tracin"
    aggregate: Literal["max", "mean"] = "max"
    checkpoint_weights: str | list[float] = "auto"
    damping: float = 0.1
    calibration: list[str | list[str]] = field(default_factory=list)
    calibration_ridge: float = DEFAULT_RIDGE
    chunk_rows: int = 4096
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        check_types(self)
        if isinstance(self.train, str):
            self.train = [self.train]
        if isinstance(self.val, str):
            self.val = [self.val]
        if not self.train or len(self.train) != len(self.val):
            raise ValueError(f"score needs one --val store per --train store (got {len(self.train)} train, {len(self.val)} val)")
        if not self.out:
            raise ValueError("score needs --out (the scores folder)")
        if isinstance(self.checkpoint_weights, str) and self.checkpoint_weights != "auto":
            try:
                self.checkpoint_weights = [float(w) for w in self.checkpoint_weights.split(",")]
            except ValueError:
                raise ValueError(f"checkpoint_weights must be 'auto' or numbers like 1e-5,5e-6; got {self.checkpoint_weights!r}") from None
        if isinstance(self.checkpoint_weights, list) and len(self.checkpoint_weights) != len(self.train):
            raise ValueError(f"{len(self.checkpoint_weights)} checkpoint_weights for {len(self.train)} checkpoints")
        if self.damping <= 0 or self.chunk_rows < 1:
            raise ValueError("damping must be > 0 and chunk_rows >= 1")
        if isinstance(self.calibration, str):
            self.calibration = [self.calibration]
        if self.calibration:
            if len(self.calibration) != len(self.train):
                raise ValueError(f"one --calibration store per --train store (got {len(self.calibration)} for "
                                 f"{len(self.train)}; \"\" for a store without one)")
            if self.method != "tracin":
                raise ValueError("calibration corrects the features of cosine scores; it needs method = tracin")
            if self.calibration_ridge <= 0:
                raise ValueError(f"calibration_ridge must be > 0, got {self.calibration_ridge}")
        self.train = [str(Path(p).resolve()) for p in self.train]
        self.val = [str(Path(p).resolve()) for p in self.val]
        self.calibration = [[str(Path(q).resolve()) for q in p] if isinstance(p, list) else
                            str(Path(p).resolve()) if p else "" for p in self.calibration]


def _canonical_layout(man: dict) -> list[dict]:
    return [{**L, "name": canonical_name(L["name"])} for L in man["layout"]]


def same_gradient_space(tm: dict, vm: dict) -> bool:
    """Whether two stores' features are gradients of the same parameters in the same coordinates:
    the same model and checkpoint, or a proxy carrying a target's LoRA checkpoint (the target-first
    order) beside that target with the same checkpoint: both are gradients of that one adapter."""
    if tm["model_hash"] == vm["model_hash"]:
        return True
    carried = [m for m in (tm, vm) if m.get("trains") == CARRIED]
    plain = [m for m in (tm, vm) if m.get("trains") == "lora" and not str(m["model_hash"]).startswith("proxy:")]
    return (len(carried) == 1 and len(plain) == 1 and "+" in tm["model_hash"] and "+" in vm["model_hash"]
            and tm["model_hash"].rsplit("+", 1)[1] == vm["model_hash"].rsplit("+", 1)[1])


def _check_pair(tm: dict, vm: dict, t: str, v: str) -> None:
    for key in ("seed", "proj_dim", "dim"):
        if tm[key] != vm[key]:
            raise ValueError(f"{t} and {v} are not comparable: their {key} differ "
                             f"(featurise both with the same projection settings)")
    if not same_gradient_space(tm, vm):
        raise ValueError(f"{t} and {v} are not comparable: they are gradients of different models or checkpoints "
                         f"(featurise both with the same model and checkpoint, or a proxy carrying a target's LoRA "
                         f"checkpoint and that target with the same checkpoint)")
    if _canonical_layout(tm) != _canonical_layout(vm):
        raise ValueError(f"{t} and {v} are not comparable: their layouts (layers, shapes, order) differ")


def _subtask_matrix(val_store: str, method: str, subtasks: list[str], tasks: list[str]) -> torch.Tensor:
    """(dim, n_subtasks): per subtask the mean of its validation features (normalised for tracin)."""
    V = torch.cat([x for _, x in iter_features(val_store, dtype=torch.float64)])
    if method == "tracin":
        V = V / V.norm(dim=1, keepdim=True).clamp_min(1e-30)
    idx = {s: [i for i, t in enumerate(tasks) if t == s] for s in subtasks}
    return torch.stack([V[idx[s]].mean(0) for s in subtasks], dim=1)


def second_moment(store: str, chunk_rows: int) -> torch.Tensor:
    """F = (1/N) Σ φ φᵀ over a store's rows, float64, streamed (under torchrun each rank sums its
    shards and the sums are all-reduced)."""
    man = read_manifest(store)
    F = torch.zeros(man["dim"], man["dim"], dtype=torch.float64)

    def mine() -> None:
        for _, _, X in iter_feature_rows(store, chunk_rows, torch.float64, part=world()):
            F.add_(X.T @ X)

    on_every_rank(mine)
    return all_reduce_sum_(F) / max(man["n_examples"], 1)


@dataclass
class ScoreResult:
    ids: list[str]
    sources: list[str]
    tasks: list[str]
    subtasks: list[str]
    per_subtask: torch.Tensor  # (n, n_subtasks) float64
    score: torch.Tensor  # (n,)
    weights: list[float]
    calibration: dict | None = None  # estimate_agreement's report, when the run is calibrated


def compute_scores(config: ScoreConfig, report_agreement: bool = True) -> ScoreResult:
    """Scores without writing anything (the library core of :func:`score`). ``report_agreement``:
    log the calibration's estimate of the agreement with the target (and its warning) and return it
    in the result; off for a second scoring of the same stores (the rerank's order below its shortlist)."""
    tman = [read_manifest(p) for p in config.train]
    vman = [read_manifest(p) for p in config.val]
    for t, v, tm, vm in zip(config.train, config.val, tman, vman):
        _check_pair(tm, vm, t, v)
        if tm["ids"] != tman[0]["ids"]:
            raise ValueError(f"{t} holds other examples than {config.train[0]}; featurise the same pool at every checkpoint")
        if vm["ids"] != vman[0]["ids"]:
            raise ValueError(f"{v} holds other examples than {config.val[0]}")
    if config.checkpoint_weights == "auto":
        weights = [float(m["lr"]) if m.get("lr") else 1.0 for m in tman]
    else:
        weights = list(config.checkpoint_weights)
    vtasks = vman[0]["tasks"]
    subtasks = sorted(set(vtasks))
    n = tman[0]["n_examples"]
    total = torch.zeros(n, len(subtasks), dtype=torch.float64)
    fits: dict[tuple, Correction] = {}  # a pool store paired twice ("both") is fitted once
    estimate = []  # per calibrated pair: (correction, U, weight, whether its validation store is the target's)
    for c, (t, v, w) in enumerate(zip(config.train, config.val, weights)):
        U = _subtask_matrix(v, config.method, subtasks, vtasks)
        calib = config.calibration[c] if config.calibration else ""
        key = (t, tuple(calib) if isinstance(calib, list) else calib)
        if calib and key not in fits:
            fits[key] = fit_correction(t, calib, config.calibration_ridge, config.chunk_rows)
        corr = fits.get(key)
        if corr is not None:
            cm = read_manifest(calib[0] if isinstance(calib, list) else calib)
            estimate.append((corr, U, w, (vman[c]["model_hash"], vman[c]["checkpoint"]) == (cm["model_hash"], cm["checkpoint"])))
        if config.method == "if":
            F = second_moment(t, config.chunk_rows)
            lam = config.damping * torch.trace(F) / F.shape[0]
            U = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=F.dtype), U)
        def mine() -> None:
            # under torchrun each rank scores its share of the shards into its rows of ``total`` (the
            # others stay zero) and one all-reduce assembles the table on every rank
            for row, ids, X in iter_feature_rows(t, config.chunk_rows, torch.float64, part=world()):
                if config.method == "tracin":
                    X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-30)
                if corr is not None:
                    X = corr.apply(ids, X)
                total[row:row + X.shape[0]] += w * (X @ U)

        on_every_rank(mine)
        rank, ranks = world()
        if ranks > 1:
            shards = len(tman[c]["shards"])
            log.info("score: rank %d of %d scored %d of %d shards", rank, ranks, len(range(rank, shards, ranks)), shards)
        log.info("scored store pair %d/%d (weight %.3g)", c + 1, len(weights), w)
    all_reduce_sum_(total)
    if not bool(torch.isfinite(total).all()):
        raise ValueError("scores came out non-finite (NaN or inf); check the stores' features and the damping")
    agg = total.max(dim=1).values if config.aggregate == "max" else total.mean(dim=1)
    return ScoreResult(tman[0]["ids"], tman[0]["sources"], tman[0]["tasks"], subtasks, total, agg, weights,
                       _report_agreement(estimate, subtasks) if estimate and report_agreement else None)


def _report_agreement(estimate: list, subtasks: list[str]) -> dict | None:
    """Logs (rank 0) and returns the calibration's estimate of the scores' agreement with the target's."""
    rep = estimate_agreement(estimate, subtasks)
    if rep is None or world()[0] != 0:
        return rep
    sp = rep["spearman"]
    fmt = lambda d: ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in d.items())  # noqa: E731
    log.info("calibration: proxy-target feature cosine %.3f (%.3f corrected, held out); estimated Spearman with the "
             "target's scores over the %d calibration examples: %s (uncalibrated %s)", rep["cosine"],
             rep["held_out_cosine"], rep["examples"], fmt(sp), fmt(rep["uncalibrated_spearman"]))
    low = {k: v for k, v in sp.items() if v is not None and v < AGREEMENT_WARNING}
    if low:
        log.warning("the proxy's scores are unlikely to rank the pool as the target would: estimated Spearman %s, "
                    "below %.1f (from %d examples: ±%.2f or so); check the proxy with `iprox fidelity --proxy`, or "
                    "calibrate on more examples", fmt(low), AGREEMENT_WARNING, rep["examples"],
                    estimate_spread(rep["examples"]))
    return rep


def _column_names(subtasks: list[str]) -> list[str]:
    return [f"task:{s}" if s in RESERVED else s for s in subtasks]


def write_scores_csv(path: Path, res: ScoreResult, chunk_rows: int = 65536) -> None:
    """Writes ``scores.csv`` a chunk of rows at a time (a 1M-example pool is never one string)."""
    import io

    def pieces():
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(list(RESERVED) + _column_names(res.subtasks))
        sub = res.per_subtask
        for a in range(0, len(res.ids), chunk_rows):
            b = min(len(res.ids), a + chunk_rows)
            for i, s_i, row in zip(range(a, b), res.score[a:b].tolist(), sub[a:b].tolist()):
                w.writerow([res.ids[i], res.sources[i], res.tasks[i], repr(s_i)] + [repr(x) for x in row])
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
        yield buf.getvalue()

    artifacts.atomic_write_text(path, pieces())


def write_scores_parquet(path: Path, res: ScoreResult) -> None:
    """The same table as ``scores.csv`` in Parquet (float64 scores; for pandas, polars, DuckDB)."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"id": res.ids, "source": res.sources, "task": res.tasks, "score": pa.array(res.score.numpy())}
    for j, name in enumerate(_column_names(res.subtasks)):
        cols[name] = pa.array(res.per_subtask[:, j].contiguous().numpy())
    tmp = path.parent / f".{path.name}.tmp"
    pq.write_table(pa.table(cols), tmp)
    artifacts.set_umask_mode(tmp)
    os.replace(tmp, path)


def score(config: ScoreConfig) -> Path:
    """Computes and writes the scores folder; returns the path of ``scores.csv``. Under torchrun
    every rank scores a share of the pool's shards and rank 0 writes."""
    out = Path(config.out)
    cfg = asdict(config)
    calib = [q for p in config.calibration for q in (p if isinstance(p, list) else [p]) if q]
    for store in config.train + config.val + calib:  # readable stores before anything is written
        read_manifest(store)
    if on_rank0(lambda: artifacts.prepare_stage(out, "score", cfg, config.overwrite)):
        return out / SCORES_FILE
    res = compute_scores(config)
    on_rank0(lambda: write_scores_folder(out, res, {
        "method": config.method, "aggregate": config.aggregate, "weights": res.weights,
        **({"calibration": res.calibration} if res.calibration else {})}))
    return out / SCORES_FILE


def write_scores_folder(out: Path, res: ScoreResult, meta: dict) -> None:
    """Writes a scores table's files into the prepared folder ``out`` (``scores.csv``,
    ``scores.parquet``, ``scores.json``: ``meta`` with the subtasks and a summary) and marks it complete."""
    write_scores_csv(out / SCORES_FILE, res)
    if importlib.util.find_spec("pyarrow") is not None:
        write_scores_parquet(out / "scores.parquet", res)
    else:  # an environment assembled without iprox's dependencies (pip installs pyarrow with iprox)
        log.warning("score: pyarrow is not installed, so %s has scores.csv but no scores.parquet (the same table)",
                    out)
    s = res.score
    artifacts.atomic_write_json(out / "scores.json", {
        **meta, "subtasks": res.subtasks, "n": len(res.ids),
        "score_min": float(s.min()), "score_max": float(s.max()), "score_mean": float(s.mean())})
    artifacts.mark_complete(out)


def read_score_result(folder: str | Path) -> ScoreResult:
    """A scores folder written by :func:`score` as a :class:`ScoreResult` (its per-subtask columns
    and aggregate, float64; the weights from ``scores.json``)."""
    folder = Path(folder)
    meta = artifacts.read_json(folder / "scores.json", "scores summary")
    rows = read_scores(folder)
    subtasks = list(meta.get("subtasks", []))
    cols = _column_names(subtasks)
    missing = [c for c in cols if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{folder / SCORES_FILE} lacks the subtask columns {missing} that scores.json names")
    per = torch.tensor([[float(r[c]) for c in cols] for r in rows], dtype=torch.float64).reshape(len(rows), len(cols))
    return ScoreResult([r["id"] for r in rows], [r.get("source", "") for r in rows], [r.get("task", "") for r in rows],
                       subtasks, per, torch.tensor([r["score"] for r in rows], dtype=torch.float64),
                       list(meta.get("weights", [])), meta.get("calibration"))


def random_scores(pool_file: str | Path, out: str | Path, seed: int) -> Path:
    """The random baseline's scores folder: a seeded uniform score per pool example, no subtask
    columns; returns the path of ``scores.csv``."""
    out = Path(out)
    settings = {"method": "random", "pool": str(pool_file), "seed": seed}
    if not artifacts.prepare_stage(out, "score", settings):
        exs = load_examples(str(pool_file))
        s = torch.rand(len(exs), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        write_scores_csv(out / SCORES_FILE, ScoreResult([e.id for e in exs], [e.source for e in exs],
                                                        [e.task for e in exs], [], s[:, None][:, :0], s, []))
        artifacts.atomic_write_json(out / "scores.json", {"method": "random", "seed": seed, "n": len(exs)})
        artifacts.mark_complete(out)
    return out / SCORES_FILE
