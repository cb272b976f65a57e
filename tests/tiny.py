"""Tiny random models of every attention layout kvlib must read, built in-process from configs."""

from kvlib.models import build_model, model_config

# (family, num_heads, num_kv_heads, head_dim, hidden_size): every attention layout kvlib must read.
FAMILY_SHAPES = {
    "llama-mha": ("llama", 4, 4, 8, 32),
    "llama-gqa": ("llama", 4, 2, 8, 32),
    "llama-mqa": ("llama", 4, 1, 8, 32),
    "qwen2": ("qwen2", 6, 2, 8, 48),
    "mistral": ("mistral", 4, 2, 8, 32),
    "gemma": ("gemma", 4, 1, 16, 32),  # explicit head_dim != hidden_size / num_heads
    "gpt2": ("gpt2", 4, 4, 8, 32),  # absolute positions, no RoPE, no num_key_value_heads
}


def tiny(name: str, num_layers: int = 2, vocab_size: int = 61, seed: int = 0, **overrides):
    family, heads, kv_heads, head_dim, hidden = FAMILY_SHAPES[name]
    config = model_config(
        family,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        vocab_size=vocab_size,
        **overrides,
    )
    return build_model(config, seed)
