"""Helpers shared by the benchmark scripts: finding the data and updating BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Written by the scripts in `benchmarks/` (`make bench`); each script owns one section and rewrites\n"
    "only that. Timings on these shared CPU machines are noisy; compare rows of one run, not runs.\n"
)


def find_data() -> Path:
    """``$IPROX_DATA``, else ``../shared/data`` beside the repository."""
    for cand in [os.environ.get("IPROX_DATA", ""), str(ROOT.parent / "shared" / "data")]:
        if cand and (Path(cand) / "gsm8k").is_dir():
            return Path(cand)
    raise SystemExit("benchmark data not found: set IPROX_DATA to the folder holding gsm8k/ and bbh/")


def update_benchmarks_md(section: str, body: str) -> None:
    """Replaces (or appends) the section between ``<!-- section:start -->`` and ``<!-- section:end -->``."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else HEADER
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def measure_and_report(doc: str, results: Path, section: str, measure_all, report) -> None:
    """The ``main`` of a diag script that measures from the fidelity study's work folder: ``--work``,
    ``--report`` (only rewrite the report from ``results``); the measurement (``measure_all(work)``)
    goes to ``results``, ``report(results)`` into BENCHMARKS.md's ``section`` and to stdout."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/iprox-bench-fidelity"))
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the results JSON")
    args = ap.parse_args()
    if not args.report:
        results.write_text(json.dumps(measure_all(args.work), indent=1))
    body = report(json.loads(results.read_text()))
    update_benchmarks_md(section, body)
    print(body)


def selection_data(work: Path, data: Path, tasks: list[str], n_gsm: int, per_task: int, n_val: int, n_test: int):
    """The selection benchmarks' data, written under ``work``: per target task ``n_val`` validation
    and ``n_test`` held-out test examples of BBH, and a pool of ``n_gsm`` GSM8K train problems plus
    ``per_task`` examples of every BBH task, none of them held out; and the embedded target saved as
    an HF folder (every process then loads it in seconds).

    Returns:
        (pool examples, pool file, validation file, {task: test file}, target folder).
    """
    from iprox.data import load_examples

    bbh = load_examples(str(data / "bbh" / "tasks"))
    by_task: dict[str, list] = {}
    for e in bbh:
        by_task.setdefault(e.task, []).append(e)
    rng = random.Random(0)
    val, test = [], {}
    for t in tasks:
        exs = rng.sample(by_task[t], n_val + n_test)
        val += exs[:n_val]
        test[t] = exs[n_val:]
    held = {e.id for e in val} | {e.id for t in tasks for e in test[t]}
    pool = rng.sample(load_examples(str(data / "gsm8k" / "train.jsonl")), n_gsm)
    for t in sorted(by_task):
        pool += rng.sample([e for e in by_task[t] if e.id not in held], per_task)

    def dump(path: Path, exs) -> Path:
        path.write_text("".join(json.dumps({"id": e.id, "source": e.source, "task": e.task, "messages": e.messages}) + "\n"
                                for e in exs))
        return path

    pool_f, val_f = dump(work / "pool.jsonl", pool), dump(work / "val.jsonl", val)
    test_f = {t: dump(work / f"test-{t}.jsonl", test[t]) for t in tasks}
    target = work / "target"
    if not (target / "config.json").exists():
        from iprox.models import EMBEDDED_MODEL, load_model

        m, tok, _ = load_model(EMBEDDED_MODEL)
        m.save_pretrained(target)
        tok.save_pretrained(target)
        del m
    return pool, pool_f, val_f, test_f, target


def sh(cmd: list[str], log_path: Path) -> None:
    """Runs a command from the repository root, appending its output to ``log_path``; exits on failure.

    Stopping the benchmark (Ctrl-C, or ``kill`` of its process) stops the command too: its stages
    resume on the next run, and nothing keeps running unseen beside the next timing.
    """
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:   # a plain kill would skip the cleanup below
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    t0 = time.perf_counter()
    with open(log_path, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if code:
        raise SystemExit(f"failed ({code}) after {time.perf_counter() - t0:.0f}s: {' '.join(cmd)}; see {log_path}")


IPROX = [sys.executable, "-m", "iprox.cli"]


def build_seconds(timings: dict) -> float:
    """The proxy's build in a run's stage times: compress + align (one "proxy" stage before 0.5)."""
    return sum(timings.get(k, 0.0) for k in ("proxy", "compress", "align"))


FIGURES = ("spearman", "head_spearman", "overlap_5")  # whole-pool, head, top-5%: the diagnostics' cells


def mean_figures(entries: list[dict], count: bool = False) -> str:
    """A table cell: the mean over ``entries`` (seeds) of each of ``FIGURES``, "a / b / c" ("–" for
    none); with ``count``, how many after it."""
    if not entries:
        return "–"
    cell = " / ".join(f"{statistics.fmean(e[k] for e in entries):.2f}" for k in FIGURES)
    return cell + (f" (n={len(entries)})" if count else "")


def figure_table(first: str, tasks: list[str], out: dict, label=str, ref_label=str, count: bool = False) -> list[str]:
    """A markdown table of ``out[variant][reference][task]`` (lists of per-seed figures): one row per
    variant and reference, a :func:`mean_figures` cell per task; ``first`` heads the variants' column."""
    lines = [f"| {first} | reference | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for variant, by_ref in out.items():
        for ref, by_task in by_ref.items():
            cells = [mean_figures(by_task.get(t, []), count) for t in tasks]
            lines.append(f"| {label(variant)} | {ref_label(ref)} | " + " | ".join(cells) + " |")
    return lines


def score_rows(res) -> list[dict]:
    """An :class:`iprox.scores.ScoreResult` as ``read_scores`` gives a table (per-subtask columns)."""
    return [{"id": i, "source": s, "task": t, "score": float(x),
             **{c: float(res.per_subtask[r, j]) for j, c in enumerate(res.subtasks)}}
            for r, (i, s, t, x) in enumerate(zip(res.ids, res.sources, res.tasks, res.score))]


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def downstream(work: Path, target: Path, pool_f: Path, test_f: dict[str, Path], tasks: list[str],
               selections: dict[str, Path | dict[str, Path]], k: int, max_len: int) -> dict[str, dict]:
    """Per task and selection (a scores folder, or one per task: runs of one task each): the top ``k``
    of the pool by that task's score column (the aggregate where there is none) fine-tunes the target
    (LoRA, 3 epochs, lr 2e-4), which is then evaluated on the task's held-out test examples; also the
    target without fine-tuning. Every step is skipped when its output exists.

    Returns:
        ``{task: {name: {"share", "loss", "accuracy"}}}`` (share: of the top ``k`` from the task).
    """
    from iprox.loading import read_scores
    from iprox.selection import rank

    raw = {json.loads(line)["id"]: line for line in pool_f.read_text().splitlines()}
    log_path = work / "log.txt"
    evaluate = IPROX + ["evaluate", "--accuracy", "--max-new-tokens", "8", "--no-progress"]
    down: dict[str, dict] = {}
    for t in tasks:
        down[t] = {}
        ev = work / "eval" / f"none-{t}.json"
        ev.parent.mkdir(exist_ok=True)
        if not ev.exists():
            sh(evaluate + ["--model", str(target), "--data", str(test_f[t]), "--out", str(ev)], log_path)
        e = json.loads(ev.read_text())
        down[t]["no fine-tuning"] = {"share": None, "loss": e["token_loss"], "accuracy": e["accuracy"]}
        for name, scores in selections.items():
            rows = read_scores(scores[t] if isinstance(scores, dict) else scores)  # (per task: runs of one task each)
            col = t if t in rows[0] else "score"  # random has no subtask columns
            top = rank([{"id": r["id"], "score": float(r[col])} for r in rows], k)
            sel_f = work / "eval" / f"sel-{slug(name)}-{t}.jsonl"
            sel_f.write_text("".join(raw[r["id"]] + "\n" for r in top))
            share = sum(1 for r in top if json.loads(raw[r["id"]])["task"] == t) / k
            ft = work / "ft" / f"{slug(name)}-{t}"
            sh(IPROX + ["finetune", "--model", str(target), "--data", str(sel_f), "--out", str(ft), "--epochs", "3",
                        "--lr", "2e-4", "--max-length", str(max_len)], log_path)
            ev = work / "eval" / f"{slug(name)}-{t}.json"
            if not ev.exists():
                sh(evaluate + ["--model", str(ft), "--data", str(test_f[t]), "--out", str(ev)], log_path)
            e = json.loads(ev.read_text())
            down[t][name] = {"share": share, "loss": e["token_loss"], "accuracy": e["accuracy"]}
    return down
