"""Parity of ``kvlib.rope.unrotate_keys`` with Hugging Face's own rotary code, for every causal-LM family.

Each model type that ``AutoModelForCausalLM`` knows (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), and a few variants
that change how a family rotates (ALiBi, NoPE layers, partial rotation, scaled RoPE), is one case, its config
shrunk to a tiny shape. A case whose rotation ``rope_family`` refuses passes from the config alone: ``unrotate_keys``
raises ``ValueError`` for it, so it is never silently wrong. Any other case builds the tiny model and runs it on
4 tokens at positions 4092..4095 (the second example at 1000..1003) while the module-level rotary functions of its
modeling code (``apply_rotary_pos_emb`` and kin) are wrapped to record what they were given and what they returned,
and checks that ``kv_spec`` describes the cache it left. No type needs skipping: the ones that cannot be built tiny
and offline are all refused from their config.
In each layer, the keys before rotation are the recorded input whose output is the cached keys, or a contiguous
slice of them for families that rotate part of each head; ``unrotate_keys`` of the cached keys must give them back
to ``TOL``. A family kvlib calls never rotated must record no rotary call and have no rotary code at all.

TOL: the model rotates in float32 with cos/sin that ``unrotate_keys`` reproduces bit for bit: each rotated element
is two products and a sum (1.5 ulp of the pair's size), the inverse two products, a sum, a division and a rounding
(2.5 ulp), so the two agree to a few ulp, <= 8 * 2**-24 ~ 5e-7 of the keys' largest magnitude. TOL = 1e-5 leaves
20x headroom, while one ulp of a float32 angle near position 4095 (2**-12 rad) is 24x above it: angles computed
another way (float64, as kvlib did) or from another theta fail (``test_the_tolerance_catches_...`` below).
"""

import dataclasses
import inspect
import re
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from kvlib.hf import KVSpec, decoder_config, kv_spec
from kvlib.rope import rope_family, rope_frequencies, unrotate_keys

TOL = 1e-5
VOCAB = 128
SHAPE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 8192,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
}
POSITIONS = torch.stack([torch.arange(4092, 4096), torch.arange(1000, 1004)])  # (B, T) = (2, 4)

# Per-type fields without which the tiny config fails transformers' own validation.
OVERRIDES = {
    "dots3_note": {
        "text_config": {"num_key_value_heads": 4},
        "vision_config": {"adapter_out_dim": 64},
        "audio_config": {"adapter_out_dim": 64},
    },
    "dots3_note_text": {"num_key_value_heads": 4},
    "got_ocr2": {
        "vision_config": {"hidden_size": 32, "output_channels": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    },
    "moss_transcribe_diarize": {
        "audio_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    },
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "mamba2": {"num_heads": 8},
    "xlnet": {"d_head": 16},
    "zaya": {"num_experts_per_tok": 1},
    "zamba": {"layers_block_type": ["mamba", "hybrid"]},
    "zamba2": {"layers_block_type": ["mamba", "hybrid"]},
    "gemma4_assistant": {
        "text_config": {
            "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": 0,
            "enable_moe_block": False,
            "use_double_wide_mlp": False,
        }
    },
}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 1e4}
VARIANTS = {
    "falcon-alibi": ("falcon", {"alibi": True}),
    "falcon-multi-head": ("falcon", {"multi_query": False}),
    "falcon-new-decoder": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "smollm3-nope-layers": ("smollm3", {"num_hidden_layers": 4}),  # every 4th layer skips RoPE
    "cohere2-full-attention-layers": ("cohere2", {"num_hidden_layers": 4}),  # every 4th layer is global, NoPE
    "llama-ignores-partial-rotary-factor": (
        "llama",
        {"rope_parameters": DEFAULT_ROPE | {"partial_rotary_factor": 0.5}},
    ),
    "phi-partial-rotary-factor-0.25": ("phi", {"rope_parameters": DEFAULT_ROPE | {"partial_rotary_factor": 0.25}}),
    "glm4-partial-rotary-factor-1": ("glm4", {"rope_parameters": DEFAULT_ROPE | {"partial_rotary_factor": 1.0}}),
    "llama-linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}}),
    "llama-llama3": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024,
            }
        },
    ),
    "qwen2-yarn": (
        "qwen2",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 4.0,
                "original_max_position_embeddings": 2048,
            }
        },
    ),
    "llama-dynamic": ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}),
}
CASES = {t: (t, OVERRIDES.get(t, {})) for t in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)} | VARIANTS

ROTARY_FUNCTION = re.compile(r"_?apply_\w*(rotary|rope)\w*")
ROTARY_CODE = re.compile(r"rotary|\brope|rotate_", re.IGNORECASE)


def tiny_kwargs(cls) -> dict:
    """The fields of ``SHAPE`` that config class ``cls`` has, and its default token ids moved inside the vocabulary."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in SHAPE.items() if k in defaults or k in cls.attribute_map}
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token = defaults.get(name)
        if isinstance(token, int) and token >= VOCAB:
            kwargs[name] = 0
        if isinstance(token, list):
            kwargs[name] = [t if t < VOCAB else 0 for t in token]
    return kwargs


def tiny_config(model_type: str, **overrides):
    """``model_type``'s config shrunk by ``tiny_kwargs``, with its text sub-config (multimodal models) shrunk too,
    then ``overrides`` (a ``text_config`` override updates the shrunk text config); other sub-configs keep their
    defaults."""
    cls = CONFIG_MAPPING[model_type]
    kwargs = tiny_kwargs(cls)
    text = cls.sub_configs_defaults.get("text_config")
    if text is not None:
        text_cls = CONFIG_MAPPING[text.model_type] if text.model_type else text.config_class
        kwargs["text_config"] = tiny_kwargs(text_cls) | {"model_type": text_cls.model_type}
        kwargs["text_config"] |= overrides.pop("text_config", {})
    return cls(**(kwargs | overrides))


def record_rotary_calls(model, monkeypatch) -> tuple[list, list]:
    """Wrap the module-level rotary functions of ``model``'s modeling code; returns the list that will hold
    ``(tensor inputs, tensor outputs)`` per call, and the modeling modules."""
    modules = {sys.modules[type(m).__module__] for m in model.modules()}
    modules = [m for m in modules if m.__name__.startswith("transformers.models.")]
    calls = []
    for module in modules:
        for name, fn in list(vars(module).items()):
            if inspect.isfunction(fn) and ROTARY_FUNCTION.fullmatch(name):

                def recorded(*args, _fn=fn, **kwargs):
                    out = _fn(*args, **kwargs)
                    inputs = [x for x in (*args, *kwargs.values()) if torch.is_tensor(x)]
                    calls.append((inputs, list(out) if isinstance(out, (tuple, list)) else [out]))
                    return out

                monkeypatch.setattr(module, name, recorded)
    return calls, modules


def run_tiny(config, monkeypatch) -> tuple[list, list, list]:
    """The cached keys (L of (B, H, T, D)) of a tiny model built from ``config`` over random tokens at ``POSITIONS``,
    with the rotary calls it made and its modeling modules (``record_rotary_calls``)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    calls, modules = record_rotary_calls(model, monkeypatch)
    with torch.no_grad():
        out = model(input_ids=torch.randint(3, VOCAB, POSITIONS.shape), position_ids=POSITIONS, use_cache=True)
    return [layer.keys for layer in out.cache.layers], calls, modules


def keys_before_rotation(keys, calls):
    """The (B, H, T, D) keys before rotation: ``keys`` with the recorded output that equals ``keys[..., a:b]``
    (head-major, or time-major transposed) replaced by that call's input; ``None`` if no call produced them."""
    B, H, T, D = keys.shape
    for inputs, outputs in calls:
        for given, returned in zip(inputs, outputs):
            for x, y in ((given, returned), (given.transpose(1, 2), returned.transpose(1, 2))):
                if y.dim() != 4 or tuple(y.shape[:3]) != (B, H, T) or x.shape != y.shape or y.shape[3] > D:
                    continue
                R = y.shape[3]
                for a in range(D - R + 1):
                    if torch.equal(keys[..., a : a + R], y):
                        pre = keys.clone()
                        pre[..., a : a + R] = x
                        return pre
    return None


@pytest.mark.parametrize("case", CASES)
def test_unrotate_keys_is_exact_or_refused(case, monkeypatch):
    model_type, overrides = CASES[case]
    config = tiny_config(model_type, **overrides)
    try:
        rope_frequencies(config)
    except ValueError as refusal:  # refused from the config alone: unrotate_keys raises it first
        assert f"{decoder_config(config).model_type} " in str(refusal) and "kv.pre_rope: false" in str(refusal)
        return
    family = rope_family(config)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert size < 5e6, f"{case}: the tiny config still has {size} parameters; shrink it in OVERRIDES"
    cached, calls, modules = run_tiny(config, monkeypatch)
    spec = kv_spec(config)
    assert [tuple(k.shape) for k in cached] == [(2, spec.num_kv_heads, 4, spec.head_dim)] * spec.num_layers
    if family is None:
        assert not calls and not any(ROTARY_CODE.search(inspect.getsource(m)) for m in modules)
        assert all(unrotate_keys(k, POSITIONS, config) is k for k in cached)
        return
    for layer, keys in enumerate(cached):
        pre = keys_before_rotation(keys, calls)
        assert pre is not None, f"layer {layer}: no recorded rotary call produced the cached keys"
        assert not torch.equal(pre, keys)  # the cache really holds rotated keys
        error = (unrotate_keys(keys, POSITIONS, config) - pre).abs().max() / pre.abs().max()
        assert error <= TOL, f"layer {layer}: relative error {error:.2e}"


def float64_angle_unrotation(keys, positions, config):
    """kvlib's previous un-rotation (rotate-half, all dims): angles in float64, not as the model computes them."""
    D = keys.shape[-1]
    inv_freq = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
    k = keys.double()
    x1, x2 = k.chunk(2, dim=-1)
    return (k * angles.cos() - torch.cat((-x2, x1), dim=-1) * angles.sin()).to(keys.dtype)


def theta_off_by_one_millionth(keys, positions, config):
    """``unrotate_keys`` with ``rope_theta`` larger by a factor 1 + 1e-6."""
    theta = config.rope_parameters["rope_theta"] * (1 + 1e-6)
    return unrotate_keys(keys, positions, tiny_config("llama", rope_parameters=DEFAULT_ROPE | {"rope_theta": theta}))


@pytest.mark.parametrize("wrong", [float64_angle_unrotation, theta_off_by_one_millionth])
def test_the_tolerance_catches_angles_that_differ_from_the_models(wrong, monkeypatch):
    config = tiny_config("llama")
    cached, calls, _ = run_tiny(config, monkeypatch)
    keys = cached[0]
    pre = keys_before_rotation(keys, calls)
    exact = (unrotate_keys(keys, POSITIONS, config) - pre).abs().max() / pre.abs().max()
    error = (wrong(keys, POSITIONS, config) - pre).abs().max() / pre.abs().max()
    assert exact <= TOL < error


@pytest.mark.parametrize(
    ("overrides", "num_kv_heads"),
    [
        ({}, 1),  # multi_query (the default): one KV head
        ({"multi_query": False}, 4),  # one KV head per query head
        ({"new_decoder_architecture": True, "num_kv_heads": 2}, 4),  # 2 KV heads, cached broadcast to 4
    ],
)
def test_kv_spec_reads_the_kv_heads_falcon_caches(overrides, num_kv_heads):
    assert kv_spec(tiny_config("falcon", **overrides)) == KVSpec(2, num_kv_heads, 16)


@pytest.mark.parametrize("model_type", ["mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm"])
def test_kv_spec_refuses_models_without_an_attention_kv_cache(model_type):
    with pytest.raises(ValueError, match=f"kvlib distils attention KV caches; {model_type} has none"):
        kv_spec(tiny_config(model_type, **OVERRIDES.get(model_type, {})))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("gptj", "gptj rotates interleaved pairs of its first rotary_dim dims from a sin/cos table"),
        ("nanochat", "nanochat rotates by the negative angle"),
        ("deepseek_v3", "kvlib has not verified how deepseek_v3 rotates its keys"),
        ("bert", "kvlib has not verified how bert rotates its keys"),
        ("falcon-alibi", "falcon with alibi=True never rotates its keys"),
        ("smollm3-nope-layers", r"smollm3 skips RoPE on layers \[3\] \(no_rope_layers\)"),
        ("cohere2-full-attention-layers", r"cohere2 skips RoPE on its full-attention layers \[3\]"),
        ("llama-dynamic", "llama rope_type 'dynamic' changes its frequencies"),
    ],
)
def test_unrotate_keys_refuses_what_it_cannot_undo_and_names_the_fix(case, message):
    model_type, overrides = CASES[case]
    config = tiny_config(model_type, **overrides)
    with pytest.raises(ValueError, match=message + r".*set kv\.pre_rope: false"):
        unrotate_keys(torch.randn(1, 2, 4, 16), torch.arange(4), config)
