"""The trainable distillation module: a student plus what carries a teacher's stored KV onto it.

``TeacherAligner`` (one per teacher) applies the four alignment axes in a fixed order:

1. **layers**: each student layer's target is the layer map's weighted sum of teacher layers;
2. **time**: ``time_taps`` (global / segment / span) carries the teacher's tokens onto the student's, per
   example: each student step is a weighted sum of k teacher steps (a gather), O(B Ht Ts k Dt) per teacher
   layer and never a ``(Ts, Tt)`` matrix (doing this before projecting keeps the projector's work on the
   shorter axis when the teacher reads characters); the layer mix of 1. is applied after it, on Ts steps;
3. **heads and head dim**: one ``KVProjector`` per student layer.

The layer mix and the projectors (1. and 3.) are ``LayerProjection``, which ``kvlib.latent.SlotAligner``
shares: its teacher slots need no time alignment.

With ``shuffle_time`` (the negative control) each example's real teacher steps are put in a random
order first, so the targets keep the teacher's statistics but lose their relation to the text (the aligner
moves the taps' targets instead of the KV: tap ``j`` reads step ``order[j]``).

``Distiller`` owns the student, the aligners and, for several teachers, a ``kvlib.fusion`` module,
so that ``accelerate`` wraps one module whose ``forward`` holds all trainable computation. Its
forward returns the loss terms: CE over the real next tokens, and the KV loss (plus an optional
MiniLMv2 relation loss) of the student's K, V against the aligned (and per layer fused) teacher
targets, over real student positions that the alignment reaches. Keys are compared before RoPE when
``pre_rope`` is set (the store then holds pre-RoPE teacher keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kvlib.config import check_choice, check_positive, from_dict
from kvlib.fusion import KINDS as FUSIONS
from kvlib.fusion import AttentionFusion, RouterFusion, check_fixed_weights
from kvlib.hf import KVSpec, forward_with_kv, kv_spec
from kvlib.layers import KINDS as LAYER_MAPS
from kvlib.layers import LayerMap
from kvlib.losses import KINDS as KV_LOSSES
from kvlib.losses import kv_loss, kv_scales, relation_loss
from kvlib.objective import next_token_loss
from kvlib.projectors import KINDS as PROJECTORS
from kvlib.projectors import KVProjector
from kvlib.resample import ALIGNMENTS, time_taps
from kvlib.rope import unrotate_keys


@dataclass(frozen=True)
class KVConfig:
    """How teacher KV is aligned to the student and weighed against CE."""

    weight: float = 1.0  # weight of the KV loss in the total loss (CE has weight 1)
    loss: str = "mse"
    k_weight: float = 1.0
    v_weight: float = 1.0
    normalize: bool = True  # standardise each side by its own per-layer mean and std (kvlib.losses.kv_distance)
    pre_rope: bool = True  # match keys before RoPE (un-rotate the student's; the store holds pre-RoPE teacher keys)
    time_align: str = "span"
    layer_map: str = "uniform"
    projector: str = "linear"
    relation_weight: float = 0.0  # weight of the MiniLMv2 relation loss (0 = off)
    relation_heads: int = 1
    shuffle_time: bool = False  # negative control: teacher KV shuffled in time within each example

    def __post_init__(self):
        check_choice("loss", self.loss, KV_LOSSES)
        check_choice("time_align", self.time_align, ALIGNMENTS)
        check_choice("layer_map", self.layer_map, LAYER_MAPS)
        check_choice("projector", self.projector, PROJECTORS)
        check_positive(self, "relation_heads")
        if min(self.weight, self.k_weight, self.v_weight, self.relation_weight) < 0:
            raise ValueError(
                f"weights must be >= 0, got weight={self.weight}, k_weight={self.k_weight}, "
                f"v_weight={self.v_weight}, relation_weight={self.relation_weight}"
            )


@dataclass(frozen=True)
class FusionConfig:
    """How several teachers' aligned KV are combined per layer (see ``kvlib.fusion``)."""

    kind: str = "fixed"
    weights: list[float] | None = None  # kind fixed: one per teacher, summing to 1 (default uniform)
    temperature: float = 1.0
    entropy_weight: float = 0.0  # router only: > 0 pushes toward specialised, < 0 toward diverse

    def __post_init__(self):
        check_choice("fusion kind", self.kind, FUSIONS)
        check_positive(self, "temperature")
        if self.weights is not None and self.kind != "fixed":
            raise ValueError(f"fusion weights are used only by kind 'fixed', got them with kind {self.kind!r}")


@dataclass(frozen=True)
class GroupConfig:
    """One experiment group: which teachers (none = CE only), how their KV is used, how they are fused; and,
    when set, its own learning rate (else the student's) and the number of training examples it uses (the
    first ``train_examples`` of the student-training split; else all of them)."""

    teachers: list[str]
    kv: KVConfig | None = None
    fusion: FusionConfig | None = None
    lr: float | None = None
    train_examples: int | None = None

    def __post_init__(self):
        if (self.lr is not None and self.lr <= 0) or (self.train_examples is not None and self.train_examples < 1):
            raise ValueError(f"lr={self.lr} must be > 0 and train_examples={self.train_examples} >= 1 (or unset)")
        if bool(self.teachers) != (self.kv is not None):
            raise ValueError(f"a group with teachers {self.teachers} needs kv settings, and a group without none")
        if len(self.teachers) > 1 and self.fusion is None:
            raise ValueError(f"a group with teachers {self.teachers} needs fusion settings")
        if len(set(self.teachers)) != len(self.teachers):
            raise ValueError(f"teachers {self.teachers} are listed twice")
        if self.fusion is not None and self.fusion.weights is not None:
            check_fixed_weights(self.fusion.weights, len(self.teachers))

    @classmethod
    def from_params(cls, params: dict) -> GroupConfig:
        return from_dict(cls, params)


def shuffle_order(real: Tensor) -> Tensor:
    """(B, T) long: per example a random order of its real steps (real (B, T), right-padded); padding stays put."""
    return torch.rand(real.shape, device=real.device).masked_fill(~real, 2.0).argsort(dim=1)  # (B, T)


def shuffle_time(kv: list[tuple[Tensor, Tensor]], keep: Tensor, real: Tensor) -> tuple[list, Tensor]:
    """The negative control: each example's real time steps (real (B, T)) in one random order, shared by all
    layers and heads; padding stays in place. kv: L pairs of (B, H, T, D); keep: (B, H, T)."""
    order = shuffle_order(real)  # (B, T)
    B, H, T, D = kv[0][0].shape
    idx = order[:, None, :, None].expand(B, H, T, D)
    return [(k.gather(2, idx), v.gather(2, idx)) for k, v in kv], keep.gather(2, order[:, None].expand(B, H, T))


class LayerProjection(nn.Module):
    """A teacher's layers onto the student's: the layer map's mix of teacher layers, then one ``KVProjector``
    per student layer (head mixing, head-dim map). The aligners (``TeacherAligner``, ``kvlib.latent.SlotAligner``)
    are built on it, so its ``layer_weights`` and ``projectors`` are theirs (state_dict keys ``projectors.*``)."""

    def __init__(self, spec_t: KVSpec, spec_s: KVSpec, layer_map: LayerMap, projector: str = "linear"):
        super().__init__()
        if (layer_map.num_teacher_layers, layer_map.num_student_layers) != (spec_t.num_layers, spec_s.num_layers):
            raise ValueError(
                f"layer map goes from {layer_map.num_teacher_layers} to {layer_map.num_student_layers} layers but "
                f"the teacher has {spec_t.num_layers} and the student {spec_s.num_layers}"
            )
        self.spec_t, self.spec_s = spec_t, spec_s
        self.register_buffer("layer_weights", layer_map.matrix(), persistent=False)  # (Ls, Lt)
        self.projectors = nn.ModuleList(
            KVProjector(spec_t.num_kv_heads, spec_s.num_kv_heads, spec_t.head_dim, spec_s.head_dim, projector)
            for _ in range(spec_s.num_layers)
        )

    def project(self, kv: list[tuple[Tensor, Tensor]]) -> tuple[list, list]:
        """``(targets, mixed)`` of Lt pairs of (B, Ht, T, Dt), time already aligned: per student layer the
        projected (B, Hs, T, Ds) pair and the layer-mixed (B, Ht, T, Dt) pair before projection."""
        keys = torch.stack([k for k, _ in kv])  # (Lt, B, Ht, T, Dt)
        values = torch.stack([v for _, v in kv])
        keys = torch.einsum("sl,lbhxd->sbhxd", self.layer_weights, keys)  # (Ls, B, Ht, T, Dt)
        values = torch.einsum("sl,lbhxd->sbhxd", self.layer_weights, values)
        targets = [proj(ks, vs) for proj, ks, vs in zip(self.projectors, keys, values)]  # Ls x (B, Hs, T, Ds)
        return targets, list(zip(keys, values))


class TeacherAligner(LayerProjection):
    """One teacher's stored KV (Lt layers of (B, Ht, Tt, Dt)) -> student-shaped targets (Ls of (B, Hs, Ts, Ds)):
    time taps, then the ``LayerProjection``."""

    def __init__(
        self, spec_t: KVSpec, spec_s: KVSpec, layer_map: LayerMap, projector: str, time_align: str, shuffle_time=False
    ):
        super().__init__(spec_t, spec_s, layer_map, projector)
        self.time_align, self.shuffle_time = time_align, shuffle_time

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
        index, weight = time_taps(
            self.time_align,
            teacher["attention_mask"].bool(),
            student["attention_mask"].bool(),
            teacher["offsets"],
            student["offsets"],
            teacher["segment_bounds"],
            student["segment_bounds"],
        )  # (B, Ts, k) each
        (B, Ts, k), Ht = index.shape, keep.shape[1]
        if self.shuffle_time:  # tap j reads the step the shuffle puts at j
            order = shuffle_order(teacher["attention_mask"].bool())  # (B, Tt)
            index = order.gather(1, index.flatten(1)).view(B, Ts, k)  # (B, Ts, k)
        index = index[:, None].expand(B, Ht, Ts, k)  # (B, Ht, Ts, k)
        w = weight[:, None] * keep.gather(2, index.flatten(2)).view(B, Ht, Ts, k).float()  # (B, Ht, Ts, k)
        mass = w.sum(-1)  # (B, Ht, Ts): each head reads only what it holds
        w = w / mass.clamp(min=1e-12)[..., None]

        def read(x: Tensor) -> Tensor:  # (B, Ht, Tt, Dt) -> (B, Ht, Ts, Dt): the weighted sum of each step's taps
            x, D = x.float(), x.shape[-1]
            taps = (w[..., j, None] * x.gather(2, index[..., j, None].expand(B, Ht, Ts, D)) for j in range(k))
            return sum(taps, x.new_zeros(B, Ht, Ts, D))

        targets, mixed = self.project([(read(kt), read(vt)) for kt, vt in kv_t])  # Ls pairs each
        covered = student["attention_mask"].bool() & (mass > 0).all(1)  # (B, Ts): every teacher head reaches it
        return targets, mixed, covered


class Distiller(nn.Module):
    """Student + one aligner per teacher (+ a fusion for several); ``forward(batch)`` returns the loss terms.

    Terms: ``ce``; with teachers ``kv`` (and ``relation``, and ``entropy`` for a router with an entropy
    regulariser), ``loss`` (the weighted total), and with a fusion ``fusion_weights`` (Ls, B, N), the
    teachers' weights per layer and example (detached, averaged over positions for per-position kinds).
    ``kv_std`` (detached, logged by the training loop): per student layer the std of the student's cached
    (post-RoPE) K and V over real tokens, (Ls, 2), and with teachers of the targets' K and V over the covered
    positions too, (Ls, 4), so that a collapse of either side's scale shows in the metrics.
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
        terms = {"ce": next_token_loss(out.logits, ids, mask)}
        scales = kv_scales(out.kv, mask.bool())  # (Ls, 2)
        if self.aligners:
            terms |= self.kv_terms(out.kv, batch, out.hidden, out.queries)
            scales = torch.cat([scales, terms.pop("target_std")], 1)  # (Ls, 4)
        weights = self.term_weights()
        terms["loss"] = sum(weights[name] * terms[name] for name in weights if name in terms)
        return terms | {"kv_std": scales}

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
        terms["target_std"] = kv_scales(targets, covered)  # (Ls, 2)
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
