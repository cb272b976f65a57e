"""The benchmarks' own parts: the per-token reference of the slot selection, the memory probe and the configuration.
(The whole suite runs as the smoke pipeline's `benchmarks` stage, tests/test_pipeline_dvc.py.)"""

import sys

import pytest
import torch
from tiny import tiny

from kvlib.benchmark import BenchConfig, kava_select_loop, peak_bytes, run_benchmarks
from kvlib.data import generate
from kvlib.teacher_kv import kava_select, run_teacher, segment_masks
from kvlib.text import train_tokenizer


@pytest.mark.parametrize("budget", [5, 150])  # fewer slots than eligible keys, and more than some examples have
def test_the_per_token_reference_selects_what_the_vectorised_kava_selects(budget):
    examples = generate(5, seed=2, max_operand=9)
    tok = train_tokenizer("char", [e.text for e in examples])
    teacher = tiny("qwen2", num_layers=3, vocab_size=len(tok)).eval()  # 6 query heads over 2 KV heads
    enc, kv, attn = run_teacher(teacher, tok, examples, attention=True)
    observers, eligible = segment_masks(enc["segment_bounds"], enc["attention_mask"])
    assert (eligible.sum(1) > 5).all() and (eligible.sum(1) < 150).any() and observers.any(1).all()
    keys = [k for k, _ in kv]
    positions, kept = kava_select(attn, keys, observers, eligible, budget)
    ref_positions, ref_kept = kava_select_loop(attn, keys, observers, eligible, budget)
    assert torch.equal(kept, ref_kept)
    assert torch.equal(positions, ref_positions)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU probe reads Linux /proc")
def test_the_cpu_memory_probe_sees_a_temporary_tensor():
    size = 64 * 2**20
    seen = peak_bytes(lambda: torch.ones(size // 4).sum(), torch.device("cpu"))
    assert 0.9 * size < seen < 1.3 * size


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"student": "gpt-5"}, r"no real shapes \['gpt-5'\]"),
        ({"teachers": {}}, "at least one real shape"),
        ({"examples": 2, "batch_size": 4}, r"examples \(2\) must be at least one batch \(4\)"),
        ({"examples": 8, "batch_size": 4, "select_traces": 9}, r"one problem per selection trace \(9\)"),
        ({"select_tokens": 32, "select_window": 32}, "must be shorter than select_tokens"),
        ({"device": "tpu"}, "device must be"),
        ({"kv": {"wieght": 0.1}}, "wieght"),
        ({"repeats": 0}, "repeats must be > 0"),
    ],
)
def test_bad_benchmark_settings_are_named(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        BenchConfig(**bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_asking_for_a_gpu_without_one_is_named(tmp_path):
    with pytest.raises(ValueError, match="device 'cuda' was asked for but torch sees no GPU"):
        run_benchmarks({"device": "cuda"}, tmp_path)
