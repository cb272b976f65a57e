"""Tiny causal LMs of real Hugging Face families, built from a shape, and local checkpoints.

``model_config`` turns a family name and a shape into that family's own config class, so that every
model kvlib trains or tests is a real ``transformers`` model (its attention, RoPE, cache and masks).
Nothing is downloaded: models come from configs or from local directories.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GemmaConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

CONFIGS = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
    "gemma": GemmaConfig,
    "gpt2": GPT2Config,
}
FAMILIES = tuple(CONFIGS)

# Published configs of real teacher / student checkpoints (config.json on the Hugging Face Hub):
# family, hidden size, MLP width, layers, query heads, KV heads, head dim, rope theta, vocabulary, tied output.
REAL_SHAPES = {
    "qwen2.5-1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 128, 1e6, 151936, True),
    "qwen2-7b": ("qwen2", 3584, 18944, 28, 28, 4, 128, 1e6, 152064, False),
    "qwen2.5-0.5b": ("qwen2", 896, 4864, 24, 14, 2, 64, 1e6, 151936, True),
    "tinyllama-1.1b": ("llama", 2048, 5632, 22, 32, 4, 64, 1e4, 32000, False),
}


def model_config(
    family: str,
    *,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    hidden_size: int,
    vocab_size: int,
    max_positions: int = 512,
    rope_theta: float = 10000.0,
):
    """The ``family``'s config with this shape (MLP width 4x hidden, untied output for all but GPT-2/Gemma)."""
    if family not in CONFIGS:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    if family == "gpt2":
        if num_kv_heads != num_heads or head_dim * num_heads != hidden_size:
            raise ValueError(
                f"gpt2 has one KV head per query head and head_dim = hidden_size / num_heads; got "
                f"num_heads={num_heads}, num_kv_heads={num_kv_heads}, head_dim={head_dim}, hidden_size={hidden_size}"
            )
        return GPT2Config(
            vocab_size=vocab_size,
            n_positions=max_positions,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            bos_token_id=None,
            eos_token_id=None,
        )
    return CONFIGS[family](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def real_config(name: str, num_layers: int | None = None, vocab_size: int | None = None):
    """The config of the real checkpoint ``name`` (``REAL_SHAPES``), optionally with fewer layers (CPU memory)
    or another vocabulary size; built with ``build_model`` it is that model's architecture with random weights."""
    if name not in REAL_SHAPES:
        raise ValueError(f"no real shape {name!r}; known: {sorted(REAL_SHAPES)}")
    family, hidden, mlp, layers, heads, kv_heads, head_dim, theta, vocab, tied = REAL_SHAPES[name]
    if num_layers is not None and not 1 <= num_layers <= layers:
        raise ValueError(f"{name} has {layers} layers; num_layers must lie in [1, {layers}], got {num_layers}")
    return CONFIGS[family](
        vocab_size=vocab_size or vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=num_layers or layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_model(config, seed: int):
    """A randomly initialised causal LM from ``config``, reproducible from ``seed``."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def load_model(path: str | Path, dtype: torch.dtype | None = None):
    """A causal LM from a local checkpoint directory (never the network), in ``dtype`` (default: float32)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a local Hugging Face checkpoint (no config.json there)")
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32)
