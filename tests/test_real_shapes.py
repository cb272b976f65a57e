"""The full alignment + loss path on models shaped like real teacher / student pairs (published configs,
random weights, fewer layers so that CPU memory suffices): Qwen2.5-1.5B -> Qwen2.5-0.5B (12/2 heads of
128 -> 14/2 of 64) and Qwen2-7B -> TinyLlama-1.1B (28/4 heads of 128 -> 32/4 of 64)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from kvlib.config import KVConfig
from kvlib.data import SEGMENTS, generate
from kvlib.distill import Distiller, TeacherAligner
from kvlib.hf import extract_kv, kv_spec
from kvlib.layers import layer_map
from kvlib.rope import unrotate_keys
from kvlib.text import encode_batch, train_tokenizer

SHAPES = {  # published hidden / intermediate sizes, attention heads, KV heads, head dim and rope theta
    "qwen2.5-1.5b": (Qwen2Config, 1536, 8960, 12, 2, 128, 1e6),
    "qwen2-7b": (Qwen2Config, 3584, 18944, 28, 4, 128, 1e6),
    "qwen2.5-0.5b": (Qwen2Config, 896, 4864, 14, 2, 64, 1e6),
    "tinyllama-1.1b": (LlamaConfig, 2048, 5632, 32, 4, 64, 1e4),
}


def build(name, layers, vocab_size):
    cls, hidden, inter, heads, kv_heads, head_dim, theta = SHAPES[name]
    config = cls(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "teacher_name, student_name", [("qwen2.5-1.5b", "qwen2.5-0.5b"), ("qwen2-7b", "tinyllama-1.1b")]
)
def test_distillation_step_runs_on_real_shapes(teacher_name, student_name):
    examples = generate(4, seed=0, max_operand=9)
    spans = [{s: e.spans[s] for s in SEGMENTS} for e in examples]
    tok_t = train_tokenizer("char", [e.text for e in examples])
    tok_s = train_tokenizer("bpe", [e.text for e in examples], vocab_size=300)
    teacher, student = build(teacher_name, 1, len(tok_t)).eval(), build(student_name, 2, len(tok_s))
    spec_t, spec_s = kv_spec(teacher.config), kv_spec(student.config)
    assert spec_t.head_dim == 128 and spec_s.head_dim == 64 and spec_s.num_kv_heads in (2, 4)
    enc_t = encode_batch(tok_t, [e.text for e in examples], spans)
    with torch.no_grad():
        kv = extract_kv(teacher, enc_t["input_ids"], enc_t["attention_mask"])
    positions = torch.arange(enc_t["input_ids"].shape[1])
    kv = [(unrotate_keys(k, positions, teacher.config), v) for k, v in kv]
    mask = enc_t["attention_mask"].bool()[:, None].expand(-1, spec_t.num_kv_heads, -1)
    batch = encode_batch(tok_s, [e.text for e in examples], spans)
    batch["teachers"] = [
        {"kv": kv, "mask": mask, **{k: enc_t[k] for k in ("attention_mask", "offsets", "segment_bounds")}}
    ]
    aligner = TeacherAligner(spec_t, spec_s, layer_map(1, 2), "linear", "span")
    d = Distiller(student, [aligner], KVConfig(weight=0.1))
    terms = d(batch)
    assert torch.isfinite(terms["loss"]) and terms["kv"] > 0
    terms["loss"].backward()
    assert d.aligners[0].projectors[0].dim_k.linear.weight.grad.abs().sum() > 0
    assert student.model.layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0
