"""Distillation losses on KV tensors.

- ``kv_distance`` / ``kv_loss``: the KaVa loss (Kuzina et al. 2025, https://arxiv.org/abs/2510.02312)
  between student K, V and their teacher targets (already projected, time-aligned and fused to the
  student's shape): mse, l1, smooth_l1 (p = 2, 1, Huber) or cosine distance per head vector, averaged
  over the real positions of a mask. Optional per-layer normalisation standardises **each side by its
  own** mean and standard deviation over the masked entries (gradients flow through both statistics),
  so layers and models of different scales weigh alike and the loss is invariant to the scale of either
  side: neither the student nor a learnable projector can lower it by shrinking its K or V (dividing both
  sides by the target's detached std, the earlier rule, let the student's K/V and the projected target
  shrink together; runs ended with K/V 30-200x smaller than a CE-only student's). K and V both count,
  with weights.
- ``kv_scales``: the standard deviation of K and V per layer over the masked entries, which the training
  loop logs for the student and the target so that a collapse of either side is visible.
- ``relation_loss``: MiniLMv2 (Wang et al. 2021, https://arxiv.org/abs/2012.15828) self-relations.
  Heads of each side are concatenated and re-split into ``R`` relation heads, ``softmax(x x^T /
  sqrt(d))`` relation matrices are built per side, and the teacher's is matched by KL. Needs no
  projector: only the time axes must agree.

Losses are computed in float32 whatever the inputs (under bf16 autocast K and V can differ in dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KINDS = ("mse", "l1", "smooth_l1", "cosine")


def _head_mask(mask: Tensor, x: Tensor) -> Tensor:
    """A (B, T) or (B, H, T) mask as a float (B, H, T) mask for x (B, H, T, D)."""
    B, H, T, _ = x.shape
    fits = (mask.dim() == 2 and tuple(mask.shape) == (B, T)) or (
        mask.dim() == 3 and mask.shape[0] == B and mask.shape[1] in (1, H) and mask.shape[2] == T
    )
    if not fits:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not fit KV of shape {tuple(x.shape)}; pass (B, T) or (B, H, T)"
        )
    if mask.dim() == 2:
        mask = mask[:, None]  # (B, 1, T)
    return mask.expand(B, H, T).to(torch.float32)


def masked_moments(x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation (scalars) of x (B, H, T, D) over the entries of the positions m (B, H, T) sets."""
    n = (m.sum() * x.shape[-1]).clamp(min=1)
    mean = (x * m[..., None]).sum() / n
    return mean, (((x - mean) ** 2 * m[..., None]).sum() / n).clamp(min=1e-12).sqrt()


def kv_distance(pred: Tensor, target: Tensor, mask: Tensor, kind: str = "mse", normalize: bool = False) -> Tensor:
    """Mean distance between pred and target (B, H, T, D) over the positions where mask (B, T) or (B, H, T) is set.

    ``normalize``: each side standardised by its own masked mean and std first (scale-invariant on both sides).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same (B, H, T, D) shape; "
            "project and align the teacher to the student first"
        )
    m = _head_mask(mask, pred)  # (B, H, T)
    pred, target = pred.float(), target.float()
    if normalize:
        (mean_p, std_p), (mean_t, std_t) = masked_moments(pred, m), masked_moments(target, m)
        pred, target = (pred - mean_p) / std_p, (target - mean_t) / std_t
    if kind == "cosine":
        per = 1 - F.cosine_similarity(pred, target, dim=-1)  # (B, H, T)
    elif kind == "mse":
        per = (pred - target).square().mean(-1)
    elif kind == "l1":
        per = (pred - target).abs().mean(-1)
    else:
        per = F.smooth_l1_loss(pred, target, reduction="none").mean(-1)
    return (per * m).sum() / m.sum().clamp(min=1)


def kv_loss(
    student_kv: list[tuple[Tensor, Tensor]],
    target_kv: list[tuple[Tensor, Tensor]],
    mask: Tensor,
    kind: str = "mse",
    k_weight: float = 1.0,
    v_weight: float = 1.0,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(mean over layers, per-layer (L,))`` of ``k_weight * d(K) + v_weight * d(V)`` over L layers of (B, H, T, D)."""
    if len(student_kv) != len(target_kv) or not student_kv:
        raise ValueError(f"student has {len(student_kv)} layers but the target {len(target_kv)}; map layers first")
    if k_weight < 0 or v_weight < 0 or k_weight + v_weight == 0:
        raise ValueError(f"k_weight={k_weight} and v_weight={v_weight} must be >= 0 and not both 0")
    per_layer = torch.stack(
        [
            k_weight * kv_distance(ks, kt, mask, kind, normalize)
            + v_weight * kv_distance(vs, vt, mask, kind, normalize)
            for (ks, vs), (kt, vt) in zip(student_kv, target_kv)
        ]
    )
    return per_layer.mean(), per_layer


def kv_scales(kv: list[tuple[Tensor, Tensor]], mask: Tensor) -> Tensor:
    """(L, 2) detached float32: per layer the std of K and of V (L pairs of (B, H, T, D)) over the masked entries."""
    rows = []
    for k, v in kv:
        m = _head_mask(mask, k)
        rows.append(torch.stack([masked_moments(x.detach().float(), m)[1] for x in (k, v)]))
    return torch.stack(rows)


def _relations(x: Tensor, num_relation_heads: int, key_mask: Tensor) -> Tensor:
    """Log-softmax relation matrices (B, R, T, T) of x (B, H, T, D), heads re-split into R relation heads."""
    B, H, T, D = x.shape
    if (H * D) % num_relation_heads != 0:
        raise ValueError(f"H*D = {H}*{D} = {H * D} is not divisible by num_relation_heads={num_relation_heads}")
    d = H * D // num_relation_heads
    x = x.float().transpose(1, 2).reshape(B, T, num_relation_heads, d).transpose(1, 2)  # (B, R, T, d)
    scores = x @ x.transpose(-1, -2) / d**0.5  # (B, R, T, T)
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.log_softmax(-1)


def relation_loss(student_x: Tensor, teacher_x: Tensor, mask: Tensor, num_relation_heads: int) -> Tensor:
    """KL(teacher || student) of MiniLMv2 self-relations, averaged over real query positions.

    student_x (B, Hs, T, Ds) and teacher_x (B, Ht, T, Dt): keys or values on the same (student) time
    axis; head counts and sizes may differ. mask (B, T): real positions (queries and keys).
    """
    if student_x.dim() != 4 or teacher_x.dim() != 4 or student_x.shape[::2] != teacher_x.shape[::2]:
        raise ValueError(
            f"student {tuple(student_x.shape)} and teacher {tuple(teacher_x.shape)} must be (B, H, T, D) with the "
            "same B and T; align the teacher's time axis to the student's first"
        )
    key_mask = mask.bool()
    log_s = _relations(student_x, num_relation_heads, key_mask)
    log_t = _relations(teacher_x, num_relation_heads, key_mask)
    kl = (log_t.exp() * (log_t - log_s)).nan_to_num(0.0).sum(-1)  # (B, R, T): masked keys give 0 * (-inf - -inf)
    rows = key_mask[:, None, :].expand_as(kl).float()
    return (kl * rows).sum() / rows.sum().clamp(min=1)
