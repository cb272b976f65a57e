"""Alignment of the head-count and head-dim axes: learnable teacher -> student KV projectors.

A ``KVProjector`` maps one layer's teacher K and V, (B, Ht, T, Dt), to the student's shape
(B, Hs, T, Ds) in two steps, with separate parameters for K and V:

1. **head mixing** ``(Hs, Ht)``: each student head is a learned mixture of teacher heads, initialised
   by ``area_weights`` — grouped averaging when ``Ht % Hs == 0`` (32 -> 8: blocks of four),
   copying when ``Hs % Ht == 0`` (8 -> 32, MQA 1 -> 4), overlap-proportional averaging otherwise
   (7 -> 3). Head counts are the configs' ``num_key_value_heads`` (see ``kvlib.hf.kv_spec``).
2. **head-dim map** ``Dt -> Ds``: ``linear`` is one matrix (identity init when ``Dt == Ds``, else a
   semi-orthogonal init); ``elastic`` adds a residual bottleneck LayerNorm -> Linear -> SiLU ->
   Linear whose last layer starts at zero, so both kinds start from the same map.

With matching shapes a fresh projector of either kind is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kvlib.resample import area_weights

KINDS = ("linear", "elastic")


class _HeadDimMap(nn.Module):
    """(..., Dt) -> (..., Ds): a linear map, plus a zero-initialised residual bottleneck if elastic."""

    def __init__(self, Dt: int, Ds: int, elastic: bool, hidden: int):
        super().__init__()
        self.linear = nn.Linear(Dt, Ds, bias=False)
        with torch.no_grad():
            if Dt == Ds:
                self.linear.weight.copy_(torch.eye(Ds))
            else:
                nn.init.orthogonal_(self.linear.weight)
        self.bottleneck = None
        if elastic:
            self.bottleneck = nn.Sequential(nn.LayerNorm(Dt), nn.Linear(Dt, hidden), nn.SiLU(), nn.Linear(hidden, Ds))
            nn.init.zeros_(self.bottleneck[-1].weight)
            nn.init.zeros_(self.bottleneck[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        return y if self.bottleneck is None else y + self.bottleneck(x)


class KVProjector(nn.Module):
    """Teacher K, V (B, Ht, T, Dt) -> student-shaped K, V (B, Hs, T, Ds) for one layer."""

    def __init__(self, Ht: int, Hs: int, Dt: int, Ds: int, kind: str = "linear", hidden: int | None = None):
        super().__init__()
        if min(Ht, Hs, Dt, Ds) < 1:
            raise ValueError(f"head counts and head dims must be >= 1, got Ht={Ht}, Hs={Hs}, Dt={Dt}, Ds={Ds}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.Ht, self.Hs, self.Dt, self.Ds, self.kind = Ht, Hs, Dt, Ds, kind
        init = area_weights(Ht, Hs)  # (Hs, Ht)
        self.mix_k = nn.Parameter(init.clone())
        self.mix_v = nn.Parameter(init.clone())
        elastic, hidden = kind == "elastic", hidden or Ds
        self.dim_k = _HeadDimMap(Dt, Ds, elastic, hidden)
        self.dim_v = _HeadDimMap(Dt, Ds, elastic, hidden)

    def _check(self, name: str, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.Ht or x.shape[3] != self.Dt:
            raise ValueError(
                f"expected teacher {name} of shape (B, {self.Ht}, T, {self.Dt}), got {tuple(x.shape)}; "
                f"build the projector from this teacher's kv_spec"
            )

    def forward(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self._check("keys", k)
        self._check("values", v)
        if k.shape[0] != v.shape[0] or k.shape[2] != v.shape[2]:
            raise ValueError(f"keys {tuple(k.shape)} and values {tuple(v.shape)} differ in batch or time")
        dtype = self.mix_k.dtype
        k = torch.einsum("sh,bhtd->bstd", self.mix_k, k.to(dtype))  # (B, Hs, T, Dt)
        v = torch.einsum("sh,bhtd->bstd", self.mix_v, v.to(dtype))  # (B, Hs, T, Dt)
        return self.dim_k(k), self.dim_v(v)  # (B, Hs, T, Ds) each

    def extra_repr(self) -> str:
        return f"Ht={self.Ht}, Hs={self.Hs}, Dt={self.Dt}, Ds={self.Ds}, kind={self.kind!r}"
