import torch

from kvlib.analysis import layer_features, paired_kv
from kvlib.config import ModelShape
from kvlib.data import generate
from kvlib.layers import cka_matrix
from kvlib.text import train_tokenizer


def test_paired_kv_puts_both_models_on_the_students_real_tokens():
    examples = generate(6, seed=0, max_operand=9)
    tok_t = train_tokenizer("char", [e.text for e in examples])
    tok_s = train_tokenizer("bpe", [e.text for e in examples], vocab_size=300)
    teacher = ModelShape("qwen2", 3, 4, 2, 16, 64).build(len(tok_t), 0)
    student = ModelShape("llama", 2, 4, 1, 8, 32).build(len(tok_s), 0)
    pairs = paired_kv(teacher, tok_t, student, tok_s, examples[:3])
    n = int(pairs["enc_s"]["attention_mask"].sum())
    assert [tuple(k.shape) for k, _ in pairs["teacher"]] == [(2, n, 16)] * 3
    assert [tuple(v.shape) for _, v in pairs["student"]] == [(1, n, 8)] * 2
    feats_t, feats_s = layer_features(pairs["teacher"], "keys"), layer_features(pairs["student"], "values")
    assert feats_t[0].shape == (n, 32) and feats_s[1].shape == (n, 8)
    cka = cka_matrix(feats_t, feats_s)
    assert cka.shape == (3, 2) and ((cka >= 0) & (cka <= 1 + 1e-9)).all()
    self_cka = cka_matrix(feats_s, feats_s)
    torch.testing.assert_close(self_cka.diagonal(), torch.ones(2, dtype=self_cka.dtype))


def test_paired_kv_needs_examples():
    import pytest

    with pytest.raises(ValueError, match="at least one example"):
        paired_kv(None, None, None, None, [])
