"""Alignment of the layer axis: linear CKA and teacher -> student layer maps.

Linear CKA (Kornblith et al. 2019, https://arxiv.org/abs/1905.00414): with ``X`` (n, p) and ``Y``
(n, q) centred per column, ``CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``. It is 1 for identical
inputs, invariant to orthogonal transforms and isotropic scaling, and compares layers of different
widths; computed in float64 in feature space (cheap when n >> p).

A ``LayerMap`` says, for each student layer, which teacher layers it learns from and with which
weights (non-negative, summing to 1). Three kinds:

- ``uniform``: student layer ``i`` sits at teacher depth ``i (Lt - 1) / (Ls - 1)`` and interpolates
  linearly between the two nearest teacher layers (first -> first, last -> last);
- ``ratio``: student layer ``i`` averages the teacher layers in its share ``[i Lt / Ls, (i + 1) Lt / Ls)``
  of the depth, weighted by overlap;
- ``cka``: one teacher layer per student layer, the monotone (non-decreasing) assignment with the
  largest total CKA, with first -> first and last -> last fixed (dynamic programming).

All three are monotone and also work when the student is deeper than the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvlib.resample import area_weights

KINDS = ("uniform", "ratio", "cka")


def linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA between x (n, p) and y (n, q), the same n samples in the same order; a 0-dim tensor."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"linear_cka needs x (n, p) and y (n, q) over the same n samples, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"linear_cka needs at least 2 samples, got {x.shape[0]}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    xx = torch.linalg.matrix_norm(x.T @ x)
    yy = torch.linalg.matrix_norm(y.T @ y)
    if xx == 0 or yy == 0:
        raise ValueError("linear_cka is undefined for an input that is constant across samples")
    return torch.linalg.matrix_norm(y.T @ x) ** 2 / (xx * yy)


def cka_matrix(feats_t: list[Tensor], feats_s: list[Tensor]) -> Tensor:
    """``(Lt, Ls)`` linear CKA of every teacher layer's features (n, p_l) with every student layer's (n, q_l)."""
    if not feats_t or not feats_s:
        raise ValueError(
            f"cka_matrix needs features of at least one layer per side, got {len(feats_t)} and {len(feats_s)}"
        )
    return torch.stack([torch.stack([linear_cka(ft, fs) for fs in feats_s]) for ft in feats_t])


@dataclass(frozen=True)
class LayerMap:
    """Per student layer ``i``: teacher layers ``sources[i]`` with weights ``weights[i]`` (sum 1)."""

    num_teacher_layers: int
    sources: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]

    @property
    def num_student_layers(self) -> int:
        return len(self.sources)

    def matrix(self) -> Tensor:
        """Dense ``(Ls, Lt)`` row-stochastic form: ``student_kv[i] = sum_j M[i, j] teacher_kv[j]``."""
        m = torch.zeros(self.num_student_layers, self.num_teacher_layers)
        for i, (src, w) in enumerate(zip(self.sources, self.weights)):
            m[i, list(src)] = torch.tensor(w)
        return m

    def to_dict(self) -> dict:
        return {
            "num_teacher_layers": self.num_teacher_layers,
            "sources": [list(s) for s in self.sources],
            "weights": [list(w) for w in self.weights],
        }


def _from_matrix(m: Tensor) -> LayerMap:
    rows = [(r > 0).nonzero().flatten().tolist() for r in m]
    return LayerMap(
        num_teacher_layers=m.shape[1],
        sources=tuple(tuple(src) for src in rows),
        weights=tuple(tuple(float(m[i, j]) for j in src) for i, src in enumerate(rows)),
    )


def _uniform(num_teacher_layers: int, num_student_layers: int) -> Tensor:
    Lt, Ls = num_teacher_layers, num_student_layers
    pos = torch.arange(Ls, dtype=torch.float64) * (Lt - 1) / max(Ls - 1, 1)  # (Ls,)
    if Ls == 1:
        pos = torch.tensor([(Lt - 1) / 2], dtype=torch.float64)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=Lt - 1)
    w = pos - lo
    m = torch.zeros(Ls, Lt, dtype=torch.float64)
    m[torch.arange(Ls), lo] += 1 - w
    m[torch.arange(Ls), hi] += w
    return m


def _monotone_argmax(cka: Tensor) -> Tensor:
    """One-hot ``(Ls, Lt)`` non-decreasing assignment maximising the summed ``cka[a(i), i]``,
    with ``a(0) = 0`` and ``a(Ls - 1) = Lt - 1`` when ``Ls >= 2``."""
    Lt, Ls = cka.shape
    score = cka.T.double()  # (Ls, Lt)
    best = torch.full((Ls, Lt), float("-inf"), dtype=torch.float64)
    back = torch.zeros(Ls, Lt, dtype=torch.long)
    best[0] = score[0] if Ls == 1 else torch.where(torch.arange(Lt) == 0, score[0], float("-inf"))
    for i in range(1, Ls):
        prev, arg = torch.cummax(best[i - 1], dim=0)  # best predecessor at or before each j
        best[i], back[i] = prev + score[i], arg
    a = torch.empty(Ls, dtype=torch.long)
    a[-1] = Lt - 1 if Ls >= 2 else int(best[0].argmax())
    for i in range(Ls - 1, 0, -1):
        a[i - 1] = back[i, a[i]]
    return torch.nn.functional.one_hot(a, Lt).double()


def layer_map(
    num_teacher_layers: int, num_student_layers: int, kind: str = "uniform", cka: Tensor | None = None
) -> LayerMap:
    """Which teacher layers (and weights) each student layer is distilled from.

    cka: the ``(Lt, Ls)`` matrix from ``cka_matrix``, required by ``kind="cka"`` and used by no other kind.
    """
    Lt, Ls = num_teacher_layers, num_student_layers
    if Lt < 1 or Ls < 1:
        raise ValueError(f"layer counts must be >= 1, got teacher {Lt} and student {Ls}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if (cka is not None) != (kind == "cka"):
        raise ValueError(
            f"a cka matrix is required by kind='cka' and used by no other kind; "
            f"got kind={kind!r} with {'a' if cka is not None else 'no'} cka matrix"
        )
    if kind == "uniform":
        return _from_matrix(_uniform(Lt, Ls))
    if kind == "ratio":
        return _from_matrix(area_weights(Lt, Ls).double())
    if tuple(cka.shape) != (Lt, Ls):
        raise ValueError(
            f"cka has shape {tuple(cka.shape)} but the map is from {Lt} teacher to {Ls} student layers; "
            f"expected ({Lt}, {Ls})"
        )
    if not torch.isfinite(cka).all():
        raise ValueError("cka holds NaN or inf; compute it with cka_matrix on features that vary across samples")
    return _from_matrix(_monotone_argmax(cka))
