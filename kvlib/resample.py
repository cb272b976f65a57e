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
  ``i`` over the teacher tokens whose character spans overlap it, in proportion to the overlap;
  ``causal=True`` (alignment ``causal_span``) keeps only the teacher tokens that end at or before the
  student token's end, so that no target holds text the student has not read yet (a teacher token
  straddling the student token's end is dropped; a student token left with none reads the last teacher
  token that ends at or before its end).

``time_alignment`` builds the ``(B, Ts, Tt)`` matrix of each kind (global / segment / span / causal_span) for a
right-padded batch; ``time_taps`` gives the same rows sparsely, as per student step the k teacher steps it
reads and their weights (k = 2 for linear resampling, the largest character overlap count of the batch for
the span kinds), so that applying it costs O(B H Ts k D) instead of O(B H Ts Tt D); the dense form stays as
its tested reference.

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


def _segment_positions(b_in: Tensor, b_out: Tensor, t_in: int, t_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where output steps ``0 .. t_out - 1`` sample the input under checked cut points b_in, b_out (B, S + 1).

    Returns ``(pos, mask, keep)``, each (B, t_out): pos the float64 input position in ``[0, t_in - 1]``, mask
    True inside some segment, keep True inside a segment whose input is not empty.
    """
    t = torch.arange(t_out, device=b_out.device)  # (T_out,)
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
    pos = (start_in + frac).clamp(0, max(t_in - 1, 0))  # (B, T_out)
    return pos, mask, mask & (len_in > 0)


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
    pos, mask, keep = _segment_positions(b_in, b_out, x.shape[-2], t_out)  # (B, T_out) each
    if shared:
        pos, keep, mask = pos[0], keep[0], mask[0]  # (T_out,)
    else:
        view = (pos.shape[0],) + (1,) * (x.dim() - 3) + (t_out,)
        pos, keep = pos.view(view), keep.view(view)  # (B, 1, ..., T_out)
    if x.shape[-2] == 0:
        return x.new_zeros(*x.shape[:-2], t_out, x.shape[-1]), mask
    return _interpolate(x, pos, mode).masked_fill(~keep[..., None], 0), mask


def _check_offsets(
    offsets_t: Tensor, offsets_s: Tensor, mask_t: Tensor | None, mask_s: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Checks the inputs of a span alignment; returns the bool masks (B, Tt) and (B, Ts) (default: all real)."""
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
    return mask_t, mask_s


def span_alignment(
    offsets_t: Tensor,
    offsets_s: Tensor,
    mask_t: Tensor | None = None,
    mask_s: Tensor | None = None,
    causal: bool = False,
) -> Tensor:
    """Row-stochastic ``(B, Ts, Tt)`` time alignment from tokenizer character offsets.

    offsets_t: (B, Tt, 2), offsets_s: (B, Ts, 2) character ``[start, end)`` of each token in the same
    text; mask_t / mask_s: (B, T) True on real tokens (default: all). Row ``i`` weights teacher tokens
    by their character overlap with student token ``i``; a student token that overlaps none (a
    special or whitespace token) takes its nearest teacher token by span centre. Rows of padded
    student tokens and columns of padded teacher tokens are zero. Apply it as
    ``einsum("bst,bhtd->bhsd", A, kv_t)``. ``causal``: only teacher tokens ending at or before the student
    token's end count, and the fallback is the last of them (by index; the first teacher token when none
    ends that early, which a teacher ``<bos>`` at ``(0, 0)`` never leaves).
    """
    mask_t, mask_s = _check_offsets(offsets_t, offsets_s, mask_t, mask_s)
    (B, Tt, _), Ts = offsets_t.shape, offsets_s.shape[1]
    if Tt == 0:  # no teacher token, hence (checked above) no real student token: all rows are zero
        return torch.zeros(B, Ts, 0, device=offsets_s.device)
    s0, s1 = offsets_s[..., 0, None].double(), offsets_s[..., 1, None].double()  # (B, Ts, 1)
    t0, t1 = offsets_t[:, None, :, 0].double(), offsets_t[:, None, :, 1].double()  # (B, 1, Tt)
    valid = mask_s[:, :, None] & mask_t[:, None, :]  # (B, Ts, Tt)
    if causal:
        valid = valid & (t1 <= s1)
    overlap = (torch.minimum(s1, t1) - torch.maximum(s0, t0)).clamp(min=0) * valid  # (B, Ts, Tt)
    if causal:  # the last teacher token that ends in time (index 0 when none does)
        index = torch.arange(Tt, device=offsets_t.device).expand_as(valid)
        pick = torch.where(valid, index, -1).max(2, keepdim=True).values.clamp(min=0)  # (B, Ts, 1)
        valid = mask_s[:, :, None] & mask_t[:, None, :]
    else:
        dist = ((s0 + s1) - (t0 + t1)).abs().masked_fill(~valid, float("inf"))  # (B, Ts, Tt)
        pick = dist.argmin(2, keepdim=True)
    nearest = torch.zeros_like(overlap).scatter_(2, pick, 1.0) * valid
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


ALIGNMENTS = ("global", "segment", "span", "causal_span")
SPANS = ("span", "causal_span")  # the kinds that read character offsets


def _check_alignment(kind: str, mask_t: Tensor, mask_s: Tensor, offsets_t, offsets_s, bounds_t, bounds_s) -> None:
    """The checks shared by ``time_alignment`` and ``time_taps`` (their docstrings say what is refused)."""
    if kind not in ALIGNMENTS:
        raise ValueError(f"time alignment must be one of {ALIGNMENTS}, got {kind!r}")
    for name, m in (("mask_t", mask_t), ("mask_s", mask_s)):
        if m.dim() != 2 or (m.long().diff(dim=1) > 0).any():
            raise ValueError(f"{name} must be a right-padded (B, T) mask (real tokens first), got {m.long().tolist()}")
    if mask_s.shape[0] != mask_t.shape[0]:
        raise ValueError(
            f"mask_t holds {mask_t.shape[0]} examples but mask_s {mask_s.shape[0]}; give both the same batch"
        )
    lonely = mask_s.any(1) & ~mask_t.any(1)
    if lonely.any():
        raise ValueError(
            f"examples {lonely.nonzero().flatten().tolist()} have student tokens but no teacher token; encode "
            "every example for both models (each starts with <bos>)"
        )
    if kind in SPANS and (offsets_t is None or offsets_s is None):
        raise ValueError(f"time alignment {kind!r} needs offsets_t and offsets_s")
    if kind == "segment" and (bounds_t is None or bounds_s is None):
        raise ValueError("time alignment 'segment' needs bounds_t and bounds_s")


def _alignment_bounds(kind: str, mask_t: Tensor, mask_s: Tensor, bounds_t, bounds_s) -> tuple[Tensor, Tensor]:
    """Checked (B, S + 1) token cut points of both sides: one segment of the real tokens for ``global``."""
    B, Tt = mask_t.shape
    if kind == "global":
        zero = mask_t.new_zeros(B, dtype=torch.long)
        return torch.stack([zero, mask_t.long().sum(1)], 1), torch.stack([zero, mask_s.long().sum(1)], 1)  # (B, 2)
    b_t = _as_bounds(bounds_t, "bounds_t", mask_t.device)  # (B or 1, S + 1)
    b_s = _as_bounds(bounds_s, "bounds_s", mask_s.device)
    if b_t.shape[1] != b_s.shape[1] or b_t.shape[0] not in (1, B) or b_s.shape[0] not in (1, B):
        raise ValueError(
            f"bounds_t {tuple(b_t.shape)} and bounds_s {tuple(b_s.shape)} must both be (1 or B={B}, S + 1) with "
            "the same segments"
        )
    if (b_t[:, -1] > Tt).any():
        raise ValueError(f"bounds_t reach {b_t[:, -1].tolist()} but the teacher has only {Tt} time steps")
    b_t, b_s = b_t.expand(B, -1), b_s.expand(B, -1)  # (B, S + 1)
    lonely = (b_s.diff(dim=1) > 0) & (b_t.diff(dim=1) == 0)  # (B, S)
    if lonely.any():
        b, j = lonely.nonzero()[0].tolist()
        raise ValueError(
            f"segment {j} of example {b} has student tokens but no teacher token (bounds_t {b_t[b].tolist()}, "
            f"bounds_s {b_s[b].tolist()}); a segment of non-empty text has tokens on both sides: check the "
            "segment bounds of both encodings"
        )
    return b_t, b_s


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
    ``span``: character-overlap alignment (offsets_t (B, Tt, 2), offsets_s (B, Ts, 2)); ``causal_span``: the
    same over the teacher tokens that end at or before the student token's end (``span_alignment``).
    Apply it as ``einsum("bst,bhtd->bhsd", A, x_t)``; rows of student padding are zero. An example (for
    ``segment``: a segment) with student tokens but no teacher token raises (module docstring: T = 0).
    The dense reference of ``time_taps``, which gives the same rows without a (Ts, Tt) matrix.
    """
    _check_alignment(kind, mask_t, mask_s, offsets_t, offsets_s, bounds_t, bounds_s)
    if kind in SPANS:
        return span_alignment(offsets_t, offsets_s, mask_t, mask_s, causal=kind == "causal_span")
    B, Tt = mask_t.shape
    b_t, b_s = _alignment_bounds(kind, mask_t, mask_s, bounds_t, bounds_s)
    eye = torch.eye(Tt, device=mask_t.device).expand(B, Tt, Tt)  # (B, Tt, Tt): resampling it gives the weights
    a, _ = segment_resample(eye, b_t, b_s)  # (B, Ts', Tt)
    return torch.nn.functional.pad(a, (0, 0, 0, mask_s.shape[1] - a.shape[1]))  # (B, Ts, Tt)


def _span_taps(
    offsets_t: Tensor, offsets_s: Tensor, mask_t: Tensor, mask_s: Tensor, causal: bool = False
) -> tuple[Tensor, Tensor]:
    """``span_alignment`` as taps (B, Ts, k); teacher starts and ends must not decrease over real tokens.

    Then the teacher tokens overlapping student token ``[s0, s1)`` are a run: from the first one ending
    after ``s0`` to the last one starting before ``s1`` (two binary searches); ``causal`` ends the run
    before the first one ending after ``s1`` (a third). The nearest token by centre (centres ``t0 + t1``
    are sorted too) is one of the two around ``s0 + s1``; ties go to the lower index, as ``argmin`` does in
    the dense form. The causal fallback, the last token ending by ``s1``, is just before that third search.
    """
    (B, Tt, _), Ts = offsets_t.shape, offsets_s.shape[1]
    t0, t1 = offsets_t[..., 0].double(), offsets_t[..., 1].double()  # (B, Tt)
    unsorted = ((t0.diff(dim=1) < 0) | (t1.diff(dim=1) < 0)) & mask_t[:, 1:]  # (B, Tt - 1)
    if unsorted.any():
        b = int(unsorted.nonzero()[0, 0])
        raise ValueError(
            f"span taps need teacher offsets whose starts and ends never decrease over the real tokens; example "
            f"{b} has {offsets_t[b][mask_t[b]].tolist()}; encode with kvlib.text.encode_batch, which tiles them"
        )
    t0, t1 = t0.masked_fill(~mask_t, float("inf")), t1.masked_fill(~mask_t, float("inf"))  # padding sorts last
    s0, s1 = offsets_s[..., 0].double().contiguous(), offsets_s[..., 1].double().contiguous()  # (B, Ts)
    first = torch.searchsorted(t1, s0, right=True)  # (B, Ts): first teacher token ending after the start
    stop = torch.searchsorted(t0, s1)  # (B, Ts): first teacher token starting at or after the end
    if causal:
        in_time = torch.searchsorted(t1, s1, right=True)  # (B, Ts): first teacher token ending after the end
        stop = torch.minimum(stop, in_time)
    count = (stop - first).clamp(min=0) * mask_s  # (B, Ts): the run's length
    k = max(int(count.max()) if count.numel() else 0, 1)
    tap = torch.arange(k, device=offsets_t.device)  # (k,)
    index = (first[..., None] + tap).clamp(max=Tt - 1)  # (B, Ts, k)
    g0 = t0.gather(1, index.flatten(1)).view(B, Ts, k)  # (B, Ts, k)
    g1 = t1.gather(1, index.flatten(1)).view(B, Ts, k)
    overlap = (torch.minimum(s1[..., None], g1) - torch.maximum(s0[..., None], g0)).clamp(min=0)  # (B, Ts, k)
    overlap = torch.where(tap < count[..., None], overlap, 0.0)

    centre, x = t0 + t1, s0 + s1  # (B, Tt) sorted, inf on padding; (B, Ts)
    right = torch.searchsorted(centre, x)  # (B, Ts): first centre >= x
    left = (right - 1).clamp(min=0)
    d_left = torch.where(right > 0, x - centre.gather(1, left), float("inf"))  # (B, Ts)
    d_right = torch.where(right < Tt, centre.gather(1, right.clamp(max=Tt - 1)) - x, float("inf"))
    left = torch.searchsorted(centre, centre.gather(1, left))  # first of the tokens sharing that centre
    nearest = torch.where(d_right < d_left, right, left).clamp(max=Tt - 1)  # (B, Ts)
    if causal:
        nearest = (in_time - 1).clamp(min=0)  # (B, Ts)

    alone = (overlap.sum(-1) == 0) & mask_s  # (B, Ts): overlaps nothing, takes the nearest token
    index = torch.where(alone[..., None], nearest[..., None], index)  # (B, Ts, k)
    weight = torch.where(alone[..., None], (tap == 0).double(), overlap)  # (B, Ts, k)
    weight = weight / weight.sum(-1, keepdim=True).clamp(min=1e-12)
    return index, weight.to(torch.float32)


def time_taps(
    kind: str,
    mask_t: Tensor,
    mask_s: Tensor,
    offsets_t: Tensor | None = None,
    offsets_s: Tensor | None = None,
    bounds_t: Tensor | None = None,
    bounds_s: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``time_alignment`` in sparse form: per student step, the teacher steps it reads and their weights.

    Same arguments and checks as ``time_alignment``. Returns ``(index, weight)``, (B, Ts, k) long in
    ``[0, Tt)`` and (B, Ts, k) float32, such that row ``i`` of ``time_alignment(...)[b]`` is
    ``zeros(Tt).index_add(0, index[b, i], weight[b, i])``; unused taps and student padding have weight 0.
    ``global`` / ``segment``: k = 2, the two neighbours of linear interpolation (the same step at the
    end of a segment). ``span`` / ``causal_span``: k = the most teacher tokens one student token's characters
    reach in this batch (at least 1, the fallback token); it needs teacher offsets whose starts and ends never
    decrease over real tokens (``kvlib.text.encode_batch`` tiles them). Work and memory O(B Ts k), with
    O(log Tt) binary searches for ``span``: no (Ts, Tt) matrix. Apply to x_t (B, H, Tt, D) as the sum over
    taps ``j`` of ``weight[:, None, :, j, None] * x_t.gather(2, index[:, None, :, j, None].expand(B, H, Ts, D))``
    (``kvlib.distill.TeacherAligner`` does). ``Tt = 0`` gives k = 0.
    """
    _check_alignment(kind, mask_t, mask_s, offsets_t, offsets_s, bounds_t, bounds_s)
    if kind in SPANS:
        mask_t, mask_s = _check_offsets(offsets_t, offsets_s, mask_t, mask_s)
    (B, Tt), Ts = mask_t.shape, mask_s.shape[1]
    if Tt == 0:  # no teacher token, hence (checked) no real student token: no taps
        return mask_s.new_zeros(B, Ts, 0, dtype=torch.long), torch.zeros(B, Ts, 0, device=mask_s.device)
    if kind in SPANS:
        return _span_taps(offsets_t, offsets_s, mask_t.bool(), mask_s.bool(), causal=kind == "causal_span")
    b_t, b_s = _alignment_bounds(kind, mask_t, mask_s, bounds_t, bounds_s)
    pos, _, keep = _segment_positions(b_t, b_s, Tt, Ts)  # (B, Ts) each
    lo = pos.floor().long()  # (B, Ts)
    w = (pos - lo).to(torch.float32)  # as _interpolate computes it
    index = torch.stack([lo, (lo + 1).clamp(max=Tt - 1)], -1)  # (B, Ts, 2)
    weight = torch.stack([1 - w, w], -1).masked_fill(~keep[..., None], 0)  # (B, Ts, 2)
    return index, weight
