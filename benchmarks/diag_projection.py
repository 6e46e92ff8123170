"""How much of the target's own seed-to-seed disagreement is its random projection, and how close is
the 0.7 default's proxy to the target under the current feature-store format?

The fidelity study (``benchmarks/bench_fidelity.py``) measures every proxy against the target at
seed 0 and calls the target's other seeds (another warm-up order and projection seed) its ceiling.
This separates the two: the target's seed-0 warm-up checkpoint featurised again under another
projection seed (only the projection differs), beside the target's warm-ups of seeds 1 and 2 (both
differ). It then featurises the 0.7 default's proxies of seeds 0-2 (the study's "0.6 default, val
both" runs: their proxy and their warm-up checkpoint, which is the target's own) and scores them as
that setting does (the proxy's validation gradients and the target's, summed). Each proxy is
compared with the target of seed 0 (the study's reference) and with the target of its own seed
(same warm-up checkpoint, same projection: what is left is the proxy's own error).

Every store is computed with the code as it is, so the figures belong to the store format that
code writes (``loading.STORE_FORMAT_VERSION``); results go under that key, and a run with another
format adds its own beside it. Nothing of the study is rebuilt: proxies and checkpoints are read.

    python benchmarks/diag_projection.py                      # run what is missing, then report
    python benchmarks/diag_projection.py --report             # only rewrite the section

The figures under "store format 2" came from the code before format 3 (commit 8d1587b) with
``--only "target, warm-up 0, projection 0" "IProX, seed 0" "target, warm-up 0, projection 1"``, its
folders filled beforehand with stores the same commands had written: the study's "target" and "0.6
default, val both" seed-0 stores and scores, and the target's seed-0 checkpoint featurised under
projection seed 1 (``iprox features`` / ``iprox score`` with this script's arguments)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_fidelity import BASE, TASKS, measure  # noqa: E402
from common import IPROX, sh, slug, update_benchmarks_md  # noqa: E402

from iprox.loading import STORE_FORMAT_VERSION, read_manifest, read_scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT = "0.6 default, val both"  # the study's setting that is the 0.7 default at sparsity 0.5
# rank 8 × the widest side of SmolLM2-135M's projections (1536): every LoRA side whole
EXACT_DIM = 8 * 1536


def jobs(work: Path) -> list[dict]:
    """What to featurise, in the order worth having if the run is cut short."""
    run = lambda s: work / "runs" / f"{slug(DEFAULT)}-s{s}"  # noqa: E731
    ckpt = lambda s: _origin(work, s) / "warmup" / "checkpoint-1"  # noqa: E731  (the target's own warm-up)
    out = [{"name": "target, warm-up 0, projection 0", "model": work / "target", "ckpt": ckpt(0), "seed": 0},
           {"name": "IProX, seed 0", "model": run(0) / "proxy", "ckpt": ckpt(0), "seed": 0, "both": True},
           {"name": "target, warm-up 0, projection 1", "model": work / "target", "ckpt": ckpt(0), "seed": 1}]
    for s in (1, 2):
        out.append({"name": f"IProX, seed {s}", "model": run(s) / "proxy", "ckpt": ckpt(s), "seed": s, "both": True})
    for s in (1, 2):
        out.append({"name": f"target, warm-up {s}, projection {s}", "model": work / "target", "ckpt": ckpt(s), "seed": s})
    # No projection at all: a budget that covers every side of every LoRA matrix, so each side is
    # the identity (from store format 3) and the features are the exact preconditioned gradients
    for s in (0, 1):
        out.append({"name": f"target, warm-up {s}, exact", "model": work / "target", "ckpt": ckpt(s), "seed": s,
                    "proj_dim": EXACT_DIM})
        out.append({"name": f"IProX, seed {s}, exact", "model": run(s) / "proxy", "ckpt": ckpt(s), "seed": s,
                    "both": True, "proj_dim": EXACT_DIM})
    return out


def _origin(work: Path, seed: int) -> Path:
    """The run whose warm-up checkpoint (the target's own, at ``seed``) and pool the jobs read: the
    default setting's, or where that is no longer on disk the study's target run at that seed (the
    target-first order warms the target up alike, bit for bit)."""
    run = work / "runs" / f"{slug(DEFAULT)}-s{seed}"
    return run if (run / "warmup" / "COMPLETE").exists() else work / "runs" / f"target-s{seed}"


def featurise(job: dict, folder: Path, work: Path, max_length: int) -> float:
    """Pool and validation stores and the scores of one job; seconds of its pool pass (0 if done before)."""
    pool = _origin(work, 0) / "pool"
    exact = "proj_dim" in job
    common = ["--checkpoint", str(job["ckpt"]), "--seed", str(job["seed"]),
              "--proj-dim", str(job.get("proj_dim", BASE["features"]["proj_dim"])),
              "--max-length", str(max_length), "--batch-size", str(BASE["features"]["batch_size"]), "--no-progress"]
    log = folder.parent / "log.txt"
    seconds = 0.0
    if not (folder / "train" / "COMPLETE").exists():
        t0 = time.perf_counter()
        sh(IPROX + ["features", "--data", str(pool / "pool.jsonl"), "--out", str(folder / "train"),
                    "--model", str(job["model"]), "--grad", "adam", *common], log)
        seconds = time.perf_counter() - t0
    if exact:  # nothing was projected: the store holds as many dimensions as the adapter has parameters
        man = read_manifest(folder / "train")
        if man["dim"] != lora_parameters(man["checkpoint"]):
            raise SystemExit(f"{folder / 'train'} is projected ({man['dim']} dimensions); raise EXACT_DIM")
    vals = [("val", job["model"])] + ([("val-target", work / "target")] if job.get("both") else [])
    for name, model in vals:
        if not (folder / name / "COMPLETE").exists():
            sh(IPROX + ["features", "--data", str(pool / "validation.jsonl"), "--out", str(folder / name),
                        "--model", str(model), "--grad", "sgd", *common], log)
    if not (folder / "scores" / "COMPLETE").exists():
        sh(IPROX + ["score", "--train", *[str(folder / "train")] * len(vals), "--chunk-rows", "32" if exact else "4096",
                    "--val", *[str(folder / n) for n, _ in vals], "--out", str(folder / "scores"), "--no-progress"], log)
    return seconds


def lora_parameters(checkpoint: str) -> int:
    """Parameters of a LoRA checkpoint's adapter (all its A and B matrices)."""
    from safetensors import safe_open

    with safe_open(str(Path(checkpoint) / "adapter_model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity", help="the fidelity study's work folder")
    ap.add_argument("--max-length", type=int, default=320)
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these jobs (default: all, in order)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    path = RESULTS / "projection.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    if not args.report:
        work = Path(args.work)
        key = f"store format {STORE_FORMAT_VERSION}"
        mine = res.setdefault(key, {"seconds": {}, "vs": {}})
        base = work / "projection" / f"format-{STORE_FORMAT_VERSION}"
        base.mkdir(parents=True, exist_ok=True)
        study = study_against_exact(work)
        if study:  # (a run under another format has no exact reference: keep the table)
            res["fidelity study against the exact target"] = study
        for job in jobs(work):
            if args.only and job["name"] not in args.only:
                continue
            folder = base / slug(job["name"])
            sec = featurise(job, folder, work, args.max_length)
            if sec:
                mine["seconds"][job["name"]] = round(sec, 1)
            compare(mine, base)
            path.write_text(json.dumps(res, indent=2))
            print(f"{key}: {job['name']} done", flush=True)
    update_benchmarks_md("projection", report(res))
    print(report(res))


def compare(mine: dict, base: Path) -> None:
    def scores(name):
        f = base / slug(name) / "scores"
        return read_scores(f) if (f / "COMPLETE").exists() else None

    ref = scores("target, warm-up 0, projection 0")
    if ref is None:
        return
    pairs = {"target: another projection seed": ("target, warm-up 0, projection 1", ref)}
    for s in (1, 2):
        pairs[f"target: warm-up and projection seed {s}"] = (f"target, warm-up {s}, projection {s}", ref)
    for s in (0, 1, 2):
        pairs[f"IProX seed {s} against target seed 0"] = (f"IProX, seed {s}", ref)
        if s:
            pairs[f"IProX seed {s} against target seed {s}"] = (f"IProX, seed {s}", scores(f"target, warm-up {s}, projection {s}"))
    exact = scores("target, warm-up 0, exact")
    if exact is not None:
        pairs["target (projected) against target exact"] = ("target, warm-up 0, projection 0", exact)
        pairs["target, another projection seed, against target exact"] = ("target, warm-up 0, projection 1", exact)
        pairs["target warm-up 1 exact against target exact"] = ("target, warm-up 1, exact", exact)
        pairs["IProX seed 0 (projected) against target exact"] = ("IProX, seed 0", exact)
        for s in (0, 1):
            pairs[f"IProX seed {s} exact against target exact"] = (f"IProX, seed {s}, exact", exact)
        pairs["IProX seed 1 exact against target warm-up 1 exact"] = ("IProX, seed 1, exact", scores("target, warm-up 1, exact"))
    for label, (name, against) in pairs.items():
        rows = scores(name)
        if rows is not None and against is not None:
            mine["vs"][label] = measure(rows, against)


def study_against_exact(work: Path) -> dict:
    """Every fidelity-study run whose scores are on disk, against the exact target (seed 0): per
    setting, per task, the figures of each seed. Only score tables are read; the runs' own stores
    stay as the study made them (store format 2, proj_dim 64)."""
    ref = work / "projection" / f"format-{STORE_FORMAT_VERSION}" / slug("target, warm-up 0, exact") / "scores"
    study = RESULTS / "fidelity.json"
    if not (ref / "COMPLETE").exists() or not study.exists():
        return {}
    exact = read_scores(ref)
    out: dict[str, list] = {}
    for rec in json.loads(study.read_text())["runs"].values():
        if rec.get("scores") and (Path(rec["scores"]) / "COMPLETE").exists():  # (one run per task: no single table)
            out.setdefault(rec["setting"], []).append([rec["seed"], measure(read_scores(rec["scores"]), exact)])
    return out


def report(res: dict) -> str:
    lines = ["## The target's projection noise, and the proxy under each store format (issue 12)", "",
             "`benchmarks/diag_projection.py`: the fidelity study's target and 0.7-default proxies (sparsity 0.5) "
             "featurised again with the code of each store format (proj_dim 64 per layer; \"exact\": 12288, every "
             "LoRA side whole, no projection). Per task "
             "(boolean_expressions / hyperbaton / formal_fallacies): whole-pool Spearman / head Spearman / top-5% "
             "overlap / task share of the top 5% (of 15; the reference's in brackets).", ""]
    for key, mine in res.items():
        if key == "fidelity study against the exact target":
            continue
        lines += [f"### {key}", "", "| comparison | " + " | ".join(TASKS) + " |", "|---|" + "---|" * len(TASKS)]
        for label, m in mine["vs"].items():
            lines.append(f"| {label} | " + " | ".join(
                f"{m[t]['spearman']:.2f} / {m[t]['head_spearman']:.2f} / {m[t]['overlap_5']:.2f} / "
                f"{round(m[t]['share_5'] * 15)} ({round(m[t]['ref_share_5'] * 15)})" for t in TASKS) + " |")
        if mine.get("seconds"):
            lines += ["", "Pool pass (300 examples, train features) seconds: " +
                      "; ".join(f"{k} {v:.0f}" for k, v in mine["seconds"].items()) + "."]
        lines.append("")
    study = res.get("fidelity study against the exact target")
    if study:
        lines += ["### The fidelity study's runs against the exact target", "",
                  "Each run's scores as the study made them (store format 2, proj_dim 64), against the target's exact "
                  "gradients (seed-0 warm-up): mean over the seeds on disk (n) of whole-pool Spearman / head Spearman / "
                  "top-5% overlap. The target's own warm-up seed 1 (exact) is the ceiling: "
                  + _cells(res, "target warm-up 1 exact against target exact") + ".", "",
                  "| setting | n | " + " | ".join(TASKS) + " |", "|---|---|" + "---|" * len(TASKS)]
        for setting, figs in sorted(study.items(), key=lambda kv: -sum(
                statistics.fmean(f[t]["spearman"] for _, f in kv[1]) for t in TASKS)):
            lines.append(f"| {setting} | {len(figs)} | " + " | ".join(" / ".join(
                f"{statistics.fmean(f[t][k] for _, f in figs):.2f}" for k in ("spearman", "head_spearman", "overlap_5"))
                for t in TASKS) + " |")
    return "\n".join(lines).rstrip()


def _cells(res: dict, label: str) -> str:
    m = res.get(f"store format {STORE_FORMAT_VERSION}", {}).get("vs", {}).get(label)
    if m is None:
        return "not measured"
    return "; ".join(f"{t} {m[t]['spearman']:.2f} / {m[t]['head_spearman']:.2f} / {m[t]['overlap_5']:.2f}" for t in TASKS)


if __name__ == "__main__":
    main()
