"""``iprox`` command line: a thin shell over the library."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .runtime import add_config_args, config_from_args, field_help

log = logging.getLogger("iprox")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # transformers is chatty about GGUF conversion at INFO.
    logging.getLogger("transformers").setLevel(logging.WARNING)


ALIGN_FIELDS = ("align_steps", "align_epochs", "align_examples", "lambda_kl", "temperature", "lr", "weight_decay",
                "grad_accum", "checkpoint_every")


def _add_build_proxy(sub) -> None:
    from .proxy import ProxyConfig

    p = sub.add_parser("build-proxy", help="stage 1 (IPSVD), and stage 2 (alignment) when asked for steps",
                       description="Compress a target model into a proxy: influence-preserving SVD of every "
                                   "projection, then optionally align the factors' gradients with the target's.")
    add_config_args(p, ProxyConfig, required=("out",), groups={"stage 2 (alignment)": ALIGN_FIELDS})


def _cmd_build_proxy(args) -> int:
    from .proxy import ProxyConfig, build_proxy

    print(build_proxy(ProxyConfig(**config_from_args(args, ProxyConfig))).format())
    return 0


def _add_align(sub) -> None:
    from dataclasses import fields

    from .alignment import ALIGN_FIELDS, RUN_FIELDS, SHARED_FIELDS
    from .proxy import ProxyConfig

    p = sub.add_parser("align", help="stage 2 alone: align a compressed proxy's factors with its target",
                       description="Align the factors of a compressed proxy (build-proxy without alignment steps, "
                                   "or a run's compressed/) with its target, into a proxy folder of its own. "
                                   "Settings not given are the ones the proxy was compressed with.")
    p.add_argument("--proxy", required=True, help="the compressed proxy folder (left as it is)")
    helps = field_help(ProxyConfig)
    add_config_args(p, ProxyConfig, required=("out",),
                    skip=tuple(f.name for f in fields(ProxyConfig) if f.name not in ALIGN_FIELDS + SHARED_FIELDS + RUN_FIELDS),
                    overrides={n: {"default": None, "help": helps.get(n, "") + " (default: as the proxy was compressed)"}
                               for n in SHARED_FIELDS})


def _cmd_align(args) -> int:
    from .alignment import align_config, align_proxy
    from .proxy import ProxyConfig

    given = {k: v for k, v in config_from_args(args, ProxyConfig).items() if v is not None}
    print(align_proxy(align_config(args.proxy, **given), args.proxy).format())
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="held-out next-token loss on response tokens")
    p.add_argument("--model", required=True, help="a proxy folder, or any model `build-proxy --model` accepts")
    p.add_argument("--data", action="append", required=True, help="held-out data file or folder (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N examples only (0: all)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 (bf16), float16 (fp16) or auto")
    p.add_argument("--device", default="", help="default: $IPROX_DEVICE, else CUDA when present, else CPU")
    p.add_argument("--out", default="", help="also write the figures to this JSON file")
    p.add_argument("--accuracy", action="store_true",
                   help="also exact-match accuracy of greedy answers (BBH targets, GSM8K final numbers)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="generation budget (0: 16, or 256 for GSM8K)")
    p.add_argument("--no-progress", action="store_true")


def _cmd_evaluate(args) -> int:
    from .data import load_examples, tokenize_examples
    from .evaluation import heldout_loss
    from .loading import load_model_or_proxy
    from .models import default_device

    model, tok = load_model_or_proxy(args.model, args.dtype, args.device or default_device())
    examples = load_examples(args.data)
    if args.limit:
        examples = examples[: args.limit]
    tokd, _ = tokenize_examples(tok, examples, args.max_length)
    res = heldout_loss(model, tokd, args.batch_size, tok.pad_token_id, progress=not args.no_progress)
    res["model"] = args.model
    print(f"{args.model}: response-token loss {res['token_loss']:.4f} over {res['n_tokens']} tokens "
          f"({res['n_examples']} examples; mean per-example loss {res['example_loss']:.4f})")
    if args.accuracy:
        from .evaluation import answer_accuracy

        acc = answer_accuracy(model, tok, examples, args.max_new_tokens, progress=not args.no_progress)
        res.update(accuracy=acc["accuracy"], predictions=acc["predictions"])
        print(f"exact-match accuracy {acc['accuracy']:.3f} over {acc['n_examples']} examples")
    if args.out:
        from .artifacts import atomic_write_json

        atomic_write_json(args.out, res)
    return 0


def _add_fidelity(sub) -> None:
    p = sub.add_parser("fidelity", help="a proxy against its target: score agreement and/or gradient cosine and KL")
    p.add_argument("--target-scores", default="", help="scores of a target-selected run (scores.csv, scores or run folder)")
    p.add_argument("--proxy-scores", default="", help="scores of the same selection run with the proxy")
    p.add_argument("--target-again-scores", default="",
                   help="the target run again with other seeds: its agreement with --target-scores is the ceiling "
                        "the proxy's figures are reported against")
    p.add_argument("--target", default="smollm2-135m-instruct")
    p.add_argument("--proxy", default="", help="proxy folder (gradient cosines and KL on --data)")
    p.add_argument("--data", action="append", default=[], help="held-out data for the gradient report (repeatable)")
    p.add_argument("--limit", type=int, default=32, help="first N examples (0: all)")
    p.add_argument("--per-source", type=int, default=0, metavar="N",
                   help="a seeded sample of N examples of every source in --data (e.g. the pool's), in place of "
                        "--limit: the report and the warning then cover each source (0: the data as it is)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--warn-below", type=float, default=None,
                   help="warn when the all-layer gradient cosine on --data, or on one of its sources, is below "
                        "this (default: 0.3, iprox.fidelity.WARN_COSINE)")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 (bf16), float16 (fp16) or auto")
    p.add_argument("--device", default="", help="default: $IPROX_DEVICE, else CUDA when present, else CPU")
    p.add_argument("--out", required=True, help="REPORT.json to write")
    p.add_argument("--no-progress", action="store_true")


def _cmd_fidelity(args) -> int:
    from .artifacts import atomic_write_json
    from .data import load_examples, tokenize_examples
    from .fidelity import (WARN_COSINE, fidelity_warning, format_agreement, format_report, gradient_fidelity,
                           plot_scatter, score_agreement, scores_path)
    from .models import default_device, load_model
    from .proxy import load_proxy
    from .loading import read_scores

    by_scores = bool(args.target_scores or args.proxy_scores or args.target_again_scores)
    if by_scores and not (args.target_scores and args.proxy_scores):
        raise ValueError("score agreement needs both --target-scores and --proxy-scores")
    if bool(args.proxy) != bool(args.data):
        raise ValueError("the gradient report needs both --proxy and --data")
    if not by_scores and not args.proxy:
        raise ValueError("give --target-scores and --proxy-scores, or --proxy and --data, or both")
    rep: dict = {}
    if by_scores:
        tp, pp = scores_path(args.target_scores), scores_path(args.proxy_scores)
        again = read_scores(scores_path(args.target_again_scores)) if args.target_again_scores else None
        agree, a, b = score_agreement(read_scores(tp), read_scores(pp), again)
        png = Path(args.out).with_suffix(".png")
        plot_scatter(a, b, png, f"Spearman {agree['spearman']:.3f}, Kendall {agree['kendall']:.3f}")
        rep.update(agree, target_scores=str(tp), proxy_scores=str(pp), scatter=str(png))
        print(format_agreement(agree))
        print(f"scatter: {png}")
        if not args.proxy:
            atomic_write_json(args.out, rep)
            print(f"report: {args.out}")
            return 0
    device = args.device or default_device()
    examples = load_examples(args.data)
    if args.per_source:  # a seeded sample of every source, so that none is judged on a handful
        import random

        rng = random.Random(0)
        groups = {s: [e for e in examples if e.source == s] for s in sorted({e.source for e in examples})}
        examples = [e for g in groups.values() for e in rng.sample(g, min(args.per_source, len(g)))]
    elif args.limit:
        examples = examples[: args.limit]
    proxy, ptok = load_proxy(args.proxy, args.dtype, device=device, with_tokenizer=True)
    target, _, _ = load_model(args.target, args.dtype, device)
    tokd, _ = tokenize_examples(ptok, examples, args.max_length)
    rep.update(gradient_fidelity(proxy, target, tokd, ptok.pad_token_id, args.temperature, not args.no_progress))
    rep.update(proxy=args.proxy, target=args.target)
    warning = fidelity_warning(rep, WARN_COSINE if args.warn_below is None else args.warn_below)
    rep["warning"] = warning
    atomic_write_json(args.out, rep)
    print(format_report(rep))
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"report: {args.out}")
    return 0


def _add_plan(sub) -> None:
    from .plan import PlanConfig

    p = sub.add_parser("plan", help="per-stage peak memory, FLOPs and store size from the model's config alone")
    p.add_argument("--config", default="", metavar="RUN.toml",
                   help="plan this run config: its target, max_length, [proxy], [warmup] and [features] settings "
                        "and its pool's size (flags given beside it win)")
    add_config_args(p, PlanConfig, skip=PLAN_SECTIONS,
                    overrides={n: {"default": None} for n in ("model", "pool", "validation", "max_length")})
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="one stage setting, e.g. proxy.sparsity=0.3 or warmup.epochs=2 (a TOML value; repeatable)")
    p.add_argument("--out", default="", help="also write the plan as JSON here")


PLAN_SECTIONS = ("proxy", "warmup", "features")


def _plan_settings(args) -> dict:
    """PlanConfig's arguments: a run config's (with --config), then the flags, then --set."""
    import tomllib

    from .plan import PlanConfig

    kw = {k: v for k, v in config_from_args(args, PlanConfig).items() if v is not None}
    if args.config:
        from .data import load_examples
        from .pipeline import load_config

        run = load_config(args.config)
        counted = {}
        for key in ("pool", "validation"):
            if key not in kw:  # the sampled size of every source, as the run's pool stage takes it
                counted[key] = sum(s["sample"] or len(load_examples(s["path"])) for s in getattr(run, key))
        features = {k: v for k, v in run.features.items() if k != "train_grad"}
        kw = {"model": run.model, "max_length": run.max_length, **counted,
              "proxy": dict(run.proxy), "warmup": dict(run.warmup), "features": features, **kw}
    for item in args.set:
        key, eq, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not (eq and dot and name) or section not in PLAN_SECTIONS:
            raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE with SECTION one of {PLAN_SECTIONS}")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare word: a string
        kw.setdefault(section, {})[name.strip()] = parsed
    return kw


def _cmd_plan(args) -> int:
    from .plan import PlanConfig, format_plan, plan

    res = plan(PlanConfig(**_plan_settings(args)))
    print(format_plan(res))
    if args.out:
        from .artifacts import atomic_write_json

        atomic_write_json(args.out, res)
    return 0


def _add_warmup(sub) -> None:
    from .warmup import WarmupConfig

    p = sub.add_parser("warmup", help="short LoRA (or proxy-factor) warm-up; one checkpoint per epoch for TracIn")
    add_config_args(p, WarmupConfig, required=("data", "out"))


def _cmd_warmup(args) -> int:
    from .warmup import WarmupConfig, run_warmup

    cfg = WarmupConfig(**config_from_args(args, WarmupConfig))
    for d in run_warmup(cfg):
        print(d)
    return 0


def _add_features(sub) -> None:
    from .features import FeatureConfig

    p = sub.add_parser("features", help="per-example projected gradients into a sharded, resumable store")
    add_config_args(p, FeatureConfig, required=("data", "out"))


def _cmd_features(args) -> int:
    from .features import FeatureConfig, compute_features

    print(compute_features(FeatureConfig(**config_from_args(args, FeatureConfig))).format())
    return 0


def _add_finetune(sub) -> None:
    from .finetune import FinetuneConfig

    p = sub.add_parser("finetune", help="fine-tune a model on selected records (LoRA, merged; or full)")
    add_config_args(p, FinetuneConfig, required=("data", "out"))


def _cmd_finetune(args) -> int:
    from .finetune import FinetuneConfig, finetune

    print(f"fine-tuned model: {finetune(FinetuneConfig(**config_from_args(args, FinetuneConfig)))}")
    return 0


def _add_score(sub) -> None:
    from .scores import ScoreConfig

    p = sub.add_parser("score", help="TracIn or influence-function scores of the pool on the validation set")
    add_config_args(p, ScoreConfig, required=("train", "val", "out"),
                    overrides={"train": {"nargs": "+", "action": "store"}, "val": {"nargs": "+", "action": "store"}})


def _cmd_score(args) -> int:
    from .loading import read_scores
    from .scores import ScoreConfig, score

    path = score(ScoreConfig(**config_from_args(args, ScoreConfig)))
    rows = read_scores(path)
    print(f"scored {len(rows)} examples: {path}")
    return 0


def _add_select(sub) -> None:
    from .selection import SelectConfig

    p = sub.add_parser("select", help="write the top-scored records (unchanged, or as chat records) as JSONL")
    add_config_args(p, SelectConfig, required=("scores", "data", "out"))


def _cmd_select(args) -> int:
    from .selection import SelectConfig, format_selection, select

    man = select(SelectConfig(**config_from_args(args, SelectConfig)))
    print(format_selection(man))
    print(f"written: {args.out}")
    return 0


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline from a TOML config (resumes; skips finished stages)")
    p.add_argument("config", help="CONFIG.toml")
    p.add_argument("--out", default="", help="override [run] out")
    p.add_argument("--overwrite", action="store_true", help="rebuild stages whose settings changed")
    p.add_argument("--device", default="")
    p.add_argument("--no-progress", action="store_true")


def _run_overrides(args) -> dict:
    over = {"progress": not args.no_progress}
    if args.out:
        over["out"] = args.out
    if args.device:
        over["device"] = args.device
    return over


def _cmd_run(args) -> int:
    from .pipeline import load_config, run

    import os

    res = run(load_config(args.config, _run_overrides(args)), overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report for the run
        print(res.format())
    return 0


DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.toml"


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help=f"`iprox run` on the shipped demo config ({DEMO_CONFIG.name}): embedded model, shared data")
    p.add_argument("--out", default="", help="run folder (default: the config's, runs/demo)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="")
    p.add_argument("--no-progress", action="store_true")


def _cmd_demo(args) -> int:
    from .pipeline import load_config, run

    t0 = time.perf_counter()
    cfg = load_config(DEMO_CONFIG, _run_overrides(args))
    print(f"iprox demo: {DEMO_CONFIG}\n  target {cfg.model}, selector {cfg.selector}, run folder {cfg.out}")
    res = run(cfg, overwrite=args.overwrite)
    print(res.format())
    print(f"demo finished in {time.perf_counter() - t0:.0f}s")
    return 0


# Exit codes: 2 for what the user can fix in the command, config or data (as argparse uses);
# 3 for a failure while running (I/O, a damaged artifact, a held lock); 4 for anything unexpected.
EXIT_USAGE, EXIT_RUNTIME, EXIT_BUG, EXIT_INTERRUPTED = 2, 3, 4, 130


def exit_code(e: BaseException) -> int:
    from .artifacts import ArtifactError, LockedError

    if isinstance(e, (ArtifactError, LockedError)):
        return EXIT_RUNTIME
    if isinstance(e, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, TypeError)):
        return EXIT_USAGE
    if isinstance(e, (OSError, RuntimeError)):
        return EXIT_RUNTIME
    return EXIT_BUG


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="iprox", description="Influence-preserving proxies for data selection")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"iprox {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build_proxy(sub)
    _add_align(sub)
    _add_evaluate(sub)
    _add_fidelity(sub)
    _add_plan(sub)
    _add_warmup(sub)
    _add_features(sub)
    _add_finetune(sub)
    _add_score(sub)
    _add_select(sub)
    _add_run(sub)
    _add_demo(sub)
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    handlers = {"build-proxy": _cmd_build_proxy, "align": _cmd_align, "evaluate": _cmd_evaluate, "fidelity": _cmd_fidelity, "demo": _cmd_demo,
                "plan": _cmd_plan, "warmup": _cmd_warmup, "features": _cmd_features,
                "score": _cmd_score, "finetune": _cmd_finetune, "select": _cmd_select, "run": _cmd_run}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print(f"iprox {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001  (the one error policy: a line, a code; -v for the traceback)
        if args.verbose:
            raise
        code = exit_code(e)
        text = str(e) if code == EXIT_USAGE else f"{type(e).__name__}: {e}"
        print(f"iprox {args.command}: error: {text}", file=sys.stderr)
        if code == EXIT_BUG:
            print("  (an unexpected failure; rerun with -v for the traceback and report it)", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
