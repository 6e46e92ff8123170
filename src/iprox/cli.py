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


def _add_build_proxy(sub) -> None:
    from .alignment import ALIGN_FIELDS
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
    from .evaluation import EvaluateConfig

    p = sub.add_parser("evaluate", help="held-out next-token loss on response tokens")
    add_config_args(p, EvaluateConfig, required=("model", "data"))


def _cmd_evaluate(args) -> int:
    from .evaluation import EvaluateConfig, evaluate, format_evaluation

    print(format_evaluation(evaluate(EvaluateConfig(**config_from_args(args, EvaluateConfig)))))
    return 0


def _add_fidelity(sub) -> None:
    from .fidelity import FidelityConfig

    p = sub.add_parser("fidelity", help="a proxy against its target: score agreement and/or gradient cosine and KL")
    add_config_args(p, FidelityConfig, required=("out",))


def _cmd_fidelity(args) -> int:
    from .fidelity import FidelityConfig, fidelity_report, format_agreement, format_report

    cfg = FidelityConfig(**config_from_args(args, FidelityConfig))
    rep = fidelity_report(cfg)
    if cfg.by_scores:
        print(format_agreement(rep))
        print(f"scatter: {rep['scatter']}")
    if cfg.proxy:
        print(format_report(rep))
        if rep["warning"]:
            print(f"warning: {rep['warning']}", file=sys.stderr)
    print(f"report: {cfg.out}")
    return 0


def _add_plan(sub) -> None:
    from .plan import PLAN_SECTIONS, PlanConfig

    p = sub.add_parser("plan", help="per-stage peak memory, FLOPs and store size from the model's config alone")
    p.add_argument("--config", default="", metavar="RUN.toml",
                   help="plan this run config: its target, max_length, [proxy], [warmup] and [features] settings "
                        "and its pool's size (flags given beside it win)")
    add_config_args(p, PlanConfig, skip=PLAN_SECTIONS,
                    overrides={n: {"default": None} for n in ("model", "pool", "validation", "max_length",
                                                               "warmup_on", "val_model", "calibrate", "rerank",
                                                               "rerank_growth")})
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="one stage setting, e.g. proxy.sparsity=0.3 or warmup.epochs=2 (a TOML value; repeatable)")
    p.add_argument("--out", default="", help="also write the plan as JSON here")


def _plan_settings(args) -> dict:
    from .plan import PlanConfig, plan_settings

    given = {k: v for k, v in config_from_args(args, PlanConfig).items() if v is not None}
    return plan_settings(given, args.config, args.set)


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
                    overrides={"train": {"nargs": "+", "action": "store"}, "val": {"nargs": "+", "action": "store"},
                               "calibration": {"nargs": "+", "action": "store"}})


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
    p.add_argument("--from", dest="reuse", default="", metavar="RUN",
                   help="start this (new) run folder from an earlier run: its finished stages with the same "
                        "settings and data are copied, e.g. the proxy, warm-up and pool features for another "
                        "target task's validation examples")
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

    res = run(load_config(args.config, _run_overrides(args)), overwrite=args.overwrite, reuse=args.reuse or None)
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
