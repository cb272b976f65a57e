"""The trainable distillation module: a student plus what carries a teacher's stored KV onto it.

``TeacherAligner`` (one per teacher) applies the four alignment axes in a fixed order:

1. **layers**: each student layer's target is the layer map's weighted sum of teacher layers;
2. **time**: ``time_alignment`` (global / segment / span) carries the teacher's tokens onto the
   student's, per example, as one ``(B, Ts, Tt)`` matrix (doing this before projecting keeps the
   projector's work on the shorter axis when the teacher reads characters);
3. **heads and head dim**: one ``KVProjector`` per student layer.

``Distiller`` owns the student and the aligners, so that ``accelerate`` wraps one module whose
``forward`` holds all trainable computation. Its forward returns the loss terms: CE over the real
next tokens, and the KV loss (plus an optional MiniLMv2 relation loss) of the student's K, V against
the aligned teacher targets, over real student positions that the alignment reaches. Keys are
compared before RoPE when ``pre_rope`` is set (the store then holds pre-RoPE teacher keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvlib.config import KVConfig
from kvlib.data import SEGMENTS, Example
from kvlib.hf import KVSpec, forward_with_kv, kv_spec
from kvlib.kvstore import KVStore
from kvlib.layers import LayerMap
from kvlib.losses import kv_loss, relation_loss
from kvlib.projectors import KVProjector
from kvlib.resample import time_alignment
from kvlib.rope import unrotate_keys
from kvlib.text import encode_batch


class TeacherAligner(nn.Module):
    """One teacher's stored KV (Lt layers of (B, Ht, Tt, Dt)) -> student-shaped targets (Ls of (B, Hs, Ts, Ds))."""

    def __init__(self, spec_t: KVSpec, spec_s: KVSpec, layer_map: LayerMap, projector: str, time_align: str):
        super().__init__()
        if (layer_map.num_teacher_layers, layer_map.num_student_layers) != (spec_t.num_layers, spec_s.num_layers):
            raise ValueError(
                f"layer map goes from {layer_map.num_teacher_layers} to {layer_map.num_student_layers} layers but "
                f"the teacher has {spec_t.num_layers} and the student {spec_s.num_layers}"
            )
        self.spec_t, self.spec_s, self.time_align = spec_t, spec_s, time_align
        self.register_buffer("layer_weights", layer_map.matrix(), persistent=False)  # (Ls, Lt)
        self.projectors = nn.ModuleList(
            KVProjector(spec_t.num_kv_heads, spec_s.num_kv_heads, spec_t.head_dim, spec_s.head_dim, projector)
            for _ in range(spec_s.num_layers)
        )

    def forward(self, teacher: dict, student: dict) -> tuple[list, list, Tensor]:
        """``(targets, unprojected, covered)``: per student layer the projected (B, Hs, Ts, Ds) targets and the
        layer- and time-aligned teacher (B, Ht, Ts, Dt) before projection, and the (B, Ts) mask of covered
        student positions.

        teacher: a ``KVStore.batch`` (``kv``, ``mask``, ``attention_mask``, ``offsets``, ``segment_bounds``); for a
        compressed store each teacher head's alignment is renormalised over the slots it kept;
        student: the encoded batch (``attention_mask``, ``offsets``, ``segment_bounds``).
        """
        kv_t = teacher["kv"]
        if len(kv_t) != self.spec_t.num_layers:
            raise ValueError(
                f"teacher batch has {len(kv_t)} layers but the aligner was built for {self.spec_t.num_layers}"
            )
        A = time_alignment(
            self.time_align,
            teacher["attention_mask"].bool(),
            student["attention_mask"].bool(),
            teacher["offsets"],
            student["offsets"],
            teacher["segment_bounds"],
            student["segment_bounds"],
        )  # (B, Ts, Tt)
        keep = teacher["mask"].float()  # (B, Ht, Tt): real tokens, or the slots a compressed store kept
        A = A[:, None] * keep[:, :, None, :]  # (B, Ht, Ts, Tt): each head reads only what it holds
        mass = A.sum(-1)  # (B, Ht, Ts)
        A = A / mass.clamp(min=1e-12)[..., None]
        keys = torch.stack([k for k, _ in kv_t]).float()  # (Lt, B, Ht, Tt, Dt)
        values = torch.stack([v for _, v in kv_t]).float()
        keys = torch.einsum("sl,lbhtd,bhxt->sbhxd", self.layer_weights, keys, A)  # (Ls, B, Ht, Ts, Dt)
        values = torch.einsum("sl,lbhtd,bhxt->sbhxd", self.layer_weights, values, A)
        targets = [proj(k, v) for proj, k, v in zip(self.projectors, keys, values)]  # Ls x (B, Hs, Ts, Ds)
        covered = student["attention_mask"].bool() & (mass > 0).all(1)  # (B, Ts): every teacher head reaches it
        return targets, list(zip(keys, values)), covered


class Distiller(nn.Module):
    """Student + teacher aligner; ``forward(batch)`` returns the loss terms and the weighted total."""

    def __init__(self, student, aligner: TeacherAligner | None = None, kv: KVConfig | None = None):
        super().__init__()
        if (aligner is None) != (kv is None):
            raise ValueError("pass both a teacher aligner and a KVConfig for KV distillation, or neither for CE only")
        if aligner is not None and aligner.spec_s != kv_spec(student.config):
            raise ValueError(f"aligner targets {aligner.spec_s} but the student is {kv_spec(student.config)}")
        self.student, self.aligner, self.kv = student, aligner, kv

    def forward(self, batch: dict) -> dict[str, Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits, kv_s = forward_with_kv(self.student, ids, mask)
        real = mask[:, 1:].bool()  # (B, T-1): next tokens that exist
        ce = F.cross_entropy(logits[:, :-1][real].float(), ids[:, 1:][real])
        terms = {"ce": ce}
        if self.aligner is not None:
            if self.kv.pre_rope:
                positions = torch.arange(ids.shape[1], device=ids.device)
                kv_s = [(unrotate_keys(k, positions, self.student.config), v) for k, v in kv_s]
            targets, unprojected, covered = self.aligner(batch["teacher"], batch)
            terms["kv"], _ = kv_loss(
                kv_s, targets, covered, self.kv.loss, self.kv.k_weight, self.kv.v_weight, self.kv.normalize
            )
            if self.kv.relation_weight > 0:
                terms["relation"] = torch.stack(
                    [
                        relation_loss(xs, xt, covered, self.kv.relation_heads)
                        for (ks, vs), (kt, vt) in zip(kv_s, unprojected)
                        for xs, xt in ((ks, kt), (vs, vt))
                    ]
                ).mean()
        weights = self.term_weights()
        terms["loss"] = sum(weights[name] * terms[name] for name in weights if name in terms)
        return terms

    def term_weights(self) -> dict[str, float]:
        """Weight of each loss term in the total."""
        if self.kv is None:
            return {"ce": 1.0}
        return {"ce": 1.0, "kv": self.kv.weight, "relation": self.kv.relation_weight}


def collate_fn(tokenizer, examples: list[Example], store: KVStore | None = None, max_length: int | None = None):
    """``collate(indices) -> batch``: the examples encoded by the student's tokenizer (right-padded, with
    offsets and segment bounds) and, with a store, the teacher's stored KV of the same examples."""
    if store is not None and store.ids != [e.id for e in examples]:
        raise ValueError(
            f"the KV store holds {len(store)} examples that are not these {len(examples)} in this order; "
            "extract the store over the same split the student trains on"
        )

    def collate(indices) -> dict:
        chunk = [examples[i] for i in indices]
        spans = [{name: e.spans[name] for name in SEGMENTS} for e in chunk]
        batch = encode_batch(tokenizer, [e.text for e in chunk], spans, max_length)
        if store is not None:
            batch["teacher"] = store.batch(list(indices))
        return batch

    return collate
