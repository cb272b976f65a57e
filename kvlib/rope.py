"""Undo rotary position embeddings on cached keys, exactly or not at all.

Hugging Face caches store keys *after* RoPE (Su et al. 2021, https://arxiv.org/abs/2104.09864).
Comparing rotated keys of two models with different RoPE bases, scalings or head sizes compares
positions, not content, so kvlib matches keys before RoPE.

RoPE rotates pairs of the first ``R`` dims of each head by ``angle = position * inv_freq[i]`` and
multiplies by ``attention_scaling``. The inverse repeats the model's own arithmetic for cos/sin
(transformers 5.24): ``inv_freq`` in float32 from the family's own formula (``rope_theta``, and
``partial_rotary_factor`` only where the family's default RoPE reads it) or from transformers' own
initialiser for the scaled types ``linear``, ``llama3`` and ``yarn``, computed on the default device
as transformers' ``_init_weights`` computes it; angles ``position.float() * inv_freq`` in float32 on
the keys' device; ``cos``, ``sin`` times ``attention_scaling``, cast to the keys' dtype (olmo,
olmo2, ernie4_5 and ernie4_5_moe keep them in float32: in bfloat16 that is one rounding of cos/sin,
no larger than the model's own rounding of the rotated keys; float32 keys are unaffected). It then
applies the exact inverse of the 2x2 map ``[[c, -s], [s, c]]`` (divided by ``c² + s²``) in float32
(float64 for float64 keys), a few float32 ulp from the keys the model rotated. Float64 angles, as
kvlib used before, differ from the model's float32 ones by up to half an ulp of the angle (1.2e-4
rad at position 4095): 3-5e-5 of the keys' magnitude in a tiny Llama, several times that float32
bound. Types whose frequencies change with the sequence length (``dynamic``, ``longrope``) are
refused.

Which dims pair up, and which families rotate at all, is read from each family's
``modeling_<type>.py``, not guessed: a model type missing from the tables below is refused, never
un-rotated by analogy. Each entry is checked against the model itself (keys captured before rotation
inside it, positions up to 4095) by ``tests/test_rope_families.py``. A multimodal model is judged by
its text decoder (``kvlib.hf.decoder_config``: fuyu by persimmon, got_ocr2 by qwen2).

=================  ====================================================================================
pairs              families (``model_type``)
=================  ====================================================================================
half, all dims     llama, mistral, mixtral, ministral, qwen2, qwen2_moe, qwen3, qwen3_moe, gemma, gemma2,
                   granite, granitemoe, starcoder2, olmo, olmo2, olmoe, seed_oss, falcon, smollm3
half, partial      phi, phi3, stablelm, gpt_neox, persimmon, nemotron
interleaved, all   cohere, cohere2, helium, ernie4_5, ernie4_5_moe
interleaved, part  glm, glm4
never rotated      gpt2, gpt_bigcode, opt, bloom, mpt, xglm, biogpt, ctrl (absolute / ALiBi positions)
=================  ====================================================================================

``half`` pairs ``(x[i], x[i + R/2])`` (``rotate_half``); ``interleaved`` pairs ``(x[2i], x[2i + 1])``.
``partial`` families rotate ``R = int(head_dim * partial_rotary_factor)`` dims, the others all of
``head_dim`` whatever ``partial_rotary_factor`` says (their default RoPE ignores it).

Refused although listed, because one un-rotation cannot serve every layer (``unrotate_keys`` has
no layer index) or the keys were never rotated: falcon with ``alibi``, smollm3 with NoPE layers
(a 0 in ``no_rope_layers``), cohere2 with full-attention layers (which skip RoPE). Refused with a
named reason: gptj and codegen (interleaved pairs of the first ``rotary_dim`` dims from a sin/cos
table, no ``rope_parameters``), nanochat (rotates by the negative angle). The fix for a refused
model is always the same: match post-RoPE keys (``kv.pre_rope: false``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kvlib.hf import decoder_config

STATIC_SCALED_TYPES = ("linear", "llama3", "yarn")
FIX = "match post-RoPE keys instead (set kv.pre_rope: false)"


class Family(NamedTuple):
    """How one model family rotates its keys: ``pairs`` is "half" or "interleaved"; ``partial`` whether its
    default RoPE rotates only ``partial_rotary_factor`` of each head."""

    pairs: str
    partial: bool


HALF, HALF_PARTIAL = Family("half", False), Family("half", True)
INTERLEAVED, INTERLEAVED_PARTIAL = Family("interleaved", False), Family("interleaved", True)
FAMILIES = {
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "ministral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2"),
        HALF,
    ),
    **dict.fromkeys(
        ("granite", "granitemoe", "starcoder2", "olmo", "olmo2", "olmoe", "seed_oss", "falcon", "smollm3"), HALF
    ),
    **dict.fromkeys(("phi", "phi3", "stablelm", "gpt_neox", "persimmon", "nemotron"), HALF_PARTIAL),
    **dict.fromkeys(("cohere", "cohere2", "helium", "ernie4_5", "ernie4_5_moe"), INTERLEAVED),
    **dict.fromkeys(("glm", "glm4"), INTERLEAVED_PARTIAL),
}
NO_ROPE = frozenset(("gpt2", "gpt_bigcode", "opt", "bloom", "mpt", "xglm", "biogpt", "ctrl"))
REFUSED = {
    "gptj": "rotates interleaved pairs of its first rotary_dim dims from a sin/cos table and has no rope_parameters",
    "codegen": "rotates interleaved pairs of its first rotary_dim dims from a sin/cos table and has no rope_parameters",
    "nanochat": "rotates by the negative angle (its rotate_half is (x2, -x1))",
}


def rope_family(config) -> Family | None:
    """How ``config``'s model rotates its cached keys, or ``None`` if it never does; ``ValueError`` where kvlib
    cannot undo it exactly (see the module docstring for the table)."""
    config = decoder_config(config)
    model_type = config.model_type
    if model_type in NO_ROPE:
        return None
    if model_type in REFUSED:
        raise ValueError(f"{model_type} {REFUSED[model_type]}; unrotate_keys cannot undo it; {FIX}")
    if model_type not in FAMILIES:
        raise ValueError(
            f"kvlib has not verified how {model_type} rotates its keys (verified: {sorted(FAMILIES)}; never rotated: "
            f"{sorted(NO_ROPE)}); {FIX}"
        )
    if model_type == "falcon" and config.alibi:
        raise ValueError(f"falcon with alibi=True never rotates its keys (ALiBi biases instead); {FIX}")
    if model_type == "smollm3" and not all(config.no_rope_layers):
        nope = [i for i, rope in enumerate(config.no_rope_layers) if not rope]
        raise ValueError(
            f"smollm3 skips RoPE on layers {nope} (no_rope_layers) and rotates the others; unrotate_keys "
            f"un-rotates every layer alike; {FIX}"
        )
    if model_type == "cohere2" and "full_attention" in config.layer_types:
        full = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
        raise ValueError(
            f"cohere2 skips RoPE on its full-attention layers {full} and rotates the sliding ones; unrotate_keys "
            f"un-rotates every layer alike; {FIX}"
        )
    return FAMILIES[model_type]


def rope_frequencies(config) -> tuple[Tensor, float] | None:
    """``(inv_freq (R/2,) float32, attention_scaling)`` exactly as the model's rotary embedding holds them, or
    ``None`` if the model never rotates its keys."""
    family = rope_family(config)
    return None if family is None else family_frequencies(decoder_config(config), family)


def family_frequencies(config, family: Family) -> tuple[Tensor, float]:
    """``rope_frequencies`` of a text config whose ``family`` is known."""
    params = config.rope_parameters
    if "rope_type" not in params:
        raise ValueError(
            f"{config.model_type} rope_parameters {sorted(params)} are per layer type; unrotate_keys needs one flat "
            f"rope_parameters dict; {FIX}"
        )
    rope_type = params["rope_type"]
    if rope_type == "default":
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if family.partial:
            dim = int(dim * params.get("partial_rotary_factor", 1.0))
        return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    if rope_type in STATIC_SCALED_TYPES:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        return inv_freq, float(scaling)
    raise ValueError(
        f"{config.model_type} rope_type {rope_type!r} changes its frequencies with the sequence length and cannot be "
        f"undone exactly; supported: 'default', {', '.join(map(repr, STATIC_SCALED_TYPES))}; {FIX}"
    )


def unrotate_keys(keys: Tensor, position_ids: Tensor, config) -> Tensor:
    """Pre-RoPE keys from cached (rotated) keys.

    keys: (B, H, T, D) as stored in the model's cache.
    position_ids: (B, T) or (T,) positions the model used when it rotated them.
    Returns (B, H, T, D) in the keys' dtype; the keys themselves for models that never rotate them (GPT-2).
    Raises ``ValueError`` for a model whose rotation kvlib cannot undo exactly (``rope_family``).
    """
    family = rope_family(config)
    if family is None:
        return keys
    inv_freq, scaling = family_frequencies(decoder_config(config), family)
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
    angles = position_ids.to(keys.device)[..., None].float() * inv_freq.to(keys.device)  # (B, T, R/2) float32, as HF
    work = torch.promote_types(keys.dtype, torch.float32)
    cos = (angles.cos() * scaling).to(keys.dtype).to(work)[:, None]  # (B, 1, T, R/2)
    sin = (angles.sin() * scaling).to(keys.dtype).to(work)[:, None]
    k_rot, k_pass = keys[..., :R].to(work), keys[..., R:]
    if family.pairs == "half":
        x1, x2 = k_rot.chunk(2, dim=-1)  # (B, H, T, R/2) each
    else:
        x1, x2 = k_rot[..., 0::2], k_rot[..., 1::2]  # (B, H, T, R/2) each
    norm = cos * cos + sin * sin
    y1, y2 = (x1 * cos + x2 * sin) / norm, (x2 * cos - x1 * sin) / norm
    if family.pairs == "half":
        k_rot = torch.cat((y1, y2), dim=-1)  # (B, H, T, R)
    else:
        k_rot = torch.stack((y1, y2), dim=-1).flatten(-2)  # (B, H, T, R)
    return torch.cat((k_rot.to(keys.dtype), k_pass), dim=-1)
