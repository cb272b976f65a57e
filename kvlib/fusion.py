"""Fusion of several teachers' aligned KV into one target per student layer.

Before fusion every teacher's KV is aligned to the student, so for one student layer teacher ``i``
gives ``K_i, V_i`` of shape (B, Hs, Ts, Ds) and a (B, Ts) mask of the student positions it covers
(``None`` for the mask: it covers every position). A teacher with no KV at this layer (a shallower
teacher mapped to fewer layers) is passed as ``None``.

``fuse`` is the pure weighted sum: per position, the weights of the teachers that are present and
cover it are renormalised to sum to 1. The fused mask holds the positions where that sum was
positive, i.e. the union of the covering teachers' masks (a teacher given weight exactly 0 counts
as not covering; only ``fixed`` can give 0 to a present teacher). Positions outside it are zero.

Five ``Fusion`` modules choose the weights; ``make_fusion`` picks one by name. Every kind except
``fixed`` divides its logits by ``temperature`` before a softmax over the available teachers
(present, and covering at least one position of the example; per position for ``attention``):

- ``fixed``: constant weights (default uniform), given as N finite non-negative numbers summing to 1
  (a list that does not is refused, not rescaled); no parameters.
- ``similarity``: per example, ``cos(s, t_i)`` where ``s`` is the student's own K concatenated with V,
  averaged over heads and over the positions any teacher covers, and ``t_i`` the same average of
  teacher ``i`` over the positions it covers; no parameters.
- ``attention``: per position, each student query head attends over the teachers' keys at that
  position, ``<q, K_i> / sqrt(Ds)``; the per-head softmaxes are averaged over heads, so K and V of all
  heads share one (B, N, Ts) weighting.
- ``task``: one learned logit vector per (task, layer), initialised to zero (uniform weights).
- ``router``: LayerNorm -> Linear(hidden, 64) -> SiLU -> Linear(64, N * L) on the student's hidden
  state averaged over the covered positions, giving per example and per layer logits; the last
  Linear starts at zero (uniform weights).

Routing never sends gradient into the student: its K, V, queries and hidden states are detached
before they choose weights, otherwise the KV loss would pull the student toward whichever teacher
it already resembles. The teachers' KV is not detached (it is the target, and carries the
projectors' gradient).

Entropy regulariser (router only): ``RouterFusion.entropy_loss(w) = entropy_weight * H(w)`` with
``H`` the per-example entropy ``-sum_i w_i log w_i`` (nats) averaged over the batch. Added to the
loss and minimised, a **positive** ``entropy_weight`` lowers the entropy (each example specialises
on few teachers); a **negative** one raises it (keeps the teachers mixed). Each forward call stores
its value as ``aux_loss`` (for one layer; a zero tensor when ``entropy_weight == 0`` and for the
other kinds), which the trainer adds after each call.

Adaptive per-example weights follow the multi-teacher KD finding that a fixed mix can make a much
stronger teacher hurt (RL-KD, https://arxiv.org/abs/2012.06048).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("fixed", "similarity", "attention", "task", "router")
ROUTER_WIDTH = 64

TeacherKV = tuple[Tensor, Tensor] | None


def _stack(kvs: list[TeacherKV], masks: list[Tensor | None]) -> tuple[Tensor, Tensor, Tensor]:
    """Teachers stacked on a new axis: K, V (B, N, Hs, Ts, Ds), zero outside coverage and for missing
    teachers, and cover (B, N, Ts), True where the teacher is present and covers the position."""
    if len(masks) != len(kvs):
        raise ValueError(f"got {len(kvs)} teacher KVs but {len(masks)} masks; give one mask (or None) per teacher")
    present = [i for i, kv in enumerate(kvs) if kv is not None]
    if not present:
        raise ValueError(f"all {len(kvs)} teachers are None at this layer; fuse at least one teacher's KV")
    ref = kvs[present[0]][0]
    if ref.dim() != 4:
        raise ValueError(
            f"teacher KV must be (B, Hs, Ts, Ds), got teacher {present[0]}'s K of shape {tuple(ref.shape)}"
        )
    B, _, Ts, _ = ref.shape
    for i in present:
        k, v = kvs[i]
        if k.shape != ref.shape or v.shape != ref.shape:
            raise ValueError(
                f"teacher {i} has K {tuple(k.shape)} and V {tuple(v.shape)} but teacher {present[0]}'s K is "
                f"{tuple(ref.shape)}; align every teacher's K and V to the student's (B, Hs, Ts, Ds) first"
            )
        if masks[i] is not None and tuple(masks[i].shape) != (B, Ts):
            raise ValueError(f"teacher {i}'s mask has shape {tuple(masks[i].shape)}, expected (B, Ts) = ({B}, {Ts})")
    zeros = ref.new_zeros(ref.shape)
    K = torch.stack([zeros if kv is None else kv[0] for kv in kvs], dim=1)  # (B, N, Hs, Ts, Ds)
    V = torch.stack([zeros if kv is None else kv[1] for kv in kvs], dim=1)  # (B, N, Hs, Ts, Ds)
    none = torch.zeros(B, Ts, dtype=torch.bool, device=ref.device)
    cover = torch.stack(
        [none if kv is None else ~none if m is None else m.bool() for kv, m in zip(kvs, masks)], dim=1
    )  # (B, N, Ts)
    outside = ~cover[:, :, None, :, None]  # (B, N, 1, Ts, 1)
    return K.masked_fill(outside, 0), V.masked_fill(outside, 0), cover


def _fuse_stacked(K: Tensor, V: Tensor, cover: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted sum over the teacher axis of K, V (B, N, Hs, Ts, Ds) with weights (B, N) or (B, N, Ts)
    renormalised per position over the covering teachers -> K, V (B, Hs, Ts, Ds) and mask (B, Ts)."""
    w = (weights if weights.dim() == 3 else weights[:, :, None]) * cover  # (B, N, Ts)
    total = w.sum(1, keepdim=True)  # (B, 1, Ts)
    w = (w / torch.where(total > 0, total, 1)).to(K.dtype)
    k = torch.einsum("bnt,bnhtd->bhtd", w, K)  # (B, Hs, Ts, Ds)
    v = torch.einsum("bnt,bnhtd->bhtd", w, V)  # (B, Hs, Ts, Ds)
    return k, v, total[:, 0] > 0


def fuse(kvs: list[TeacherKV], masks: list[Tensor | None], weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Fuse N teachers' aligned K, V (B, Hs, Ts, Ds) (or None) with non-negative weights (B, N) or (B, N, Ts).

    masks: per teacher (B, Ts) bool of covered positions, or None for all. Per position the weights of
    the present, covering teachers are renormalised to 1. Returns fused K, V (B, Hs, Ts, Ds) and the
    (B, Ts) mask of positions with positive total weight (zeros outside it).
    """
    K, V, cover = _stack(kvs, masks)
    B, N, _, Ts, _ = K.shape
    if tuple(weights.shape) not in ((B, N), (B, N, Ts)):
        raise ValueError(
            f"weights must be (B, N) = ({B}, {N}) or (B, N, Ts) = ({B}, {N}, {Ts}) for {N} teachers, "
            f"got {tuple(weights.shape)}"
        )
    if (weights < 0).any():
        raise ValueError(f"weights must be non-negative, got a minimum of {weights.min().item():.4g}")
    return _fuse_stacked(K, V, cover, weights)


def _masked_softmax(logits: Tensor, avail: Tensor, dim: int) -> Tensor:
    """Softmax over dim restricted to avail (broadcastable bool); 0 where unavailable, and 0 everywhere
    along dim when nothing is available (no NaN, in value or gradient)."""
    w = logits.masked_fill(~avail, torch.finfo(logits.dtype).min).softmax(dim)
    return w * avail


def _pool(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x (..., T, F) over the positions where mask (..., T) is True -> (..., F); 0 if none."""
    m = mask[..., None].to(x.dtype)  # (..., T, 1)
    return (x * m).sum(-2) / m.sum(-2).clamp(min=1)


def mean_entropy(weights: Tensor) -> Tensor:
    """Entropy in nats over the teacher axis (dim 1) of weights (B, N, ...), averaged over the rest; 0 log 0 = 0."""
    return -(weights * weights.clamp(min=torch.finfo(weights.dtype).tiny).log()).sum(1).mean()


class Fusion(nn.Module):
    """Chooses per-teacher weights for one student layer and fuses the teachers' aligned KV with them.

    Each concrete kind defines ``teacher_weights(K, V, cover, student_kv, student_h, student_q, task_ids,
    layer)``: K, V (B, N, Hs, Ts, Ds) and cover (B, N, Ts) from ``_stack`` -> weights (B, N) or (B, N, Ts).
    """

    def __init__(self, num_teachers: int, temperature: float = 1.0):
        super().__init__()
        self.num_teachers = num_teachers
        self.temperature = temperature
        self.aux_loss = torch.zeros(())  # an extra loss term the trainer adds; only the router sets one

    def forward(
        self,
        kvs: list[TeacherKV],
        masks: list[Tensor | None],
        *,
        student_kv: tuple[Tensor, Tensor],
        student_h: Tensor,
        student_q: Tensor | None,
        task_ids: Tensor,
        layer: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Fused K, V (B, Hs, Ts, Ds), mask (B, Ts) and the weights used, (B, N) or (B, N, Ts).

        The weights are >= 0, 0 for a missing teacher, and sum to 1 over the available teachers; ``fuse``
        then renormalises per position over the teachers that cover it.
        """
        if len(kvs) != self.num_teachers:
            raise ValueError(
                f"got {len(kvs)} teacher KVs but this fusion was built for {self.num_teachers} teachers; "
                "pass None for a teacher with no KV at this layer"
            )
        K, V, cover = _stack(kvs, masks)
        w = self.teacher_weights(K, V, cover, student_kv, student_h, student_q, task_ids, layer)
        k, v, mask = _fuse_stacked(K, V, cover, w)
        return k, v, mask, w

    def _check_layer(self, layer: int, num_layers: int) -> None:
        if not 0 <= layer < num_layers:
            raise ValueError(f"layer {layer} is out of range for a fusion built for {num_layers} student layers")


def check_fixed_weights(weights: list[float], num_teachers: int) -> None:
    """Raise ValueError unless ``weights`` are ``num_teachers`` finite, non-negative numbers summing to 1.

    They are used in float32: each weight written to float32 precision carries up to half a float32 epsilon
    of rounding, so the exact sum (``math.fsum``) may miss 1 by at most ``num_teachers`` float32 epsilons."""
    ok = len(weights) == num_teachers and all(math.isfinite(w) and w >= 0 for w in weights)
    if not ok or abs(math.fsum(weights) - 1) > num_teachers * torch.finfo(torch.float32).eps:
        raise ValueError(
            f"fixed_weights must be {num_teachers} non-negative numbers (finite, one per teacher) summing to 1, "
            f"got {weights}; set the group's fusion.weights so, e.g. {[1 / num_teachers] * num_teachers}"
        )


class FixedFusion(Fusion):
    """Constant weights (``check_fixed_weights``; default uniform), renormalised over the available teachers."""

    def __init__(self, num_teachers: int, fixed_weights: list[float] | None = None):
        super().__init__(num_teachers)
        if fixed_weights is not None:
            check_fixed_weights(fixed_weights, num_teachers)
        w = torch.ones(num_teachers) if fixed_weights is None else torch.tensor(fixed_weights, dtype=torch.float32)
        self.register_buffer("fixed", w, persistent=False)

    def teacher_weights(self, K, V, cover, student_kv, student_h, student_q, task_ids, layer) -> Tensor:
        w = self.fixed * cover.any(-1)  # (B, N)
        total = w.sum(1, keepdim=True)
        return w / torch.where(total > 0, total, 1)


class SimilarityFusion(Fusion):
    """Per example: softmax of cos(student KV, teacher KV) / temperature, both pooled over heads and positions."""

    def teacher_weights(self, K, V, cover, student_kv, student_h, student_q, task_ids, layer) -> Tensor:
        k_s, v_s = student_kv
        if k_s.shape != K.shape[:1] + K.shape[2:] or v_s.shape != k_s.shape:
            raise ValueError(
                f"student K {tuple(k_s.shape)} and V {tuple(v_s.shape)} must match the teachers' "
                f"{tuple(K.shape[:1] + K.shape[2:])}; pass the student's own KV of this layer"
            )
        s = torch.cat([k_s, v_s], dim=-1).detach().mean(1)  # (B, Ts, 2Ds)
        s = _pool(s, cover.any(1))  # (B, 2Ds)
        t = _pool(torch.cat([K, V], dim=-1).mean(2), cover)  # (B, N, 2Ds)
        cos = F.cosine_similarity(s[:, None], t, dim=-1)  # (B, N)
        return _masked_softmax(cos / self.temperature, cover.any(-1), dim=1)


class AttentionFusion(Fusion):
    """Per position: student queries attend over the teachers' keys there; softmax per head, mean over heads."""

    def teacher_weights(self, K, V, cover, student_kv, student_h, student_q, task_ids, layer) -> Tensor:
        if student_q is None or student_q.shape != K.shape[:1] + K.shape[2:]:
            got = None if student_q is None else tuple(student_q.shape)
            raise ValueError(
                f"attention fusion needs student_q of shape {tuple(K.shape[:1] + K.shape[2:])} (queries projected "
                f"to the KV heads), got {got}"
            )
        scores = torch.einsum("bhtd,bnhtd->bhtn", student_q.detach(), K) / math.sqrt(K.shape[-1])  # (B, Hs, Ts, N)
        avail = cover.transpose(1, 2)[:, None]  # (B, 1, Ts, N)
        w = _masked_softmax(scores / self.temperature, avail, dim=-1)  # (B, Hs, Ts, N)
        return w.mean(1).transpose(1, 2)  # (B, N, Ts)


class TaskFusion(Fusion):
    """A learned logit vector per (task, layer); zero at the start, so the weights start uniform."""

    def __init__(self, num_teachers: int, num_layers: int, num_tasks: int, temperature: float = 1.0):
        super().__init__(num_teachers, temperature)
        self.num_layers, self.num_tasks = num_layers, num_tasks
        self.logits = nn.Parameter(torch.zeros(num_tasks, num_layers, num_teachers))

    def teacher_weights(self, K, V, cover, student_kv, student_h, student_q, task_ids, layer) -> Tensor:
        self._check_layer(layer, self.num_layers)
        B = K.shape[0]
        if task_ids.shape != (B,) or ((task_ids < 0) | (task_ids >= self.num_tasks)).any():
            raise ValueError(
                f"task_ids must be (B,) = ({B},) with values in [0, {self.num_tasks}), got shape "
                f"{tuple(task_ids.shape)} and values {task_ids.tolist()}; build the fusion with every task counted"
            )
        logits = self.logits[task_ids.long(), layer]  # (B, N)
        return _masked_softmax(logits / self.temperature, cover.any(-1), dim=1)


class RouterFusion(Fusion):
    """A small network on the student's pooled hidden state gives per example and per layer logits."""

    def __init__(
        self,
        num_teachers: int,
        num_layers: int,
        hidden_size: int,
        temperature: float = 1.0,
        entropy_weight: float = 0.0,
    ):
        super().__init__(num_teachers, temperature)
        self.num_layers, self.hidden_size, self.entropy_weight = num_layers, hidden_size, entropy_weight
        self.net = nn.Sequential(
            nn.LayerNorm(hidden_size),
            nn.Linear(hidden_size, ROUTER_WIDTH),
            nn.SiLU(),
            nn.Linear(ROUTER_WIDTH, num_teachers * num_layers),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def entropy_loss(self, weights: Tensor) -> Tensor:
        """``entropy_weight * mean_entropy(weights)``: positive -> specialised, negative -> mixed weights."""
        return self.entropy_weight * mean_entropy(weights)

    def teacher_weights(self, K, V, cover, student_kv, student_h, student_q, task_ids, layer) -> Tensor:
        self._check_layer(layer, self.num_layers)
        B, N, _, Ts, _ = K.shape
        if tuple(student_h.shape) != (B, Ts, self.hidden_size):
            raise ValueError(
                f"student_h must be (B, Ts, hidden) = ({B}, {Ts}, {self.hidden_size}), got {tuple(student_h.shape)}; "
                "build the router with the student's hidden_size"
            )
        h = _pool(student_h.detach(), cover.any(1))  # (B, hidden)
        logits = self.net(h).view(B, self.num_layers, N)[:, layer]  # (B, N)
        w = _masked_softmax(logits / self.temperature, cover.any(-1), dim=1)
        self.aux_loss = self.entropy_loss(w)
        return w


def make_fusion(
    kind: str,
    num_teachers: int,
    num_layers: int,
    hidden_size: int,
    num_tasks: int,
    fixed_weights: list[float] | None = None,
    temperature: float = 1.0,
    entropy_weight: float = 0.0,
) -> Fusion:
    """The fusion module of the given kind for N teachers, L student layers, the student's hidden size and T tasks.

    fixed_weights is used only by ``fixed``, entropy_weight only by ``router``; temperature by all but ``fixed``.
    """
    if kind not in KINDS:
        raise ValueError(f"fusion kind must be one of {KINDS}, got {kind!r}")
    if min(num_teachers, num_layers, hidden_size, num_tasks) < 1:
        raise ValueError(
            f"num_teachers, num_layers, hidden_size and num_tasks must be >= 1, got {num_teachers}, {num_layers}, "
            f"{hidden_size} and {num_tasks}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if fixed_weights is not None and kind != "fixed":
        raise ValueError(f"fixed_weights are used only by kind='fixed', got them with kind={kind!r}")
    if entropy_weight != 0 and kind != "router":
        raise ValueError(f"entropy_weight is used only by kind='router', got {entropy_weight} with kind={kind!r}")
    match kind:
        case "fixed":
            return FixedFusion(num_teachers, fixed_weights)
        case "similarity":
            return SimilarityFusion(num_teachers, temperature)
        case "attention":
            return AttentionFusion(num_teachers, temperature)
        case "task":
            return TaskFusion(num_teachers, num_layers, num_tasks, temperature)
        case "router":
            return RouterFusion(num_teachers, num_layers, hidden_size, temperature, entropy_weight)
