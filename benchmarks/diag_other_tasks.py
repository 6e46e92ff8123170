"""Do 0.19's defaults hold on target tasks the fidelity study did not tune them on?

The study (``bench_fidelity.py``) chose every default on three target tasks: boolean_expressions,
hyperbaton and formal_fallacies. This runs the same defaults, as a new user would, on other BBH tasks
of the same pool of 300: ``--tasks`` of its 17 other BBH tasks, drawn with ``--draw-seed``, with
``VAL`` validation examples each drawn from the task's examples outside the pool.

Per seed (0, 1, 2), nothing is rebuilt that a user's second target task would not rebuild:

* the target: one run of all drawn tasks (its validation examples together), started ``--from`` the
  study's target run at that seed (``runs/target-s<seed>``): its warm-up and pool features are reused,
  its validation stores and scores are new;
* the proxy: one run per task, started ``--from`` the study's "0.19 default, one task per run" run of
  boolean_expressions at that seed: the proxy, the warm-up, the pool's and the calibration's features
  are reused; the validation stores, the scores, the rerank (the target featurises the shortlist) and
  the selection are new.

Measured per task (the task's own score column), as ``bench_fidelity.py`` measures: whole-pool
Spearman, Spearman over the reference's top 20% (head), top-5% overlap and the top 5%'s share from the
task (the reference's in brackets), against the target at seed 0, the target at the run's own seed,
and the ceiling: the target's seeds 1 and 2 against seed 0.

``--calibration`` then asks whether more calibration examples close what the whole pool misses, from the
stores on disk (nothing rebuilt): a fixed set ``E`` of 100 seeded pool examples is never calibrated on;
for each size in ``SIZES``, ``DRAWS`` seeded samples of the other 200 correct the proxy's pool rows
from the target run's rows at the run's seed (its pool store: the same checkpoint and projection as
the run's calibration store), and the corrected rows' scores against the target's validation
gradients (the order the rerank keeps below what the target scored) are compared over ``E`` with the
target at seed 0 and at the run's seed; the ceiling over ``E``: the target's seeds 1 and 2 against 0.

    python benchmarks/diag_other_tasks.py [--tasks 5] [--draw-seed 0] [--seeds 0 1 2] [--calibration] [--report]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import TASKS, final_scores  # noqa: E402
from common import IPROX, find_data, sh, slug, update_benchmarks_md  # noqa: E402

from iprox.fidelity import score_agreement  # noqa: E402
from iprox.loading import read_scores  # noqa: E402

log = logging.getLogger("diag_other_tasks")
RESULTS = ROOT / "benchmarks" / "results"
VAL = 4
PROXY_FROM = "0.19 default, one task per run"
SIZES = (30, 60, 120, 200)
DRAWS = 5
HELD_OUT = 100


def draw_tasks(pool_f: Path, n: int, seed: int) -> list[str]:
    """``n`` of the pool's BBH tasks other than the study's, drawn with ``seed``."""
    tasks = {json.loads(ln)["task"] for ln in pool_f.read_text().splitlines() if ln.strip()}
    others = sorted(tasks - set(TASKS) - {"gsm8k"})
    if n > len(others):
        raise SystemExit(f"--tasks {n}: the pool has {len(others)} other BBH tasks")
    return random.Random(seed).sample(others, n)


def write_validation(work: Path, data: Path, pool_f: Path, tasks: list[str], seed: int) -> dict[str, Path]:
    """Per task ``VAL`` examples outside the pool (one file per task, and all of them together)."""
    from iprox.data import load_examples

    in_pool = {json.loads(ln)["id"] for ln in pool_f.read_text().splitlines() if ln.strip()}
    rng = random.Random(seed)
    files, lines = {}, []
    folder = work / "other-tasks"
    folder.mkdir(exist_ok=True)
    for t in tasks:
        exs = [e for e in load_examples(str(data / "bbh" / "tasks" / f"{t}.json")) if e.id not in in_pool]
        rows = [json.dumps({"id": e.id, "source": e.source, "task": e.task, "messages": e.messages}) + "\n"
                for e in rng.sample(exs, VAL)]
        files[t] = folder / f"val-{t}.jsonl"
        files[t].write_text("".join(rows))
        lines += rows
    files["all"] = folder / "val-all.jsonl"
    files["all"].write_text("".join(lines))
    return files


def config_from(src: Path, dst: Path, out: Path, val: Path) -> None:
    """The study's config ``src`` with another run folder and validation file."""
    text = src.read_text()
    text, n_out = re.subn(r'(?m)^out = .*$', f"out = {json.dumps(str(out))}", text)
    text, n_val = re.subn(r'(?m)^validation = .*$', f"validation = [{json.dumps(str(val))}]", text)
    if (n_out, n_val) != (1, 1):
        raise SystemExit(f"{src}: expected one out and one validation line")
    dst.write_text(text)


def run(work: Path, cfg_src: Path, name: str, val: Path, start: Path) -> Path:
    out = work / "runs" / name
    if (out / "selection" / "COMPLETE").exists():
        log.info("%s: finished earlier; read back", name)
        return out
    if not (start / "selection" / "COMPLETE").exists():
        raise SystemExit(f"{start} is not a finished run: run bench_fidelity.py's {start.name} first")
    cfg = work / "configs" / f"{name}.toml"
    config_from(cfg_src, cfg, out, val)
    log.info("%s (from %s)", name, start.name)
    sh(IPROX + ["run", str(cfg), "--no-progress", *([] if (out / "pipeline.json").exists() else ["--from", str(start)])],
       work / "log.txt")
    return out


def figures(ref: Path, other: Path, task: str) -> dict:
    rep, _, _ = score_agreement(read_scores(final_scores(ref)), read_scores(final_scores(other)))
    v = rep["subtasks"][task]
    return {"spearman": v["spearman"], "head": v["head_spearman"], "top5": v["overlap_at"]["5"]["overlap"],
            "share": v["task_share_at_5"]["other"], "ref_share": v["task_share_at_5"]["target"]}


def measure(work: Path, tasks: list[str], seeds: list[int]) -> dict:
    res: dict = {"tasks": tasks, "seeds": seeds, "cases": {}}
    target = {s: work / "runs" / f"other-target-s{s}" for s in seeds}
    for t in tasks:
        c = res["cases"][t] = {"proxy vs seed 0": {}, "proxy vs same seed": {}, "target vs seed 0": {}, "rerank": {}}
        for s in seeds:
            p = work / "runs" / f"other-{slug(PROXY_FROM)}-{slug(t)}-s{s}"
            c["proxy vs seed 0"][s] = figures(target[0], p, t)
            c["proxy vs same seed"][s] = figures(target[s], p, t)
            if s:
                c["target vs seed 0"][s] = figures(target[0], target[s], t)
            meta = json.loads((p / "pipeline.json").read_text())
            rr = json.loads((p / "rerank" / "scores" / "scores.json").read_text())["rerank"]
            c["rerank"][s] = {"passes": sum(rr["rounds"]), "recalibrated_rounds": rr["recalibrated"]["rounds"],
                              "seconds": meta["timings"].get("rerank"), "spearman": rr["columns"]["score"]["spearman"],
                              "reused": meta.get("reused", [])}
    return res


def calibration_sizes(work: Path, tasks: list[str], seeds: list[int]) -> dict:
    """Per task and calibration size: Spearman over the held-out set of the calibrated rows' scores
    against the target's validation gradients, with the seed-0 target and the same-seed target (a
    list over seeds and draws), and the ceiling over the same set."""
    from diag_common_mode import _rows

    from iprox.calibration import correction_from_rows

    runs = work / "runs"
    ref0 = read_scores(final_scores(runs / "other-target-s0"))
    out: dict = {"sizes": list(SIZES), "draws": DRAWS, "tasks": {}}
    held: list[str] | None = None

    def over(a: dict, b: dict) -> float:
        return spearman_over(a, b, held)

    for t in tasks:
        col0 = {r["id"]: float(r[t]) for r in ref0}
        res = out["tasks"][t] = {"uncalibrated": [], **{str(c): [] for c in SIZES}, "ceiling": []}
        for s in seeds:
            run_dir = runs / f"other-{slug(PROXY_FROM)}-{slug(t)}-s{s}"
            cfg = json.loads((run_dir / "scores" / "stage.json").read_text())["config"]
            train, vt = Path(cfg["train"][1]), Path(cfg["val"][1])
            if not vt.name.startswith("val-target"):
                raise SystemExit(f"{run_dir}: expected the target's validation store second, got {vt.name}")
            ids, P = _rows(train)
            tids, T = _rows(runs / f"target-s{s}" / "features" / train.name)
            if tids != ids:
                raise SystemExit(f"target-s{s}'s pool store holds other examples than {run_dir.name}'s")
            _, V = _rows(vt)
            same = {r["id"]: float(r[t]) for r in read_scores(final_scores(runs / f"other-target-s{s}"))}
            exact = dict(zip(ids, (T @ V.T).mean(1).tolist()))
            if spearman_over(exact, same, ids) < 0.999:  # the target's rows and validation store are the run's
                raise SystemExit(f"{run_dir.name}: the target's pool rows do not give other-target-s{s}'s scores")
            if held is None:
                held = sorted(random.Random(0).sample(ids, HELD_OUT))
            rest = [i for i in ids if i not in set(held)]

            def scores(X):
                return dict(zip(ids, (X @ V.T).mean(1).tolist()))

            base = scores(P)
            res["uncalibrated"].append({"seed": s, "seed0": over(base, col0), "same": over(base, same)})
            for c in SIZES:
                for draw in range(DRAWS if c < len(rest) else 1):
                    cids = random.Random(100 + draw).sample(rest, c)
                    at = [ids.index(i) for i in cids]
                    got = scores(correction_from_rows(cids, P[at], T[at]).apply(ids, P))
                    res[str(c)].append({"seed": s, "draw": draw, "seed0": over(got, col0), "same": over(got, same)})
            if s:
                res["ceiling"].append(over(same, col0))
    return out


def spearman_over(a: dict, b: dict, ids: list[str]) -> float:
    """Spearman of two {id: score} maps over ``ids``."""
    from scipy.stats import spearmanr

    return float(spearmanr([a[i] for i in ids], [b[i] for i in ids])[0])


def calibration_report(cal: dict) -> list[str]:
    sizes = ["uncalibrated"] + [str(c) for c in cal["sizes"]]
    lines = ["Calibration size (`--calibration`): Spearman over 100 held-out pool examples of the calibrated rows' scores "
             "against the target's validation gradients, against the target at seed 0 / at the run's own seed (mean "
             f"over seeds 0-2 and {cal['draws']} draws); the ceiling: the target's seeds 1 and 2 against seed 0 over the "
             "same examples, and 95% of it.", "",
             "| task | " + " | ".join(sizes) + " | ceiling (95%) |", "|---" * (len(sizes) + 2) + "|"]
    for t, res in cal["tasks"].items():
        cells = [f"{statistics.mean(r['seed0'] for r in res[k]):.2f} / {statistics.mean(r['same'] for r in res[k]):.2f}"
                 for k in sizes]
        ceil = statistics.mean(res["ceiling"])
        lines.append(f"| {t} | " + " | ".join(cells) + f" | {ceil:.2f} ({0.95 * ceil:.2f}) |")
    return lines


def _mean(rows: dict, key: str, seeds) -> float:
    return statistics.mean(rows[s][key] for s in seeds)


def report(res: dict) -> None:
    tasks, seeds = res["tasks"], res["seeds"]
    others = [s for s in seeds if s]
    head = ["| task | reference | seeds | whole pool | head | top 5% | share of the top 5% (reference's) |",
            "|---|---|---|---|---|---|---|"]
    rows, bars = [], []
    for t in tasks:
        c = res["cases"][t]
        for name, key, ss in [("target, seed 0", "proxy vs seed 0", seeds), ("target, seed 0", "proxy vs seed 0", others),
                              ("target, the run's seed", "proxy vs same seed", seeds),
                              ("ceiling: the target's own other seeds against seed 0", "target vs seed 0", others)]:
            r = {int(k): v for k, v in c[key].items()}
            if not all(s in r for s in ss) or not ss:
                continue
            rows.append(f"| {t} | {name} | {', '.join(map(str, ss))} | {_mean(r, 'spearman', ss):.2f} | "
                        f"{_mean(r, 'head', ss):.2f} | {_mean(r, 'top5', ss):.2f} | {_mean(r, 'share', ss):.2f} "
                        f"({_mean(r, 'ref_share', ss):.2f}) |")
        if others:
            ceil = {int(k): v for k, v in c["target vs seed 0"].items()}
            prox = {int(k): v for k, v in c["proxy vs seed 0"].items()}
            whole_bar = min(0.9, 0.95 * _mean(ceil, "spearman", others))
            bars.append((t, _mean(prox, "spearman", others), whole_bar, _mean(prox, "head", others),
                         _mean(ceil, "head", others), _mean(prox, "top5", others), _mean(ceil, "top5", others)))
    rr = [v for t in tasks for v in res["cases"][t]["rerank"].values()]
    body = ["## 0.19's defaults on target tasks the study did not tune them on (issue 12)", "",
            f"`benchmarks/diag_other_tasks.py`: {len(tasks)} of the pool's 17 BBH tasks besides the study's three, drawn "
            f"with seed {res.get('draw_seed', 0)}, {VAL} validation examples each from outside the pool; the study's pool of "
            "300, its target runs' warm-ups and pool features, and its 0.19-default proxies (seeds "
            f"{', '.join(map(str, seeds))}), each started `--from` as a user's next target task is. One proxy run per "
            "task; one target run per seed over all drawn tasks. Figures on each task's own score column; means over "
            "the seeds listed.", "", *head, *rows, ""]
    if bars:
        body += ["The bars against seed 0, as the study states them (the proxy's seeds 1 and 2 against the ceiling; "
                 "whole pool: 0.9, or 95% of the ceiling where that is lower):", "",
                 "| task | whole pool (bar) | head (the target's own) | top 5% (the target's own) |", "|---|---|---|---|"]
        body += [f"| {t} | {w:.2f} ({b:.2f}) | {h:.2f} ({hc:.2f}) | {o:.2f} ({oc:.2f}) |" for t, w, b, h, hc, o, oc in bars]
        body.append("")
    body.append(f"Rerank: {statistics.mean(r['passes'] for r in rr):.0f} target passes per run on average "
                f"({min(r['passes'] for r in rr)}-{max(r['passes'] for r in rr)}), "
                f"{sum(1 for r in rr if r['recalibrated_rounds'])} of {len(rr)} runs added recalibrated rounds; "
                f"{statistics.mean(r['seconds'] for r in rr):.0f} s per run on average.")
    if res.get("calibration"):
        body += [""] + calibration_report(res["calibration"])
    update_benchmarks_md("other-tasks", "\n".join(body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity")
    ap.add_argument("--tasks", type=int, default=5, help="how many other BBH tasks to draw")
    ap.add_argument("--draw-seed", type=int, default=0)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--calibration", action="store_true",
                    help="also the calibration sizes from the stores on disk (needs the runs; a few minutes)")
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the results JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    res_path = RESULTS / "other_tasks.json"
    if args.report:
        report(json.loads(res_path.read_text()))
        return
    if 0 not in args.seeds:
        raise SystemExit("--seeds must include 0 (the reference)")
    work = Path(args.work)
    pool_f = work / "pool.jsonl"
    if not pool_f.exists():
        raise SystemExit(f"no study pool at {pool_f}: run bench_fidelity.py first")
    tasks = draw_tasks(pool_f, args.tasks, args.draw_seed)
    log.info("tasks: %s", ", ".join(tasks))
    val = write_validation(work, find_data(), pool_f, tasks, args.draw_seed)
    for s in args.seeds:
        run(work, work / "configs" / f"target-s{s}.toml", f"other-target-s{s}", val["all"], work / "runs" / f"target-s{s}")
        first = work / "runs" / f"{slug(PROXY_FROM)}-boolean_expressions-s{s}"
        cfg = work / "configs" / f"{slug(PROXY_FROM)}-boolean_expressions-s{s}.toml"
        for t in tasks:
            run(work, cfg, f"other-{slug(PROXY_FROM)}-{slug(t)}-s{s}", val[t], first)
    res = {**measure(work, tasks, args.seeds), "draw_seed": args.draw_seed}
    if args.calibration:
        res["calibration"] = calibration_sizes(work, tasks, args.seeds)
    elif res_path.exists() and json.loads(res_path.read_text()).get("calibration"):  # measured earlier: kept
        res["calibration"] = json.loads(res_path.read_text())["calibration"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps(res, indent=2))
    report(res)


if __name__ == "__main__":
    main()
