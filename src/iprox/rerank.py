"""The reranked scores: the head of the proxy's ranking scored again by the target.

The proxy scores the whole pool; the target then featurises only the proxy's shortlist, about
``m`` examples (by default three times the selection): the head of each subtask's column, ``m /
subtasks`` examples each, at the same LoRA checkpoints and projection, and LESS scores them with the
target's own validation gradients. The shortlist, in the target's order, goes above the rest of the
pool, which keeps the proxy's order. A selection of ``k`` examples is then the target's own choice
among the shortlist, for ``m / n`` of the target's pool pass beside the proxy's pass. The heads are
taken per subtask, not from the aggregate, because the aggregate (LESS's max over subtasks) depends
on how the subtasks' scores compare in size, which the proxy preserves worse than each subtask's
order: with three BBH tasks, a shortlist of the proxy's aggregate held mostly one task's examples
and the target's top 5% were mostly not in it. It needs the
target-first order (the proxy carries the target's LoRA checkpoints, so the two models' features
share coordinates) and TracIn scores (the influence-function variant's second moment is the whole
pool's, which the target never sees).

Why: the proxy agrees with the target least where selection happens, on the order of the head
(``BENCHMARKS.md``, "Reranking the proxy's shortlist with the target").

Every column of the table is placed alike. Its reranked rows (for the aggregate ``score``: the
whole shortlist; for a subtask's column: the longest head of its own ranking that lies wholly in the
shortlist, at least its own ``m / subtasks``, since a row the target did not score cannot be placed
among those it did) hold the target's scores; the others keep the proxy's, shifted to lie below the
lowest of those (their order and differences kept; the shifts are in ``scores.json``). The aggregate
is therefore not recomputed from the columns; with one subtask the two are the same.

Given other scores of the whole pool (``rest``), the rows below the reranked ones take those instead,
shifted alike; which rows are reranked, and the report, stay the proxy's. The pipeline passes the
pool's scores against the target's validation gradients alone (``[rerank] rest_order = "target"``, the
default where the run scores against both models'), which order the pool below the head better than
the sum of both (``BENCHMARKS.md``, "Below the shortlist").

The report (``scores.json``'s ``rerank``, and the log) gives the shortlist's size and, per column,
how many rows were reranked, the Spearman of the proxy's and the target's scores over them (the
proxy's agreement with the target where selection happens, measured on every run at no extra cost),
how many of the proxy's top ``k`` the target keeps, and how deep in the proxy's order the target's
top ``k`` reaches (near the shortlist's end, a longer shortlist might change the selection).

Where it reaches into the shortlist's last fifth, the shortlist grows (:func:`rerank_rounds`): it
doubles (the head of each column, twice as long), the target featurises only the examples it has not
yet scored, and the placement is redone; up to ``max_growth`` times the first length (by default 2:
one doubling, so at most twice the target passes). Only where the target's top ``k`` still reach
the end of the longest shortlist does the run warn. Why: on hyperbaton, the study's weakest task, the
target's top 15 reached rank 44 and 45 of a 45-example shortlist at two of three seeds
(``BENCHMARKS.md``, the fidelity study), so part of what the target would select may have lain past it.

A block the proxy misplaces far below the shortlist shows no such sign. The recalibrated rounds (since
0.19, ``[rerank] recalibrate``) look for it within the same budget: the target's rows of what it has
scored are pairs of proxy and target rows like the calibration examples', so the calibration's
correction is fitted again on all of them, the pool is scored again against the target's validation
gradients (its scored examples then carry the target's own scores: one scale), and the target scores
the examples this predicts would enter its top ``k`` (:func:`predicted_entries`), until none is left.
Where nothing is predicted to enter, no target pass is added. Those scores then place the target's
(the heads of the columns are taken in their order) and order the rest of the pool; the warning is then
for examples still predicted to enter when the budget ran out. Why: on a pool of 1,000, formal_fallacies
at seed 1 lost 10 of the target's top 50, all causal_judgement examples answered "No", which the proxy
ranked 187-557 while it ranked the same task's "Yes" answers in its top 70; two "No" examples were in the
shortlist and the target placed them in its top 50, and the recalibrated round found the other ten for 11
more target passes (``BENCHMARKS.md``, "Growing the shortlist by the recalibrated scores").
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from . import artifacts
from .agreement import spearman
from .scores import ScoreResult
from .selection import rank

# "auto": the shortlist holds this many times the selection (BENCHMARKS.md: at 3x a 5% selection the
# top-5% overlap with the exact target came within 0.02 of the target's own run at the same projection,
# or above it, on every task measured).
DEFAULT_FACTOR = 3
# the target's top k reaching past this share of the shortlist (in the proxy's order) grows the
# shortlist, and past the longest one is warned about
DEEP_WARNING = 0.8
# the shortlist may grow to this many times its first length (one doubling)
DEFAULT_GROWTH = 2


def check_fraction(fraction) -> None:
    """Refuses a ``[rerank] fraction`` other than ``"auto"`` or a share of the pool in [0, 1]."""
    if fraction == "auto":
        return
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f'[rerank] fraction must be "auto" ({DEFAULT_FACTOR} times the selection), a share of the '
                         f"pool in [0, 1], or 0 (off); got {fraction!r}")


def check_growth(growth) -> None:
    """Refuses a ``[rerank] max_growth`` that is not a number >= 1."""
    if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not growth >= 1:
        raise ValueError(f"[rerank] max_growth must be a number >= 1 (how many times its first length the shortlist may "
                         f"grow to; 1: never), got {growth!r}")


def shortlist_size(fraction: float | str, n: int, k: int) -> int:
    """The shortlist's size for a pool of ``n`` and a selection of ``k``: ``DEFAULT_FACTOR * k`` for
    ``"auto"``, else ``ceil(fraction * n)``; at least ``k`` (a shorter shortlist would leave part of
    the selection unchecked) and at most ``n``."""
    check_fraction(fraction)
    m = DEFAULT_FACTOR * k if fraction == "auto" else math.ceil(fraction * n - 1e-9)
    return min(n, max(k, m))


def shortlist(res: ScoreResult, m: int) -> list[str]:
    """The ids (in pool order) of the head of each subtask's column, ``ceil(m / subtasks)`` examples
    each (ties: the smaller id, as the selection breaks them); a table without subtask columns by its
    score. About ``m``: fewer where the heads share examples, at most ``subtasks - 1`` more from the
    rounding; the whole pool when ``m`` is."""
    if m >= len(res.ids):
        return list(res.ids)
    cols = [res.per_subtask[:, j] for j in range(res.per_subtask.shape[1])] or [res.score]
    per = math.ceil(m / len(cols))
    keep: set[str] = set()
    for col in cols:
        keep.update(r["id"] for r in rank([{"id": i, "score": s} for i, s in zip(res.ids, col.tolist())], per))
    return [i for i in res.ids if i in keep]


def write_shortlist(pool_file: str | Path, ids: list[str], out: str | Path) -> Path:
    """Writes the records of the pool file whose ids are in ``ids`` (in pool order) to ``out``.

    Raises:
        ValueError: an id is not in the pool file.
    """
    want = set(ids)
    lines = [ln for ln in Path(pool_file).read_text(encoding="utf-8").splitlines()
             if ln.strip() and json.loads(ln)["id"] in want]
    if len(lines) != len(want):
        raise ValueError(f"{len(want) - len(lines)} shortlisted ids are not in the pool file {pool_file}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_text(out, "".join(ln + "\n" for ln in lines))
    return out


def _place(proxy: torch.Tensor, target: torch.Tensor, at: list[int]) -> tuple[torch.Tensor, float]:
    """One column: the target's scores ``target`` at rows ``at``, the proxy's elsewhere, shifted to
    lie strictly below the lowest of the target's; returns the column and the shift."""
    out = proxy.clone()
    rest = torch.ones(len(proxy), dtype=torch.bool)
    rest[at] = False
    if not at:
        return out, 0.0
    out[at] = target
    if not bool(rest.any()):
        return out, 0.0
    top, floor = float(proxy[rest].max()), float(target.min())
    span = float(proxy[rest].max() - proxy[rest].min())
    gap = 1e-3 * max(span, abs(floor), abs(top), 1e-12)
    shift = floor - gap - top
    out[rest] = proxy[rest] + shift
    return out, shift


def _leading(proxy: torch.Tensor, ids: list[str], scored: set[int]) -> list[int]:
    """The rows of the longest prefix of a column's ranking (as the selection orders it) whose rows
    all have the target's scores."""
    out = []
    for r in rank([{"id": i, "score": x, "row": j} for j, (i, x) in enumerate(zip(ids, proxy.tolist()))]):
        if r["row"] not in scored:
            break
        out.append(r["row"])
    return out


def _column_report(proxy: torch.Tensor, target: torch.Tensor, at: list[int], ids: list[str], k: int) -> dict:
    """Agreement over the reranked rows ``at`` of one column (orders as the selection takes them)."""
    if not at:
        return {"reranked": 0, "spearman": None, "kept": 0, "deepest": 0}
    k = min(k, len(at))
    p = proxy[at]
    by_proxy = [r["id"] for r in rank([{"id": ids[a], "score": x} for a, x in zip(at, p.tolist())])]
    by_target = [r["id"] for r in rank([{"id": ids[a], "score": x} for a, x in zip(at, target.tolist())], k)]
    depth = {i: r for r, i in enumerate(by_proxy, 1)}
    rho = spearman(p.tolist(), target.tolist()) if len(at) > 1 else float("nan")
    return {"reranked": len(at), "spearman": None if rho != rho else rho,
            "kept": len(set(by_proxy[:k]) & set(by_target)), "deepest": max(depth[i] for i in by_target)}


def combine(proxy: ScoreResult, target: ScoreResult, k: int, rest: ScoreResult | None = None) -> tuple[ScoreResult, dict]:
    """The reranked table from the proxy's scores of the pool and the target's of its shortlist, and
    the report (see the module docstring) for a selection of ``k``.

    Args:
        rest: other scores of the whole pool (the same examples and subtasks as ``proxy``) that order
            the rows below the reranked ones in place of the proxy's; which rows are reranked, and the
            report, are the proxy's still.

    Raises:
        ValueError: the target's table names examples the proxy's does not, or other subtasks; ``rest``
            holds other examples or subtasks than the proxy's.
    """
    if target.subtasks != proxy.subtasks:
        raise ValueError(f"the target's scores have subtasks {target.subtasks}, the proxy's {proxy.subtasks}: "
                         "score both with the same validation examples")
    if rest is not None and (rest.ids != proxy.ids or rest.subtasks != proxy.subtasks):
        raise ValueError("the scores that order the rest of the pool hold other examples or subtasks than the proxy's")
    below = rest if rest is not None else proxy
    pos = {i: r for r, i in enumerate(proxy.ids)}
    missing = [i for i in target.ids if i not in pos]
    if missing:
        raise ValueError(f"{len(missing)} of the target's examples are not in the proxy's scores (first: {missing[0]!r})")
    row = {pos[i]: r for r, i in enumerate(target.ids)}  # pool row -> the target table's row
    scored = set(row)

    def column(p: torch.Tensor, t: torch.Tensor, b: torch.Tensor, whole: bool = False) -> tuple[torch.Tensor, float, dict]:
        at = sorted(scored) if whole else _leading(p, proxy.ids, scored)
        tv = t[[row[a] for a in at]]
        placed, shift = _place(b, tv, at)
        return placed, shift, _column_report(p, tv, at, proxy.ids, k)

    score, shift, rep = column(proxy.score, target.score, below.score, whole=True)
    columns, shifts = {"score": rep}, {"score": shift}
    cols = proxy.per_subtask.clone()
    for j, name in enumerate(proxy.subtasks):
        cols[:, j], shifts[name], columns[name] = column(proxy.per_subtask[:, j], target.per_subtask[:, j],
                                                         below.per_subtask[:, j])
    report = {"shortlist": len(scored), "pool": len(proxy.ids), "k": min(k, len(scored)), "columns": columns,
              "shift": shifts}
    out = ScoreResult(proxy.ids, proxy.sources, proxy.tasks, proxy.subtasks, cols, score, proxy.weights,
                      proxy.calibration)
    return out, report


def concat(tables: list[ScoreResult]) -> ScoreResult:
    """The rows of several score tables of the same subtasks (disjoint examples), one after another."""
    first = tables[0]
    return ScoreResult([i for t in tables for i in t.ids], [x for t in tables for x in t.sources],
                       [x for t in tables for x in t.tasks], first.subtasks,
                       torch.cat([t.per_subtask for t in tables]), torch.cat([t.score for t in tables]), first.weights)


def needs_longer(rep: dict) -> bool:
    """Whether the target's top ``k`` reach into the last part of a shortlist shorter than the pool."""
    d, m = rep["columns"]["score"]["deepest"], rep["shortlist"]
    return m < rep["pool"] and d > DEEP_WARNING * m


def predicted_entries(recal: ScoreResult, target: ScoreResult, k: int) -> list[str]:
    """The examples the target has not scored that the recalibrated table ``recal`` places among the
    target's top ``k`` of some column (its aggregate or a subtask's): a predicted score at least the
    ``k``-th best of the target's scores in that column. Most promising first (by how far the
    prediction lies above that score, the largest over the columns), ties by id.

    Raises:
        ValueError: ``recal`` does not give the target's scored examples the target's own scores
            (the two are then not on one scale: it must be scored against the target's validation
            gradients, corrected with the target's rows of every example the target scored).
    """
    pos = {i: r for r, i in enumerate(recal.ids)}
    rows = [pos[i] for i in target.ids]
    cols = [(recal.score, target.score)] + [(recal.per_subtask[:, j], target.per_subtask[:, j])
                                            for j in range(len(recal.subtasks))]
    margin = torch.full((len(recal.ids),), -math.inf, dtype=torch.float64)
    for pred, t in cols:
        t = t.double()
        if not torch.allclose(pred[rows].double(), t, rtol=1e-4, atol=1e-6 * float(t.abs().max().clamp_min(1e-30))):
            raise ValueError("the recalibrated scores of the examples the target scored are not the target's own: "
                             "the two tables are not on one scale")
        kth = float(torch.topk(t, min(k, len(t))).values[-1])
        margin = torch.maximum(margin, pred.double() - kth)
    margin[rows] = -math.inf
    keep = [(-float(margin[r]), i) for i, r in pos.items() if margin[r] >= 0]
    return [i for _, i in sorted(keep)]


def rerank_rounds(proxy: ScoreResult, k: int, m: int, growth: float,
                  score_target: Callable[[list[str], int], ScoreResult],
                  rest: ScoreResult | None = None,
                  recalibrate: Callable[[list[str]], ScoreResult] | None = None) -> tuple[ScoreResult, dict]:
    """The reranked table and its report, the shortlist grown where it looks too short.

    Round 0 has the target score the shortlist of ``m`` (:func:`shortlist`); while the target's top
    ``k`` reach into its last part (:func:`needs_longer`) and it is shorter than ``growth * m``
    examples, the next round doubles it, capped there, and the target scores the examples it adds.

    With ``recalibrate``, more rounds follow while the budget lasts: the pool is scored again with the
    correction fitted on the target's rows of every example it has scored too, and the target scores
    the examples that this predicts would enter its top ``k`` (:func:`predicted_entries`), until none
    is left. The examples alike to one the proxy underrated share its error, so the target's rows of
    the shortlist move them up; where nothing moves, no round is added. The last of those tables (the
    target's scores where it scored, the prediction elsewhere) is then the one the target's scores are
    placed in (it orders the column heads and the rows below them); the report stays the proxy's.

    Args:
        score_target: ``(ids, round) -> the target's score table of those examples`` (new ones only).
        rest: as :func:`combine`'s (without ``recalibrate``; with it, the recalibrated table orders the rest).
        recalibrate: ``(ids the target scored, in pool order) -> the pool's table scored against the
            target's validation gradients, its correction fitted on those examples' target rows as
            well`` (the same examples and subtasks as ``proxy``).

    Returns:
        :func:`combine`'s table and report, the report with ``rounds``: how many examples the target
        scored in each round; with ``recalibrate``, ``recalibrated``: how many of those rounds came from
        it and ``unchecked``, how many examples it still predicted would enter when the budget ran out.
    """
    check_growth(growth)
    limit = min(len(proxy.ids), math.floor(growth * m + 1e-9))
    tables: list[ScoreResult] = []
    done: set[str] = set()
    rounds: list[int] = []
    size = m
    while True:
        new = [i for i in shortlist(proxy, size) if i not in done]
        if new:
            tables.append(score_target(new, len(rounds)))
            done.update(new)
        rounds.append(len(new))
        res, rep = combine(proxy, concat(tables), k, rest)
        if size >= limit or not needs_longer(rep):
            break
        size = min(limit, 2 * size)
    if recalibrate is not None:
        added = 0
        while True:
            recal = recalibrate([i for i in proxy.ids if i in done])
            if recal.ids != proxy.ids or recal.subtasks != proxy.subtasks:
                raise ValueError("the recalibrated scores hold other examples or subtasks than the proxy's")
            new = predicted_entries(recal, concat(tables), k)
            if not new or len(done) >= limit:
                break
            new = new[:limit - len(done)]
            tables.append(score_target(new, len(rounds)))
            done.update(new)
            rounds.append(len(new))
            added += 1
        _, rep = combine(proxy, concat(tables), k, rest)
        res, _ = combine(recal, concat(tables), k, recal)
        rep["recalibrated"] = {"rounds": added, "unchecked": len(new)}
    rep["rounds"] = rounds
    return res, rep


def format_rerank(rep: dict) -> str:
    """One line for the log: the shortlist and the aggregate column's agreement."""
    a = rep["columns"]["score"]
    rho = "n/a" if a["spearman"] is None else f"{a['spearman']:.2f}"
    return (f"rerank: the target rescored the proxy's shortlist, {rep['shortlist']} of {rep['pool']} pool examples "
            f"({100 * rep['shortlist'] / rep['pool']:.1f}%{_grown(rep)}); Spearman of the two over it {rho}; of the proxy's top "
            f"{rep['k']} the target kept {a['kept']}; its top {rep['k']} reach down to rank {a['deepest']} of what it "
            f"scored, in the proxy's order")


def _grown(rep: dict) -> str:
    rounds = rep.get("rounds", [])
    recal = rep.get("recalibrated", {}).get("rounds", 0)
    return "" if len(rounds) < 2 else (f", grown from {rounds[0]} in {len(rounds) - 1} more round(s)" +
                                       (f", {recal} of them recalibrated" if recal else ""))


def warn_if_short(rep: dict) -> str | None:
    """A warning when the target's top ``k`` reaches into the last part of the (grown) shortlist
    (some of what the target would select may lie past it), else ``None``."""
    if "recalibrated" in rep:
        left = rep["recalibrated"]["unchecked"]
        if left:
            return (f"{left} examples the target did not score are still predicted to enter its top {rep['k']} (the "
                    f"recalibrated scores) after {rep['shortlist']} of {rep['pool']}: a larger [rerank] max_growth "
                    "would check them")
        return None
    if needs_longer(rep):
        d, m = rep["columns"]["score"]["deepest"], rep["shortlist"]
        return (f"the target's top {rep['k']} reach down to rank {d} of the proxy's shortlist of {m}: examples past it "
                f"might be selected too; a longer shortlist ([rerank] fraction, or max_growth) would check")
    return None
