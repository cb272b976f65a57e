import pytest
import torch

from kvlib.hf import kv_spec
from kvlib.models import FAMILIES, build_model, load_model, model_config


@pytest.mark.parametrize("family", FAMILIES)
def test_model_config_builds_the_requested_shape(family):
    kv_heads = 4 if family == "gpt2" else 2
    config = model_config(
        family, num_layers=3, num_heads=4, num_kv_heads=kv_heads, head_dim=8, hidden_size=32, vocab_size=40
    )
    spec = kv_spec(config)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (3, kv_heads, 8)
    assert config.vocab_size == 40


def test_build_model_is_reproducible_from_its_seed():
    config = model_config("llama", num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, hidden_size=16, vocab_size=20)
    a, b, c = build_model(config, 3), build_model(config, 3), build_model(config, 4)
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_load_model_round_trips_a_local_checkpoint(tmp_path):
    config = model_config("qwen2", num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, hidden_size=16, vocab_size=20)
    model = build_model(config, 0)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    ids = torch.randint(0, 20, (1, 5))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_load_model_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="is not a local Hugging Face checkpoint"):
        load_model(tmp_path)


def test_model_config_rejects_unknown_family():
    with pytest.raises(ValueError, match="family must be one of"):
        model_config("bert", num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8, hidden_size=16, vocab_size=20)


def test_model_config_rejects_uneven_kv_groups():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        model_config("llama", num_layers=1, num_heads=6, num_kv_heads=4, head_dim=8, hidden_size=48, vocab_size=20)


def test_model_config_rejects_gqa_for_gpt2():
    with pytest.raises(ValueError, match="gpt2 has one KV head per query head"):
        model_config("gpt2", num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32, vocab_size=20)
