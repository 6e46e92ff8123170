"""Held-out next-token loss on response tokens."""

from __future__ import annotations

import logging
import math
import re
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import TokenizedExample, batches, collate

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
