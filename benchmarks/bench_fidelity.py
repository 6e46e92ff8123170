"""Fidelity study: which settings make the proxy's selection the target's, against what ceiling, and at
what build cost.

The full-mode pool of ``bench_selection.py`` (300 examples: 100 GSM8K train problems and 10 of each
of the 20 BBH tasks; target tasks boolean_expressions, hyperbaton and formal_fallacies, 4 validation
examples each, none in the pool) and the embedded SmolLM2-135M-Instruct as the target. Every
(setting, seed) is one ``iprox run`` in its own process and folder, so the study resumes where it
stopped: a finished run is read back, an interrupted one resumes through the pipeline's own resume.

References, per target task (the scores' per-task columns):

* ``target``: the target through the same pipeline (LoRA warm-up, Kronecker features with
  elementwise Adam), seed 0. Seeds 1, 2 (another warm-up order and projection) against seed 0 give
  the **ceiling**: how well the target agrees with itself.
* ``exact LESS``: the target with the dense per-example engine (one backward per example), seed 0.

Every proxy run is compared with both, per task: Spearman over the pool, Spearman over the
reference's top 20% (the head), top-1/5/10% overlap, and the share of its top 5% drawn from the task
beside the target's. Each proxy's gradient cosine with the target on held-out test examples (``iprox
fidelity --proxy``) is measured too, to see how well that cheap check predicts score agreement.
Figures are mean ± spread (half the range) over seeds.

``--settings`` picks settings (default: the core set), ``--seeds`` the seeds, ``--report`` rewrites
the report from the results JSON. Writes ``benchmarks/results/fidelity.json``, PNGs and the
"fidelity" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import IPROX, build_seconds, downstream, find_data, selection_data, sh, slug, update_benchmarks_md  # noqa: E402

from iprox.agreement import spearman  # noqa: E402
from iprox.fidelity import score_agreement  # noqa: E402
from iprox.loading import read_scores  # noqa: E402

log = logging.getLogger("bench_fidelity")
RESULTS = ROOT / "benchmarks" / "results"
TASKS = ["boolean_expressions", "hyperbaton", "formal_fallacies"]

# The settings every proxy run starts from; a setting below changes some of them.
BASE = {
    "run": {"selector": "proxy", "warmup_on": "proxy"},
    "proxy": {"sparsity": 0.5, "probe_examples": 16, "probe_tokens": 4096, "batch_size": 4,
              "align_examples": 16, "align_epochs": 5.0, "lambda_kl": 0.1, "lr": 1e-4,
              # the defaults before 0.6, under which the study's first settings ran
              "probe_balance": "loss", "align_cosine": "batch",
              # no floor on the steps align_epochs counts (0.11's default is 40): every setting before
              # 0.11 aligned 5 epochs of 16 = 20 steps; settings that want more say align_steps
              "align_min_steps": 0},
    "warmup": {"fraction": 0.05, "lr": 2e-5},
    # val_model pinned to what every setting before 0.7 ran with (settings that compare validation
    # models set their own): a rerun under 0.7's default ("both") would not be the run its name says
    # (and calibrate to 0, as every run before 0.8 had none: settings that calibrate set their own)
    "features": {"proj_dim": 64, "batch_size": 8, "train_grad": "adam", "val_model": "proxy", "calibrate": 0},
    # no rerank (0.12's default in the target-first order): the study measures the proxy's own scores
    # (diag_rerank.py measures the rerank from the same stores)
    "rerank": {"fraction": 0},
}
NO_ALIGN = {"align_epochs": 0.0, "align_examples": 0}
# the defaults since 0.6 (per-example cosine as micro-batches of one, 4 accumulated: the same examples
# per step as BASE's batch of 4)
DEFAULT_06 = {"probe_balance": "example", "batch_size": 1, "grad_accum": 4}


def _settings() -> dict[str, dict]:
    """name → {"group": sweep it belongs to, section: overrides of BASE}."""
    s: dict[str, dict] = {
        "target": {"group": "reference", "run": {"selector": "model"}},
        "exact LESS": {"group": "reference", "run": {"selector": "model"}, "features": {"engine": "dense"}},
        "proxy-first": {"group": "order"},
        "representation (RDS+)": {"group": "downstream baselines", "run": {"selector": "representation"}},
        "random": {"group": "downstream baselines", "run": {"selector": "random"}},
    }
    for steps in (0, 8, 40):  # the default is 5 epochs over 16 examples at batch 4: 20 steps
        s[f"align {steps} steps"] = {"group": "alignment length",
                                     "proxy": NO_ALIGN if steps == 0 else {"align_epochs": 0.0, "align_steps": steps}}
    s["align set 48"] = {"group": "alignment set", "proxy": {"align_examples": 48}}
    for lam in (0.0, 1.0):
        s[f"lambda_kl {lam:g}"] = {"group": "lambda_kl", "proxy": {"lambda_kl": lam}}
    s["probe 64"] = {"group": "probe", "proxy": {"probe_examples": 64}}
    for sp in (0.3, 0.7):
        s[f"sparsity {sp}"] = {"group": "sparsity", "proxy": {"sparsity": sp}}
    s["warm-up lora"] = {"group": "warm-up", "warmup": {"proxy_trains": "lora"}}
    s["target-first"] = {"group": "order", "run": {"selector": "proxy", "warmup_on": "target"}}
    for sp in (0.3, 0.7):
        s[f"target-first {sp}"] = {"group": "warm-up", "run": {"selector": "proxy", "warmup_on": "target"},
                                   "proxy": {"sparsity": sp}}
    s["target-first align 40"] = {"group": "warm-up", "run": {"selector": "proxy", "warmup_on": "target"},
                                  "proxy": {"align_epochs": 0.0, "align_steps": 40}}
    s["target-first align 0"] = {"group": "warm-up", "run": {"selector": "proxy", "warmup_on": "target"},
                                 "proxy": NO_ALIGN}
    # the gradient cosine per example (micro-batch 1, 4 accumulated: the same 20 steps over the same
    # examples), as influence is per example, instead of per micro-batch of 4
    s["target-first per-example align"] = {"group": "alignment objective", "run": {"selector": "proxy", "warmup_on": "target"},
                                           "proxy": {"batch_size": 1, "grad_accum": 4}}
    # every probe example weighing the same in the output-gradient moments (a GSM8K answer's ~130
    # tokens share one mean loss, so its gradients were small beside a BBH answer's few tokens)
    s["target-first balanced probe"] = {"group": "probe", "run": {"selector": "proxy", "warmup_on": "target"},
                                        "proxy": {"probe_balance": "example"}}
    s["target-first balanced probe, per-example align"] = {
        "group": "alignment objective", "run": {"selector": "proxy", "warmup_on": "target"},
        "proxy": {"probe_balance": "example", "batch_size": 1, "grad_accum": 4}}
    s["target-first svd 0.5"] = {"group": "baselines", "run": {"selector": "proxy", "warmup_on": "target"},
                                 "proxy": {"init": "svd"}}
    # the 0.6 default's alignment at the same cost over 5x the examples (80 examples, one pass: 20
    # steps), and twice as long over the same 16
    s["0.6 default, align set 80 x 1 epoch"] = {
        "group": "alignment set", "run": {"selector": "proxy", "warmup_on": "target"},
        "proxy": {**DEFAULT_06, "align_examples": 80, "align_epochs": 1.0}}
    for steps in (40, 80):
        s[f"0.6 default, align {steps} steps"] = {
            "group": "alignment length", "run": {"selector": "proxy", "warmup_on": "target"},
            "proxy": {**DEFAULT_06, "align_epochs": 0.0, "align_steps": steps}}
    # the loss still falls at step 40 of a constant learning rate of 1e-4 and levels off by step 50
    # (80-step log): 40 steps (0.11's default length) at 3x the rate, half the 80 steps' cost
    s["0.6 default, align 40 steps, lr 3e-4"] = {
        "group": "alignment length", "run": {"selector": "proxy", "warmup_on": "target"},
        "proxy": {**DEFAULT_06, "align_epochs": 0.0, "align_steps": 40, "lr": 3e-4}}
    # the remaining sweeps of the issue, from the 0.6 default
    tf = {"selector": "proxy", "warmup_on": "target"}
    for lam in (0.0, 1.0):
        s[f"0.6 default, lambda_kl {lam:g}"] = {"group": "lambda_kl", "run": tf, "proxy": {**DEFAULT_06, "lambda_kl": lam}}
    s["0.6 default, probe 64"] = {"group": "probe", "run": tf, "proxy": {**DEFAULT_06, "probe_examples": 64}}
    s["0.6 default, 2 checkpoints"] = {"group": "checkpoints", "run": tf, "proxy": DEFAULT_06, "warmup": {"epochs": 2}}
    # IProX against plain SVD at every sparsity, both aligned as the 0.6 default aligns (plain SVD
    # has no probe, so probe_balance does not reach it; layer-drop at each sparsity is
    # "layer-drop <s>" below; IProX at 0.5 is "target-first balanced probe, per-example align")
    for sp in (0.3, 0.5, 0.7):
        if sp != 0.5:
            s[f"0.6 default, sparsity {sp}"] = {"group": "sparsity", "run": tf, "proxy": {**DEFAULT_06, "sparsity": sp}}
        s[f"target-first svd {sp}, per-example align"] = {
            "group": "baselines", "run": tf, "proxy": {**DEFAULT_06, "init": "svd", "sparsity": sp}}
    # the validation gradients from the target (which carries the same LoRA checkpoint) instead of
    # the proxy, or both scores summed: only the pool goes through the proxy
    for vm in ("target", "both"):
        s[f"0.6 default, val {vm}"] = {"group": "validation model", "run": tf, "proxy": DEFAULT_06,
                                       "features": {"val_model": vm}}
    # The same stores scored another way, without building anything again: "both"'s run holds the
    # pool store and the proxy's and the target's validation stores of each checkpoint, so `iprox
    # score` on a pair of them is what a run with val_model = proxy or target would compute (same
    # seed, same deterministic stages). Its build time is the source run's.
    for vm, val in (("proxy", "val"), ("target", "val-target")):
        s[f"0.6 default, val {vm}, rescored"] = {"group": "validation model",
                                                 "rescore": {"from": "0.6 default, val both", "val": val}}
    # Runs made before val_model existed, their pool stores scored against the target's validation
    # gradients (and beside the proxy's: both): the target's store of each checkpoint is computed
    # here (a few examples) into the rescored folder.
    for source in ("0.6 default, sparsity 0.3", "0.6 default, sparsity 0.7", "target-first svd 0.3, per-example align",
                   "target-first svd 0.7, per-example align", "target-first svd 0.5, per-example align",
                   "0.6 default, align 40 steps"):
        for vm, val in (("target", ["val-target"]), ("both", ["val", "val-target"])):
            s[f"{source}, val {vm}"] = {"group": "validation model",
                                        "rescore": {"from": source, "val": val, "compute": True}}
    # the kept parameters spread over depth, more to the lower blocks (benchmarks/diag_rank_allocation.py:
    # at stage 1 this raises the gradient cosine most at slope 0.6), validation gradients as in 0.7
    s["0.7 default, depth slope 0.6"] = {"group": "rank allocation", "run": tf,
                                         "proxy": {**DEFAULT_06, "depth_slope": 0.6}, "features": {"val_model": "both"}}
    # the alignment's gradient cosine taken between the gradients of the target's carried LoRA adapters
    # (the space the features are read in) instead of the factor-space projections; the target warms
    # up first so its last checkpoint is there to align in
    s["0.7 default, LoRA-space align"] = {"group": "alignment objective", "run": tf,
                                          "proxy": {**DEFAULT_06, "align_space": "lora"},
                                          "features": {"val_model": "both"}}
    for vm, val in (("proxy", "val"), ("target", "val-target")):
        s[f"0.7 default, LoRA-space align, val {vm}, rescored"] = {
            "group": "alignment objective", "rescore": {"from": "0.7 default, LoRA-space align", "val": val}}
    # The 0.7 default's proxy warmed up and read out other ways. Each reuses the proxy of the same
    # seed's "0.6 default, val both" run (the same compress and align settings, so the same proxy;
    # its build seconds are that run's): only the warm-up and what follows run.
    s["0.7 default, 4 checkpoints"] = {"group": "checkpoints", "run": tf, "proxy": DEFAULT_06,
                                       "warmup": {"epochs": 4}, "features": {"val_model": "both"},
                                       "reuse": "0.6 default, val both"}
    for trains in ("factors", "lora"):  # the proxy warms up itself: its factors, or LoRA on them
        s[f"0.7 default, proxy-first, {trains} warm-up"] = {
            "group": "warm-up", "run": {"selector": "proxy", "warmup_on": "proxy"}, "proxy": DEFAULT_06,
            "warmup": {"proxy_trains": trains}, "reuse": "0.6 default, val both"}
    # The 0.7 default's proxy with its pool features corrected by the target's on 32 seeded pool
    # examples ([features] calibrate, 0.8): only the warm-up and what follows run, under store format 3
    s["0.8, calibrate 32"] = {"group": "calibration", "run": tf, "proxy": DEFAULT_06,
                              "features": {"val_model": "both", "calibrate": 32}, "reuse": "0.6 default, val both"}
    # 0.12's defaults as a new user gets them: nothing pinned but the data, the seed, the selection and
    # the study's one warm-up checkpoint. One run per target task (its own validation examples alone),
    # as a user with one task runs it: there the rerank's shortlist is that task's head (in a run of the
    # three tasks each column's head is a third of it, and a column's top 5% keeps the proxy's set).
    # From seed 1 on, the second and third task start from the first's run (--from, 0.13): the same
    # selection as a fresh run (tested), the build paid once.
    s["0.12 default, one task per run"] = {"group": "defaults", "defaults": True, "alone": True}
    # 0.14's defaults: the same, but the rerank's shortlist doubles where the target's top k reach its
    # last fifth. Each (task, seed) starts from 0.12's run of it (--from): everything up to the scores is
    # the same, so only the rerank runs again.
    s["0.14 default, one task per run"] = {"group": "defaults", "defaults": True, "alone": True,
                                           "start_from": "0.12 default, one task per run"}
    # 0.19's defaults: 0.18's calibration size (a tenth of the pool, here 30 where 0.14 took 32) and
    # 0.19's recalibrated rerank rounds. Each (task, seed) starts from 0.14's run of it: the proxy, its
    # alignment and the warm-up are reused, the features stage runs again for the new calibration size.
    s["0.19 default, one task per run"] = {"group": "defaults", "defaults": True, "alone": True,
                                           "start_from": "0.14 default, one task per run"}
    # 0.15's defaults (the selection, the calibration and the rerank of "0.14 default") with another
    # proxy: another sparsity, or plain SVD in place of IPSVD (both aligned as the defaults align).
    # Layer-drop too since 0.17: its kept blocks carry the target's LoRA checkpoint at the target's block
    # indices (the dropped blocks' adapters are held and never run); its rows above ran proxy-first.
    for sp in (0.3, 0.5, 0.7):
        s[f"0.17 default, layer-drop {sp}"] = {"group": "defaults, other proxies", "defaults": True, "alone": True,
                                               "proxy": {"sparsity": sp, "init": "layer-drop"}}
    for sp in (0.3, 0.7):
        s[f"0.15 default, sparsity {sp}"] = {"group": "defaults, other proxies", "defaults": True, "alone": True,
                                              "proxy": {"sparsity": sp}}
    for sp in (0.3, 0.5, 0.7):
        s[f"0.15 default, svd {sp}"] = {"group": "defaults, other proxies", "defaults": True, "alone": True,
                                        "proxy": {"sparsity": sp, "init": "svd"}}
    s["factored-adam"] = {"group": "preconditioner", "features": {"train_grad": "factored-adam"}}
    for e in (2, 4):
        s[f"{e} checkpoints"] = {"group": "checkpoints", "warmup": {"epochs": e}}
    for sp in (0.3, 0.5, 0.7):
        s[f"svd+align {sp}"] = {"group": "baselines", "proxy": {"sparsity": sp, "init": "svd"}}
        s[f"layer-drop {sp}"] = {"group": "baselines", "proxy": {"sparsity": sp, "init": "layer-drop", **NO_ALIGN}}
        if sp != 0.5:
            s[f"ipsvd+align {sp}"] = {"group": "baselines", "proxy": {"sparsity": sp}}
    return s


SETTINGS = _settings()
CORE = ["target", "proxy-first", "target-first", "align 0 steps"]


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def write_config(path: Path, out: Path, target: Path, pool: Path, val: Path, setting: dict, seed: int,
                 epochs: int, max_len: int) -> None:
    if setting.get("defaults"):  # the library's defaults: only what every run of the study shares
        sections = {"run": {"selector": "proxy"}, "warmup": {"epochs": epochs}}
        if setting.get("proxy"):  # another proxy under the defaults: only what it names
            sections["proxy"] = dict(setting["proxy"])
    else:
        sections = {k: dict(v) for k, v in BASE.items()}
        sections["warmup"].setdefault("epochs", epochs)
        for sec in ("run", "proxy", "warmup", "features", "rerank"):
            sections[sec].update(setting.get(sec, {}))
    sections["run"].update(out=str(out), model=str(target), seed=seed)
    sections["data"] = {"pool": [str(pool)], "validation": [str(val)], "max_length": max_len}
    sections["score"] = {"method": "tracin", "aggregate": "max"}
    sections["select"] = {"fraction": 0.05}
    if sections["run"]["selector"] != "proxy":
        del sections["proxy"]
    path.write_text("".join(f"[{sec}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in body.items())
                            for sec, body in sections.items()))


def measure(rows: list[dict], ref: list[dict]) -> dict:
    """Per-task figures of one score table against a reference table (a table without per-task
    columns, random's, is compared by its one score)."""
    rows = [{**r, **{t: r["score"] for t in TASKS if t not in r}} for r in rows]
    rep, _, _ = score_agreement(ref, rows)
    out = {}
    for t in TASKS:
        v = rep["subtasks"][t]
        out[t] = {"spearman": v["spearman"], "head_spearman": v["head_spearman"],
                  "overlap_1": v["overlap_at"]["1"]["overlap"], "overlap_5": v["overlap_at"]["5"]["overlap"],
                  "overlap_10": v["overlap_at"]["10"]["overlap"],
                  "share_5": v["task_share_at_5"]["other"], "ref_share_5": v["task_share_at_5"]["target"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--settings", nargs="+", default=CORE, metavar="NAME",
                    help=f"settings to run (default: {' / '.join(CORE)}); 'all' for every one: {' / '.join(SETTINGS)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1, help="warm-up epochs = checkpoints of the base setting")
    ap.add_argument("--max-length", type=int, default=320)
    ap.add_argument("--work", default="/tmp/iprox-bench-fidelity")
    ap.add_argument("--report", action="store_true", help="only rewrite the report from the results JSON")
    ap.add_argument("--downstream", nargs="*", default=None, metavar="NAME",
                    help="fine-tune the target on each named setting's top 5%% per task (seed 0; default: target, "
                         "proxy-first, target-first, RDS+, random) and evaluate on 40 held-out examples per task")
    ap.add_argument("--no-reference", action="store_true",
                    help="only build the runs on disk, for another script that needs them (the target reference "
                         "is not run first; results and report are not written)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    res_path = RESULTS / "fidelity.json"
    if args.report:
        finish(json.loads(res_path.read_text()))
        return
    if args.no_reference and args.downstream is not None:
        raise SystemExit("--downstream needs the target reference; leave --no-reference out")
    names = list(SETTINGS) if args.settings == ["all"] else args.settings
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; known: {list(SETTINGS)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pool, pool_f, val_f, test_f, target = selection_data(work, find_data(), TASKS, 100, 10, 4, 40)
    held = work / "heldout.jsonl"  # 4 test examples per task for the gradient check
    held.write_text("".join("".join(test_f[t].read_text().splitlines(keepends=True)[:4]) for t in TASKS))
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    results.update(pool=len(pool), tasks=TASKS, epochs=args.epochs, max_length=args.max_length, base=BASE)
    # a third reference where diag_projection.py made it in this work folder: the target's exact
    # gradients (every LoRA side whole, no projection; warm-up seed 0), diag_rerank.py's reference
    exact_store = work / "projection" / "format-3" / "target__warm-up_0__exact" / "scores"
    if (exact_store / "COMPLETE").exists():
        results["exact_gradients"] = str(exact_store)
    runs = results.setdefault("runs", {})
    fresh: set[str] = set()  # the runs this invocation made or read back
    # The reference first (every comparison needs it), then the rest seed by seed, so an
    # interrupted study has every setting at its first seeds rather than one setting at all of them.
    order = [] if args.no_reference else [("target", 0)]
    order += [(n, s) for s in args.seeds for n in names if (n, s) not in order]
    if args.downstream is not None:
        want = args.downstream or ["target", "proxy-first", "target-first", "representation (RDS+)", "random"]
        order = [("target", 0)] + [(n, 0) for n in want if n != "target"]
    for name, seed in order:
        if name == "exact LESS" and seed != 0:
            continue
        key = f"{name} | {seed}"
        out = work / "runs" / f"{slug(name)}-s{seed}"
        cfg = work / "configs" / f"{slug(name)}-s{seed}.toml"
        cfg.parent.mkdir(exist_ok=True)
        rescore = SETTINGS[name].get("rescore")
        source = name if rescore is None else rescore["from"]
        built = work / "runs" / f"{slug(source)}-s{seed}"  # the run whose proxy and stores these are
        # an earlier setting's run of each task and seed, to start from where it is still on disk
        start_from = SETTINGS[name].get("start_from")
        earlier = {t: work / "runs" / f"{slug(start_from)}-{slug(t)}-s{seed}" for t in TASKS} if start_from else {}
        if rescore is not None:
            if not (built / "selection" / "COMPLETE").exists():
                log.warning("%s, seed %d: skipped, %r has no finished run at this seed (list it before this one)",
                            name, seed, source)
                continue
            # each pool store paired with each of its checkpoint's validation stores (scores add up)
            prefixes = rescore["val"] if isinstance(rescore["val"], list) else [rescore["val"]]
            pairs = [(t, (out if rescore.get("compute") and p == "val-target" else built) / "features" /
                      t.name.replace("train", p)) for t in sorted((built / "features").glob("train-*")) for p in prefixes]
            if rescore.get("compute"):
                for v in {v for _, v in pairs if v.parent.parent == out}:
                    ck = built / "warmup" / f"checkpoint-{v.name.rsplit('-', 1)[1]}"
                    sh(IPROX + ["features", "--model", str(target), "--checkpoint", str(ck), "--grad", "sgd",
                                "--data", str(built / "pool" / "validation.jsonl"), "--seed", str(seed),
                                "--proj-dim", str(BASE["features"]["proj_dim"]), "--max-length", str(args.max_length),
                                "--out", str(v), "--no-progress"], work / "log.txt")
            sh(IPROX + ["score", "--train", *[str(t) for t, _ in pairs], "--val", *[str(v) for _, v in pairs],
                        "--out", str(out / "scores"), "--no-progress"], work / "log.txt")
        else:
            # a setting run once per target task has a folder per task (the first one's proxy is checked)
            alone = TASKS if SETTINGS[name].get("alone") else [None]
            outs = {t: out if t is None else work / "runs" / f"{slug(name)}-{slug(t)}-s{seed}" for t in alone}
            built = outs[alone[0]]
            ran = False  # whether this invocation built (part of) the run: its earlier comparisons are then stale
            for t, o in outs.items():
                c = cfg if t is None else cfg.with_name(f"{o.name}.toml")
                write_config(c, o, target, pool_f, val_f if t is None else task_validation(val_f, t), SETTINGS[name],
                             seed, args.epochs, args.max_length)
                if key in runs and (o / "selection" / "COMPLETE").exists():
                    log.info("%s, seed %d%s: finished earlier; read back", name, seed, f", {t}" if t else "")
                    continue
                log.info("%s, seed %d%s", name, seed, f", {t}" if t else "")
                if "reuse" in SETTINGS[name]:
                    reuse_build(work / "runs" / f"{slug(SETTINGS[name]['reuse'])}-s{seed}", o)
                # a later task over the same pool starts from the first task's run (`iprox run --from`: its
                # proxy, warm-up and pool features, which a fresh run would rebuild bit for bit)
                src = outs[alone[0]]
                if t in earlier and (earlier[t] / "selection" / "COMPLETE").exists():
                    src = earlier[t]
                start = (["--from", str(src)] if o != src and (src / "selection" / "COMPLETE").exists()
                         and not (o / "pipeline.json").exists() else [])
                sh(IPROX + ["run", str(c), "--no-progress", *start], work / "log.txt")
                ran = True
        meta = json.loads((built / "pipeline.json").read_text())
        timings = meta["timings"]
        if rescore is None and TASKS[0] in earlier and (earlier[TASKS[0]] / "pipeline.json").exists():
            # its proxy is that run's, so is its build (a run whose start is gone built its own: its timings)
            was = json.loads((earlier[TASKS[0]] / "pipeline.json").read_text())["timings"]
            timings = {**timings, **{k: v for k, v in was.items() if k in ("compress", "align")}}
        rec = {"setting": name, "seed": seed, "group": SETTINGS[name]["group"], "out": str(out),
               "timings": timings, "scores": str(final_scores(out))}
        if rescore is None and SETTINGS[name].get("alone"):
            rec.update(out=str(built), scores=None, scores_by_task={t: str(final_scores(o)) for t, o in outs.items()},
                       rerank={t: _rerank_report(o) for t, o in outs.items()},
                       timings_by_task={t: json.loads((o / "pipeline.json").read_text())["timings"]
                                        for t, o in outs.items()})
        defn = SETTINGS[source]
        factored = defn.get("proxy", {}).get("init") != "layer-drop"  # the gradient check needs factors
        if defn.get("run", BASE["run"])["selector"] == "proxy" and factored:
            # per proxy (a run started from another setting's run has its proxy)
            fid = work / "gradcos" / f"{slug(defn.get('reuse') or defn.get('start_from') or source)}-s{seed}.json"
            fid.parent.mkdir(exist_ok=True)
            if not fid.exists():
                sh(IPROX + ["fidelity", "--proxy", str(built / "proxy"), "--target", str(target), "--data", str(held),
                            "--limit", "0", "--max-length", str(args.max_length), "--out", str(fid), "--no-progress"],
                   work / "log.txt")
            g = json.loads(fid.read_text())
            rec.update(grad_cosine=g["grad_cosine_global"], kl=g["kl"])
        if args.no_reference:  # a rebuild for another script: the study's record stays as it was measured
            was = runs.get(key, {})
            log.info("%s, seed %d rebuilt: gradient cosine %s, KL %s (recorded: %s, %s); results not written", name,
                     seed, rec.get("grad_cosine"), rec.get("kl"), was.get("grad_cosine"), was.get("kl"))
            continue
        # comparisons made earlier against a reference whose folder is gone since stay as measured, unless
        # this invocation rebuilt the run: they were measured on another build's scores
        if "vs" in runs.get(key, {}):
            if rescore is None and ran:
                log.info("%s, seed %d: rebuilt; its earlier comparisons (%s) are dropped and remeasured where their "
                         "reference is on disk", name, seed, ", ".join(runs[key]["vs"]))
            else:
                rec["vs"] = dict(runs[key]["vs"])
        runs[key] = rec
        fresh.add(key)
        compare(results, fresh)
        RESULTS.mkdir(parents=True, exist_ok=True)
        res_path.write_text(json.dumps(results, indent=2))
    if args.downstream is not None:
        sel = {n: ({t: Path(f) for t, f in runs[f"{n} | 0"]["scores_by_task"].items()}
                   if runs[f"{n} | 0"].get("scores_by_task") else Path(runs[f"{n} | 0"]["scores"])) for n, _ in order}
        new = downstream(work, target, pool_f, test_f, TASKS, sel, 15, args.max_length)
        # selectors measured in an earlier invocation (whose run folders may be gone) keep their rows
        old = results.get("downstream", {})
        results["downstream"] = {t: {**old.get(t, {}), **rows} for t, rows in new.items()}
        res_path.write_text(json.dumps(results, indent=2))
    if not args.no_reference:
        finish(results)


def task_validation(val_f: Path, task: str) -> Path:
    """The validation file's examples of one task, beside it (for a run of that task alone)."""
    out = val_f.with_name(f"{val_f.stem}-{task}.jsonl")
    text = "".join(ln + "\n" for ln in val_f.read_text().splitlines() if ln.strip() and json.loads(ln)["task"] == task)
    if not out.exists() or out.read_text() != text:
        out.write_text(text)
    return out


def final_scores(out: Path) -> Path:
    """A run's scores as its selection took them: the reranked ones where the run reranked."""
    return out / "rerank" / "scores" if (out / "rerank" / "scores" / "COMPLETE").exists() else out / "scores"


def _rerank_report(out: Path) -> dict | None:
    """The rerank's report of a run (``scores.json``'s ``rerank``), when it reranked."""
    f = out / "rerank" / "scores" / "scores.json"
    return json.loads(f.read_text()).get("rerank") if f.exists() else None


def reuse_build(src: Path, out: Path) -> None:
    """Starts the run folder ``out`` from ``src``'s pool and proxy (its compress and align stages),
    their records pointed at ``out``: `iprox run` then finds them complete with its own settings and
    runs the warm-up on, keeping their stage times. A proxy built with other settings is refused
    there (its settings differ), not rebuilt. Nothing to do when ``out`` holds them already."""
    if (out / "proxy").exists():
        return
    if not (src / "proxy" / "COMPLETE").exists():
        raise SystemExit(f"{out.name} reuses the proxy of {src}, which has none; run that setting at this seed first")
    out.mkdir(parents=True, exist_ok=True)
    for d in ("pool", "compressed", "proxy"):
        shutil.copytree(src / d, out / d)
        for f in (out / d).rglob("*.json"):
            f.write_text(f.read_text().replace(str(src), str(out)))
    meta = json.loads((src / "pipeline.json").read_text())
    keep = ("pool", "compress", "align")
    meta = {k: {st: v for st, v in meta[k].items() if st in keep} for k in ("fingerprints", "timings", "peak_rss_gib",
                                                                            "model_load_s") if k in meta}
    (out / "pipeline.json").write_text(json.dumps(meta, indent=2))


def compare(results: dict, fresh: set[str]) -> None:
    """Each run against the target (seed 0 and, where its folder is on disk, the run's own seed) and
    exact LESS, per task. A comparison made earlier is kept
    unless the run is in ``fresh`` (run or read back by this invocation): a reference rerun since
    (under a newer store format, say) does not change the figures measured against it then."""
    runs = results["runs"]
    refs = {"target": runs.get("target | 0"), "exact LESS": runs.get("exact LESS | 0"),
            "exact gradients": {"scores": results["exact_gradients"]} if results.get("exact_gradients") else None}
    for key, rec in runs.items():
        # and the target run at the run's own seed (warm-up and projection): the proxy's error alone
        mine = {**refs, "target, same seed": runs.get(f"target | {rec['seed']}")}
        want = {n: r for n, r in mine.items() if r is not None and r is not rec and Path(r["scores"]).is_dir()
                and (key in fresh or n not in rec.get("vs", {}))}
        if not want:
            continue
        # per task, the scores its column is read from (a run per task: that task's own run)
        folders = rec.get("scores_by_task") or {t: rec["scores"] for t in TASKS}
        if not all(Path(f).is_dir() for f in folders.values()):
            # a run from an earlier work folder (since cleared) keeps the comparison made when it ran
            continue
        tables = {f: read_scores(f) for f in set(folders.values())}
        for rname, ref in want.items():
            ref_rows = read_scores(ref["scores"])
            rec.setdefault("vs", {})[rname] = {t: measure(tables[f], ref_rows)[t] for t, f in folders.items()}


def _stat(xs: list[float]) -> tuple[float, float, int]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan"), 0
    return statistics.fmean(xs), (max(xs) - min(xs)) / 2, len(xs)


def _fmt(xs: list[float], digits: int = 2) -> str:
    m, h, n = _stat(xs)
    if n == 0:
        return "–"
    return f"{m:.{digits}f}" if n == 1 else f"{m:.{digits}f} ± {h:.{digits}f}"


def finish(results: dict) -> None:
    body = report(results)
    print(body)
    update_benchmarks_md("fidelity", body)


def report(r: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = r["runs"]
    by_setting: dict[str, list[dict]] = {}
    for rec in runs.values():
        # the target's seed 0 is the reference run (and, against exact LESS, the fast engine's check);
        # its other seeds are the ceiling
        name = rec["setting"]
        if name == "target":
            name = "target, Kronecker engine (seed 0)" if rec["seed"] == 0 else "target, other seeds (ceiling)"
        by_setting.setdefault(name, []).append(rec)
    lines = ["## Fidelity: which settings make the proxy's selection the target's (issue 12)", "",
             f"`benchmarks/bench_fidelity.py`: target SmolLM2-135M-Instruct; pool of {r['pool']} (100 GSM8K train, 10 of "
             f"each of the 20 BBH tasks), target tasks {', '.join(r['tasks'])} with 4 validation examples each; warm-up "
             f"5% of the pool, {r['epochs']} checkpoint(s) unless the setting says otherwise; max length {r['max_length']}; "
             f"top 5% = 15 examples. Base proxy: " + ", ".join(f"{k} {v}" for k, v in r["base"]["proxy"].items()) +
             f"; train features with {r['base']['features']['train_grad']}. Figures are per target task, "
             "mean ± half-range over the seeds run (n = seeds); whole-pool Spearman, Spearman over the reference's "
             "top 20% (head), top-5% overlap, and the share of the top 5% drawn from the task (the reference's in brackets).",
             ""]
    titles = {"target": "### Against target (seed 0)", "exact LESS": "### Against exact LESS (dense engine, seed 0)",
              "exact gradients": "### Against the target's exact gradients (no projection, warm-up seed 0; "
                                 "diag_rerank.py's reference)",
              "target, same seed": "### Against the target at the run's own seed (the same warm-up and projection "
                                   "seed: the proxy's own error, without the seed-to-seed spread)"}
    for ref, title in titles.items():
        if not any(ref in x.get("vs", {}) for x in runs.values()):
            continue
        lines += [title, "",
                  "| setting | n | build (s) | grad cos | " + " | ".join(f"{t}: Spearman / head / top-5% / share" for t in r["tasks"]) + " |",
                  "|---|---|---|---|" + "---|" * len(r["tasks"])]
        for name, recs in by_setting.items():
            recs = [x for x in recs if ref in x.get("vs", {})]
            if not recs:
                continue
            cells = []
            for t in r["tasks"]:
                v = [x["vs"][ref][t] for x in recs]
                cells.append(f"{_fmt([a['spearman'] for a in v])} / {_fmt([a['head_spearman'] for a in v])} / "
                             f"{_fmt([a['overlap_5'] for a in v])} / {_fmt([a['share_5'] for a in v])} "
                             f"({v[0]['ref_share_5']:.2f})")
            build = _fmt([build_seconds(x["timings"]) or float("nan") for x in recs], 0)
            cos = _fmt([x.get("grad_cosine", float("nan")) for x in recs], 3)
            lines.append(f"| {name} | {len(recs)} | {build} | {cos} | " + " | ".join(cells) + " |")
        lines.append("")
    # Does the held-out gradient cosine predict score agreement? One point per proxy run.
    pts = [(x["grad_cosine"], statistics.fmean(x["vs"]["target"][t]["spearman"] for t in r["tasks"]),
            statistics.fmean(x["vs"]["target"][t]["head_spearman"] for t in r["tasks"]))
           for x in runs.values() if "grad_cosine" in x and "target" in x.get("vs", {})]
    if len(pts) >= 3:
        rho = spearman([p[0] for p in pts], [p[1] for p in pts])
        rho_head = spearman([p[0] for p in pts], [p[2] for p in pts])
        lines += [f"Held-out gradient cosine (`iprox fidelity --proxy`, 12 test examples) against the mean over tasks of "
                  f"each proxy run's agreement with the target, over {len(pts)} proxy runs "
                  f"({len({round(p[0], 6) for p in pts})} distinct proxies): rank correlation {rho:.2f} with whole-pool "
                  f"Spearman, {rho_head:.2f} with head Spearman.", ""]
    # Fidelity against build cost.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, recs in by_setting.items():
        recs = [x for x in recs if "target" in x.get("vs", {}) and build_seconds(x["timings"]) > 0]
        if not recs:
            continue
        ys = [statistics.fmean(x["vs"]["target"][t]["spearman"] for t in r["tasks"]) for x in recs]
        xs = [build_seconds(x["timings"]) for x in recs]
        m, h, _ = _stat(ys)
        axes[0].errorbar([statistics.fmean(xs)], [m], yerr=[h], fmt="o", capsize=3)
        axes[0].annotate(name, (statistics.fmean(xs), m), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if "target, other seeds (ceiling)" in by_setting:
        ceil = [statistics.fmean(x["vs"]["target"][t]["spearman"] for t in r["tasks"])
                for x in by_setting["target, other seeds (ceiling)"] if "target" in x.get("vs", {})]
        if ceil:
            axes[0].axhline(statistics.fmean(ceil), color="grey", ls="--", label="target seed-to-seed (ceiling)")
            axes[0].legend(fontsize=7)
    axes[0].set_xlabel("proxy build time (s): probe, factorisation, alignment")
    axes[0].set_ylabel("Spearman with the target (mean over tasks)")
    axes[0].set_title("fidelity against build cost")
    if pts:
        axes[1].scatter([p[0] for p in pts], [p[1] for p in pts], s=12, label="whole pool")
        axes[1].scatter([p[0] for p in pts], [p[2] for p in pts], s=12, label="head (target's top 20%)")
        axes[1].legend(fontsize=7)
        axes[1].set_xlabel("held-out gradient cosine (iprox fidelity --proxy)")
        axes[1].set_ylabel("Spearman with the target (mean over tasks)")
        axes[1].set_title("does the cheap check predict agreement?")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "fidelity.png", dpi=110)
    plt.close(fig)
    lines += ["![fidelity against build cost](benchmarks/results/fidelity.png)"]
    if r.get("downstream"):
        tasks = [t for t in r["tasks"] if t in r["downstream"]]
        lines += ["", "### Downstream: the top 5% per task fine-tunes the target (seed 0)", "",
                  "LoRA, 3 epochs, lr 2e-4; held-out loss and exact-match accuracy on 40 test examples per task; share: "
                  "of the 15 selected examples, those from the task itself (its share of the pool is 0.033)."
                  + (f" {r['downstream_note']}." if r.get("downstream_note") else ""), "",
                  "| selector | " + " | ".join(f"{t}: share, loss, accuracy" for t in tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        names = list(dict.fromkeys(n for t in tasks for n in r["downstream"][t]))
        for name in names:
            cells = []
            for t in tasks:
                d = r["downstream"][t].get(name)
                if d is None:  # a selector fine-tuned for some tasks only
                    cells.append("–")
                    continue
                share = "–" if d["share"] is None else f"{d['share']:.2f}"
                cells.append(f"{share}, {d['loss']:.3f}, {d['accuracy']:.2f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
