"""Alignment step cost: each example's gradient cosine in token form (0.15), one pass per example or
one pass for the step's examples, against 0.14's weight gradients one example at a time, beside the
summed-gradient cosine; and one checkpoint's cost.

A random-initialised Llama of a named geometry (as bench_scale.py; cost does not depend on the
weights), its SVD proxy at sparsity 0.5, and the same alignment examples for every form. Each form
runs ``--steps`` optimiser steps of ``--batch`` examples after one untimed step, ``--rounds`` times, in
the order A B C D D C B A (A: 0.14's form, the reference), so that a drifting machine falls on all
alike; the figure is the median step. Results are saved after every form (a time limit keeps them).

    python benchmarks/bench_align_step.py --geometry 135m --dtype float32 --steps 3     # CPU
    PYTHONPATH=src python3 benchmarks/bench_align_step.py --inputs bench-inputs --geometry 1b --dtype bf16

Results: ``benchmarks/results/align_step.json`` (merged per geometry, dtype and device) and the
``align-step`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

from bench_scale import GEOMETRIES, export_inputs, make_target  # noqa: E402
from common import update_benchmarks_md  # noqa: E402

from iprox.align_objective import layer_pairs  # noqa: E402
from iprox.alignment import LOG_FILE, AlignSettings, run_alignment, save_checkpoint, _factor_params  # noqa: E402
from iprox.data import load_examples, tokenize_examples  # noqa: E402
from iprox.models import default_device, resolve_dtype  # noqa: E402
from iprox.proxy import factorize_model  # noqa: E402
from iprox.session import Session  # noqa: E402
from iprox.training import MasterAdamW  # noqa: E402

log = logging.getLogger("bench_align_step")
RESULTS = ROOT / "benchmarks" / "results"
# form: (batch_size, grad_accum, per_example, examples per pass) for a step of B examples
FORMS = {"per example, token form, passes of 1 (0.15 default)": lambda B: (B, 1, True, 1),
         "per example, token form, one pass of B": lambda B: (B, 1, True, B),
         "per example, weight gradients, passes of 1 (0.14)": lambda B: (1, B, False, 1),
         "summed gradient, one pass of B": lambda B: (B, 1, False, B)}
BEFORE = "per example, weight gradients, passes of 1 (0.14)"

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_form(proxy0, target, examples, pad_id, B: int, form: str, steps: int, work: Path, device: str) -> dict:
    bs, ga, per_example, micro = FORMS[form](B)
    out = work / f"{'example' if per_example else 'summed'}-{bs}x{ga}-{micro}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    proxy = copy.deepcopy(proxy0)
    s = AlignSettings(steps=steps + 1, batch_size=bs, grad_accum=ga, lr=1e-4, weight_decay=0.0, lambda_kl=0.1,
                      temperature=2.0, checkpoint_every=10**9, seed=0, per_example=per_example, micro_batch=micro)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    run_alignment(proxy, target, examples, s, out, pad_id, progress=False)
    _sync(device)
    rows = list(csv.DictReader(open(out / LOG_FILE)))
    secs = [float(r["seconds"]) for r in rows[1:]]  # the first step warms up
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    del proxy
    return {"step_s": secs, "peak_accelerator_gib": peak, "loss_first": float(rows[0]["loss"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geometry", default="135m", choices=sorted(GEOMETRIES))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=4, help="examples per optimiser step (the align default)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per form and round")
    ap.add_argument("--rounds", type=int, default=2, help="1: A B C D; 2: A B C D D C B A")
    ap.add_argument("--forms", type=int, nargs="+", default=list(range(len(FORMS))),
                    help="which forms, by position in the table (default: all)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--inputs", default="", help="folder from bench_scale.py --export-inputs (default: export)")
    ap.add_argument("--work", default="/tmp/iprox-bench-align-step")
    ap.add_argument("--report", action="store_true", help="only rewrite the BENCHMARKS.md section")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    path = RESULTS / "align_step.json"
    if args.report:
        update_benchmarks_md("align-step", report(json.loads(path.read_text())))
        return
    device = default_device()
    dtype = resolve_dtype(args.dtype, device)
    work = Path(args.work) / f"{args.geometry}-{dtype}"
    work.mkdir(parents=True, exist_ok=True)
    inputs = Path(args.inputs) if args.inputs else work / "inputs"
    if not (inputs / "pool.jsonl").exists():
        export_inputs(inputs, 64, 8)
    make_target(work / "target", args.geometry, dtype, inputs / "tokenizer")
    session = Session()
    target, tok = session.model(str(work / "target"), dtype, device)
    proxy = copy.deepcopy(target)
    factorize_model(proxy, 0.5, "svd", None, factor_dtype="float32")
    pool = load_examples(str(inputs / "pool.jsonl"))
    n = args.batch * (args.steps + 1)
    examples, _ = tokenize_examples(tok, pool[:n], args.max_length)
    res = {"geometry": args.geometry, "dtype": dtype, "device": device,
           "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)",
           "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "max_length": args.max_length,
           "forms_run": sorted(args.forms),
           "mean_tokens": sum(len(t.input_ids) for t in examples) / len(examples),
           "params": sum(p.numel() for p in target.parameters()), "forms": {}}
    chosen = [f for i, f in enumerate(FORMS) if i in args.forms]
    if BEFORE not in chosen:
        raise SystemExit("the 0.14 form is the table's reference: keep it among --forms")
    chosen = [BEFORE] + [f for f in chosen if f != BEFORE]   # first: the table needs it from the first save on
    order = (chosen + chosen[::-1])[: len(chosen) * args.rounds]
    for form in order:
        r = time_form(proxy, target, examples, tok.pad_token_id, args.batch, form, args.steps, work, device)
        got = res["forms"].setdefault(form, {"step_s": [], "peak_accelerator_gib": 0.0, "loss_first": r["loss_first"]})
        got["step_s"] += r["step_s"]
        got["median_step_s"] = statistics.median(got["step_s"])
        got["peak_accelerator_gib"] = max(got["peak_accelerator_gib"], r["peak_accelerator_gib"])
        log.info("%s: %s s per step", form, " ".join(f"{x:.2f}" for x in r["step_s"]))
        if BEFORE in res["forms"]:
            allres = save(path, res)   # after every form: a run cut short by a time limit keeps what it measured
    # one checkpoint of this proxy's factors and Adam moments (what the align stage writes every 10 steps)
    opt = MasterAdamW(_factor_params(layer_pairs(proxy, target)), lr=1e-4)
    t0 = time.perf_counter()
    save_checkpoint(work / "checkpoint", 1, opt)
    res["checkpoint_s"] = time.perf_counter() - t0
    res["checkpoint_gib"] = sum(f.stat().st_size for f in (work / "checkpoint").iterdir()) / 2**30
    allres = save(path, res)
    print(report(allres))


def save(path: Path, res: dict) -> dict:
    """``res`` into the results JSON under its key, and the BENCHMARKS.md section rewritten."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    allres = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    allres["runs"][f"{res['geometry']}/{res['dtype']}/{res['device']}"] = res
    path.write_text(json.dumps(allres, indent=1) + "\n")
    update_benchmarks_md("align-step", report(allres))
    return allres


def report(allres: dict) -> str:
    lines = ["## Alignment step: per-example cosines in token form (0.15)", "",
             "`benchmarks/bench_align_step.py` (command in each block): random-initialised geometry, SVD proxy at "
             "sparsity 0.5, the same examples for every form, median of the timed steps (forms in turn, then in "
             "reverse). The first-step loss is the same objective's value for the three per-example forms.", ""]
    for r in allres["runs"].values():
        lines += [f"### {r['geometry']}, {r['dtype']}, {r['device_name']}", "",
                  f"`python benchmarks/bench_align_step.py --geometry {r['geometry']} --dtype {r['dtype']} "
                  f"--batch {r['batch']} --steps {r['steps']} --rounds {r['rounds']} --max-length {r['max_length']}"
                  + (f" --forms {' '.join(map(str, r['forms_run']))}" if len(r["forms_run"]) < len(FORMS) else "") + "` — "
                  f"{r['params']:,} parameters, {r['batch']} examples per step (mean {r['mean_tokens']:.0f} tokens).", "",
                  "| form | s per step | × 0.14's | steps timed | first-step loss | peak accel GiB |", "|---|---|---|---|---|---|"]
        base = r["forms"][BEFORE]["median_step_s"]
        for form, f in r["forms"].items():
            lines.append(f"| {form} | {f['median_step_s']:.3f} | {f['median_step_s'] / base:.2f} | {len(f['step_s'])} | "
                         f"{f['loss_first']:.4f} | {f['peak_accelerator_gib']:.1f} |")
        lines += [""] + ([f"- One checkpoint (float32 factors and two Adam moments, {r['checkpoint_gib']:.2f} GiB): "
                          f"{r['checkpoint_s']:.1f} s.", ""] if "checkpoint_s" in r else
                         ["- Cut short by its time limit before the checkpoint was timed.", ""])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
