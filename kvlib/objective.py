"""The CE objective every run trains with, and the module a CE-only run (a teacher) trains.

``next_token_loss`` is the mean cross-entropy of the next token over the real (not padded) positions
of a right-padded batch, computed in float32. ``CausalLM`` wraps a Hugging Face causal LM so that
``kvlib.train.train`` can train it like a ``kvlib.distill.Distiller``: ``forward(batch)`` returns the
loss terms (``ce`` and the total ``loss``), ``student`` is the model and ``term_weights`` the terms'
weights. A teacher's training so depends on this module only, not on the KV alignment and losses.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def next_token_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean CE of token t+1 given tokens <= t over the real next tokens; logits (B, T, V), ids and mask (B, T)."""
    real = attention_mask[:, 1:].bool()  # (B, T-1): next tokens that exist
    return F.cross_entropy(logits[:, :-1][real].float(), input_ids[:, 1:][real])


class CausalLM(nn.Module):
    """A causal LM trained with CE only; ``forward(batch)`` returns ``{"ce", "loss"}``."""

    def __init__(self, model):
        super().__init__()
        self.student = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP wraps the model's blocks

    def forward(self, batch: dict) -> dict[str, Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        ce = next_token_loss(self.student(input_ids=ids, attention_mask=mask).logits, ids, mask)
        return {"ce": ce, "loss": ce}

    def term_weights(self) -> dict[str, float]:
        return {"ce": 1.0}
