"""The pipeline's stages from Python on smoke sizes: data -> teacher -> teacher KV -> students."""

import json

import pytest

from kvlib.checkpoints import load_trained
from kvlib.config import ModelConfig
from kvlib.data import load_jsonl, load_splits, prepare_data, split_sha256
from kvlib.evaluate import evaluate_student
from kvlib.kvstore import KVStore
from kvlib.student import train_student
from kvlib.teacher import train_teacher
from kvlib.teacher_kv import extract_teacher_kv

SIZES = {"teacher_train": 24, "student_train": 12, "validation": 4, "test": 6}
TRAIN = {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "save_every": 10, "share_every": 0}
TEACHER = {
    "shape": {"family": "qwen2", "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "hidden_size": 64},
    "tokenizer": {"kind": "char", "vocab_size": None},
    "train": TRAIN,
    "max_new_tokens": 8,
}
STUDENT = {
    "shape": {"family": "llama", "num_layers": 2, "num_heads": 4, "num_kv_heads": 1, "head_dim": 8, "hidden_size": 32},
    "tokenizer": {"kind": "bpe", "vocab_size": 300},
    "train": TRAIN,
    "max_new_tokens": 8,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    splits = prepare_data(SIZES, seed=0, max_operand=9, out_dir=root / "data")
    teacher = train_teacher(TEACHER, root / "data", root / "teacher", progress=False)
    store = extract_teacher_kv(root / "teacher", root / "data", root / "kv", progress=False)
    return root, splits, teacher, store


def test_data_stage_writes_disjoint_hashed_splits(run):
    root, splits, _, _ = run
    loaded = load_splits(root / "data")
    assert {name: len(ex) for name, ex in loaded.items()} == SIZES
    assert all(splits[name]["sha256"] == split_sha256(ex) for name, ex in loaded.items())
    questions = [e.question for ex in loaded.values() for e in ex]
    assert len(questions) == len(set(questions))
    assert json.loads((root / "data" / "splits.json").read_text()) == splits


def test_teacher_stage_saves_model_tokenizer_and_test_metrics(run):
    root, _, teacher, _ = run
    assert {"model", "tokenizer", "metrics.json", "test_predictions.jsonl"} <= {
        p.name for p in (root / "teacher").iterdir()
    }
    assert teacher["n"] == SIZES["test"] and 0.0 <= teacher["accuracy"] <= 1.0
    assert teacher["kv_spec"] == {"num_layers": 3, "num_kv_heads": 2, "head_dim": 16}


def test_kv_stage_stores_the_student_training_split(run):
    root, _, _, store = run
    assert store.ids == [e.id for e in load_jsonl(root / "data" / "student_train.jsonl")]
    assert KVStore(root / "kv").meta["pre_rope"] is True


GROUPS = {
    "control": {"teachers": []},
    "span": {"teachers": ["A"], "kv": {"time_align": "span"}},
    "segment-elastic": {"teachers": ["A"], "kv": {"time_align": "segment", "projector": "elastic"}},
    "two-routed": {"teachers": ["A", "A2"], "kv": {}, "fusion": {"kind": "router"}},
    "cka-shuffled": {"teachers": ["A"], "kv": {"layer_map": "cka", "shuffle_time": True}},
}


def test_student_stage_bounds_each_stores_cache_as_asked(run, tmp_path):
    kv_root = tmp_path / "kv"
    kv_root.mkdir()
    (kv_root / "A").symlink_to(run[0] / "kv")
    with pytest.raises(ValueError, match=r"cache_bytes=1 cannot hold the store.s largest shard"):
        train_student(STUDENT, GROUPS["span"], 1, run[0] / "data", tmp_path / "s", kv_root, store_cache_bytes=1)


@pytest.mark.parametrize("group", GROUPS)
def test_student_stage_trains_and_evaluates(run, tmp_path, group):
    root = run[0]
    kv_root = tmp_path / "kv"
    kv_root.mkdir()
    for name in ("A", "A2"):
        (kv_root / name).symlink_to(root / "kv")
    (tmp_path / "alignment").mkdir()
    (tmp_path / "alignment" / "cka_A.json").write_text(
        json.dumps({"keys": [[0.9, 0.1], [0.2, 0.3], [0.1, 0.8]], "values": [[0.0] * 2] * 3})
    )
    out = tmp_path / "student"
    summary = train_student(
        STUDENT, GROUPS[group], 1, root / "data", out, kv_root, tmp_path / "alignment", progress=False
    )
    assert summary["finished"] and summary["seed"] == 1
    metrics = evaluate_student(out, root / "data", 8, out / "test_predictions.jsonl")
    assert metrics["n"] == SIZES["test"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ("kv" in rows[-1]) == (group != "control")
    assert ("fusion_weights" in rows[-1]) == (group == "two-routed")


def test_student_stage_rejects_a_store_with_other_keys(run, tmp_path):
    root = run[0]
    group = {"teachers": ["kv"], "kv": {"pre_rope": False}}
    with pytest.raises(ValueError, match="kv.pre_rope=False but the store of teacher kv holds pre-RoPE keys"):
        train_student(STUDENT, group, 0, root / "data", tmp_path, kv_root=root)


def test_cka_layer_map_needs_the_alignment_stage(run, tmp_path):
    root = run[0]
    with pytest.raises(ValueError, match="layer_map 'cka' needs the alignment stage's CKA matrices"):
        train_student(STUDENT, {"teachers": ["kv"], "kv": {"layer_map": "cka"}}, 0, root / "data", tmp_path, root)


def test_data_stage_needs_every_split(tmp_path):
    with pytest.raises(ValueError, match=r"sizes lack splits \['validation'\]"):
        prepare_data({"teacher_train": 2, "student_train": 2, "test": 2}, 0, 9, tmp_path)


def test_a_checkpoint_teacher_is_used_as_it_is(run, tmp_path):
    root = run[0]
    model, tokenizer = load_trained(root / "teacher")
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")  # a real checkpoint keeps its tokenizer beside the weights
    metrics = train_teacher({"path": str(tmp_path / "ckpt"), "max_new_tokens": 8}, root / "data", tmp_path / "t")
    assert metrics == {**run[2], "train_seconds": 0.0}
    assert json.loads((tmp_path / "t" / "checkpoint.json").read_text())["path"] == str(tmp_path / "ckpt")


def test_model_params_need_a_shape_or_a_path():
    with pytest.raises(ValueError, match="give a model either a shape and a tokenizer .* or a checkpoint path"):
        ModelConfig.from_params({"shape": STUDENT["shape"], "train": TRAIN})


def test_a_built_model_needs_training():
    with pytest.raises(ValueError, match="a model built from a shape needs a train section"):
        ModelConfig.from_params({"shape": STUDENT["shape"], "tokenizer": STUDENT["tokenizer"]})


def test_a_student_needs_training(run, tmp_path):
    with pytest.raises(ValueError, match="a student needs a train section"):
        train_student({"path": str(tmp_path)}, {"teachers": []}, 0, run[0] / "data", tmp_path)


def test_data_stage_takes_a_gsm8k_file_as_test_split(tmp_path):
    gsm8k = tmp_path / "gsm8k.jsonl"
    record = {"question": "Ann has 3 pens and buys 4. How many?", "answer": "She has <<3+4=7>>7.\n#### 7"}
    gsm8k.write_text(json.dumps(record) + "\n")
    splits = prepare_data(SIZES | {"test": 1}, 0, 9, tmp_path / "data", files={"test": str(gsm8k)})
    assert splits["test"]["n"] == 1 and splits["test"]["tasks"] == ["gsm8k"]
    assert load_splits(tmp_path / "data")["test"][0].answer == "7"
