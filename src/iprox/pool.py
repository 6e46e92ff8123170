"""The pool stage: the candidate pool and the validation set of a run, sampled once and written as
normalised records (``pool/pool.jsonl``, ``pool/validation.jsonl``) that every later stage reads.

Each source is a file or folder in any format ``data.load_examples`` reads, taken whole or as a
seeded sample of ``sample`` records (the same records on every machine for the same seed and path).
A validation example is never in the pool, even when both name the same file. Every record keeps
its original id, source and task, so the selection can name and copy the original records.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import artifacts
from .data import Example, load_examples
from .runtime import check_data_paths

POOL_FILE, VALIDATION_FILE = "pool.jsonl", "validation.jsonl"


def source_spec(s: Any, where: str) -> dict:
    """One ``[data]`` entry, normalised to ``{"path", "sample"}`` (``sample`` 0: every record)."""
    if isinstance(s, str):
        return {"path": s, "sample": 0}
    if isinstance(s, dict) and isinstance(s.get("path"), str) and set(s) <= {"path", "sample"}:
        sample = s.get("sample", 0)
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 0:
            raise ValueError(f"[data] {where}: sample must be a whole number >= 0 (0: all), got {sample!r}")
        return {"path": s["path"], "sample": sample}
    raise ValueError(f"[data] {where} entries are paths or {{path = ..., sample = N}}; got {s!r}")


@dataclass
class PoolConfig:
    """Settings of the pool stage (the ``[data]`` section's sources and ``[run] seed``).

    Attributes:
        pool: the candidate sources: paths, or ``{"path", "sample"}`` for a seeded sample.
        validation: the target task's examples, in the same form.
        seed: seeds every sample (with the source's path, so sources sample independently).
        out: the stage's folder.
    """

    pool: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    seed: int = 0
    out: str = ""

    def __post_init__(self):
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"[run] seed must be a whole number, got {self.seed!r}")
        if not self.pool or not self.validation:
            raise ValueError("[data] needs pool = [...] and validation = [...]")
        self.pool = [source_spec(s, "pool") for s in self.pool]
        self.validation = [source_spec(s, "validation") for s in self.validation]
        for s in self.pool + self.validation:
            check_data_paths([s["path"]])

    def settings(self) -> dict:
        """What the result depends on (the folder's ``stage.json``; ``out`` is where, not what)."""
        return {"pool": self.pool, "validation": self.validation, "seed": self.seed}


def _sample(specs: list[dict], seed: int, exclude: frozenset = frozenset()) -> list[Example]:
    out = []
    for s in specs:
        exs = [e for e in load_examples(s["path"]) if e.id not in exclude]
        if s["sample"] and s["sample"] < len(exs):
            keep = sorted(random.Random(f"{seed}:{s['path']}").sample(range(len(exs)), s["sample"]))
            exs = [exs[i] for i in keep]
        out += exs
    return out


def _lines(exs: list[Example]) -> str:
    return "".join(json.dumps({"id": e.id, "source": e.source, "task": e.task, "messages": e.messages},
                              ensure_ascii=False) + "\n" for e in exs)


def _sets(config: PoolConfig) -> tuple[str, str]:
    """The pool's and the validation set's records as written (JSON lines)."""
    val = _sample(config.validation, config.seed)
    pool = _sample(config.pool, config.seed, exclude=frozenset(e.id for e in val))  # never select a validation example
    return _lines(pool), _lines(val)


def write_pool(config: PoolConfig) -> tuple[Path, Path]:
    """Samples and writes the pool and validation sets (skipped when ``out`` holds them already);
    returns the two files."""
    folder = Path(config.out)
    if not artifacts.prepare_stage(folder, "pool", config.settings()):
        pool, val = _sets(config)
        for name, text in ((POOL_FILE, pool), (VALIDATION_FILE, val)):
            artifacts.atomic_write_text(folder / name, text)
        artifacts.atomic_write_json(folder / "pool.json", {
            "pool": pool.count("\n"), "validation": val.count("\n"),
            "validation_tasks": sorted({json.loads(ln)["task"] for ln in val.splitlines()})})
        artifacts.mark_complete(folder)
    return load_pool(folder)


def content_digests(config: PoolConfig, folder: str | Path) -> tuple[str, str]:
    """SHA-256 of the pool's and of the validation set's records as the pool stage writes them: read
    from ``folder`` where it holds them with these settings, else sampled here (nothing written).
    Every stage that reads only the pool depends on the first alone, so that a run with other
    validation examples keeps its proxy, warm-up and pool features while its pool is the same."""
    folder = Path(folder)
    meta = folder / artifacts.STAGE_FILE
    done = artifacts.is_complete(folder) and meta.exists() and artifacts.comparable(
        artifacts.read_json(meta, "stage settings file").get("config", {})) == artifacts.comparable(config.settings())
    if done:
        texts = [(folder / POOL_FILE).read_bytes(), (folder / VALIDATION_FILE).read_bytes()]
    else:
        texts = [t.encode("utf-8") for t in _sets(config)]
    return hashlib.sha256(texts[0]).hexdigest(), hashlib.sha256(texts[1]).hexdigest()


def load_pool(folder: str | Path) -> tuple[Path, Path]:
    """The pool and validation files of a finished pool stage."""
    folder = Path(folder)
    if not artifacts.is_complete(folder):
        raise FileNotFoundError(f"{folder} holds no finished pool stage (no {artifacts.COMPLETE_FILE})")
    return folder / POOL_FILE, folder / VALIDATION_FILE
