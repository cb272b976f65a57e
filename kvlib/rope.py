"""Undo rotary position embeddings on cached keys.

Hugging Face caches store keys *after* RoPE (rotate-half convention, Su et al. 2021,
https://arxiv.org/abs/2104.09864). Comparing rotated keys of two models with different RoPE bases,
scalings or head sizes compares positions, not content, so kvlib matches keys before RoPE.

RoPE rotates each pair ``(x[i], x[i + R/2])`` of the first ``R = partial_rotary_factor * D`` dims by
the angle ``pos * inv_freq[i]`` and multiplies by ``attention_scaling`` (1 except for YaRN-style
types). The inverse is the rotation by ``-angle`` divided by that scale. The frequencies are the
model's own: its ``rope_parameters`` (``rope_theta``, ``rope_type``, ``factor``,
``partial_rotary_factor``), computed by transformers' own RoPE initialisers for scaled types.
RoPE types whose frequencies change with the sequence length (``dynamic``, ``longrope``) are
rejected rather than undone approximately.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kvlib.hf import kv_spec

STATIC_SCALED_TYPES = ("linear", "llama3", "yarn")


def rope_frequencies(config) -> tuple[Tensor, float] | None:
    """``(inv_freq (R/2,), attention_scaling)`` of a config's RoPE, or ``None`` if it has no RoPE."""
    config = config.get_text_config()
    params = getattr(config, "rope_parameters", None)
    if params is None:
        return None
    if "rope_type" not in params:
        raise ValueError(
            f"rope_parameters {sorted(params)} are per layer type; unrotate_keys needs one flat "
            "rope_parameters dict (un-rotate each layer type with its own config)"
        )
    rope_type = params["rope_type"]
    if rope_type == "default":
        dim = int(kv_spec(config).head_dim * params.get("partial_rotary_factor", 1.0))
        inv_freq = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        return inv_freq, 1.0
    if rope_type in STATIC_SCALED_TYPES:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        return inv_freq.to(torch.float64), float(scaling)
    raise ValueError(
        f"rope_type {rope_type!r} changes its frequencies with the sequence length and cannot be "
        f"undone exactly; supported: 'default', {', '.join(map(repr, STATIC_SCALED_TYPES))}"
    )


def rotate_half(x: Tensor) -> Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrotate_keys(keys: Tensor, position_ids: Tensor, config) -> Tensor:
    """Pre-RoPE keys from cached (rotated) keys.

    keys: (B, H, T, D) as stored in the model's cache.
    position_ids: (B, T) or (T,) positions the model used when it rotated them.
    Returns (B, H, T, D) in the keys' dtype; unchanged keys for models without RoPE (e.g. GPT-2).
    """
    freqs = rope_frequencies(config)
    if freqs is None:
        return keys
    inv_freq, scaling = freqs
    if keys.dim() != 4:
        raise ValueError(f"keys must be (B, H, T, D), got shape {tuple(keys.shape)}")
    B, H, T, D = keys.shape
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0).expand(B, T)
    if tuple(position_ids.shape) != (B, T):
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)} but keys have B={B}, T={T}; "
            "pass (B, T) or (T,) positions"
        )
    R = 2 * inv_freq.numel()
    if R > D:
        raise ValueError(f"config rotates {R} dims but keys have head dim {D}; pass the config of the model")
    angles = position_ids.to(torch.float64)[..., None] * inv_freq.to(keys.device)  # (B, T, R/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, R)
    cos, sin = angles.cos(), angles.sin()
    k_rot, k_pass = keys[..., :R].to(torch.float64), keys[..., R:]
    k_rot = (k_rot * cos - rotate_half(k_rot) * sin) / scaling  # (B, H, T, R)
    return torch.cat((k_rot.to(keys.dtype), k_pass), dim=-1)
