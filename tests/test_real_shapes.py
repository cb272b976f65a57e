"""The full alignment + loss path on models shaped like real teacher / student pairs (published configs,
random weights, fewer layers so that CPU memory suffices): Qwen2.5-1.5B -> Qwen2.5-0.5B (12/2 heads of
128 -> 14/2 of 64) and Qwen2-7B -> TinyLlama-1.1B (28/4 heads of 128 -> 32/4 of 64)."""

import pytest
import torch

from kvlib.batches import collate_fn
from kvlib.config import TrainConfig
from kvlib.data import SEGMENTS, generate
from kvlib.distill import Distiller, KVConfig, TeacherAligner
from kvlib.hf import kv_spec
from kvlib.layers import layer_map
from kvlib.models import REAL_SHAPES, build_model, load_model, real_config
from kvlib.teacher_kv import online_batch
from kvlib.text import encode_batch, train_tokenizer
from kvlib.train import train


@pytest.mark.parametrize(
    "teacher_name, student_name", [("qwen2.5-1.5b", "qwen2.5-0.5b"), ("qwen2-7b", "tinyllama-1.1b")]
)
def test_distillation_step_runs_on_real_shapes(teacher_name, student_name):
    examples = generate(4, seed=0, max_operand=9)
    spans = [{s: e.spans[s] for s in SEGMENTS} for e in examples]
    tok_t = train_tokenizer("char", [e.text for e in examples])
    tok_s = train_tokenizer("bpe", [e.text for e in examples], vocab_size=300)
    teacher = build_model(real_config(teacher_name, 1, len(tok_t)), seed=0).eval()
    student = build_model(real_config(student_name, 2, len(tok_s)), seed=0)
    spec_t, spec_s = kv_spec(teacher.config), kv_spec(student.config)
    assert spec_t.head_dim == 128 and spec_s.head_dim == 64 and spec_s.num_kv_heads in (2, 4)
    batch = encode_batch(tok_s, [e.text for e in examples], spans)
    batch["teachers"] = [online_batch(teacher, tok_t, examples)]  # pre-RoPE keys, as a store holds them
    aligner = TeacherAligner(spec_t, spec_s, layer_map(1, 2), "linear", "span")
    d = Distiller(student, [aligner], KVConfig(weight=0.1))
    terms = d(batch)
    assert torch.isfinite(terms["loss"]) and terms["kv"] > 0
    terms["loss"].backward()
    assert d.aligners[0].projectors[0].dim_k.linear.weight.grad.abs().sum() > 0
    assert student.model.layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", REAL_SHAPES)
def test_real_configs_have_the_published_attention_layout(name):
    full = real_config(name)
    spec = kv_spec(full)
    layers, heads, kv_heads, head_dim = REAL_SHAPES[name][3:7]
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (layers, kv_heads, head_dim)
    assert full.num_attention_heads == heads and full.vocab_size == REAL_SHAPES[name][8]
    assert kv_spec(real_config(name, 2, 300)).num_layers == 2
    with pytest.raises(ValueError, match="num_layers must lie in"):
        real_config(name, layers + 1)


def test_a_tied_embedding_student_is_saved_and_reloaded_whole(tmp_path):
    examples = generate(8, seed=0, max_operand=9)
    tok = train_tokenizer("char", [e.text for e in examples])
    student = build_model(real_config("qwen2.5-0.5b", 1, len(tok)), seed=0)  # ties its output to the embedding
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, share_every=0)
    train(Distiller(student), collate_fn(tok, examples), len(examples), cfg, tmp_path, progress=False)
    reloaded = load_model(tmp_path / "model")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    ids = torch.randint(0, len(tok), (2, 12))
    torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)
