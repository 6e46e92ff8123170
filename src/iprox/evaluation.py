"""Held-out next-token loss on response tokens."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import TokenizedExample, batches, collate
from .models import resolve_dtype
from .runtime import check_data_paths, check_types

log = logging.getLogger(__name__)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of next-token prediction, zero where the label is -100.

    Args:
        logits: (B, T, V) float.
        labels: (B, T) int64, -100 for tokens outside the loss.

    Returns:
        (B, T-1) float32 losses aligned with ``labels[:, 1:]``.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=-100, reduction="none")
    return loss.view(shift_labels.shape)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean response-token loss of each example, (B,). Each example weighs the same."""
    tl = token_losses(logits, labels)
    n = (labels[:, 1:] != -100).sum(dim=1).clamp_min(1)
    return tl.sum(dim=1) / n


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, examples: Sequence[TokenizedExample], batch_size: int = 8,
                 pad_id: int = 0, progress: bool = True) -> dict[str, float]:
    """Next-token loss of ``model`` on the response tokens of ``examples``.

    Returns:
        ``token_loss`` (mean over all response tokens), ``example_loss`` (mean of per-example
        means), ``n_tokens`` and ``n_examples``.
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    device = next(model.parameters()).device
    model.eval()
    tot, ntok, ex_sum = 0.0, 0, 0.0
    for batch in tqdm(batches(examples, batch_size, sort_by_length=True), desc="held-out loss", unit="batch",
                      disable=not progress, leave=False):
        enc = collate(batch, pad_id, device)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        tl = token_losses(logits, enc["labels"])
        mask = enc["labels"][:, 1:] != -100
        tot += float(tl.sum())
        ntok += int(mask.sum())
        ex_sum += float((tl.sum(1) / mask.sum(1).clamp_min(1)).sum())
    out = {"token_loss": tot / max(ntok, 1), "example_loss": ex_sum / len(examples),
           "n_tokens": ntok, "n_examples": len(examples)}
    if not math.isfinite(out["token_loss"]):
        log.warning("held-out loss is not finite: %s", out["token_loss"])
    return out


# ---------------------------------------------------------------------------------------------
# Exact-match accuracy by greedy generation (short answers)
# ---------------------------------------------------------------------------------------------

_GSM_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def gold_answer(answer: str) -> tuple[str, str]:
    """``("number", "72")`` for a GSM8K-style answer ending in ``#### 72``, else ``("exact", text)``."""
    m = _GSM_ANSWER.search(answer.strip())
    if m:
        return "number", m.group(1).replace(",", "")
    return "exact", answer.strip()


def is_correct(prediction: str, kind: str, gold: str) -> bool:
    """Number: the number after ``####`` if the prediction has one, else its last number.
    Exact: the prediction, stripped, starts with the gold answer followed by a non-alphanumeric
    character or nothing (``(B)``, ``(B).`` and ``(B) because`` match ``(B)``; ``Truely`` does not match ``True``)."""
    p = prediction.strip()
    if kind == "number":
        m = _GSM_ANSWER.search(p)
        nums = [m.group(1)] if m else _NUMBER.findall(p)
        if not nums:
            return False
        try:
            return float(nums[-1].replace(",", "")) == float(gold)
        except ValueError:
            return False
    return p == gold or (p.startswith(gold) and not p[len(gold)].isalnum())


@torch.no_grad()
def answer_accuracy(model: torch.nn.Module, tokenizer, examples, max_new_tokens: int = 0,
                    progress: bool = True) -> dict:
    """Exact-match accuracy of greedy answers to each example's prompt (all turns but the last).

    Args:
        examples: :class:`~iprox.data.Example` objects whose last turn is the gold answer.
        max_new_tokens: generation budget; 0 picks 16 for short answers and 256 for GSM8K-style ones.

    Returns:
        ``accuracy``, ``n_examples``, and ``predictions`` (id, gold, prediction, correct).
    """
    device = next(model.parameters()).device
    model.eval()
    rows = []
    for ex in tqdm(examples, desc="accuracy", unit="ex", disable=not progress, leave=False):
        kind, gold = gold_answer(ex.messages[-1]["content"])
        budget = max_new_tokens or (256 if kind == "number" else 16)
        prompt = tokenizer.apply_chat_template(ex.messages[:-1], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        pred = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        rows.append({"id": ex.id, "gold": gold, "prediction": pred, "correct": is_correct(pred, kind, gold)})
    acc = sum(r["correct"] for r in rows) / max(len(rows), 1)
    return {"accuracy": acc, "n_examples": len(rows), "predictions": rows}


@dataclass
class EvaluateConfig:
    """Settings of ``iprox evaluate``.

    Attributes:
        model: a proxy folder, or any model ``build-proxy --model`` accepts.
        data: held-out data files or folders.
        limit: evaluate the first N examples only (0: all).
        max_length: tokens per example.
        batch_size: examples per forward pass.
        dtype: float32, bfloat16 (bf16), float16 (fp16) or auto.
        device: "" for $IPROX_DEVICE, else CUDA when present, else CPU.
        out: also write the figures to this JSON file.
        accuracy: also exact-match accuracy of greedy answers (BBH targets, GSM8K final numbers).
        max_new_tokens: generation budget for the accuracy (0: 16, or 256 for GSM8K).
        progress: show progress bars.
    """

    model: str = ""
    data: list[str] = field(default_factory=list)
    limit: int = 0
    max_length: int = 512
    batch_size: int = 8
    dtype: str = "float32"
    device: str = ""
    out: str = ""
    accuracy: bool = False
    max_new_tokens: int = 0
    progress: bool = True

    def __post_init__(self):
        check_types(self)
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.model or not self.data:
            raise ValueError("evaluate needs --model and --data")
        if min(self.limit, self.max_new_tokens) < 0 or self.batch_size < 1 or self.max_length < 8:
            raise ValueError("limit and max_new_tokens must be >= 0, batch_size >= 1, max_length >= 8")
        check_data_paths(self.data)
        self.dtype = resolve_dtype(self.dtype, self.device)


def evaluate(config: EvaluateConfig) -> dict:
    """Held-out loss (and, when asked, answer accuracy) of a model or proxy; writes ``config.out``
    when given. Returns the figures (see :func:`heldout_loss`, :func:`answer_accuracy`)."""
    from .artifacts import atomic_write_json
    from .data import load_examples, tokenize_examples
    from .loading import load_model_or_proxy
    from .models import default_device

    model, tok = load_model_or_proxy(config.model, config.dtype, config.device or default_device())
    examples = load_examples(config.data)
    if config.limit:
        examples = examples[: config.limit]
    tokd, _ = tokenize_examples(tok, examples, config.max_length)
    res = heldout_loss(model, tokd, config.batch_size, tok.pad_token_id, progress=config.progress)
    res["model"] = config.model
    if config.accuracy:
        acc = answer_accuracy(model, tok, examples, config.max_new_tokens, progress=config.progress)
        res.update(accuracy=acc["accuracy"], predictions=acc["predictions"])
    if config.out:
        atomic_write_json(config.out, res)
    return res


def format_evaluation(res: dict) -> str:
    lines = [f"{res['model']}: response-token loss {res['token_loss']:.4f} over {res['n_tokens']} tokens "
             f"({res['n_examples']} examples; mean per-example loss {res['example_loss']:.4f})"]
    if "accuracy" in res:
        lines.append(f"exact-match accuracy {res['accuracy']:.3f} over {len(res['predictions'])} examples")
    return "\n".join(lines)
