"""Alignment of the time axis (and of any index axis by area).

Teacher and student tokenise the same text into different numbers of tokens (``Tt != Ts``).
Three tools, all vectorised (no Python loop over tokens):

- ``resample_time``: global resampling of ``(..., T, D)`` to ``t_out`` steps. Output samples are
  evenly spaced over ``[0, T_in - 1]`` with both ends included (a single output sample sits in the
  middle); ``linear`` interpolates between the two neighbouring inputs, ``nearest`` takes the closest
  one. ``T_in = 0`` gives zeros, ``t_out = 0`` an empty tensor, ``T_in = 1`` repeats.
- ``segment_resample``: the same per segment (prompt / reasoning / answer), so that no segment
  leaks into another; batched with per-example segment bounds.
- ``span_alignment``: the ``(Ts, Tt)`` row-stochastic matrix whose row ``i`` spreads student token
  ``i`` over the teacher tokens whose character spans overlap it, in proportion to the overlap.

``area_weights`` is the overlap-proportional ``(n_out, n_in)`` averaging matrix used to initialise
head mixing (7 -> 3 heads) and to build ratio layer maps.

Empty sequences (T = 0): resampling an empty input gives zeros, to an empty output an empty tensor. The
alignment matrices (``span_alignment``, ``time_alignment`` of every kind) have a zero row for each
padded student step and a zero column for each padded teacher step, so ``Ts = 0`` or ``Tt = 0`` (or
masks with no real token) give the all-zero ``(B, Ts, Tt)`` matrix, possibly empty. What has no
correct result raises ``ValueError``: an example with real student tokens but no real teacher token
(or, for ``segment``, a segment with student tokens but none of the teacher's), whose student rows
could only be zero, i.e. a distillation target of zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("linear", "nearest")


def _gather_time(x: Tensor, idx: Tensor) -> Tensor:
    """x (..., T, D), idx (..., T_out) broadcastable to x's leading dims -> (..., T_out, D)."""
    lead = x.shape[:-2]
    idx = idx.expand(*lead, idx.shape[-1])  # (..., T_out)
    return torch.gather(x, -2, idx[..., None].expand(*lead, idx.shape[-1], x.shape[-1]))  # (..., T_out, D)


def _interpolate(x: Tensor, pos: Tensor, mode: str) -> Tensor:
    """Sample x (..., T, D) at fractional time positions pos (..., T_out) in [0, T - 1]."""
    if mode == "nearest":
        return _gather_time(x, torch.floor(pos + 0.5).long())
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=x.shape[-2] - 1)
    w = (pos - lo).to(x.dtype)[..., None]  # (..., T_out, 1)
    return _gather_time(x, lo) * (1 - w) + _gather_time(x, hi) * w


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def resample_time(x: Tensor, t_out: int, mode: str = "linear") -> Tensor:
    """Resample x (..., T_in, D) along its time axis to (..., t_out, D)."""
    _check_mode(mode)
    if x.dim() < 2:
        raise ValueError(f"x must be (..., T, D), got shape {tuple(x.shape)}")
    if t_out < 0:
        raise ValueError(f"t_out must be >= 0, got {t_out}")
    t_in = x.shape[-2]
    if t_out == t_in:
        return x
    if t_in == 0 or t_out == 0:
        return x.new_zeros(*x.shape[:-2], t_out, x.shape[-1])
    if t_out == 1:
        pos = torch.full((1,), (t_in - 1) / 2, dtype=torch.float64, device=x.device)
    else:
        pos = torch.arange(t_out, dtype=torch.float64, device=x.device) * (t_in - 1) / (t_out - 1)
    return _interpolate(x, pos, mode)


def _as_bounds(bounds, name: str, device) -> Tensor:
    b = torch.as_tensor(bounds, device=device).long()
    if b.dim() == 1:
        b = b[None]
    if b.dim() != 2 or b.shape[1] < 2:
        raise ValueError(f"{name} must be cut points (S + 1,) or (B, S + 1) with S >= 1, got shape {tuple(b.shape)}")
    if (b[:, 0] != 0).any() or (b.diff(dim=1) < 0).any():
        raise ValueError(f"{name} must start at 0 and never decrease, got {b.tolist()}")
    return b


def segment_resample(x: Tensor, bounds_in, bounds_out, mode: str = "linear") -> tuple[Tensor, Tensor]:
    """Resample each segment of the time axis separately.

    x: (B, ..., T_in, D), or (..., T_in, D) with shared bounds.
    bounds_in / bounds_out: segment cut points ``[0, b1, ..., b_S]``, shared (S + 1,) or per example
    (B, S + 1). Segment ``j`` of the input, ``[bounds_in[j], bounds_in[j + 1])``, is resampled onto
    ``[bounds_out[j], bounds_out[j + 1])`` of the output. An empty input segment gives zeros.
    Returns ``(y, mask)``: y (..., T_out, D) with ``T_out = max(bounds_out[:, -1])``, and mask
    (B, T_out) for per-example bounds or (T_out,) for shared ones, True where an output step lies
    inside a segment (False on the padding after a shorter example's last segment).
    """
    _check_mode(mode)
    b_in = _as_bounds(bounds_in, "bounds_in", x.device)
    b_out = _as_bounds(bounds_out, "bounds_out", x.device)
    if b_in.shape[1] != b_out.shape[1]:
        raise ValueError(
            f"bounds_in has {b_in.shape[1] - 1} segments but bounds_out has {b_out.shape[1] - 1}; "
            "give both sides the same segments"
        )
    if (b_in[:, -1] > x.shape[-2]).any():
        raise ValueError(f"bounds_in reach {b_in[:, -1].tolist()} but x has only {x.shape[-2]} time steps")
    shared = b_in.shape[0] == 1 and b_out.shape[0] == 1
    if not shared:
        B = max(b_in.shape[0], b_out.shape[0])
        if x.dim() < 3 or x.shape[0] != B or b_in.shape[0] not in (1, B) or b_out.shape[0] not in (1, B):
            raise ValueError(
                f"per-example bounds for {B} examples need x of shape (B={B}, ..., T, D) and bounds of "
                f"(1 or {B}, S + 1); got x {tuple(x.shape)}, bounds_in {tuple(b_in.shape)}, "
                f"bounds_out {tuple(b_out.shape)}"
            )
        b_in, b_out = b_in.expand(B, -1), b_out.expand(B, -1)
    t_out = int(b_out[:, -1].max())
    t = torch.arange(t_out, device=x.device)  # (T_out,)
    seg = torch.searchsorted(b_out[:, 1:].contiguous(), t.expand(b_out.shape[0], -1).contiguous(), right=True)
    mask = seg < b_out.shape[1] - 1  # (B, T_out): inside some segment
    seg = seg.clamp(max=b_out.shape[1] - 2)
    start_out, len_out = b_out.gather(1, seg), b_out.diff(dim=1).gather(1, seg)  # (B, T_out)
    start_in, len_in = b_in.gather(1, seg), b_in.diff(dim=1).gather(1, seg)  # (B, T_out)
    offset = (t - start_out).to(torch.float64)
    frac = torch.where(
        len_out > 1,
        offset * (len_in - 1).clamp(min=0) / (len_out - 1).clamp(min=1),
        (len_in - 1).clamp(min=0) / 2.0,
    )
    pos = (start_in + frac).clamp(0, max(x.shape[-2] - 1, 0))  # (B, T_out)
    keep = mask & (len_in > 0)  # (B, T_out): inside a segment whose input is not empty
    if shared:
        pos, keep, mask = pos[0], keep[0], mask[0]  # (T_out,)
    else:
        view = (pos.shape[0],) + (1,) * (x.dim() - 3) + (t_out,)
        pos, keep = pos.view(view), keep.view(view)  # (B, 1, ..., T_out)
    if x.shape[-2] == 0:
        return x.new_zeros(*x.shape[:-2], t_out, x.shape[-1]), mask
    return _interpolate(x, pos, mode).masked_fill(~keep[..., None], 0), mask


def span_alignment(
    offsets_t: Tensor, offsets_s: Tensor, mask_t: Tensor | None = None, mask_s: Tensor | None = None
) -> Tensor:
    """Row-stochastic ``(B, Ts, Tt)`` time alignment from tokenizer character offsets.

    offsets_t: (B, Tt, 2), offsets_s: (B, Ts, 2) character ``[start, end)`` of each token in the same
    text; mask_t / mask_s: (B, T) True on real tokens (default: all). Row ``i`` weights teacher tokens
    by their character overlap with student token ``i``; a student token that overlaps none (a
    special or whitespace token) takes its nearest teacher token by span centre. Rows of padded
    student tokens and columns of padded teacher tokens are zero. Apply it as
    ``einsum("bst,bhtd->bhsd", A, kv_t)``.
    """
    if offsets_t.dim() != 3 or offsets_t.shape[-1] != 2 or offsets_s.dim() != 3 or offsets_s.shape[-1] != 2:
        raise ValueError(
            f"offsets must be (B, T, 2), got teacher {tuple(offsets_t.shape)} and student {tuple(offsets_s.shape)}"
        )
    if offsets_t.shape[0] != offsets_s.shape[0]:
        raise ValueError(f"teacher batch {offsets_t.shape[0]} != student batch {offsets_s.shape[0]}")
    B, Tt, _ = offsets_t.shape
    Ts = offsets_s.shape[1]
    mask_t = torch.ones(B, Tt, dtype=torch.bool, device=offsets_t.device) if mask_t is None else mask_t.bool()
    mask_s = torch.ones(B, Ts, dtype=torch.bool, device=offsets_s.device) if mask_s is None else mask_s.bool()
    if tuple(mask_t.shape) != (B, Tt) or tuple(mask_s.shape) != (B, Ts):
        raise ValueError(
            f"masks must match the offsets: mask_t {tuple(mask_t.shape)} vs (B, Tt)=({B}, {Tt}), "
            f"mask_s {tuple(mask_s.shape)} vs (B, Ts)=({B}, {Ts})"
        )
    empty = mask_s.any(1) & ~mask_t.any(1)
    if empty.any():
        raise ValueError(f"examples {empty.nonzero().flatten().tolist()} have student tokens but no teacher token")
    if Tt == 0:  # no teacher token, hence (checked above) no real student token: all rows are zero
        return torch.zeros(B, Ts, 0, device=offsets_s.device)
    s0, s1 = offsets_s[..., 0, None].double(), offsets_s[..., 1, None].double()  # (B, Ts, 1)
    t0, t1 = offsets_t[:, None, :, 0].double(), offsets_t[:, None, :, 1].double()  # (B, 1, Tt)
    valid = mask_s[:, :, None] & mask_t[:, None, :]  # (B, Ts, Tt)
    overlap = (torch.minimum(s1, t1) - torch.maximum(s0, t0)).clamp(min=0) * valid  # (B, Ts, Tt)
    dist = ((s0 + s1) - (t0 + t1)).abs().masked_fill(~valid, float("inf"))  # (B, Ts, Tt)
    nearest = torch.zeros_like(overlap).scatter_(2, dist.argmin(2, keepdim=True), 1.0) * valid
    no_overlap = overlap.sum(2, keepdim=True) == 0  # (B, Ts, 1)
    weights = torch.where(no_overlap, nearest, overlap)
    weights = weights / weights.sum(2, keepdim=True).clamp(min=1e-12)
    return weights.to(torch.float32)


def area_weights(n_in: int, n_out: int) -> Tensor:
    """``(n_out, n_in)`` row-stochastic averaging by overlap of equal-width cells.

    The unit interval is cut into ``n_in`` input cells and ``n_out`` output cells; output cell ``i``
    averages the input cells it overlaps, weighted by the overlap. ``n_in % n_out == 0`` gives
    grouped averaging (8 -> 2: two blocks of four), ``n_out % n_in == 0`` copies (2 -> 8), anything
    else splits the straddled cells (7 -> 3), and ``n_in == n_out`` is the identity.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"area_weights needs n_in >= 1 and n_out >= 1, got n_in={n_in}, n_out={n_out}")
    edges_in = torch.arange(n_in + 1, dtype=torch.float64) * n_out  # both scaled by n_in * n_out
    edges_out = torch.arange(n_out + 1, dtype=torch.float64) * n_in
    lo = torch.maximum(edges_out[:-1, None], edges_in[None, :-1])  # (n_out, n_in)
    hi = torch.minimum(edges_out[1:, None], edges_in[None, 1:])
    overlap = (hi - lo).clamp(min=0)
    return (overlap / overlap.sum(1, keepdim=True)).to(torch.float32)


ALIGNMENTS = ("global", "segment", "span")


def time_alignment(
    kind: str,
    mask_t: Tensor,
    mask_s: Tensor,
    offsets_t: Tensor | None = None,
    offsets_s: Tensor | None = None,
    bounds_t: Tensor | None = None,
    bounds_s: Tensor | None = None,
) -> Tensor:
    """The ``(B, Ts, Tt)`` matrix that carries teacher time steps onto student ones, for right-padded batches.

    ``global``: each example's real teacher tokens linearly resampled onto its real student tokens;
    ``segment``: the same per segment (bounds_t (B, S + 1), bounds_s (B, S + 1) token cut points);
    ``span``: character-overlap alignment (offsets_t (B, Tt, 2), offsets_s (B, Ts, 2)).
    Apply it as ``einsum("bst,bhtd->bhsd", A, x_t)``; rows of student padding are zero. An example (for
    ``segment``: a segment) with student tokens but no teacher token raises (module docstring: T = 0).
    """
    if kind not in ALIGNMENTS:
        raise ValueError(f"time alignment must be one of {ALIGNMENTS}, got {kind!r}")
    for name, m in (("mask_t", mask_t), ("mask_s", mask_s)):
        if m.dim() != 2 or (m.long().diff(dim=1) > 0).any():
            raise ValueError(f"{name} must be a right-padded (B, T) mask (real tokens first), got {m.long().tolist()}")
    B, Tt = mask_t.shape
    Ts = mask_s.shape[1]
    if mask_s.shape[0] != B:
        raise ValueError(f"mask_t holds {B} examples but mask_s {mask_s.shape[0]}; give both the same batch")
    lonely = mask_s.any(1) & ~mask_t.any(1)
    if lonely.any():
        raise ValueError(
            f"examples {lonely.nonzero().flatten().tolist()} have student tokens but no teacher token; encode "
            "every example for both models (each starts with <bos>)"
        )
    if kind == "span":
        if offsets_t is None or offsets_s is None:
            raise ValueError("time alignment 'span' needs offsets_t and offsets_s")
        return span_alignment(offsets_t, offsets_s, mask_t, mask_s)
    if kind == "global":
        bounds_t = torch.stack([mask_t.new_zeros(B, dtype=torch.long), mask_t.long().sum(1)], dim=1)  # (B, 2)
        bounds_s = torch.stack([mask_s.new_zeros(B, dtype=torch.long), mask_s.long().sum(1)], dim=1)
    elif bounds_t is None or bounds_s is None:
        raise ValueError("time alignment 'segment' needs bounds_t and bounds_s")
    eye = torch.eye(Tt, device=mask_t.device).expand(B, Tt, Tt)  # (B, Tt, Tt): resampling it gives the weights
    a, _ = segment_resample(eye, bounds_t, bounds_s)  # (B, Ts', Tt); checks the bounds
    if kind == "segment":
        b_t = _as_bounds(bounds_t, "bounds_t", mask_t.device).expand(B, -1)  # (B, S + 1)
        b_s = _as_bounds(bounds_s, "bounds_s", mask_s.device).expand(B, -1)
        lonely = (b_s.diff(dim=1) > 0) & (b_t.diff(dim=1) == 0)  # (B, S)
        if lonely.any():
            b, j = lonely.nonzero()[0].tolist()
            raise ValueError(
                f"segment {j} of example {b} has student tokens but no teacher token (bounds_t {b_t[b].tolist()}, "
                f"bounds_s {b_s[b].tolist()}); a segment of non-empty text has tokens on both sides: check the "
                "segment bounds of both encodings"
            )
    return torch.nn.functional.pad(a, (0, 0, 0, Ts - a.shape[1]))  # (B, Ts, Tt)
