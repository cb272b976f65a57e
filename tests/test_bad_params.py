"""Bad params are refused before anything runs, each with an error naming the key, the value and the fix."""

import copy
import math

import nbformat
import pytest

from kvlib import project_root
from kvlib.config import ModelConfig, TokenizerConfig, TrainConfig, check_study, from_dict, load_params
from kvlib.distill import FusionConfig, GroupConfig, KVConfig
from kvlib.fusion import make_fusion
from kvlib.runner import check_parameters, executed_name, notebook_for, parse_sets, stage_parameters

ROOT = project_root()
DEFAULT = load_params(ROOT / "params" / "default.yaml")
SHAPE = {"family": "llama", "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "hidden_size": 32}


@pytest.mark.parametrize(
    ("cls", "values", "message"),
    [
        (
            KVConfig,
            {"shuffle_time": "false"},
            r"KVConfig.shuffle_time must be a bool \(true/false\), got 'false' \(str\)",
        ),
        (KVConfig, {"normalize": "no"}, r"KVConfig.normalize must be a bool \(true/false\), got 'no' \(str\)"),
        (GroupConfig, {"teachers": "AB"}, r"GroupConfig.teachers must be a list of strings, got 'AB' \(str\)"),
        (
            GroupConfig,
            {"teachers": ["A", 1], "kv": {}},
            r"GroupConfig.teachers must be a list of strings, got \['A', 1\]",
        ),
        (TrainConfig, {"steps": 2.5}, r"TrainConfig.steps must be an integer, got 2.5 \(float\)"),
        (TrainConfig, {"steps": True}, r"TrainConfig.steps must be an integer, got True \(bool\)"),
        (TrainConfig, {"lr": "3e-4"}, r"TrainConfig.lr must be a finite number, got '3e-4' \(str\)"),
        (TrainConfig, {"lr": True}, r"TrainConfig.lr must be a finite number, got True \(bool\)"),
        (TrainConfig, {"lr": math.nan}, r"TrainConfig.lr must be a finite number, got nan \(float\)"),
        (TrainConfig, {"mixed_precision": None}, r"TrainConfig.mixed_precision must be a string, got None"),
        (TokenizerConfig, {"vocab_size": "384"}, r"TokenizerConfig.vocab_size must be an integer or null, got '384'"),
        (FusionConfig, {"weights": [0.5, "0.5"]}, r"FusionConfig.weights must be a list of finite numbers or null"),
        (ModelConfig, {"shape": 5}, r"ModelConfig.shape must be a ModelShape \(a mapping of its keys\) or null, got 5"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_naming_config_key_value_and_type(cls, values, message):
    with pytest.raises(TypeError, match=message):
        from_dict(cls, values)


def test_a_nested_section_is_type_checked_too():
    with pytest.raises(TypeError, match=r"KVConfig.shuffle_time must be a bool \(true/false\), got 'false'"):
        GroupConfig.from_params({"teachers": ["A"], "kv": {"weight": 0.1, "shuffle_time": "false"}})
    with pytest.raises(TypeError, match=r"ModelShape.num_layers must be an integer, got 2.0 \(float\)"):
        ModelConfig.from_params({"shape": SHAPE | {"num_layers": 2.0}, "tokenizer": {}, "train": {}})


def test_an_integer_is_a_float_and_nested_mappings_become_configs():
    assert from_dict(TrainConfig, {"lr": 1, "max_grad_norm": 2}) == TrainConfig(lr=1.0, max_grad_norm=2.0)
    g = GroupConfig.from_params({"teachers": ["A", "B"], "kv": {}, "fusion": {"weights": [0, 1]}})
    assert g == GroupConfig(["A", "B"], KVConfig(), FusionConfig(weights=[0, 1]))


def test_a_config_section_that_is_not_a_mapping_or_misses_a_required_key_is_named():
    with pytest.raises(TypeError, match=r"TrainConfig must be a mapping of its keys \['steps'.*, got \[1\]"):
        from_dict(TrainConfig, [1])
    with pytest.raises(ValueError, match=r"GroupConfig needs the keys \['teachers'\]; got \['kv'\]"):
        GroupConfig.from_params({"kv": {}})


def test_exponent_floats_without_a_dot_are_read_as_the_numbers_meant(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train: {lr: 3e-4, a: 1E5, b: -2e-3, c: 1.5e5, d: .5e1, quoted: '3e-4', n: 3, x: 0.5}\n")
    got = load_params(path)["train"]
    assert got == {"lr": 3e-4, "a": 1e5, "b": -2e-3, "c": 1.5e5, "d": 5.0, "quoted": "3e-4", "n": 3, "x": 0.5}
    assert [type(got[k]) for k in ("lr", "a", "n")] == [float, float, int]
    assert parse_sets(["lr=3e-4", "steps=2"]) == {"lr": 3e-4, "steps": 2}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("data: {seed: 1}\n  bad: indent\n", r"p.yaml is not valid YAML; fix it there: (.|\n)*p.yaml\", line 2"),
        ("", r"p.yaml line 1: a params file is a mapping of sections"),
        ("- data\n- train\n", r"p.yaml line 1: a params file is a mapping of sections"),
        ("data: {seed: 1}\ntrain: 5\n", r"p.yaml line 2: section train must be a mapping of its parameters, got 5"),
        ("data: {seed: 1}\ndata: {seed: 2}\n", r"p.yaml gives the top-level keys \['data'\] more than once"),
        ("allow_outside_project: 'yes'\n", r"p.yaml line 1: option allow_outside_project must be true or false"),
    ],
)
def test_a_params_file_that_is_not_a_mapping_of_sections_is_refused_with_its_line(tmp_path, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_params(path)


DELETE = object()


def _set(params: dict, path: str, value) -> dict:
    """A deep copy of ``params`` with the value at dotted ``path`` replaced (``DELETE``: removed)."""
    params = copy.deepcopy(params)
    *parents, last = path.split(".")
    target = params
    for key in parents:
        target = target[key]
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return params


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("study.seeds", [], r"study.seeds must be a non-empty list of distinct integers, got \[\]"),
        ("study.seeds", [0, 0], r"study.seeds must be a non-empty list of distinct integers, got \[0, 0\]"),
        ("study.seeds", [0, "1"], r"study.seeds must be a non-empty list of distinct integers"),
        ("study.seeds", [True], r"study.seeds must be a non-empty list of distinct integers, got \[True\]"),
        ("study.teachers", "AB", r"study.teachers must be a non-empty list of distinct names, got 'AB'"),
        ("study.teachers", ["A", "B", "D"], r"the study names \['D'\], absent from teacher.teachers \['A', 'B'\]"),
        ("study.groups", ["S", "G9"], r"the study names \['G9'\], absent from train.groups"),
        ("study.groups", ["C", "S"], r"study.control 'C' is also in study.groups"),
        ("study.groups", ["S", "../G2"], r"study names \['../G2'\] must be letters, digits"),
        ("study.groups", ["S", "C-lr1"], r"groups \['C-lr1'\] play two roles in the study"),
        ("study.repeats", 2, r"study must have exactly the keys \['teachers', 'control', 'groups', 'seeds', 'tuning'"),
        ("study.tuning", {"groups": ["C-lr1"], "seeds": [100]}, r"tune.families list \['C-lr1', 'C-lr2', 'C-lr4'"),
        ("study.tuning.seeds", [0, 100], r"tuning seeds \[0\] are also seeds of compared runs"),
        ("study.secondary", {"groups": ["S-w3"]}, r"study.secondary must be a mapping with exactly the keys"),
        ("train.groups.C", {"tuned": "lr"}, r"train.groups.C is tuned by family 'lr', but tune.families has \['ce'"),
        ("study.teachers", ["A"], r"train.groups.F.teachers names \['B'\], but study.teachers is \['A'\]"),
        ("alignment.teachers", ["A", "D"], r"alignment.teachers names \['D'\], but study.teachers is"),
        ("evaluate.seeds", [0, 1], r"evaluate.seeds is \[0, 1\] but the study makes it \[0, 1, 2, .*, 19\]"),
        ("evaluate.secondary", {"groups": [], "seeds": []}, r"evaluate.secondary is \{'groups': \[\], 'seeds'"),
        ("statistics.primary.P1", ["S", "C-lr1"], r"statistics.primary contrasts \{'P1': \['S', 'C-lr1'\]\} must"),
        ("statistics.primary.P5", ["S", "S-w3"], r"statistics.primary has 5 contrasts; pre-register one to four"),
        ("report.plan.seeds", 2, r"report.plan.seeds is 2 but the study makes it 20"),
        (
            "evaluate",
            DELETE,
            r"the study needs evaluate.groups, but the params file has no 'evaluate' \(found: .*; add",
        ),
    ],
)
def test_a_study_that_disagrees_with_the_sections_is_refused(path, value, message):
    with pytest.raises(ValueError, match=message):
        check_study(_set(DEFAULT, path, value))


@pytest.mark.parametrize("weights", [[0.6, 0.6], [1.5, -0.5], [1.0], [0.5, 0.5, 0.0], [0.333333, 0.666666]])
def test_fixed_fusion_weights_must_be_one_per_teacher_non_negative_and_sum_to_one(weights):
    group = {"teachers": ["A", "B"], "kv": {}, "fusion": {"kind": "fixed", "weights": weights}}
    with pytest.raises(ValueError, match=r"fixed_weights must be 2 non-negative numbers .* summing to 1, got \["):
        GroupConfig.from_params(group)
    with pytest.raises(ValueError, match=r"set the group's fusion.weights so, e.g. \[0.5, 0.5\]"):
        make_fusion("fixed", 2, 2, 8, 1, fixed_weights=weights)


def test_non_finite_fixed_fusion_weights_are_refused():
    with pytest.raises(TypeError, match=r"FusionConfig.weights must be a list of finite numbers or null, got \[nan"):
        from_dict(FusionConfig, {"weights": [math.nan, 1.0]})
    with pytest.raises(ValueError, match=r"fixed_weights must be 2 non-negative numbers .* got \[nan, 1.0\]"):
        make_fusion("fixed", 2, 2, 8, 1, fixed_weights=[math.nan, 1.0])


def test_fixed_weights_written_to_float32_precision_sum_to_one():
    # float32's 1/3 is 0.33333334 (three sum to 1 + 3e-8); seven digits give 0.9999999: both within 3 float32 eps
    for weights in ([0.33333334] * 3, [0.3333333] * 3):
        g = GroupConfig.from_params({"teachers": ["A", "B", "C"], "kv": {}, "fusion": {"weights": weights}})
        assert make_fusion("fixed", 3, 2, 8, 1, fixed_weights=g.fusion.weights).fixed.tolist() == pytest.approx(
            weights, rel=2**-24
        )


def test_fusion_weights_with_another_kind_are_refused():
    with pytest.raises(ValueError, match=r"fusion weights are used only by kind 'fixed', got them with kind 'router'"):
        from_dict(FusionConfig, {"kind": "router", "weights": [0.5, 0.5]})


def _params(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_a_set_value_of_the_wrong_type_is_refused_before_anything_runs(tmp_path):
    params = _params(tmp_path, "data: {seed: 0, max_operand: 9}\n")
    with pytest.raises(TypeError, match=r"01_data.ipynb parameter seed must be an integer, got 'abc' \(str\)"):
        stage_parameters(params, "data", parse_sets(["seed=abc"]))
    with pytest.raises(ValueError, match=r"--set seed=\[1, is not valid YAML; fix it there"):
        parse_sets(["seed=[1,"])


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("{max_operand: '9'}", r"01_data.ipynb parameter max_operand must be an integer, got '9' \(str\)"),
        ("{sizes: 5}", r"01_data.ipynb parameter sizes must be a mapping, got 5 \(int\)"),
        ("{files: null}", r"01_data.ipynb parameter files must be a mapping, got None"),
    ],
)
def test_a_stage_parameter_of_the_wrong_type_is_refused(tmp_path, section, message):
    with pytest.raises(TypeError, match=message):
        stage_parameters(_params(tmp_path, f"data: {section}\n"), "data")


def test_a_float_parameter_takes_an_integer():
    check_parameters(notebook_for("statistics"), {"alpha": 1, "n_resamples": 10})


def test_a_parameter_of_a_type_the_runner_cannot_check_is_named(tmp_path):
    nb = nbformat.v4.new_notebook(
        metadata={"kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"}}
    )
    nb.cells = [nbformat.v4.new_code_cell("pair: tuple = (1, 2)  # two numbers", metadata={"tags": ["parameters"]})]
    path = tmp_path / "01_odd.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(ValueError, match=r"01_odd.ipynb declares pair: tuple; declare one of \['int', 'float'"):
        check_parameters(path, {"pair": [1, 2]})


@pytest.mark.parametrize("out_dir", ["../elsewhere", "/tmp/elsewhere", "artifacts/../../elsewhere"])
def test_an_output_path_outside_the_project_is_refused_unless_the_params_allow_it(tmp_path, out_dir):
    with pytest.raises(ValueError, match=rf"out_dir='{out_dir}' lies outside the project .*allow_outside_project"):
        stage_parameters(_params(tmp_path, f"data: {{out_dir: {out_dir}}}\n"), "data")
    allowed = _params(tmp_path, f"allow_outside_project: true\ndata: {{out_dir: {out_dir}}}\n")
    assert stage_parameters(allowed, "data") == {"out_dir": out_dir}


def test_paths_inside_the_project_and_input_paths_anywhere_are_accepted(tmp_path):
    text = "data: {out_dir: artifacts/../artifacts/data, report_dir: reports/data, files: {test: /data/gsm8k.jsonl}}\n"
    assert stage_parameters(_params(tmp_path, text), "data")["files"] == {"test": "/data/gsm8k.jsonl"}


def test_the_executed_notebook_is_named_safely_after_the_set_values():
    notebook = notebook_for("data")
    assert executed_name(notebook, {"data_dir": "/x/y", "w": [0.5, 0.5]}) == "01_data-_x_y-_0.5__0.5_"
    assert executed_name(notebook_for("latent"), {"arm": "kava-A"}) == "10_latent-kava-A"
    candidate = {"group": "C-lr1", "out_root": "a/b"}  # an output path does not name it (nor do --set-from values)
    assert executed_name(notebook_for("train"), candidate) == "05_train-C-lr1"
