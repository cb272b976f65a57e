"""Alignment of the head-count and head-dim axes: learnable teacher -> student KV projectors.

A ``KVProjector`` maps one layer's teacher K and V, (B, Ht, T, Dt), to the student's shape
(B, Hs, T, Ds), with separate parameters for K and V. Kinds ``linear`` and ``elastic`` work in two steps:

1. **head mixing** ``(Hs, Ht)``: each student head is a learned mixture of teacher heads, initialised
   by ``area_weights`` — grouped averaging when ``Ht % Hs == 0`` (32 -> 8: blocks of four),
   copying when ``Hs % Ht == 0`` (8 -> 32, MQA 1 -> 4), overlap-proportional averaging otherwise
   (7 -> 3). Head counts are the configs' ``num_key_value_heads`` (see ``kvlib.hf.kv_spec``).
2. **head-dim map** ``Dt -> Ds``: ``linear`` is one matrix (identity init when ``Dt == Ds``, else a
   semi-orthogonal init); ``elastic`` adds a residual bottleneck LayerNorm -> Linear -> SiLU ->
   Linear whose last layer starts at zero, so both kinds start from the same map.

Kind ``c2c`` is the fuser of Cache-to-Cache (C2C; Fu et al. 2025, https://arxiv.org/abs/2510.03215), class
``C2CProjector`` in ``rosetta/model/projector.py`` of https://github.com/thu-nics/C2C, its three modules named
on https://fuvty.github.io/C2C_Project_Page (projection, dynamic weighting, learnable gating). Taken from there:
the layer's KV heads flattened to one vector per token, (B, T, Ht*Dt); a projected-feature branch to all
student heads at once, (B, T, Hs*Ds), behind a pre-norm and a GELU; a per-student-head weight from a linear
head, through a sigmoid (C2C's ``scalar_head`` and ``sigmoid(scalar)``); one scalar gate logit per K and per V
and layer, starting at 0; and the combination ``base + gate * sigmoid(head weight) * projected``. Per token::

    x = flatten(K_t)                                              # (B, T, Ht*Dt)
    out = P x + sigmoid(g) * sigmoid(W_h x + b_h) (x) MLP(x)      # (B, T, Hs*Ds) -> (B, Hs, T, Ds)
    MLP(x) = W_2 GELU(W_1 LayerNorm(x) + b_1) + b_2

with ``(x)`` scaling each student head's Ds block by that head's weight. Adapted to distillation:

- C2C fuses into the receiver's own cache, reading it too (``concat(sharer, receiver)`` in, ``receiver + ...``
  out). Here the projector must produce the student-shaped *target* from the teacher's K, V alone, so the
  student's cache is no input, and the receiver term is replaced by the projection ``P`` (Ht*Dt -> Hs*Ds, no
  bias), which starts as ``kron(area_weights, head-dim init)``: the very map the ``linear`` kind starts from,
  its head-dim init drawn the same way, so the same seed gives both kinds the same start, and the identity for
  matching shapes.
- C2C feeds the weights and the features from one shared trunk (Linear + residual RMSNorm FFN blocks, hidden
  1024, dropout 0.1); here the head weight reads ``x`` directly and the MLP is one LayerNorm -> Linear -> GELU
  -> Linear with no dropout, its width ``hidden`` (default ``Hs*Ds``: the MLP then costs about what ``P`` costs,
  where a fixed 1024 would be 4.5 times P for Llama-2-7B -> TinyLlama, 4096 -> 256).
- C2C's gate is Gumbel-sigmoid with a temperature annealed from 1 to 0.001 in training and a hard 0/1 at
  inference, as it picks the receiver layers worth fusing. Here it is a plain ``sigmoid(g)``: the target is
  the same in training and evaluation and no schedule has to be configured.
- The MLP's last layer starts at zero, so the branch adds exactly 0 at init. At the first step only ``P`` and
  that last layer get gradients (the gate, the head weight and the MLP's first layers are behind that zero);
  from the second step every parameter does.

With matching shapes a fresh projector of any kind is the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kvlib.resample import area_weights

KINDS = ("linear", "elastic", "c2c")


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


class _C2CFuser(nn.Module):
    """(B, Ht, T, Dt) -> (B, Hs, T, Ds): a projection of all the layer's heads plus a gated, head-weighted MLP."""

    def __init__(self, Ht: int, Hs: int, Dt: int, Ds: int, hidden: int, dim_init: Tensor):
        super().__init__()
        self.Hs, self.Ds = Hs, Ds
        d_in, d_out = Ht * Dt, Hs * Ds
        self.proj = nn.Linear(d_in, d_out, bias=False)
        with torch.no_grad():  # weight[s*Ds + e, h*Dt + d] = mix[s, h] * dim_init[e, d]
            self.proj.weight.copy_(torch.kron(area_weights(Ht, Hs), dim_init))  # (Hs*Ds, Ht*Dt)
        self.mlp = nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.head_weight = nn.Linear(d_in, Hs)
        self.gate = nn.Parameter(torch.zeros(()))  # logit; C2C starts it at 0 too

    def forward(self, x: Tensor) -> Tensor:
        B, Ht, T, Dt = x.shape
        x = x.transpose(1, 2).reshape(B, T, Ht * Dt)  # (B, T, Ht*Dt)
        w = torch.sigmoid(self.head_weight(x))[..., None]  # (B, T, Hs, 1)
        mlp = self.mlp(x).view(B, T, self.Hs, self.Ds)  # (B, T, Hs, Ds)
        y = self.proj(x).view(B, T, self.Hs, self.Ds) + torch.sigmoid(self.gate) * w * mlp  # (B, T, Hs, Ds)
        return y.transpose(1, 2)  # (B, Hs, T, Ds)


class KVProjector(nn.Module):
    """Teacher K, V (B, Ht, T, Dt) -> student-shaped K, V (B, Hs, T, Ds) for one layer."""

    def __init__(self, Ht: int, Hs: int, Dt: int, Ds: int, kind: str = "linear", hidden: int | None = None):
        """hidden: the elastic bottleneck's width (default Ds) or the c2c MLP's (default Hs*Ds); unused by linear."""
        super().__init__()
        if min(Ht, Hs, Dt, Ds) < 1:
            raise ValueError(f"head counts and head dims must be >= 1, got Ht={Ht}, Hs={Hs}, Dt={Dt}, Ds={Ds}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.Ht, self.Hs, self.Dt, self.Ds, self.kind = Ht, Hs, Dt, Ds, kind
        if kind == "c2c":
            # the linear kind's head-dim starts for K then V, drawn as it draws them: one seed, one start
            dim_k, dim_v = (_HeadDimMap(Dt, Ds, False, Ds).linear.weight.detach() for _ in range(2))  # (Ds, Dt)
            self.fuse_k = _C2CFuser(Ht, Hs, Dt, Ds, hidden or Hs * Ds, dim_k)
            self.fuse_v = _C2CFuser(Ht, Hs, Dt, Ds, hidden or Hs * Ds, dim_v)
        else:
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
        if self.kind == "c2c":
            dtype = self.fuse_k.proj.weight.dtype
            return self.fuse_k(k.to(dtype)), self.fuse_v(v.to(dtype))  # (B, Hs, T, Ds) each
        dtype = self.mix_k.dtype
        k = torch.einsum("sh,bhtd->bstd", self.mix_k, k.to(dtype))  # (B, Hs, T, Dt)
        v = torch.einsum("sh,bhtd->bstd", self.mix_v, v.to(dtype))  # (B, Hs, T, Dt)
        return self.dim_k(k), self.dim_v(v)  # (B, Hs, T, Ds) each

    def extra_repr(self) -> str:
        return f"Ht={self.Ht}, Hs={self.Hs}, Dt={self.Dt}, Ds={self.Ds}, kind={self.kind!r}"
