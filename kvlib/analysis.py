"""Alignment analysis: a teacher's and a student's KV over the same texts, on the student's time axis.

Two models with different tokenizers see the same text as different token sequences, so their KV
cannot be compared position by position. ``paired_kv`` runs both models over the same examples
(each with its own tokenizer), un-rotates the keys with each model's own RoPE, and carries the
teacher's KV onto the student's tokens with the character-offset span alignment. The result pairs
every real student token with a teacher vector at every layer, which is what linear CKA needs
(``kvlib.layers.cka_matrix``) to compare layers, and per head to compare heads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvlib.data import SEGMENTS, Example
from kvlib.hf import extract_kv
from kvlib.resample import time_alignment
from kvlib.rope import unrotate_keys
from kvlib.text import encode_batch


def _pre_rope_kv(model, tokenizer, examples: list[Example]):
    spans = [{name: e.spans[name] for name in SEGMENTS} for e in examples]
    enc = encode_batch(tokenizer, [e.text for e in examples], spans)
    kv = extract_kv(model.eval(), enc["input_ids"], enc["attention_mask"])
    positions = torch.arange(enc["input_ids"].shape[1])
    return [(unrotate_keys(k, positions, model.config), v) for k, v in kv], enc


@torch.no_grad()
def paired_kv(teacher, tokenizer_t, student, tokenizer_s, examples: list[Example]) -> dict:
    """Teacher and student KV over ``examples``, the teacher's carried onto the student's real tokens.

    Returns ``{"teacher": [(K, V)], "student": [(K, V)]}`` with per-layer tensors (H, n, D) over the n
    real student tokens of all examples (pre-RoPE keys), plus ``"alignment"`` (B, Ts, Tt) and both
    encodings (``"enc_t"``, ``"enc_s"``) for pictures of the time alignment.
    """
    if not examples:
        raise ValueError("paired_kv needs at least one example")
    kv_t, enc_t = _pre_rope_kv(teacher, tokenizer_t, examples)
    kv_s, enc_s = _pre_rope_kv(student, tokenizer_s, examples)
    A = time_alignment(
        "span", enc_t["attention_mask"].bool(), enc_s["attention_mask"].bool(), enc_t["offsets"], enc_s["offsets"]
    )  # (B, Ts, Tt)
    real = enc_s["attention_mask"].bool()  # (B, Ts)

    def tokens(x: Tensor) -> Tensor:  # (B, H, Ts, D) -> (H, n, D) over real student tokens
        return x.permute(1, 0, 2, 3)[:, real]

    def carried(x: Tensor) -> Tensor:
        return tokens(torch.einsum("bst,bhtd->bhsd", A, x.float()))

    return {
        "teacher": [(carried(k), carried(v)) for k, v in kv_t],
        "student": [(tokens(k.float()), tokens(v.float())) for k, v in kv_s],
        "alignment": A,
        "enc_t": enc_t,
        "enc_s": enc_s,
    }


def layer_features(kv: list[tuple[Tensor, Tensor]], part: str) -> list[Tensor]:
    """Per layer, the keys or values with heads concatenated: L of (n, H * D)."""
    index = {"keys": 0, "values": 1}[part]
    return [x[index].permute(1, 0, 2).reshape(x[index].shape[1], -1) for x in kv]  # (n, H*D)
