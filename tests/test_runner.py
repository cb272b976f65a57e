import ast
import json

import nbformat
import papermill
import pytest
import yaml

from kvlib import project_root
from kvlib.runner import check_parameters, notebook_for, parse_sets, run_stage, stage_parameters

ROOT = project_root()
PARAMS = sorted((ROOT / "params").glob("*.yaml"))
STAGE_NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    return tagged[0]


@pytest.mark.parametrize("path", STAGE_NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", STAGE_NOTEBOOKS, ids=lambda p: p.name)
def test_every_parameter_is_typed_commented_and_seen_by_papermill(path):
    source = parameters_cell(path).source
    declared = [n.target.id for n in ast.parse(source).body if isinstance(n, ast.AnnAssign)]
    assert len(declared) == len(source.strip().splitlines()), "one typed assignment per line"
    assert all("  # " in line for line in source.splitlines()), "every parameter needs a comment"
    assert sorted(declared) == sorted(papermill.inspect_notebook(str(path)))


@pytest.mark.parametrize("params_file", PARAMS, ids=lambda p: p.name)
def test_params_sections_name_only_declared_parameters(params_file):
    params = yaml.safe_load(params_file.read_text())
    for stage, section in params.items():
        if stage != "study":
            check_parameters(notebook_for(stage), section)


def test_dvc_stages_run_their_notebooks_with_their_params_section():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        body = stage.get("do", stage)
        cmd = body["cmd"].split()
        assert cmd[:4] == ["python", "-m", "kvlib.runner", cmd[3]] and cmd[4:6] == ["--params", "params/default.yaml"]
        assert str(notebook_for(cmd[3]).relative_to(ROOT)) in body["deps"]


def test_sets_are_parsed_as_yaml():
    assert parse_sets(["seed=1", "group=G1", "w=[0.5, 0.5]", "path="]) == {
        "seed": 1,
        "group": "G1",
        "w": [0.5, 0.5],
        "path": None,
    }


def test_run_stage_executes_the_notebook_and_exports_html(tmp_path):
    params = tmp_path / "params.yaml"
    sizes = {"teacher_train": 4, "student_train": 4, "validation": 2, "test": 2}
    section = {"sizes": sizes, "out_dir": str(tmp_path / "data"), "report_dir": str(tmp_path / "report")}
    params.write_text(yaml.safe_dump({"data": section}))
    executed = run_stage("data", params, {"seed": 3}, executed_dir=tmp_path / "executed")
    assert executed == tmp_path / "executed" / "01_data-3.ipynb"
    assert executed.with_suffix(".html").read_text().startswith("<!DOCTYPE html>")
    splits = json.loads((tmp_path / "report" / "splits.json").read_text())
    assert {name: s["n"] for name, s in splits.items()} == sizes


def test_unknown_stage_lists_the_stages():
    with pytest.raises(ValueError, match=r"no single notebook for stage 'trian'.*'alignment'"):
        notebook_for("trian")


def test_missing_params_section_lists_the_sections(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("alignment: {threads: 1}\n")
    with pytest.raises(ValueError, match=r"has no section 'teacher'; its sections: \['alignment'\]"):
        stage_parameters(params, "teacher")


def test_unknown_parameter_is_rejected_before_running():
    with pytest.raises(ValueError, match=r"has no parameters \['sede'\]; it declares \[.*'seed'"):
        check_parameters(notebook_for("data"), {"sede": 1})


def test_sets_need_a_name_and_an_equals_sign():
    with pytest.raises(ValueError, match="--set takes name=value, got 'seed'"):
        parse_sets(["seed"])


def test_project_root_is_found_from_a_subfolder_and_required(tmp_path):
    assert project_root(ROOT / "notebooks") == ROOT
    with pytest.raises(ValueError, match="no dvc.yaml in .* or above it"):
        project_root(tmp_path)


def test_training_stages_depend_on_every_module_their_results_come_from():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    outside = {"runner.py", "stats.py", "report.py", "analysis.py", "benchmark.py"}  # no trained result uses them
    modules = {f"kvlib/{p.name}" for p in (ROOT / "kvlib").glob("*.py") if p.name not in outside}
    for name in ("teacher", "teacher_kv", "train_control", "train", "evaluate"):
        body = stages[name].get("do", stages[name])
        assert modules <= set(body["deps"]), f"{name} misses {sorted(modules - set(body['deps']))}"
