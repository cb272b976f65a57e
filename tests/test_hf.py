import pytest
import torch
from tiny import FAMILY_SHAPES, tiny
from transformers import AutoModelForCausalLM, JambaConfig, LlamaConfig, Qwen2Config

from kvlib.hf import KVSpec, extract_kv, forward_with_kv, kv_spec
from kvlib.models import build_model, model_config


@pytest.mark.parametrize("name", FAMILY_SHAPES)
def test_extract_kv_shapes_match_kv_spec(name):
    model = tiny(name, num_layers=3)
    ids = torch.randint(0, 61, (2, 9))
    kv = extract_kv(model, ids, torch.ones_like(ids))
    spec = kv_spec(model.config)
    _, _, kv_heads, head_dim, _ = FAMILY_SHAPES[name]
    assert spec == KVSpec(3, kv_heads, head_dim)
    assert len(kv) == 3
    for k, v in kv:
        assert k.shape == v.shape == (2, kv_heads, 9, head_dim)


def test_kv_spec_reads_kv_heads_not_attention_heads():
    spec = kv_spec(LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3))
    assert spec == KVSpec(num_layers=3, num_kv_heads=2, head_dim=8)


def test_kv_spec_uses_explicit_head_dim():
    config = model_config(
        "gemma", num_layers=1, num_heads=4, num_kv_heads=1, head_dim=16, hidden_size=32, vocab_size=10
    )
    assert kv_spec(config).head_dim == 16


def test_extract_kv_carries_gradients_to_k_and_v_projections():
    model = tiny("llama-gqa")
    model.train()
    kv = extract_kv(model, torch.randint(0, 61, (2, 5)))
    sum(k.square().sum() + v.square().sum() for k, v in kv).backward()
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.grad.abs().sum() > 0
    assert attn.v_proj.weight.grad.abs().sum() > 0


def test_extract_kv_values_do_not_depend_on_masked_padding():
    model = tiny("qwen2").eval()
    ids = torch.randint(0, 61, (1, 6))
    padded = torch.cat([ids, torch.randint(0, 61, (1, 3))], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1).long()
    with torch.no_grad():
        short = extract_kv(model, ids)
        long = extract_kv(model, padded, mask)
    for (ks, vs), (kl, vl) in zip(short, long):
        torch.testing.assert_close(kl[:, :, :6], ks, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vl[:, :, :6], vs, atol=1e-5, rtol=1e-5)


def test_extract_kv_rejects_1d_ids():
    with pytest.raises(ValueError, match=r"input_ids must be \(B, T\)"):
        extract_kv(tiny("llama-gqa"), torch.arange(5))


def test_extract_kv_rejects_mask_of_other_shape():
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 4\) but input_ids has \(1, 5\)"):
        extract_kv(tiny("llama-gqa"), torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 4))


def test_extract_kv_rejects_a_sliding_window_cache():
    config = model_config(
        "mistral", num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32, vocab_size=20
    )
    config.sliding_window = 4
    with pytest.raises(ValueError, match="sliding-window or compressed caches are not supported"):
        extract_kv(build_model(config, 0), torch.zeros(1, 9, dtype=torch.long))


def test_kv_spec_rejects_uneven_query_groups():
    with pytest.raises(ValueError, match="num_attention_heads=4 and num_key_value_heads=3"):
        kv_spec(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=3))


def test_kv_spec_rejects_indivisible_width_without_head_dim():
    with pytest.raises(ValueError, match="hidden_size=30 not divisible by num_attention_heads=4"):
        kv_spec(Qwen2Config(hidden_size=30, num_attention_heads=4, num_key_value_heads=2))


def test_forward_with_kv_returns_hidden_states_entering_each_layer():
    model = tiny("llama-gqa", num_layers=3).eval()
    ids = torch.randint(0, 61, (2, 5))
    out = forward_with_kv(model, ids, hidden=True)
    assert len(out.hidden) == 3 and out.hidden[0].shape == (2, 5, 32)
    torch.testing.assert_close(out.hidden[0], model.model.embed_tokens(ids))
    assert out.queries is None


def test_forward_with_kv_returns_queries_grouped_onto_kv_heads():
    model = tiny("qwen2").eval()  # 6 query heads over 2 KV heads
    ids = torch.randint(0, 61, (2, 5))
    out = forward_with_kv(model, ids, queries=True)
    raw = []
    handle = model.model.layers[1].self_attn.q_proj.register_forward_hook(lambda m, i, o: raw.append(o))
    model(ids)
    handle.remove()
    expected = raw[0].view(2, 5, 6, 8).transpose(1, 2).view(2, 2, 3, 5, 8).mean(2)  # (B, H, T, D)
    torch.testing.assert_close(out.queries[1], expected)


def test_queries_need_separate_query_projections():
    with pytest.raises(ValueError, match="found 0 self_attn.q_proj modules for 2 layers"):
        forward_with_kv(tiny("gpt2"), torch.zeros(1, 3, dtype=torch.long), queries=True)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_extract_kv_skips_the_output_layer_but_not_the_cache(name):
    model = tiny(name).eval()
    ids = torch.randint(0, 61, (2, 9))
    full = forward_with_kv(model, ids)
    lean = forward_with_kv(model, ids, logits=False)
    assert full.logits.shape == (2, 9, 61) and lean.logits.shape == (2, 1, 61)
    torch.testing.assert_close(lean.logits[:, 0], full.logits[:, -1])
    for (k, v), (k2, v2) in zip(full.kv, extract_kv(model, ids)):
        torch.testing.assert_close(k2, k)
        torch.testing.assert_close(v2, v)


def test_extract_kv_refuses_a_hybrid_cache_with_state_space_layers():
    config = JambaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        attn_layer_period=2,
        attn_layer_offset=1,
        expert_layer_period=100,
        expert_layer_offset=99,
        num_experts=1,
        mamba_d_state=4,
        mamba_d_conv=2,
        mamba_expand=1,
        mamba_dt_rank=4,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        ValueError, match=r"jamba's cache has 2 layers of types \[.*LinearAttentionLayer.*cannot read hybrid"
    ):
        extract_kv(model, torch.randint(0, 32, (1, 5)))
