"""Held-out next-token loss on response tokens."""

from __future__ import annotations

import logging
import math
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
        enc = {k: v.to(device) for k, v in collate(batch, pad_id).items()}
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
