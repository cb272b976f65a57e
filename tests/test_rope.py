import pytest
import torch
from tiny import tiny
from transformers import AutoModelForCausalLM, LlamaConfig, StableLmConfig

from kvlib.hf import extract_kv
from kvlib.rope import rope_frequencies, unrotate_keys


def pre_rope_keys(model, ids, attn_of):
    """Keys as k_proj computes them (before RoPE), per layer: (B, H, T, D), caught by forward hooks."""
    caught, handles = [], []
    for layer in model.model.layers:
        handles.append(attn_of(layer).k_proj.register_forward_hook(lambda mod, inp, out: caught.append(out)))
    with torch.no_grad():
        kv = extract_kv(model, ids)
    for h in handles:
        h.remove()
    B, T = ids.shape
    H, D = kv[0][0].shape[1], kv[0][0].shape[3]
    return kv, [k.view(B, T, H, D).transpose(1, 2) for k in caught]  # (B, H, T, D)


ROPE_CASES = {
    "llama-theta-1e4": ("llama-gqa", {"rope_theta": 1e4}),
    "llama-theta-5e5": ("llama-mqa", {"rope_theta": 5e5}),
    "qwen2-theta-1e6": ("qwen2", {"rope_theta": 1e6}),
    "gemma-head-dim-16": ("gemma", {"rope_theta": 1e4}),
}


@pytest.mark.parametrize("case", ROPE_CASES)
def test_unrotate_recovers_pre_rope_keys(case):
    name, overrides = ROPE_CASES[case]
    model = tiny(name, num_layers=2, **overrides).eval()
    ids = torch.randint(0, 61, (2, 11))
    kv, pre = pre_rope_keys(model, ids, lambda layer: layer.self_attn)
    for (k, _), k_pre in zip(kv, pre):
        assert not torch.allclose(k, k_pre, atol=1e-3)  # the cache really holds rotated keys
        torch.testing.assert_close(unrotate_keys(k, torch.arange(11), model.config), k_pre, atol=1e-5, rtol=1e-5)


def test_unrotate_handles_linear_scaling_and_per_example_positions():
    model = tiny("qwen2").eval()
    model.config.rope_parameters = {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}
    model = AutoModelForCausalLM.from_config(model.config).eval()
    ids = torch.randint(0, 61, (2, 7))
    kv, pre = pre_rope_keys(model, ids, lambda layer: layer.self_attn)
    positions = torch.arange(7).expand(2, 7)
    torch.testing.assert_close(unrotate_keys(kv[1][0], positions, model.config), pre[1], atol=1e-5, rtol=1e-5)
    default = dict(model.config.rope_parameters, rope_type="default")
    model.config.rope_parameters = default
    assert not torch.allclose(unrotate_keys(kv[1][0], positions, model.config), pre[1], atol=1e-3)


def test_unrotate_handles_partial_rotary_factor():
    config = StableLmConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 61, (1, 9))
    kv, pre = pre_rope_keys(model, ids, lambda layer: layer.self_attn)
    k = kv[0][0]
    assert torch.equal(k[..., 4:], pre[0][..., 4:])  # only the first half of each head is rotated
    torch.testing.assert_close(unrotate_keys(k, torch.arange(9), config), pre[0], atol=1e-5, rtol=1e-5)


def test_unrotate_leaves_keys_of_models_without_rope():
    model = tiny("gpt2")
    keys = torch.randn(1, 4, 5, 8)
    assert rope_frequencies(model.config) is None
    assert unrotate_keys(keys, torch.arange(5), model.config) is keys


def test_unrotate_keeps_dtype():
    config = tiny("llama-gqa").config
    keys = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    assert unrotate_keys(keys, torch.arange(5), config).dtype == torch.bfloat16


def test_unrotate_rejects_dynamic_rope():
    config = LlamaConfig(
        hidden_size=32,
        num_attention_heads=4,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0},
    )
    with pytest.raises(ValueError, match="rope_type 'dynamic' changes its frequencies"):
        unrotate_keys(torch.randn(1, 4, 3, 8), torch.arange(3), config)


def test_unrotate_rejects_per_layer_type_rope_parameters():
    config = LlamaConfig(hidden_size=32, num_attention_heads=4)
    config.rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": 1e4}}
    with pytest.raises(ValueError, match="are per layer type"):
        unrotate_keys(torch.randn(1, 4, 3, 8), torch.arange(3), config)


def test_unrotate_rejects_keys_that_are_not_4d():
    with pytest.raises(ValueError, match=r"keys must be \(B, H, T, D\)"):
        unrotate_keys(torch.randn(4, 3, 8), torch.arange(3), tiny("llama-gqa").config)


def test_unrotate_rejects_positions_of_other_length():
    with pytest.raises(ValueError, match=r"position_ids has shape \(1, 4\) but keys have B=1, T=3"):
        unrotate_keys(torch.randn(1, 2, 3, 8), torch.arange(4)[None], tiny("llama-gqa").config)


def test_unrotate_rejects_keys_of_another_model():
    config = tiny("gemma").config  # rotates 16 dims
    with pytest.raises(ValueError, match="config rotates 16 dims but keys have head dim 8"):
        unrotate_keys(torch.randn(1, 1, 3, 8), torch.arange(3), config)
