"""The benchmarks' own parts: the per-token reference of the slot selection, the memory probe, the configuration,
and which models are measured: the study's own checkpoints named by path (tiny ones saved here), or why not.
(The whole suite on real shapes runs as the smoke pipeline's `benchmarks` stage, tests/test_pipeline_dvc.py.)"""

import sys

import pytest
import torch
from tiny import tiny
from transformers import BertConfig, GPTJConfig

from kvlib import project_root
from kvlib.benchmark import BenchConfig, growth_exponent, kava_select_loop, peak_bytes, run_benchmarks
from kvlib.config import from_dict, load_params
from kvlib.data import generate
from kvlib.teacher_kv import kava_select, run_teacher, segment_masks
from kvlib.text import save_tokenizer, train_tokenizer

FAST = {"examples": 6, "batch_size": 2, "repeats": 1, "budget": 4, "select_traces": 2, "select_tokens": 48}
FAST |= {"select_window": 8, "device": "cpu", "growth_lengths": [12, 24, 48], "growth_dense_max": 24}
SHAPE_BUILT = {  # a study model built from a shape, as params/smoke.yaml's teacher A
    "shape": {"family": "qwen2", "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "hidden_size": 64},
    "tokenizer": {"kind": "bpe", "vocab_size": 300},
    "train": {"steps": 4},
}


def checkpoint(path, name: str, num_layers: int, vocab: int) -> str:
    """A local checkpoint folder as the study names by path: a tiny model of layout ``name`` (tests/tiny.py) saved
    with save_pretrained, and its own BPE tokenizer of ``vocab`` tokens."""
    tok = train_tokenizer("bpe", [e.text for e in generate(40, seed=1, max_operand=9)], vocab)
    tiny(name, num_layers=num_layers, vocab_size=len(tok)).save_pretrained(path)
    save_tokenizer(tok, path)
    return str(path)


def config_only(path, config) -> str:
    """A checkpoint folder without weights: ``config`` (config.json) and a tokenizer, all the benchmark reads."""
    config.save_pretrained(path)
    save_tokenizer(train_tokenizer("char", [e.text for e in generate(4, seed=1, max_operand=9)]), path)
    return str(path)


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
        ({"teachers": {}}, "at least one teacher"),
        ({"examples": 2, "batch_size": 4}, r"examples \(2\) must be at least one batch \(4\)"),
        ({"examples": 8, "batch_size": 4, "select_traces": 9}, r"one problem per selection trace \(9\)"),
        ({"select_tokens": 32, "select_window": 32}, "must be shorter than select_tokens"),
        ({"device": "tpu"}, "device must be"),
        ({"kv": {"wieght": 0.1}}, "wieght"),
        ({"repeats": 0}, "repeats must be > 0"),
        ({"growth_lengths": [256]}, r"at least two increasing integers >= 6 .* got \[256\]"),
        ({"growth_lengths": [512, 256]}, "at least two increasing integers"),
        ({"growth_lengths": [4, 256]}, "at least two increasing integers"),
        ({"growth_dense_max": 0}, "growth_dense_max must be > 0"),
        ({"growth_layers": 0}, "growth_layers must be > 0"),
        ({"full_depth_batch_size": 80}, r"full_depth_batch_size \(80\) must be at most examples \(64\)"),
        ({"models": "mine"}, r"models must be one of \('real_shapes', 'study'\)"),
        ({"teachers": {"qwen2.5-1.5b": 0}}, r"layers measured \(an integer >= 1\); got \{'qwen2.5-1.5b': 0\}"),
        ({"study_models": {"A": {"path": "/m"}}}, "study_models are measured only with models: study"),
        ({"models": "study", "teachers": {"A": 2}, "student": "S"}, r"missing there: \['A', 'S'\]"),
        (
            {"models": "study", "teachers": {"A": 2}, "student": "S", "study_models": {"A": {}, "S": {"path": "/m"}}},
            "study_models.A: give a model either a shape and a tokenizer",
        ),
    ],
)
def test_bad_benchmark_settings_are_named(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        BenchConfig(**bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gives")
def test_asking_for_a_gpu_without_one_is_named(tmp_path):
    with pytest.raises(ValueError, match="device 'cuda' was asked for but torch sees no GPU"):
        run_benchmarks({"device": "cuda"}, tmp_path)


def test_models_study_measures_the_checkpoint_named_by_path_at_the_layers_asked(tmp_path):
    teacher = checkpoint(tmp_path / "qwen2", "qwen2", num_layers=3, vocab=300)  # 6 query / 2 KV heads of 8, width 48
    student = checkpoint(tmp_path / "llama", "llama-gqa", num_layers=2, vocab=280)  # 4 / 2 heads of 8, width 32
    refused = config_only(tmp_path / "bert", BertConfig(architectures=["BertForMaskedLM"]))
    study_models = {"A": {"path": teacher}, "B": {"path": refused}, "student": {"path": student}}
    params = {"models": "study", "teachers": {"A": 2, "B": 1}, "student": "student", "student_layers": 1}
    results = run_benchmarks(params | {"study_models": study_models} | FAST, tmp_path / "work")
    models = results["models"]
    assert {k: v for k, v in models["teachers"]["A"].items() if k != "parameters"} == {
        "source": teacher,
        "model_type": "qwen2",
        "num_hidden_layers": 2,
        "checkpoint_layers": 3,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "hidden_size": 48,
        "vocab_size": 300,
    }
    assert models["student"]["source"] == student and models["student"]["model_type"] == "llama"
    assert (models["student"]["num_hidden_layers"], models["student"]["checkpoint_layers"]) == (1, 2)
    assert models["student"]["num_key_value_heads"] == 2 and models["student"]["hidden_size"] == 32
    assert "random" in models["weights"] and "config.json" in models["weights"]
    assert models["teachers"]["B"] == {"source": refused, "reason": models["teachers"]["B"]["reason"]}
    assert (
        "BertForMaskedLM" in models["teachers"]["B"]["reason"]
        and "no causal-LM class" in models["teachers"]["B"]["reason"]
    )
    assert list(results["store_bytes"]) == ["A"]  # the refused teacher is not measured, the other one is
    assert results["store_bytes"]["A"]["spec"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8}
    assert results["selection"]["shape"]["keys"][1:3] == [2, 48]  # (B, H, T, D) of teacher A
    assert set(results["ratios"]) >= {"kv_store_vs_ce", "online_vs_store", "alignment_share", "selection_speedup"}


def test_without_a_measurable_student_nothing_is_measured_and_the_results_say_why(tmp_path):
    gptj = config_only(
        tmp_path / "gptj",
        GPTJConfig(n_layer=2, n_embd=32, n_head=4, rotary_dim=8, vocab_size=64, bos_token_id=0, eos_token_id=0),
    )
    study_models = {"A": {"path": gptj}, "student": SHAPE_BUILT}
    params = {"models": "study", "teachers": {"A": 1}, "student": "student", "study_models": study_models}
    results = run_benchmarks(params | FAST)
    assert "nothing measured" in results["skipped"] and "ratios" not in results
    assert results["models"]["student"]["reason"].startswith("student is built from a shape in the study")
    assert "models: real_shapes" in results["models"]["student"]["reason"]
    assert "gptj rotates interleaved pairs" in results["models"]["teachers"]["A"]["reason"]
    assert "kv.pre_rope: false" in results["models"]["teachers"]["A"]["reason"]  # the remedy, which works:
    teacher = run_benchmarks(params | FAST | {"kv": {"pre_rope": False}})["models"]["teachers"]["A"]
    assert "reason" not in teacher and (teacher["model_type"], teacher["num_hidden_layers"]) == ("gptj", 1)


def test_more_layers_than_the_checkpoint_has_are_refused(tmp_path):
    path = checkpoint(tmp_path / "llama", "llama-gqa", num_layers=2, vocab=280)
    study_models = {"A": {"path": path}, "student": {"path": path}}
    params = {"models": "study", "teachers": {"A": 3}, "student": "student", "student_layers": 1}
    with pytest.raises(ValueError, match=r"has 2 layers; teachers.A must be at most 2, got 3"):
        run_benchmarks(params | {"study_models": study_models} | FAST)


def test_a_study_model_path_without_a_checkpoint_is_named(tmp_path):
    study_models = {"A": {"path": str(tmp_path / "nothing")}, "student": SHAPE_BUILT}
    params = {"models": "study", "teachers": {"A": 1}, "student": "student", "study_models": study_models}
    with pytest.raises(ValueError, match="nothing holds no config.json; point the study model's path at a local"):
        run_benchmarks(params | FAST)


@pytest.mark.parametrize("path", sorted((project_root() / "params").glob("*.yaml")), ids=lambda p: p.name)
def test_every_params_file_benchmarks_its_own_checkpoints(path):
    """Wherever the study names a model by path, the benchmarks measure the study's models, the same paths."""
    params = load_params(path)
    config = from_dict(BenchConfig, params["benchmarks"]["config"])
    study = params["teacher"]["teachers"] | {"student": params["train"]["student"]}
    if not any("path" in model for model in study.values()):
        assert config.models == "real_shapes"
        return
    assert config.models == "study" and config.student == "student"
    assert list(config.teachers) == params["study"]["teachers"]
    assert {n: m.get("path") for n, m in config.study_models.items()} == {n: m.get("path") for n, m in study.items()}


def test_the_growth_exponent_recovers_a_known_slope():
    lengths = [256, 1024, 4096, 16384]
    assert growth_exponent(lengths, [3e-4 * T**1.0 for T in lengths]) == pytest.approx(1.0, abs=1e-9)
    assert growth_exponent(lengths, [2e-9 * T**2.0 for T in lengths]) == pytest.approx(2.0, abs=1e-9)
    noisy = [0.01 * T**1.5 * (1.02 if i % 2 else 0.98) for i, T in enumerate(lengths)]
    assert growth_exponent(lengths, noisy) == pytest.approx(1.5, abs=0.02)


def test_results_hold_growth_series_full_depth_and_store_reads(tmp_path):
    teacher = checkpoint(tmp_path / "qwen2", "qwen2", num_layers=3, vocab=300)
    student = checkpoint(tmp_path / "llama", "llama-gqa", num_layers=2, vocab=280)
    study_models = {"A": {"path": teacher}, "student": {"path": student}}
    params = {"models": "study", "teachers": {"A": 2}, "student": "student", "student_layers": 1, "full_depth": True}
    results = run_benchmarks(params | {"study_models": study_models} | FAST, tmp_path / "work")
    growth = results["growth"]
    assert growth["shapes"]["teachers"]["A"] == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8}
    assert growth["sparse"]["lengths"] == [12, 24, 48] and growth["dense"]["lengths"] == [12, 24]
    assert growth["dense"]["skipped"]["lengths"] == [48]
    assert "above growth_dense_max (24)" in growth["dense"]["skipped"]["reason"]
    assert "skipped" not in growth["sparse"]
    for path in ("sparse", "dense"):
        series = growth[path]
        assert len(series["seconds"]) == len(series["peak_bytes"]) == len(series["lengths"])
        assert all(t > 0 for t in series["seconds"]) and all(p >= 0 for p in series["peak_bytes"])
        assert series["exponent"] == pytest.approx(growth_exponent(series["lengths"], series["seconds"]))
    verdict = results["ratios"]["growth_exponent_sparse"]
    assert verdict["target"] == "<= 1.1" and verdict["met"] == (verdict["value"] <= 1.1)
    assert results["ratios"]["growth_exponent_dense"]["value"] == growth["dense"]["exponent"]
    full = results["full_depth"]
    assert (full["student_layers"], full["batch_size"]) == (2, 1)  # the checkpoint's 2 layers, not the 1 measured
    assert set(full) >= {"ce", "kv_store"} and "kv_online" not in full
    assert results["ratios"]["kv_store_vs_ce_full_depth"]["target"] == "<= 1.1"
    read = results["store_read"]["A"]
    assert read["file_bytes"] > 0 and read["delivered_bytes"] > 0
    assert all(read[k] > 0 for k in ("raw_file_mb_per_s", "store_fresh_mb_per_s", "store_cached_mb_per_s"))


def test_the_dense_reference_aligner_matches_the_sparse_one():
    from kvlib.benchmark import DenseAligner, _synthetic_batch
    from kvlib.distill import TeacherAligner
    from kvlib.hf import KVSpec
    from kvlib.layers import layer_map

    spec_t, spec_s = KVSpec(3, 2, 8), KVSpec(2, 2, 4)
    batch, *_ = _synthetic_batch(40, [spec_t], spec_s, 16, torch.Generator().manual_seed(0))
    for kind in ("global", "segment", "span"):
        torch.manual_seed(0)
        sparse = TeacherAligner(spec_t, spec_s, layer_map(3, 2, "uniform"), "linear", kind)
        dense = DenseAligner(spec_t, spec_s, layer_map(3, 2, "uniform"), "linear", kind)
        dense.load_state_dict(sparse.state_dict())
        (t1, _, c1), (t2, _, c2) = sparse(batch["teachers"][0], batch), dense(batch["teachers"][0], batch)
        assert torch.equal(c1, c2)
        for (k1, v1), (k2, v2) in zip(t1, t2):
            torch.testing.assert_close(k1, k2, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
