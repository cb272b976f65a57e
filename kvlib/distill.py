"""The trainable distillation module: a student plus what carries a teacher's stored KV onto it.

``TeacherAligner`` (one per teacher) applies the four alignment axes in a fixed order:

1. **layers**: each student layer's target is the layer map's weighted sum of teacher layers;
2. **time**: ``time_alignment`` (global / segment / span) carries the teacher's tokens onto the
   student's, per example, as one ``(B, Ts, Tt)`` matrix (doing this before projecting keeps the
   projector's work on the shorter axis when the teacher reads characters);
3. **heads and head dim**: one ``KVProjector`` per student layer.

With ``shuffle_time`` (the negative control) each example's real teacher steps are put in a random
order first, so the targets keep the teacher's statistics but lose their relation to the text.

``Distiller`` owns the student, the aligners and, for several teachers, a ``kvlib.fusion`` module,
so that ``accelerate`` wraps one module whose ``forward`` holds all trainable computation. Its
forward returns the loss terms: CE over the real next tokens, and the KV loss (plus an optional
MiniLMv2 relation loss) of the student's K, V against the aligned (and per layer fused) teacher
targets, over real student positions that the alignment reaches. Keys are compared before RoPE when
``pre_rope`` is set (the store then holds pre-RoPE teacher keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvlib.config import KVConfig
from kvlib.data import SEGMENTS, TASKS, Example
from kvlib.fusion import AttentionFusion, RouterFusion
from kvlib.hf import KVSpec, forward_with_kv, kv_spec
from kvlib.kvstore import KVStore
from kvlib.layers import LayerMap
from kvlib.losses import kv_loss, relation_loss
from kvlib.projectors import KVProjector
from kvlib.resample import time_alignment
from kvlib.rope import unrotate_keys
from kvlib.text import check_lengths, encode_batch


def shuffle_time(kv: list[tuple[Tensor, Tensor]], keep: Tensor, real: Tensor) -> tuple[list, Tensor]:
    """The negative control: each example's real time steps (real (B, T)) in one random order, shared by all
    layers and heads; padding stays in place. kv: L pairs of (B, H, T, D); keep: (B, H, T)."""
    order = torch.rand(real.shape, device=real.device).masked_fill(~real, 2.0).argsort(dim=1)  # (B, T)
    B, H, T, D = kv[0][0].shape
    idx = order[:, None, :, None].expand(B, H, T, D)
    return [(k.gather(2, idx), v.gather(2, idx)) for k, v in kv], keep.gather(2, order[:, None].expand(B, H, T))


class TeacherAligner(nn.Module):
    """One teacher's stored KV (Lt layers of (B, Ht, Tt, Dt)) -> student-shaped targets (Ls of (B, Hs, Ts, Ds))."""

    def __init__(
        self, spec_t: KVSpec, spec_s: KVSpec, layer_map: LayerMap, projector: str, time_align: str, shuffle_time=False
    ):
        super().__init__()
        if (layer_map.num_teacher_layers, layer_map.num_student_layers) != (spec_t.num_layers, spec_s.num_layers):
            raise ValueError(
                f"layer map goes from {layer_map.num_teacher_layers} to {layer_map.num_student_layers} layers but "
                f"the teacher has {spec_t.num_layers} and the student {spec_s.num_layers}"
            )
        self.spec_t, self.spec_s, self.time_align, self.shuffle_time = spec_t, spec_s, time_align, shuffle_time
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
        kv_t, keep = teacher["kv"], teacher["mask"]  # keep (B, Ht, Tt): real tokens or the slots a store kept
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
        if self.shuffle_time:
            kv_t, keep = shuffle_time(kv_t, keep, teacher["attention_mask"].bool())
        A = A[:, None] * keep.float()[:, :, None, :]  # (B, Ht, Ts, Tt): each head reads only what it holds
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
    """Student + one aligner per teacher (+ a fusion for several); ``forward(batch)`` returns the loss terms.

    Terms: ``ce``; with teachers ``kv`` (and ``relation``, and ``entropy`` for a router with an entropy
    regulariser), ``loss`` (the weighted total), and with a fusion ``fusion_weights`` (Ls, B, N), the
    teachers' weights per layer and example (detached, averaged over positions for per-position kinds).
    """

    def __init__(self, student, aligners: list[TeacherAligner] = (), kv: KVConfig | None = None, fusion=None):
        super().__init__()
        aligners = list(aligners)
        if bool(aligners) != (kv is not None):
            raise ValueError("pass teacher aligners and a KVConfig for KV distillation, or neither for CE only")
        if len(aligners) > 1 and fusion is None:
            raise ValueError(f"{len(aligners)} teachers need a fusion (kvlib.fusion.make_fusion) to combine them")
        if fusion is not None and fusion.num_teachers != len(aligners):
            raise ValueError(f"the fusion was built for {fusion.num_teachers} teachers but {len(aligners)} are given")
        spec_s = kv_spec(student.config)
        for i, aligner in enumerate(aligners):
            if aligner.spec_s != spec_s:
                raise ValueError(f"aligner {i} targets {aligner.spec_s} but the student is {spec_s}")
        self.student, self.aligners, self.kv, self.fusion = student, nn.ModuleList(aligners), kv, fusion
        self._no_split_modules = getattr(student, "_no_split_modules", None)  # FSDP wraps the student's blocks

    def forward(self, batch: dict) -> dict[str, Tensor]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = forward_with_kv(
            self.student,
            ids,
            mask,
            hidden=isinstance(self.fusion, RouterFusion),
            queries=isinstance(self.fusion, AttentionFusion),
        )
        real = mask[:, 1:].bool()  # (B, T-1): next tokens that exist
        terms = {"ce": F.cross_entropy(out.logits[:, :-1][real].float(), ids[:, 1:][real])}
        if self.aligners:
            terms |= self.kv_terms(out.kv, batch, out.hidden, out.queries)
        weights = self.term_weights()
        terms["loss"] = sum(weights[name] * terms[name] for name in weights if name in terms)
        return terms

    def kv_terms(self, kv_s: list, batch: dict, hidden: list | None = None, queries: list | None = None) -> dict:
        """The teacher terms for the student's cache ``kv_s`` (Ls pairs of (B, Hs, Ts, Ds), post-RoPE): ``kv``,
        and as configured ``relation``, ``entropy`` and ``fusion_weights``. Everything between the student's
        forward and the loss happens here (un-rotation, time / layer / head alignment, fusion, loss); a router
        needs the student's ``hidden`` states, attention fusion its ``queries`` (``forward_with_kv``)."""
        terms = {}
        if self.kv.pre_rope:
            positions = torch.arange(kv_s[0][0].shape[2], device=kv_s[0][0].device)
            kv_s = [(unrotate_keys(k, positions, self.student.config), v) for k, v in kv_s]
        aligned = [aligner(t, batch) for aligner, t in zip(self.aligners, batch["teachers"])]
        if self.fusion is None:
            targets, _, covered = aligned[0]
        else:
            targets, covered, terms["fusion_weights"], entropy = self._fuse(aligned, kv_s, hidden, queries, batch)
            if self.fusion.aux_loss.requires_grad:
                terms["entropy"] = entropy
        terms["kv"], _ = kv_loss(
            kv_s, targets, covered, self.kv.loss, self.kv.k_weight, self.kv.v_weight, self.kv.normalize
        )
        if self.kv.relation_weight > 0:
            terms["relation"] = torch.stack(
                [
                    relation_loss(xs, xt, cov, self.kv.relation_heads)
                    for _, unprojected, cov in aligned
                    for (ks, vs), (kt, vt) in zip(kv_s, unprojected)
                    for xs, xt in ((ks, kt), (vs, vt))
                ]
            ).mean()
        return terms

    def _fuse(self, aligned, kv_s, hidden, queries, batch):
        """Per student layer, fuse the teachers' targets; returns targets, mask, weights (Ls, B, N), entropy."""
        targets, weights, entropy = [], [], 0.0
        masks = [covered for _, _, covered in aligned]
        for layer in range(len(kv_s)):
            k, v, fused_mask, w = self.fusion(
                [t[layer] for t, _, _ in aligned],
                masks,
                student_kv=kv_s[layer],
                student_h=hidden[layer] if hidden is not None else None,
                student_q=queries[layer] if queries is not None else None,
                task_ids=batch["task_ids"],
                layer=layer,
            )
            targets.append((k, v))
            entropy = entropy + self.fusion.aux_loss
            if w.dim() == 3:  # (B, N, Ts): average over the fused positions
                m = fused_mask[:, None].float()
                w = (w * m).sum(-1) / m.sum(-1).clamp(min=1)
            weights.append(w.detach())
        return targets, fused_mask, torch.stack(weights), entropy / len(kv_s)

    def term_weights(self) -> dict[str, float]:
        """Weight of each loss term in the total (``entropy`` is already scaled by the router's weight)."""
        if self.kv is None:
            return {"ce": 1.0}
        return {"ce": 1.0, "kv": self.kv.weight, "relation": self.kv.relation_weight, "entropy": 1.0}


def collate_fn(tokenizer, examples: list[Example], stores: list[KVStore] = (), max_length: int | None = None):
    """``collate(indices) -> batch``: the examples encoded by the student's tokenizer (right-padded, with
    offsets, segment bounds and ``task_ids`` indexing ``kvlib.data.TASKS``) and, under ``teachers``, each
    teacher's stored KV of the same examples. With ``max_length`` (the student's
    ``max_position_embeddings``) every example is checked once, up front: a text too long for the model is
    refused (``kvlib.text.check_lengths``), never truncated."""
    unknown = sorted({e.task for e in examples} - set(TASKS))
    if unknown:
        raise ValueError(f"training examples have tasks {unknown}; training takes the tasks {TASKS}")
    for i, store in enumerate(stores):
        if store.ids != [e.id for e in examples]:
            raise ValueError(
                f"KV store {i} holds {len(store)} examples that are not these {len(examples)} in this order; "
                "extract the store over the same split the student trains on"
            )
    if max_length is not None:
        check_lengths(tokenizer, [e.text for e in examples], [e.id for e in examples], max_length)

    def collate(indices) -> dict:
        chunk = [examples[i] for i in indices]
        spans = [{name: e.spans[name] for name in SEGMENTS} for e in chunk]
        batch = encode_batch(tokenizer, [e.text for e in chunk], spans, max_length)
        batch["task_ids"] = torch.tensor([TASKS.index(e.task) for e in chunk])
        if stores:
            batch["teachers"] = [store.batch(list(indices)) for store in stores]
        return batch

    return collate
