"""The one module that reads Hugging Face configs and caches.

``kv_spec`` reads the shape of a model's KV cache from its config: the number of *KV* heads comes
from ``num_key_value_heads`` (GQA / MQA), never from ``num_attention_heads`` unless the model has no
separate KV head count (MHA, e.g. GPT-2); Falcon, which names it ``num_kv_heads`` and caches one head
(``multi_query``) or its keys broadcast to every query head (``new_decoder_architecture``), is read
by its own rule. The head size is the config's explicit ``head_dim`` when it has one (Gemma), else
``hidden_size // num_attention_heads``. A config without ``num_attention_heads`` (Mamba, RWKV: no
attention KV cache) is refused.

``extract_kv`` runs a forward pass and returns the cache as a list of ``(K, V)`` pairs, each
``(B, H, T, D)``. Keys come back *after* RoPE, exactly as the model stores them (see
:mod:`kvlib.rope` to undo it). In train mode gradients flow back into ``k_proj`` / ``v_proj``.
Pinned to transformers 5.24, whose outputs carry the cache as ``.cache`` with per-layer
``.keys`` / ``.values``: a transformers upgrade touches only this module.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


@dataclass(frozen=True)
class KVSpec:
    """Shape of one model's KV cache: ``num_layers`` pairs of ``(B, num_kv_heads, T, head_dim)``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def decoder_config(config):
    """The config of the part whose KV cache kvlib reads: ``config`` itself for a decoder-only LM, else its text
    decoder (``text_config`` of a multimodal model, ``decoder`` of one with a separate text encoder)."""
    return config.get_text_config(decoder=True)


def kv_spec(config) -> KVSpec:
    """The KV-cache shape of a Hugging Face causal-LM config (multimodal configs: their text decoder)."""
    config = decoder_config(config)
    num_heads = getattr(config, "num_attention_heads", None)
    if num_heads is None:
        raise ValueError(
            f"kvlib distils attention KV caches; {config.model_type} has none (its config has no "
            "num_attention_heads); pick a transformer teacher or student"
        )
    if config.model_type == "falcon":
        num_kv_heads = falcon_kv_heads(config)
    else:
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"config has num_attention_heads={num_heads} and num_key_value_heads={num_kv_heads}; "
            "the query heads must split evenly over the KV heads"
        )
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        if config.hidden_size % num_heads != 0:
            raise ValueError(
                f"config has hidden_size={config.hidden_size} not divisible by "
                f"num_attention_heads={num_heads} and no explicit head_dim; set head_dim in the config"
            )
        head_dim = config.hidden_size // num_heads
    return KVSpec(config.num_hidden_layers, num_kv_heads, head_dim)


def falcon_kv_heads(config) -> int:
    """KV heads in a Falcon cache: the new (40B) decoder broadcasts its ``num_kv_heads`` keys to every query head
    before caching them, multi-query keeps one, and the original multi-head layout ``num_kv_heads`` (= query heads)."""
    if config.new_decoder_architecture:
        return config.num_attention_heads
    return 1 if config.multi_query else config.num_kv_heads


class ForwardKV(NamedTuple):
    """What one forward pass gives the distiller: logits (B, T, V), the cache (L pairs of (B, H, T, D)),
    and on request the hidden states entering each layer (L of (B, T, hidden)) and the pre-RoPE
    queries averaged over each KV head's query group (L of (B, H, T, D))."""

    logits: Tensor
    kv: list[tuple[Tensor, Tensor]]
    hidden: list[Tensor] | None = None
    queries: list[Tensor] | None = None


def forward_with_kv(
    model,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    hidden: bool = False,
    queries: bool = False,
    logits: bool = True,
) -> ForwardKV:
    """Run ``model`` on ``input_ids`` (B, T) once: logits, cache, and optionally hidden states and queries.

    Without ``logits`` only the last position's logits are computed (``logits_to_keep=1``), which spares
    the output layer's vocabulary-sized product where only the cache is wanted.

    Keys are post-RoPE, as stored by the model. Positions past the attention mask hold whatever the
    model computed there: mask them downstream. Gradients flow when the model is trainable.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
            f"{tuple(input_ids.shape)}; pass the mask returned by the tokenizer with these ids"
        )
    spec = kv_spec(model.config)
    caught, handles = [], []
    if queries:
        q_projs = [m for name, m in model.named_modules() if name.endswith("self_attn.q_proj")]
        if len(q_projs) != spec.num_layers:
            raise ValueError(
                f"found {len(q_projs)} self_attn.q_proj modules for {spec.num_layers} layers; queries need a model "
                "with separate query projections (Llama, Qwen2, Mistral, Gemma families)"
            )
        handles = [q.register_forward_hook(lambda mod, inp, out: caught.append(out)) for q in q_projs]
    try:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=True,
            output_hidden_states=hidden,
            logits_to_keep=0 if logits else 1,
        )
    finally:
        for h in handles:
            h.remove()
    layers = out.cache.layers
    if len(layers) != spec.num_layers or not all(getattr(layer, "keys", None) is not None for layer in layers):
        raise ValueError(
            f"{model.config.model_type}'s cache has {len(layers)} layers of types "
            f"{sorted({type(layer).__name__ for layer in layers})}, not {spec.num_layers} attention layers holding "
            "keys and values; kvlib distils attention KV caches and cannot read hybrid (state-space / recurrent) ones"
        )
    kv = [(layer.keys, layer.values) for layer in layers]
    B, T = input_ids.shape
    expected = (B, spec.num_kv_heads, T, spec.head_dim)
    for i, (k, v) in enumerate(kv):
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(
                f"layer {i}: cache holds K {tuple(k.shape)} / V {tuple(v.shape)}, expected {expected}; "
                "sliding-window or compressed caches are not supported by extract_kv"
            )
    grouped = None
    if queries:
        H, D = spec.num_kv_heads, spec.head_dim
        grouped = [q.view(B, T, H, -1, D).mean(3).transpose(1, 2) for q in caught]  # (B, H, T, D)
    return ForwardKV(out.logits, kv, list(out.hidden_states[:-1]) if hidden else None, grouped)


def extract_kv(model, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
    """The cache of ``model`` over ``input_ids`` (B, T): L pairs of (B, H, T, D); see ``forward_with_kv``."""
    return forward_with_kv(model, input_ids, attention_mask, logits=False).kv


def extract_kv_and_attention(
    model, input_ids: Tensor, attention_mask: Tensor | None = None
) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
    """The cache (L pairs of (B, H, T, D)) and the attention weights (L of (B, Hq, T, T), rows = queries).

    Attention weights exist only under eager attention: the model is switched to it for this pass and
    back to its own implementation afterwards.
    """
    with eager_attention(model):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=True,
            output_attentions=True,
            logits_to_keep=1,
        )
    return [(layer.keys, layer.values) for layer in out.cache.layers], list(out.attentions)


@contextmanager
def eager_attention(model):
    """``model`` switched to eager attention, the only implementation that returns attention weights, and back
    to its own afterwards."""
    own = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(own)
