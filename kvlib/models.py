"""Tiny causal LMs of real Hugging Face families, built from a shape, and local checkpoints.

``model_config`` turns a family name and a shape into that family's own config class, so that every
model kvlib trains or tests is a real ``transformers`` model (its attention, RoPE, cache and masks).
Nothing is downloaded: models come from configs or from local directories.

``load_model`` refuses what would otherwise become a silently random or wrong model:

- a config that is not a decoder-only causal LM, by name before any weight is read: a ``model_type`` with no
  causal-LM class in transformers (t5, vit), an encoder-decoder (bart), or a checkpoint whose recorded
  ``architectures`` are no causal-LM class (a ``BertForMaskedLM``, a bare ``LlamaModel`` without its head);
  and, once built, a model whose attention is not causal (a BERT config with ``is_decoder`` False);
- weights that do not match the config, from transformers' loading report: missing tensors (they would be
  initialised at random), unexpected tensors (another architecture) and tensors whose shape differs from the
  config (e.g. an embedding of another ``vocab_size``). Tied weights (``lm_head`` tied to the embedding) are
  legitimately absent from the file and load clean.

``check_vocabulary`` refuses a tokenizer with more tokens than the model's embedding has rows (its ids would
index past the embedding), wherever a model and its tokenizer are paired.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

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


def _check_causal_lm_config(config, path: Path) -> None:
    """Refuse a config that is not a decoder-only causal LM, before any weight is read."""
    name = f"{path} holds a {config.model_type!r} config"
    fix = "kvlib distils decoder-only causal LMs (llama, qwen2, mistral, gemma, gpt2, ...): point path at one"
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{name}, which has no causal-LM class in transformers; {fix}")
    if config.is_encoder_decoder:
        raise ValueError(f"{name} of an encoder-decoder model, not a decoder-only causal LM; {fix}")
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if config.architectures and not causal & set(config.architectures):
        raise ValueError(
            f"{name} saved as {config.architectures}, which is no causal-LM class (no language-model head "
            f"predicting the next token); {fix}, e.g. one saved as {MODEL_FOR_CAUSAL_LM_MAPPING_NAMES['llama']}"
        )


def _check_loading_report(info: dict, path: Path, cls: str) -> None:
    """Refuse weights that do not match the config: missing, unexpected or of another shape."""
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    mismatched = sorted(info["mismatched_keys"])
    if missing:
        raise ValueError(
            f"{path} lacks tensors of its {cls} ({len(missing)}, e.g. {missing[:4]}); they would be initialised "
            "at random. The checkpoint is incomplete (an interrupted copy or save): copy or save it again"
        )
    if unexpected:
        raise ValueError(
            f"{path} holds tensors that its {cls} does not have ({len(unexpected)}, e.g. {unexpected[:4]}): the "
            "weights belong to another architecture than config.json describes; use the config.json saved with them"
        )
    if mismatched:
        shapes = [
            f"{key} is {tuple(ckpt)} in the weights but {tuple(cfg)} by config.json" for key, ckpt, cfg in mismatched
        ]
        raise ValueError(
            f"{path} holds tensors of another shape than config.json gives ({'; '.join(shapes[:4])}); "
            "config.json does not describe these weights (e.g. another vocab_size): use the config.json saved "
            "with them"
        )


def load_model(path: str | Path, dtype: torch.dtype | None = None):
    """A causal LM from a local checkpoint directory (never the network), in ``dtype`` (default: float32).

    Refuses a path that does not exist, a config that is not a decoder-only causal LM, and weights that do not
    match the config (missing, unexpected or of another shape); see the module docstring.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint path {path} does not exist; point path at a local Hugging Face checkpoint folder")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a local Hugging Face checkpoint (no config.json there)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    _check_causal_lm_config(config, path)
    model, info = AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        local_files_only=True,
        dtype=dtype or torch.float32,
        output_loading_info=True,
        ignore_mismatched_sizes=True,  # reported in info["mismatched_keys"], refused below
    )
    bidirectional = sorted({type(m).__name__ for m in model.modules() if getattr(m, "is_causal", True) is False})
    if bidirectional:
        raise ValueError(
            f"{path} holds a {config.model_type!r} model whose attention ({bidirectional}) is not causal (an "
            "encoder such as BERT with is_decoder=False), so it is no causal LM; kvlib distils decoder-only causal "
            "LMs: point path at one"
        )
    _check_loading_report(info, path, type(model).__name__)
    return model


def check_vocabulary(model, tokenizer) -> None:
    """Refuse a ``tokenizer`` with more tokens than ``model``'s input embedding has rows.

    A tokenizer may have fewer tokens than the embedding (real checkpoints pad it, e.g. Qwen2.5: 151665 tokens,
    151936 rows); one with more yields ids past the embedding, so it belongs to another model.
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has only {rows} rows: the "
            "tokenizer belongs to another model; use the checkpoint's own tokenizer (saved beside its config.json)"
        )
