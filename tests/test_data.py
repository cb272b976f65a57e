import dataclasses
import hashlib
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from kvlib import data
from kvlib.data import (
    SEGMENTS,
    STYLES,
    TASKS,
    Example,
    generate,
    load_gsm8k,
    load_jsonl,
    load_splits,
    make_splits,
    parse_answer,
    prepare_data,
    save_jsonl,
    split_sha256,
)

CELLS = list(itertools.product(TASKS, STYLES))
EQUATION = re.compile(r"(\d+(?:[-+*/<>]\d+)+)=(\d+)")  # 5+3=8, 8>6=1, 0+1+1=2
ANNOTATIONS = re.compile(rf"<<{EQUATION.pattern}>>(?: <<{EQUATION.pattern}>>)*")


def evaluate(expr: str) -> int:
    """Integer value of a left-to-right expression like "0+1+1" or "16/2", with no eval; division must be exact."""
    tokens = re.findall(r"\d+|[-+*/<>]", expr)
    value = int(tokens[0])
    for op, b in zip(tokens[1::2], map(int, tokens[2::2])):
        match op:
            case "+":
                value += b
            case "-":
                value -= b
            case "*":
                value *= b
            case "/":
                assert value % b == 0, f"inexact division in {expr}"
                value //= b
            case ">":
                value = int(value > b)
            case "<":
                value = int(value < b)
    return value


def equations(reasoning: str) -> list[tuple[str, int]]:
    """(left side, stated result) of every equation in a reasoning, in order."""
    return [(lhs, int(rhs)) for lhs, rhs in EQUATION.findall(reasoning)]


@pytest.fixture(scope="module")
def pool():
    return generate(1200, seed=0)


# Example


def test_text_and_spans_of_a_hand_written_example():
    e = Example("chain-00000", "chain", "equation", "Tom has 5 apples. He buys 3 more.", "<<5+3=8>>", "8")
    assert e.prompt == "Q: Tom has 5 apples. He buys 3 more.\nA:"
    assert e.text == "Q: Tom has 5 apples. He buys 3 more.\nA: <<5+3=8>>\n#### 8"
    assert e.spans == {"prompt": (0, 39), "reasoning": (39, 50), "answer": (50, 56)}
    assert [e.text[slice(*e.spans[s])] for s in SEGMENTS] == [e.prompt, " <<5+3=8>>\n", "#### 8"]


def test_spans_are_contiguous_in_segment_order_and_cover_the_text(pool):
    for e in pool:
        spans = e.spans
        assert tuple(spans) == SEGMENTS
        assert spans["prompt"][0] == 0 and spans["answer"][1] == len(e.text)
        assert spans["prompt"][1] == spans["reasoning"][0] and spans["reasoning"][1] == spans["answer"][0]
        assert e.text[: spans["prompt"][1]] == e.prompt
        assert e.text[slice(*spans["reasoning"])] == f" {e.reasoning}\n"
        assert e.text[slice(*spans["answer"])] == f"#### {e.answer}"


@pytest.mark.parametrize("answer", ["1,234", "+3", "07", "-0", "3.5", "", 72])
def test_example_rejects_a_non_canonical_answer(answer):
    with pytest.raises(ValueError, match="answer must be a canonical integer string"):
        Example("x", "chain", "equation", "q", "r", answer)


# generate


def test_same_seed_gives_identical_examples_and_another_seed_different_ones():
    assert generate(50, seed=3) == generate(50, seed=3)
    a, b = generate(50, seed=3), generate(50, seed=4)
    assert sum(x.question != y.question for x, y in zip(a, b)) > 45


def test_a_prefix_does_not_depend_on_n():
    assert generate(30, seed=1) == generate(90, seed=1)[:30]


def test_ids_are_unique_and_name_the_task_and_position(pool):
    assert [e.id for e in pool[:4]] == ["chain-00000", "chain-00001", "compare-00002", "compare-00003"]
    assert len({e.id for e in pool}) == len(pool)
    assert all(e.id == f"{e.task}-{i:05d}" for i, e in enumerate(pool))


def test_questions_are_pairwise_distinct(pool):
    assert len({e.question for e in pool}) == len(pool)


def test_tasks_and_styles_come_in_equal_shares_in_every_prefix(pool):
    assert Counter((e.task, e.style) for e in pool) == {cell: 300 for cell in CELLS}
    counts = Counter((e.task, e.style) for e in pool[:10])
    assert max(counts.values()) - min(counts.values()) <= 1


def test_a_single_task_and_style_can_be_asked_for():
    examples = generate(20, seed=0, tasks=("compare",), styles=("natural",))
    assert {(e.task, e.style) for e in examples} == {("compare", "natural")}


@pytest.mark.parametrize("task, style", CELLS)
def test_every_equation_is_true_and_the_last_result_is_the_answer(task, style):
    for e in generate(300, seed=7, tasks=(task,), styles=(style,)):
        if style == "equation":
            assert ANNOTATIONS.fullmatch(e.reasoning), e.reasoning  # only annotations, one space apart
        else:
            assert "<<" not in e.reasoning and e.reasoning[0].isalpha() and e.reasoning.endswith(".")
        eqs = equations(e.reasoning)
        assert 2 <= len(eqs), e.text
        for lhs, result in eqs:
            assert evaluate(lhs) == result, (lhs, result, e.text)
            assert 0 <= result < 1000
        assert str(eqs[-1][1]) == e.answer, e.text
        assert parse_answer(e.text) == e.answer


def test_the_smallest_operand_range_still_gives_true_distinct_problems():
    examples = generate(400, seed=0, max_operand=2)
    assert len({e.question for e in examples}) == 400
    for e in examples:
        assert all(evaluate(lhs) == result for lhs, result in equations(e.reasoning)), e.text
        assert str(equations(e.reasoning)[-1][1]) == e.answer


@pytest.mark.parametrize("task", TASKS)
def test_operation_counts_two_to_four_all_occur(task):
    counts = Counter(len(equations(e.reasoning)) for e in generate(300, seed=2, tasks=(task,)))
    assert set(counts) == {2, 3, 4} and min(counts.values()) > 30, counts


def test_both_styles_state_the_same_arithmetic_for_the_same_question():
    equation = generate(200, seed=4, styles=("equation",))
    natural = generate(200, seed=4, styles=("natural",))
    assert [e.question for e in equation] == [e.question for e in natural]
    assert [equations(e.reasoning) for e in equation] == [equations(e.reasoning) for e in natural]
    assert equation[0].reasoning != natural[0].reasoning


def test_chains_use_all_four_operations_and_comparisons_also_count(pool):
    def ops(task):
        return {
            op for e in pool if e.task == task for lhs, _ in equations(e.reasoning) for op in re.findall(r"\D", lhs)
        }

    assert ops("chain") == set("+-*/") and ops("compare") == set("+-*/<>")


def test_operands_in_the_question_stay_in_range():
    for e in generate(400, seed=5, max_operand=6):
        numbers = [int(x) for x in re.findall(r"\d+", e.question)]
        assert numbers and all(2 <= x <= 6 for x in numbers), e.question


def test_questions_and_reasoning_stay_short(pool):
    q = sorted(len(e.question) for e in pool)
    r = sorted(len(e.reasoning) for e in pool)
    assert q[len(q) // 2] < 150 and q[int(0.9 * len(q))] < 200 and q[-1] < 300
    assert r[len(r) // 2] < 80 and r[int(0.9 * len(r))] < 150 and r[-1] < 200


def test_generate_rejects_negative_n():
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        generate(-1, seed=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tasks": ("chain", "sorting")}, r"tasks must be a non-empty selection of \('chain', 'compare'\)"),
        ({"tasks": ()}, "tasks must be a non-empty selection"),
        (
            {"styles": ("poetry",)},
            r"styles must be a non-empty selection of \('equation', 'natural'\), got \('poetry',\)",
        ),
    ],
)
def test_generate_rejects_unknown_tasks_and_styles(kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(4, seed=0, **kwargs)


@pytest.mark.parametrize("max_operand", [1, 0, 101])
def test_generate_rejects_max_operand_out_of_range(max_operand):
    with pytest.raises(ValueError, match=rf"max_operand must be in \[2, 100\].*got {max_operand}"):
        generate(4, seed=0, max_operand=max_operand)


def test_generate_gives_up_when_the_question_space_runs_out(monkeypatch):
    def one_question(rng, max_operand):
        rng.random()
        return "Ann has 2 apples. How many?", {"equation": "<<1+1=2>>", "natural": "So 1+1=2."}, "2"

    monkeypatch.setitem(data.DRAW, "chain", one_question)
    assert len(generate(1, seed=0, tasks=("chain",))) == 1
    with pytest.raises(ValueError, match=r"asked for 2 distinct questions but found only 1: 1000 'chain' draws"):
        generate(2, seed=0, tasks=("chain",))
    with pytest.raises(ValueError, match="ask for fewer examples or raise max_operand"):
        make_splits({"train": 1, "test": 1}, seed=0, tasks=("chain",))


# make_splits and hashes

SIZES = {"teacher_train": 120, "student_train": 60, "validation": 20, "test": 20}


def test_splits_have_the_asked_sizes_and_share_no_question_or_id():
    splits = make_splits(SIZES, seed=0)
    assert {k: len(v) for k, v in splits.items()} == SIZES
    for a, b in itertools.combinations(splits.values(), 2):
        assert not {e.question for e in a} & {e.question for e in b}
        assert not {e.id for e in a} & {e.id for e in b}


def test_splits_are_deterministic_and_balanced():
    splits = make_splits(SIZES, seed=0, max_operand=12)
    assert splits == make_splits(SIZES, seed=0, max_operand=12)
    assert splits != make_splits(SIZES, seed=1, max_operand=12)
    assert Counter((e.task, e.style) for e in splits["test"]) == {cell: 5 for cell in CELLS}


def test_split_sha256_is_stable_and_changes_when_one_example_changes():
    test = make_splits(SIZES, seed=0)["test"]
    digest = split_sha256(test)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert split_sha256(make_splits(SIZES, seed=0)["test"]) == digest
    changed = [*test[:-1], dataclasses.replace(test[-1], answer=str(int(test[-1].answer) + 1))]
    assert split_sha256(changed) != digest
    assert split_sha256(test[::-1]) != digest


@pytest.mark.parametrize("sizes", [{}, {"train": -1}, {"train": 2.5}])
def test_make_splits_rejects_bad_sizes(sizes):
    with pytest.raises(ValueError, match="sizes must map split names to counts >= 0"):
        make_splits(sizes, seed=0)


# files


def test_save_and_load_round_trip_and_the_file_hash_is_the_split_hash(tmp_path):
    examples = generate(40, seed=0) + [Example("odd-1", "gsm8k", "gsm8k", "Ünïcode “quotes”?", "a\nb", "-3")]
    path = tmp_path / "splits" / "test.jsonl"
    save_jsonl(examples, path)
    assert load_jsonl(path) == examples
    assert hashlib.sha256(path.read_bytes()).hexdigest() == split_sha256(examples)
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(examples)
    save_jsonl(examples[:3], path)  # overwrite in place, leaving no temp file behind
    assert load_jsonl(path) == examples[:3] and [p.name for p in path.parent.iterdir()] == ["test.jsonl"]


GSM8K_LINES = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all? ",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "A farm has 1,000 hens and buys 234 more. How many hens?",
     "answer": "1000+234 = <<1000+234=1234>>1234\n#### 1,234"},
]  # fmt: skip


def write_lines(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def test_load_gsm8k_reads_question_reasoning_and_canonical_answer(tmp_path):
    path = write_lines(tmp_path / "gsm8k.jsonl", [GSM8K_LINES[0], "", GSM8K_LINES[1]])
    a, b = load_gsm8k(path)
    assert (a.id, a.task, a.style, a.answer) == ("gsm8k-1", "gsm8k", "gsm8k", "72")
    assert a.question == "Natalia sold 48 clips in April and half as many in May. How many in all?"
    assert a.reasoning == "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips."
    assert (b.id, b.answer, b.reasoning) == ("gsm8k-3", "1234", "1000+234 = <<1000+234=1234>>1234")
    assert parse_answer(b.text) == "1234" and b.text.endswith("1234\n#### 1234")


@pytest.mark.parametrize("loader", [load_jsonl, load_gsm8k])
def test_loaders_name_file_and_line_of_malformed_json(tmp_path, loader):
    path = write_lines(tmp_path / "bad.jsonl", ["", '{"question": "cut off'])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not valid JSON")):
        loader(path)


@pytest.mark.parametrize("loader", [load_jsonl, load_gsm8k])
def test_loaders_reject_a_line_that_is_not_an_object(tmp_path, loader):
    path = write_lines(tmp_path / "bad.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: expected one JSON object per line, got list")):
        loader(path)


def test_load_gsm8k_names_file_and_line_of_a_missing_key(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [GSM8K_LINES[0], {"question": "How many?"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: keys ['answer'] are missing or not strings")):
        load_gsm8k(path)


def test_load_gsm8k_names_file_and_line_of_an_answer_without_hashes(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [GSM8K_LINES[1], GSM8K_LINES[0], {"question": "q", "answer": "It is 5"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: the answer has no '####'")):
        load_gsm8k(path)


def test_load_gsm8k_rejects_a_final_answer_that_is_not_an_integer(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [{"question": "q", "answer": "half\n#### 2.5"}])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: the final answer '2.5' after '####' is not an integer")):
        load_gsm8k(path)


def test_load_jsonl_names_file_and_line_of_missing_and_unknown_keys(tmp_path):
    good = dataclasses.asdict(generate(1, seed=0)[0])
    bad = {k: v for k, v in good.items() if k != "answer"} | {"label": "x"}
    path = write_lines(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: missing keys ['answer'], unknown keys ['label']")):
        load_jsonl(path)


def test_load_jsonl_names_file_and_line_of_a_bad_answer(tmp_path):
    line = dataclasses.asdict(generate(1, seed=0)[0]) | {"answer": "1,234"}
    path = write_lines(tmp_path / "bad.jsonl", [line])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: answer must be a canonical integer string")):
        load_jsonl(path)


# parse_answer


@pytest.mark.parametrize(
    "generated, expected",
    [
        ("<<5+3=8>>\n#### 72", "72"),
        ("#### 1,234", "1234"),
        ("#### -3", "-3"),
        ("#### 007", "7"),
        ("#### 72 apples\nQ: next question #### 5", "72"),
        ("#### 72.", "72"),
        ("#### 3.5", None),
        ("The answer is 72", None),
        ("####72", None),
        ("#### seventy-two #### 72", None),
        ("", None),
    ],
)
def test_parse_answer_reads_the_integer_after_the_first_hashes(generated, expected):
    assert parse_answer(generated) == expected


# prepare_data: generated splits and splits read from GSM8K-format files

FILE_SIZES = {"teacher_train": 3, "student_train": 2, "validation": 1, "test": 2}


def gsm8k_file(path, split, n):
    """n distinct GSM8K-format lines, named after the split: question "<split> problem <i>: ...", answer i + 1."""
    lines = [
        {"question": f"{split} problem {i}: Ann has {i} pens and buys 1. How many?",
         "answer": f"She has {i}+1 = <<{i}+1={i + 1}>>{i + 1} pens.\n#### {i + 1}"}
        for i in range(n)
    ]  # fmt: skip
    return write_lines(path, lines)


@pytest.fixture
def split_files(tmp_path):
    """A GSM8K-format file per split, sized as FILE_SIZES, under tmp_path/gsm8k/; files maps split -> path."""
    (tmp_path / "gsm8k").mkdir()
    return {s: str(gsm8k_file(tmp_path / "gsm8k" / f"{s}.jsonl", s, n)) for s, n in FILE_SIZES.items()}


def test_every_split_can_be_read_from_its_own_gsm8k_file_and_records_its_source(tmp_path, split_files):
    summary = prepare_data(FILE_SIZES, 0, 9, tmp_path / "data", split_files)
    assert json.loads((tmp_path / "data" / "splits.json").read_text()) == summary
    written = load_splits(tmp_path / "data")
    for split, path in split_files.items():
        assert written[split] == load_gsm8k(path)
        sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert summary[split]["source"] == {"file": path, "sha256": sha256}
        assert summary[split] | {"source": None} == {
            "n": FILE_SIZES[split], "sha256": split_sha256(written[split]), "tasks": ["gsm8k"], "source": None
        }  # fmt: skip
    e = written["student_train"][1]
    assert (e.question, e.reasoning, e.answer) == (
        "student_train problem 1: Ann has 1 pens and buys 1. How many?", "She has 1+1 = <<1+1=2>>2 pens.", "2"
    )  # fmt: skip


def test_a_mixed_run_generates_the_other_splits_exactly_as_an_all_generated_run(tmp_path, split_files):
    sizes = SIZES | {"test": 2}
    summary = prepare_data(sizes, 0, 9, tmp_path / "mixed", {"test": split_files["test"]})
    prepare_data(sizes, 0, 9, tmp_path / "generated")
    mixed, generated = load_splits(tmp_path / "mixed"), load_splits(tmp_path / "generated")
    assert mixed["test"] == load_gsm8k(split_files["test"]) and summary["test"]["tasks"] == ["gsm8k"]
    assert summary["test"]["source"]["file"] == split_files["test"]
    for split in ("teacher_train", "student_train", "validation"):
        assert mixed[split] == generated[split] and len(mixed[split]) == sizes[split]
        assert summary[split]["source"] == {"generated": {"seed": 0, "max_operand": 9}}


def test_a_relative_path_is_read_from_root_and_recorded_as_given(tmp_path, split_files):
    summary = prepare_data(FILE_SIZES, 0, 9, tmp_path / "data", {"test": "gsm8k/test.jsonl"}, root=tmp_path)
    assert summary["test"]["source"]["file"] == "gsm8k/test.jsonl"
    assert load_splits(tmp_path / "data")["test"] == load_gsm8k(split_files["test"])


def test_no_files_means_every_split_is_generated_from_the_seed(tmp_path):
    summary = prepare_data(SIZES, 3, 12, tmp_path / "data", {})
    assert load_splits(tmp_path / "data") == make_splits(SIZES, seed=3, max_operand=12)
    assert all(s["source"] == {"generated": {"seed": 3, "max_operand": 12}} for s in summary.values())


def test_a_split_file_is_validated_like_the_test_loader_naming_file_and_line(tmp_path, split_files):
    bad = write_lines(tmp_path / "teacher_train.jsonl", [GSM8K_LINES[0], {"question": "q", "answer": "a\n#### 1,00"}])
    with pytest.raises(ValueError, match=re.escape(f"{bad}:2: the final answer '1,00' after '####' is not an integer")):
        prepare_data(FILE_SIZES, 0, 9, tmp_path / "data", split_files | {"teacher_train": str(bad)})
    empty = write_lines(tmp_path / "validation.jsonl", [""])
    with pytest.raises(ValueError, match=r"validation.jsonl holds no GSM8K example .*point data.files at a GSM8K"):
        prepare_data(FILE_SIZES, 0, 9, tmp_path / "data", {"validation": str(empty)})
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "files, match",
    [
        ({"tset": "x.jsonl"}, r"files names unknown splits \['tset'\]; name splits of \['teacher_train', "),
        ({"test": "missing.jsonl"}, r"files.test: .*missing.jsonl is no file; put the GSM8K-format JSONL there or fix"),
        ({"test": "gsm8k"}, r"files.test: .*gsm8k is no file"),  # a folder
        ({"test": None}, r"files.test must be the path of a GSM8K-format JSONL, got None; .*leave the split out"),
        ({"test": ""}, r"files.test must be the path of a GSM8K-format JSONL, got ''"),
        (
            {"teacher_train": "gsm8k/test.jsonl", "test": "gsm8k/../gsm8k/test.jsonl"},
            r"files.teacher_train and files.test are the same file .*test.jsonl; give each split its own file",
        ),
    ],
)
def test_bad_files_are_refused_before_anything_is_written(tmp_path, split_files, files, match):
    with pytest.raises(ValueError, match=match):
        prepare_data(FILE_SIZES, 0, 9, tmp_path / "data", files, root=tmp_path)
    assert not (tmp_path / "data").exists()


def test_a_size_that_is_not_the_files_number_of_examples_is_refused(tmp_path, split_files):
    with pytest.raises(ValueError, match=r"sizes.test is 1319 but files.test \(.*test.jsonl\) holds 2 examples; .*"
                       r"taken whole: set sizes.test: 2, or cut the file"):  # fmt: skip
        prepare_data(FILE_SIZES | {"test": 1319}, 0, 9, tmp_path / "data", split_files)
    assert not (tmp_path / "data").exists()


def test_sizes_naming_an_unknown_split_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"sizes name unknown splits \['train'\]; give sizes for exactly"):
        prepare_data(SIZES | {"train": 5}, 0, 9, tmp_path / "data")


def test_a_question_in_two_split_files_is_refused_naming_it_and_both_files(tmp_path, split_files):
    question = "  student_train PROBLEM 1:  Ann has 1 pens\tand buys 1. How many?"  # the same, normalised
    test = write_lines(tmp_path / "test.jsonl", [GSM8K_LINES[0], {"question": question, "answer": "2 pens\n#### 2"}])
    match = (
        r"the question 'student_train PROBLEM 1: .*' is in .*gsm8k/student_train.jsonl:2 \(student_train\) and in "
        r".*/test.jsonl:2 \(test\); a question in two splits leaks .*remove it from one of the files"
    )
    with pytest.raises(ValueError, match=match):
        prepare_data(FILE_SIZES, 0, 9, tmp_path / "data", split_files | {"test": str(test)})
    assert not (tmp_path / "data").exists()


def test_a_file_question_that_a_generated_split_holds_is_refused(tmp_path):
    generated = make_splits(SIZES, seed=0, max_operand=9)["student_train"][5]
    test = write_lines(
        tmp_path / "test.jsonl", [{"question": generated.question, "answer": f"x\n#### {generated.answer}"}]
    )
    match = rf"is in the generated student_train split \({generated.id}\) and in .*test.jsonl:1 \(test\)"
    with pytest.raises(ValueError, match=match):
        prepare_data(SIZES | {"test": 1}, 0, 9, tmp_path / "data", {"test": str(test)})
