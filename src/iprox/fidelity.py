"""How faithfully a proxy reproduces its target: gradient cosines and output KL, and score agreement.

Score agreement (:func:`score_agreement`): the same selection run once with the target and once with
a proxy; Spearman and Kendall correlation of their scores over the pool, top-1/5/10% overlap and
Jaccard, and the same per subtask. Two runs of other validation subtasks (a run of three target tasks
beside a run of one of them) are compared on the subtasks they share; their aggregates are flagged as
not comparable, since each ranks against other validation examples.

Gradient fidelity:

For each held-out example (its own forward and backward pass, so the figures are per example as
influence is), and each compressed layer: the cosine between the proxy's factor gradients and the
target's weight gradient projected into factor space (``G Bᵀ`` for A, ``Aᵀ G`` for B), and the
target-to-proxy KL on response tokens. Works on any proxy folder, so a stage-1-only proxy and its
aligned version can be compared on the same examples. Given a target's LoRA warm-up checkpoint, the
cosines are taken in the space the target-first order's features are read in instead: between the
gradients of that checkpoint's adapters, carried by both models.
"""

from __future__ import annotations

import logging
import math
import random
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .agreement import agreement, task_share
from .align_objective import carrying, compared_grads, factor_space_cosines, layer_pairs, response_kl
from .data import TokenizedExample, collate
from .lowrank import FactorizedLinear, adapter_layers
from .models import EMBEDDED_MODEL, frozen, resolve_dtype
from .runtime import check_types

log = logging.getLogger(__name__)


def gradient_fidelity(proxy: torch.nn.Module, target: torch.nn.Module, examples: Sequence[TokenizedExample],
                      pad_id: int, temperature: float = 1.0, progress: bool = True,
                      lora: tuple[dict[str, torch.Tensor], float] | None = None) -> dict:
    """Per-layer and overall gradient cosines and the KL, averaged over ``examples``.

    Args:
        lora: ``(adapter state, alpha)`` of a target's LoRA checkpoint
            (:func:`~iprox.loading.read_lora_state`): compare the gradients of its adapters, carried
            by both models (``cos_A``/``cos_B`` are then the adapters' ``lora_A``/``lora_B``), instead
            of the factor-space ones.

    Returns:
        ``grad_cosine`` (mean over layers and examples of ½(cos_A + cos_B)), ``grad_cosine_global``
        (cosine of all layers' factor-space gradients concatenated, mean over examples), ``kl``
        (mean target-to-proxy KL over response tokens at ``temperature``, not τ²-scaled), ``layers``
        (name → ``cos_A``, ``cos_B``), ``n_examples``.
    """
    if not examples:
        raise ValueError("no examples for the fidelity report")
    if lora is None and not any(isinstance(m, FactorizedLinear) for m in proxy.modules()):
        raise ValueError("the gradient report compares the proxy's factor-space gradients with the target's; this "
                         "proxy has no factored layers (layer-drop, or sparsity 0): compare its scores with the "
                         "target's instead (--target-scores, --proxy-scores), or in a LoRA checkpoint's space "
                         "(--checkpoint)")
    pairs = layer_pairs(proxy, target) if lora is None else []
    names = [pr.name for pr in pairs] if lora is None else adapter_layers(lora[0])
    target.eval()
    proxy.eval()
    device = next(proxy.parameters()).device
    sum_a = torch.zeros(len(names), dtype=torch.float64)
    sum_b = torch.zeros(len(names), dtype=torch.float64)
    glob, kls = [], []
    sources = [ex.source for ex in examples]
    # Only the paired layers need gradients (the target's weights for G, the proxy's factors; in the
    # LoRA space only the carried adapters); both models get their caller's flags back afterwards.
    trainable = [t for pr in pairs for t in (pr.target.weight, pr.proxy.A.weight, pr.proxy.B.weight)]
    with frozen(target, proxy, trainable=trainable), ExitStack() as stack:
        space = stack.enter_context(carrying(proxy, target, *lora)) if lora is not None else None
        for ex in tqdm(examples, desc="fidelity", unit="ex", disable=not progress):
            enc = collate([ex], pad_id, device)
            gAB, tAB, t_logits, p_logits = compared_grads(proxy, target, pairs, enc, False, space)
            with torch.no_grad():
                ca, cb = factor_space_cosines(gAB, tAB)
                sum_a += ca.double().cpu()
                sum_b += cb.double().cpu()
                num, na, nb = 0.0, 0.0, 0.0
                for (gA, gB), (tA, tB) in zip(gAB, tAB):
                    num += float((gA * tA).sum() + (gB * tB).sum())
                    na += float(gA.pow(2).sum() + gB.pow(2).sum())
                    nb += float(tA.pow(2).sum() + tB.pow(2).sum())
                glob.append(num / max(math.sqrt(na * nb), 1e-30))
                kls.append(float(response_kl(t_logits, p_logits, enc["labels"], temperature)) / temperature**2)
    n = len(examples)
    layers = {name: {"cos_A": float(sum_a[i] / n), "cos_B": float(sum_b[i] / n)} for i, name in enumerate(names)}
    by_source = {}
    for src in sorted(set(sources)):
        idx = [i for i, s in enumerate(sources) if s == src]
        by_source[src] = {"grad_cosine_global": sum(glob[i] for i in idx) / len(idx),
                          "kl": sum(kls[i] for i in idx) / len(idx), "n_examples": len(idx)}
    return {
        "by_source": by_source,
        "grad_cosine": float(((sum_a + sum_b) / (2 * n)).mean()),
        "grad_cosine_global": sum(glob) / n,
        "kl": sum(kls) / n,
        "temperature": temperature,
        "space": "factors" if lora is None else "lora",
        "n_examples": n,
        "layers": layers,
    }


# Below this all-layer gradient cosine on held-out examples a proxy is flagged as unlikely to rank
# the pool like its target. Set from the fidelity study (BENCHMARKS.md "Fidelity"): on SmolLM2-135M at
# sparsity 0.5 the unaligned proxy measured 0.22 and put 5 of 15 hyperbaton examples in its top 5%
# where the target put 10; the aligned one measured 0.37 and ranked the head of the pool as the
# target does against itself. Random factors measure ~0.1.
WARN_COSINE = 0.3


def fidelity_warning(rep: dict, threshold: float = WARN_COSINE) -> str | None:
    """A warning for a gradient report whose all-layer cosine is below ``threshold``, overall or on
    one of the data's sources (a proxy faithful on short answers can fail on long ones, and then
    ranks that source's examples where the target does not), else None."""
    cos = rep["grad_cosine_global"]
    advice = ("Align it longer (build-proxy --align-steps/--align-epochs) or compress less (--sparsity) before "
              "scoring a pool; a proxy built before 0.6 also gains from --probe-balance and --align-cosine example")
    if math.isnan(cos) or cos < threshold:
        return (f"the proxy's gradients point away from the target's (all-layer cosine {cos:.3f} < {threshold:g} on "
                f"{rep['n_examples']} held-out examples): its selection is unlikely to be the target's. {advice}")
    by_source = rep.get("by_source", {})
    low = {s: v for s, v in by_source.items() if len(by_source) > 1
           and (math.isnan(v["grad_cosine_global"]) or v["grad_cosine_global"] < threshold)}
    if low:
        named = ", ".join(f"{s} {v['grad_cosine_global']:.3f} ({v['n_examples']} examples)" for s, v in low.items())
        return (f"the proxy's gradients point away from the target's on part of the data (all-layer cosine < "
                f"{threshold:g}: {named}): it is unlikely to rank those examples among the rest as the target does. "
                f"{advice}")
    return None


def format_report(rep: dict, max_rows: int = 12) -> str:
    """A printed table: overall figures, then the layers (first and last few when there are many)."""
    where = (f"the gradients of the carried LoRA adapters of {rep['checkpoint']}" if rep.get("space") == "lora"
             else "the proxy's factor gradients and the target's, projected on the factors")
    cols = ("cos lora_A", "cos lora_B") if rep.get("space") == "lora" else ("cos A", "cos B")
    lines = [f"compared: {where}",
             f"gradient cosine (mean over layers): {rep['grad_cosine']:.4f}",
             f"gradient cosine (all layers concatenated): {rep['grad_cosine_global']:.4f}",
             f"KL(target || proxy) on response tokens: {rep['kl']:.4f}   ({rep['n_examples']} examples)"]
    if len(rep.get("by_source", {})) > 1:
        lines += ["", f"{'source':<24} {'cosine':>8} {'KL':>8} {'examples':>9}"]
        lines += [f"{s:<24} {v['grad_cosine_global']:>8.4f} {v['kl']:>8.4f} {v['n_examples']:>9}"
                  for s, v in rep["by_source"].items()]
    lines += ["", f"{'layer':<48} {cols[0]:>10} {cols[1]:>10}"]
    items = list(rep["layers"].items())
    shown = items if len(items) <= max_rows else items[: max_rows // 2] + [("...", None)] + items[-max_rows // 2 :]
    for name, v in shown:
        lines.append(f"{name:<48}" if v is None else f"{name:<48} {v['cos_A']:>10.4f} {v['cos_B']:>10.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Score agreement: the same selection run with the target and with a proxy
# ---------------------------------------------------------------------------------------------


def score_agreement(target_rows: list[dict], proxy_rows: list[dict],
                    target_again_rows: list[dict] | None = None) -> tuple[dict, list[float], list[float]]:
    """How the proxy's scores rank the pool like the target's, overall and per subtask column they
    share: Spearman and Kendall, Spearman over the target's top 20% (the head, where selection
    happens), top-1/5/10% overlap and Jaccard, and per subtask the share of each top 5% that comes
    from the subtask's own task (when the rows carry task tags).

    Where the two tables hold other subtask columns, their aggregates (``score``) rank the pool
    against other validation examples: the aggregate's figures are still given, but the report says
    ``aggregate_comparable: false`` with an ``aggregate_note``, and the scatter is of the first shared
    subtask (``scatter_column``).

    Args:
        target_again_rows: the target run again with other seeds (warm-up, projection). Its agreement
            with the first target run is the ceiling a proxy can be held to; the report then gives
            it under ``ceiling`` and each proxy figure as a share of it under ``of_ceiling`` (per
            shared subtask too; the aggregate's only where both aggregates are comparable).

    Returns:
        The report, and the target's and proxy's scores in id order of ``scatter_column`` (for a scatter).

    Raises:
        ValueError: the tables score different pools.
    """
    t = _by_id(target_rows)
    p = _by_id(proxy_rows)
    tables = [("the proxy's", p)]
    if target_again_rows is not None:
        tables.append(("the second target run's", _by_id(target_again_rows)))
    for what, other in tables:
        if set(t) != set(other):
            raise ValueError(f"the target's score table and {what} cover different pools ({len(set(t) - set(other))} "
                             f"ids only in the target's, {len(set(other) - set(t))} only in {what})")
    ids = sorted(t)
    tasks = [t[i].get("task", "") for i in ids]
    fixed = {"id", "source", "task", "score"}

    def subtasks(rows: list[dict]) -> list[str]:
        return [c for c in rows[0] if c not in fixed]

    others = [proxy_rows] + ([target_again_rows] if target_again_rows is not None else [])
    shared = [c for c in subtasks(target_rows) if all(c in rows[0] for rows in others)]

    def column(rows, c):
        return [float(rows[i][c]) for i in ids]

    def compare(what: str, rows: list[dict], other: dict) -> dict:
        rep = {"n": len(ids), **agreement(column(t, "score"), column(other, "score")), "subtasks": {}}
        for c in shared:
            ref, got = column(t, c), column(other, c)
            sub = agreement(ref, got)
            if c in tasks:
                sub["task_share_at_5"] = {"target": task_share(ref, tasks, c), "other": task_share(got, tasks, c)}
            rep["subtasks"][c] = sub
        mine, theirs = subtasks(target_rows), subtasks(rows)
        rep["aggregate_comparable"] = set(mine) == set(theirs)
        if not rep["aggregate_comparable"]:
            rep["aggregate_note"] = (
                f"the target's table scores the subtasks {mine or ['(none)']}, {what} {theirs or ['(none)']}: their "
                "aggregates rank the pool against other validation examples, so compare " +
                (f"the subtasks they share ({', '.join(shared)})" if shared else "runs of the same validation data"))
        return rep

    rep = compare("the proxy's", proxy_rows, p)
    if target_again_rows is not None:
        ceil = compare("the second target run's", target_again_rows, tables[1][1])
        rep["ceiling"] = ceil
        if rep["aggregate_comparable"] and ceil["aggregate_comparable"]:
            rep["of_ceiling"] = _of_ceiling(rep, ceil)
        for c in shared:
            rep["subtasks"][c]["of_ceiling"] = _of_ceiling(rep["subtasks"][c], ceil["subtasks"][c])
    col = "score" if rep["aggregate_comparable"] or not shared else shared[0]
    rep["scatter_column"] = col
    return rep, column(t, col), column(p, col)


def _of_ceiling(rep: dict, ceil: dict) -> dict:
    return {"spearman": _ratio(rep["spearman"], ceil["spearman"]),
            "head_spearman": _ratio(rep["head_spearman"], ceil["head_spearman"]),
            "overlap_at_5": _ratio(rep["overlap_at"]["5"]["overlap"], ceil["overlap_at"]["5"]["overlap"])}


def _by_id(rows: list[dict]) -> dict[str, dict]:
    out = {r["id"]: r for r in rows}
    if len(out) != len(rows):
        raise ValueError("a score table lists an id twice")
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and b > 0 else float("nan")


def plot_scatter(a: list[float], b: list[float], path: str | Path, title: str) -> None:
    """PNG scatter of proxy against target scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.scatter(a, b, s=6, alpha=0.6)
    ax.set_xlabel("target score")
    ax.set_ylabel("proxy score")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_agreement(rep: dict) -> str:
    def line(r: dict) -> str:
        o = r["overlap_at"]
        return (f"Spearman {r['spearman']:.3f}, head (target's top 20%) {r['head_spearman']:.3f}, "
                f"Kendall {r['kendall']:.3f}; top-1/5/10% overlap " + " / ".join(f"{o[k]['overlap']:.2f}" for k in ("1", "5", "10")))

    def share(oc: dict) -> str:
        return f"Spearman {oc['spearman']:.0%}, head {oc['head_spearman']:.0%}, top-5% overlap {oc['overlap_at_5']:.0%}"

    lines = [f"score agreement over {rep['n']} pool examples: {line(rep)}"]
    if not rep.get("aggregate_comparable", True):
        lines.append(f"  (not comparable: {rep['aggregate_note']})")
    for name, v in rep["subtasks"].items():
        s5 = v.get("task_share_at_5")
        extra = f"; top 5% from {name}: target {s5['target']:.2f}, proxy {s5['other']:.2f}" if s5 else ""
        lines.append(f"  subtask {name}: {line(v)}{extra}")
    if "ceiling" in rep:
        ceil = rep["ceiling"]
        lines.append(f"ceiling (the target against itself, other seeds): {line(ceil)}")
        if not ceil.get("aggregate_comparable", True):
            lines.append(f"  (not comparable: {ceil['aggregate_note']})")
        for name, v in ceil["subtasks"].items():
            lines.append(f"  subtask {name}: {line(v)}")
        lines.append("proxy as a share of the ceiling: " +
                     (share(rep["of_ceiling"]) if "of_ceiling" in rep else "(the aggregates are not comparable)"))
        for name, v in rep["subtasks"].items():
            lines.append(f"  subtask {name}: {share(v['of_ceiling'])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# iprox fidelity: either report, or both, into one JSON file
# ---------------------------------------------------------------------------------------------


@dataclass
class FidelityConfig:
    """Settings of ``iprox fidelity``: score agreement (two score tables), the gradient report (a
    proxy, its target and held-out data), or both.

    Attributes:
        target_scores: scores of a target-selected run (scores.csv, scores or run folder: a run's are the
            scores its selection takes, the rerank's where it reranks).
        proxy_scores: scores of the same selection run with the proxy.
        target_again_scores: the target run again with other seeds: its agreement with
            ``target_scores`` is the ceiling the proxy's figures are reported against.
        target: the proxy's target model.
        proxy: proxy folder (gradient cosines and KL on ``data``).
        checkpoint: a LoRA warm-up checkpoint of the target: take the gradient cosines between its
            adapters' gradients, carried by both models (the space the target-first order's features
            are read in), instead of in the proxy's factor space.
        data: held-out data for the gradient report.
        limit: first N examples (0: all).
        per_source: a seeded sample of N examples of every source in ``data`` (e.g. the pool's), in
            place of ``limit``: the report and the warning then cover each source (0: the data as it is).
        max_length: tokens per example.
        temperature: softmax temperature of the KL.
        warn_below: warn when the all-layer gradient cosine on ``data``, or on one of its sources, is
            below this.
        dtype: float32, bfloat16 (bf16), float16 (fp16) or auto.
        device: "" for $IPROX_DEVICE, else CUDA when present, else CPU.
        out: the report (JSON) to write; a score scatter goes beside it as PNG.
        progress: show progress bars.
    """

    target_scores: str = ""
    proxy_scores: str = ""
    target_again_scores: str = ""
    target: str = EMBEDDED_MODEL
    proxy: str = ""
    checkpoint: str = ""
    data: list[str] = field(default_factory=list)
    limit: int = 32
    per_source: int = 0
    max_length: int = 512
    temperature: float = 1.0
    warn_below: float = WARN_COSINE
    dtype: str = "float32"
    device: str = ""
    out: str = ""
    progress: bool = True

    def __post_init__(self):
        check_types(self)
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.out:
            raise ValueError("fidelity needs --out (the report to write)")
        if self.by_scores and not (self.target_scores and self.proxy_scores):
            raise ValueError("score agreement needs both --target-scores and --proxy-scores")
        if self.checkpoint and not self.proxy:
            raise ValueError("--checkpoint sets the space of the gradient report: give --proxy and --data too")
        if bool(self.proxy) != bool(self.data):
            raise ValueError("the gradient report needs both --proxy and --data")
        if not self.by_scores and not self.proxy:
            raise ValueError("give --target-scores and --proxy-scores, or --proxy and --data, or both")
        if min(self.limit, self.per_source) < 0 or self.max_length < 8 or not self.temperature > 0:
            raise ValueError("limit and per_source must be >= 0, max_length >= 8, temperature > 0")
        self.dtype = resolve_dtype(self.dtype, self.device)

    @property
    def by_scores(self) -> bool:
        return bool(self.target_scores or self.proxy_scores or self.target_again_scores)


def fidelity_report(config: FidelityConfig) -> dict:
    """Writes and returns the report: ``format_agreement``'s figures when given score tables (and a
    scatter PNG beside ``out``), ``format_report``'s when given a proxy, with ``warning`` (None when
    the proxy looks faithful)."""
    from .artifacts import atomic_write_json
    from .data import load_examples, tokenize_examples
    from .loading import load_proxy, read_lora_state, read_scores, scores_table, target_lora_checkpoint
    from .models import default_device, load_model

    rep: dict = {}
    if config.by_scores:
        tp, pp = scores_table(config.target_scores), scores_table(config.proxy_scores)
        again = read_scores(config.target_again_scores) if config.target_again_scores else None
        agree, a, b = score_agreement(read_scores(tp), read_scores(pp), again)
        png = Path(config.out).with_suffix(".png")
        col = agree["scatter_column"]
        fig = agree if col == "score" else agree["subtasks"][col]
        plot_scatter(a, b, png, ("" if col == "score" else f"subtask {col}: ") +
                     f"Spearman {fig['spearman']:.3f}, Kendall {fig['kendall']:.3f}")
        rep.update(agree, target_scores=str(tp), proxy_scores=str(pp), scatter=str(png))
    if config.proxy:
        device = config.device or default_device()
        examples = load_examples(config.data)
        if config.per_source:  # a seeded sample of every source, so that none is judged on a handful
            rng = random.Random(0)
            groups = {s: [e for e in examples if e.source == s] for s in sorted({e.source for e in examples})}
            examples = [e for g in groups.values() for e in rng.sample(g, min(config.per_source, len(g)))]
        elif config.limit:
            examples = examples[: config.limit]
        proxy, ptok = load_proxy(config.proxy, config.dtype, device=device, with_tokenizer=True)
        target, _, _ = load_model(config.target, config.dtype, device)
        tokd, _ = tokenize_examples(ptok, examples, config.max_length)
        lora = None
        if config.checkpoint:
            info = target_lora_checkpoint(config.checkpoint, config.target)
            lora = (read_lora_state(config.checkpoint, device), float(info["lora_alpha"]))
        rep.update(gradient_fidelity(proxy, target, tokd, ptok.pad_token_id, config.temperature, config.progress, lora))
        if config.checkpoint:
            rep["checkpoint"] = config.checkpoint
        rep.update(proxy=config.proxy, target=config.target)
        rep["warning"] = fidelity_warning(rep, config.warn_below)
    atomic_write_json(config.out, rep)
    return rep
