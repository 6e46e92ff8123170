"""The representation baseline (RDS+): an example's feature is its mean-pooled final hidden state.

No gradient and no warm-up: one forward pass per example. Scored with the same TracIn code (one
"checkpoint" of weight 1), the score is the mean cosine to a subtask's validation examples, as
RDS+ ranks pool examples by cosine similarity of pooled representations.
"""

from __future__ import annotations

import torch
from torch import nn


class RepresentationEngine:
    """Mean over each example's non-padding tokens of the last layer's hidden states, (B, hidden)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.dim = int(model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        h = out.hidden_states[-1]  # (B, T, hidden), after the final norm in HF causal LMs
        mask = enc["attention_mask"][..., None].to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp_min(1)
