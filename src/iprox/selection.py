"""The selected subset: the top-scored pool records, written exactly as they were in the pool.

Order is by score, highest first; ties go to the smaller id (string order), so the result never
depends on file order or platform. Each selected record is written as its original text (a JSONL
line byte for byte; a record from a JSON or Parquet file as its JSON text), one per line, so the
file feeds TRL or HF training as is. ``selected.json`` beside it says how many, from which sources
and tasks, and the score range.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from . import artifacts
from .data import load_examples
from .runtime import check_types
from .loading import read_scores

log = logging.getLogger(__name__)


@dataclass
class SelectConfig:
    """Settings of ``iprox select``: exactly one of ``fraction`` and ``top_k``.

    Attributes:
        scores: a scores folder, ``scores.csv``, or an ``iprox run`` folder (the scores its selection takes).
        data: the pool the scores are for (files or folders).
        out: the JSONL file to write (``selected.json`` is written beside it).
        fraction: share of the pool to keep, e.g. 0.05.
        top_k: or exactly this many examples.
        format: ``original`` (each record as it was in the pool, byte for byte) or ``messages``
            (normalised chat records ``{"id", "messages"}``, one schema whatever the pool mixed:
            what TRL's SFTTrainer takes).
    """

    scores: str = ""
    data: list[str] = field(default_factory=list)
    out: str = ""
    fraction: float = 0.0
    top_k: int = 0
    format: Literal["original", "messages"] = "original"

    def __post_init__(self):
        check_types(self)
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.scores or not self.data or not self.out:
            raise ValueError("select needs --scores, --data (the pool the scores are for) and --out")
        if bool(self.fraction) == bool(self.top_k):
            raise ValueError("select needs exactly one of --fraction and --top-k")
        if self.fraction and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be positive, got {self.top_k}")


def selection_size(fraction: float, top_k: int, n: int) -> int:
    """How many of ``n`` pool examples a selection keeps: ``top_k``, or ``fraction`` of them (at
    least one), at most ``n``."""
    return min(n, top_k or max(1, math.floor(fraction * n + 1e-9)))


def rank(rows: list[dict], k: int | None = None) -> list[dict]:
    """Rows by descending score, ties broken by ascending id; only the first ``k`` when given, found
    in O(n log k) without sorting the whole pool."""
    key = lambda r: (-r["score"], r["id"])  # noqa: E731
    return sorted(rows, key=key) if k is None else heapq.nsmallest(k, rows, key=key)


def select(config: SelectConfig) -> dict:
    """Writes the selection and its manifest; returns the manifest.

    Raises:
        ValueError: the scores name ids the data does not hold, or the data repeats an id.
    """
    rows = read_scores(config.scores)
    if not rows:
        raise ValueError(f"{config.scores} holds no scores")
    bad = [r["id"] for r in rows if not math.isfinite(r["score"])]
    if bad:
        raise ValueError(f"{config.scores}: {len(bad)} scores are not finite (first: {bad[0]!r}); a selection from "
                         f"them would be arbitrary: recompute the features and scores")
    k = selection_size(config.fraction, config.top_k, len(rows))
    top = rank(rows, k)
    by_id = {}
    for ex in load_examples(config.data):
        if ex.id in by_id:
            raise ValueError(f"id {ex.id!r} appears twice in {config.data} ({by_id[ex.id].origin}, {ex.origin})")
        by_id[ex.id] = ex
    missing = [r["id"] for r in top if r["id"] not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} selected ids are not in {config.data} (e.g. {missing[0]!r}); "
                         f"pass the pool the scores were computed on")
    picked = [by_id[r["id"]] for r in top]
    out = Path(config.out)
    if config.format == "messages":
        lines = [json.dumps({"id": ex.id, "messages": ex.messages}, ensure_ascii=False) for ex in picked]
    else:
        lines = [ex.raw for ex in picked]
    artifacts.atomic_write_text(out, "".join(line + "\n" for line in lines))
    manifest = {
        "selected": k, "pool": len(rows), "fraction": k / len(rows),
        "by_source": dict(Counter(ex.source for ex in picked).most_common()),
        "by_task": dict(Counter(ex.task for ex in picked).most_common()),
        "score_max": top[0]["score"], "score_min": top[-1]["score"],
        "top": [{"id": r["id"], "source": by_id[r["id"]].source, "task": by_id[r["id"]].task, "score": r["score"]}
                for r in top[:10]],
        "config": asdict(config),
    }
    artifacts.atomic_write_json(out.with_suffix(".json"), manifest)
    return manifest


def select_into(config: SelectConfig) -> dict:
    """The pipeline's select stage: :func:`select` into a folder of its own (``config.out``'s),
    skipped when that folder holds this selection already; returns the manifest."""
    folder = Path(config.out).parent
    if artifacts.prepare_stage(folder, "select", asdict(config)):
        return artifacts.read_json(Path(config.out).with_suffix(".json"), "selection manifest")
    manifest = select(config)
    artifacts.mark_complete(folder)
    return manifest


def format_selection(man: dict) -> str:
    lines = [f"selected {man['selected']} of {man['pool']} ({100 * man['fraction']:.1f}%), "
             f"scores {man['score_min']:.4g} to {man['score_max']:.4g}"]
    lines.append("  by source: " + ", ".join(f"{k} {v}" for k, v in man["by_source"].items()))
    lines.append("  by task:   " + ", ".join(f"{k} {v}" for k, v in list(man["by_task"].items())[:12]))
    lines.append("  top examples:")
    for r in man["top"][:5]:
        lines.append(f"    {r['score']:.4g}  {r['id']}  ({r['task']})")
    return "\n".join(lines)
