"""The latent stage: arms are checked, every mode trains and is scored with its forward passes, a cross-family
teacher is read from a teacher stage's folder, and no two arms of the study are the same run."""

import itertools
import json

import pytest
import torch

from kvlib import project_root
from kvlib.config import ModelShape, load_params
from kvlib.data import load_splits, prepare_data
from kvlib.evaluate import generate
from kvlib.latent_student import LatentArm, evaluate_arm, train_latent, without_chain, write_records
from kvlib.text import save_tokenizer, train_tokenizer

STUDENT = {
    "shape": {"family": "llama", "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "hidden_size": 32},
    "tokenizer": {"kind": "char", "vocab_size": None},
    "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "save_every": 100, "eval_every": 0},
    "max_new_tokens": 6,
}
KAVA = {"mode": "latent", "weights": {"teacher_ce": 1.0, "codi": 1.0, "kv": 1.0}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare_data({"teacher_train": 12, "student_train": 4, "validation": 4, "test": 5}, 0, 4, out)
    return out


@pytest.mark.parametrize(
    "arm, match",
    [
        ({"mode": "sft"}, "mode"),
        ({"mode": "latent", "weights": {"ce": 1.0}}, "weights"),
        ({"mode": "latent", "weights": {"kv": -1.0}}, "weights"),
        ({"mode": "cot", "weights": {"codi": 1.0}}, "CE alone"),
        ({"mode": "latent", "weights": {"codi": 1.0}, "teachers": ["A"]}, "weights.kv"),
        ({"mode": "latent", "weights": {"kv": 1.0}, "teachers": ["A", "B"]}, "fusion"),
        ({"mode": "latent", "weights": {"kv": 1.0}, "rule": "mean"}, "rule"),
        (KAVA | {"teachers": ["A", "B"], "fusion": {"kind": "router", "entropy_weight": 0.1}}, "entropy_weight"),
    ],
)
def test_bad_arms_are_refused_with_the_fix(arm, match):
    with pytest.raises(ValueError, match=match):
        LatentArm.from_params(arm)


def test_no_cot_examples_keep_question_and_answer_only(data):
    e = load_splits(data)["test"][0]
    (n,) = without_chain([e])
    assert (n.question, n.answer, n.reasoning) == (e.question, e.answer, "")
    start, end = n.spans["answer"]
    assert n.text[start:end] == f"#### {e.answer}" and n.text.startswith(e.prompt)


def test_generated_lengths_count_the_tokens_up_to_and_with_the_first_eos():
    """Against a by-hand greedy loop: the number of tokens each prompt generates before it stops."""
    texts = ["Q: 1+2\nA:", "Q: a much longer prompt 3*4\nA:"]
    tokenizer = train_tokenizer("char", texts + ["#### 0123456789"])
    model = ModelShape("llama", 1, 2, 1, 8, 16).build(len(tokenizer), seed=3).eval()
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # make <eos> likely after a few tokens, so that rows stop at different steps
        model.lm_head.weight[eos] += 0.3 * model.lm_head.weight.norm(dim=1).mean()
    _, lengths = generate(model, tokenizer, texts, max_new_tokens=12, lengths=True)
    for text, n in zip(texts, lengths):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        steps = 0
        with torch.no_grad():
            while steps < 12:
                token = model(input_ids=ids).logits[0, -1].argmax()
                ids, steps = torch.cat([ids, token.view(1, 1)], 1), steps + 1
                if token == eos:
                    break
        assert n == steps


@pytest.mark.parametrize("arm", [{"mode": "cot"}, {"mode": "nocot"}, KAVA, KAVA | {"rule": "crop"}])
def test_every_mode_trains_and_is_scored_with_its_forward_passes(data, tmp_path, arm):
    summary = train_latent(STUDENT, arm, 0, data, tmp_path, num_thoughts=2, progress=False)
    assert summary["arm"] == arm and (tmp_path / "model").is_dir() and (tmp_path / "tokenizer").is_dir()
    test = load_splits(data)["test"]
    records, scores = evaluate_arm(tmp_path, arm["mode"], test, max_new_tokens=6)
    assert [r["id"] for r in records] == [e.id for e in test]
    passes = [r["forward_passes"] for r in records]
    if arm["mode"] == "latent":  # the prompt, 2 thoughts, the end marker, then one per answer token after the first
        assert all(1 + 2 + 1 <= n <= 1 + 2 + 1 + 5 for n in passes)
    else:  # one per generated token, the prompt's pass giving the first
        assert all(1 <= n <= 6 for n in passes)
    assert scores["forward_passes"] == pytest.approx(sum(passes) / len(passes))
    write_records(tmp_path / "predictions.jsonl", records, "x", 3)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(r["group"] == "x" and r["seed"] == 3 for r in rows) and len(rows) == len(test)


def test_a_written_chain_that_cannot_fit_the_positions_is_refused(data, tmp_path):
    train_latent(STUDENT, {"mode": "cot"}, 0, data, tmp_path, num_thoughts=2, progress=False)
    test = load_splits(data)["test"]
    limit = json.loads((tmp_path / "model" / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ValueError, match="max_position"):
        evaluate_arm(tmp_path, "cot", test, max_new_tokens=limit)


def test_a_cross_family_teacher_is_read_from_its_stage_folder(data, tmp_path):
    texts = [e.text for e in load_splits(data)["teacher_train"]]
    tokenizer = train_tokenizer("bpe", texts, vocab_size=300)
    teacher = ModelShape("qwen2", 3, 4, 2, 16, 64).build(len(tokenizer), seed=1)
    teacher.save_pretrained(tmp_path / "teachers" / "A" / "model")
    save_tokenizer(tokenizer, tmp_path / "teachers" / "A" / "tokenizer")
    arm = KAVA | {"teachers": ["A"]}
    train_latent(STUDENT, arm, 0, data, tmp_path / "run", 2, teacher_root=tmp_path / "teachers", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["kv"] > 0
    with pytest.raises(ValueError, match="was not trained"):
        train_latent(
            STUDENT, KAVA | {"teachers": ["B"]}, 0, data, tmp_path / "r2", 2, teacher_root=tmp_path / "teachers"
        )


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml"])
def test_no_two_arms_of_a_latent_study_are_the_same_run(name):
    params = load_params(project_root() / "params" / name)
    study, arms = params["study"]["latent"], params["latent"]["arms"]
    names = study["arms"]
    resolved = {n: LatentArm.from_params(arms[n]) for n in names}
    for a, b in itertools.combinations(names, 2):
        assert resolved[a] != resolved[b], f"latent arms {a} and {b} train the same student"


def test_an_arm_computes_its_teachers_slot_tables_once_for_all_its_seeds(data, tmp_path, monkeypatch):
    from kvlib.latent_student import run_arm
    from kvlib.slot_table import SlotTable

    texts = [e.text for e in load_splits(data)["teacher_train"]]
    tokenizer = train_tokenizer("bpe", texts, vocab_size=300)
    teacher = ModelShape("qwen2", 3, 4, 2, 16, 64).build(len(tokenizer), seed=1)
    teacher.save_pretrained(tmp_path / "teachers" / "A" / "model")
    save_tokenizer(tokenizer, tmp_path / "teachers" / "A" / "tokenizer")
    computed = []
    compute = SlotTable.compute.__func__
    monkeypatch.setattr(
        SlotTable, "compute", classmethod(lambda cls, *a, **k: computed.append(1) or compute(cls, *a, **k))
    )
    settings = {"num_thoughts": 2, "passes": 0, "split": "teacher_train", "train_examples": 8}
    summaries = run_arm(
        [0, 1], 1, tmp_path / "runs", tmp_path / "reports", params=STUDENT, name="kava-A",
        arm=KAVA | {"teachers": ["A"]}, settings=settings, data_dir=data, teacher_root=tmp_path / "teachers", threads=1,
    )  # fmt: skip
    assert computed == [1] and sorted(summaries) == [0, 1]
    assert (
        len(
            SlotTable.build(
                tmp_path / "runs" / "teacher_slots" / "A.safetensors",
                teacher,
                tokenizer,
                load_splits(data)["teacher_train"][:8],
                2,
            )
        )
        == 8
    )
    assert all((tmp_path / "runs" / str(s) / "predictions.jsonl").is_file() for s in (0, 1))
