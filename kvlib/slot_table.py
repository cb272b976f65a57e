"""A frozen teacher's chain-of-thought slots for every training problem, computed once (the latent study's
targets from teachers of other families).

What a frozen teacher gives a latent student depends on the problem alone: ``kvlib.latent.cot_slots(...,
shared=True)`` of the teacher's own encoding of the text, M slots with one selection for every layer and KV
head. Reading it once per problem costs ``N`` teacher rows, where reading it in every training step costs
``steps x batch`` rows per seed (the embedded study: 8000 against 12800 per seed, with its seeds sharing one
table). ``SlotTable.build`` computes a table, or reads the one saved at its path when that was computed from
the same inputs, and the training step looks rows up by example index (``batch["index"]``).

A table is one safetensors file: ``k.{l}`` and ``v.{l}`` (N, H, M, D), keys before RoPE, in the dtype the
teacher ran in, and ``kept`` (N, M) bool (a chain shorter than M tokens fills only its first slots). Its
metadata records what it was computed from: ``teacher_sha256``, ``tokenizer_sha256``, ``examples_sha256``
(``kvlib.teacher_kv``'s hashes), ``budget`` and ``rule``; a file whose record differs, or that does not read
whole, is computed again and replaced atomically (``kvlib.files``). Memory: every training process holds the whole
table, N x L x 2 x H x M x D values (98 MB for the embedded study's teacher A over 8000 problems in float32;
a 28-layer teacher with 4 KV heads of 128 and M = 24 takes 1.4 MB per problem in bfloat16).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from kvlib.data import SEGMENTS, Example, split_sha256
from kvlib.files import atomic_write
from kvlib.latent import cot_slots
from kvlib.teacher_kv import tokenizer_sha256, weights_sha256
from kvlib.text import encode_batch


class SlotTable:
    """The slots of ``N`` problems (``tensors`` as the module docstring describes); ``table(index)`` gives the
    rows of a batch as ``cot_slots`` does: ``{"kv": L pairs of (B, H, M, D) float32, "kept": (L, B, H, M)}`` on
    ``index``'s device."""

    def __init__(self, tensors: dict[str, Tensor]):
        layers = sum(name.startswith("k.") for name in tensors)
        names = {"kept"} | {f"{x}.{layer}" for x in "kv" for layer in range(layers)}
        if layers == 0 or set(tensors) != names or tensors["kept"].dim() != 2:
            raise ValueError(f"a slot table holds kept (N, M) and k.l / v.l for l = 0..L-1, got {sorted(tensors)}")
        N, M = tensors["kept"].shape
        for name, x in tensors.items():
            if name != "kept" and (x.dim() != 4 or x.shape[::2] != (N, M) or x.shape[1] != tensors["k.0"].shape[1]):
                raise ValueError(f"slot table tensor {name} has shape {tuple(x.shape)}; all are (N={N}, H, M={M}, D)")
        self.tensors, self.num_layers = tensors, layers

    def __len__(self) -> int:
        return self.tensors["kept"].shape[0]

    def __call__(self, index: Tensor) -> dict:
        rows = index.cpu()
        if rows.numel() == 0 or rows.min() < 0 or rows.max() >= len(self):
            raise ValueError(f"slot table rows are 0..{len(self) - 1}, got {index.tolist()}")
        t, device = self.tensors, index.device
        kv = [tuple(t[f"{x}.{i}"][rows].to(device, torch.float32) for x in "kv") for i in range(self.num_layers)]
        H = kv[0][0].shape[1]
        kept = t["kept"][rows].to(device)[None, :, None].expand(self.num_layers, -1, H, -1)  # (L, B, H, M)
        return {"kv": kv, "kept": kept}

    @classmethod
    def compute(
        cls, teacher, tokenizer, examples: list[Example], budget: int, rule: str = "rkv", batch_size: int = 32
    ) -> SlotTable:
        """The slots of ``examples`` read by ``teacher`` (its own ``tokenizer``), ``batch_size`` at a time."""
        if not examples:
            raise ValueError("a slot table needs at least one example")
        parts = []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            spans = [{name: e.spans[name] for name in SEGMENTS} for e in chunk]
            enc = encode_batch(tokenizer, [e.text for e in chunk], spans)
            device = next(teacher.parameters()).device
            slots = cot_slots(teacher, {k: v.to(device) for k, v in enc.items()}, budget, rule, shared=True)
            parts.append(
                {f"{x}.{i}": pair[j].cpu() for i, pair in enumerate(slots["kv"]) for j, x in enumerate("kv")}
                | {"kept": slots["kept"][0, :, 0].cpu()}  # shared: one selection for every layer and head
            )
        return cls({name: torch.cat([p[name] for p in parts]) for name in parts[0]})

    @classmethod
    def build(
        cls, path, teacher, tokenizer, examples: list[Example], budget: int, rule: str = "rkv", batch_size: int = 32
    ) -> SlotTable:
        """The table saved at ``path`` when it was computed from these inputs, else ``compute``'s, saved there."""
        path = Path(path)
        record = {
            "teacher_sha256": weights_sha256(teacher),
            "tokenizer_sha256": tokenizer_sha256(tokenizer),
            "examples_sha256": split_sha256(examples),
            "budget": budget,
            "rule": rule,
        }
        saved = _saved(path, record)
        if saved is not None:
            return saved
        with torch.no_grad():
            table = cls.compute(teacher, tokenizer, examples, budget, rule, batch_size)
        meta = {"record": json.dumps(record, sort_keys=True)}
        atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in table.tensors.items()}, tmp, meta))
        return table


def _saved(path: Path, record: dict) -> SlotTable | None:
    """The table at ``path`` when it was computed from ``record``'s inputs and reads whole, else None."""
    try:
        with safe_open(str(path), "pt") as f:
            if json.loads((f.metadata() or {}).get("record", "null")) != record:
                return None
        return SlotTable(load_file(str(path)))
    except (FileNotFoundError, SafetensorError, json.JSONDecodeError, OSError, ValueError):
        return None
