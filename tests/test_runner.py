import ast
import json
from pathlib import Path

import nbformat
import pytest
import yaml

from kvlib.runner import NOTEBOOKS, ROOT, check_parameters, notebook_for, parse_sets, run_stage, stage_parameters

PARAMS = sorted((ROOT / "params").glob("*.yaml"))
STAGE_NOTEBOOKS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def parameters_cell(path: Path):
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
    import papermill

    source = parameters_cell(path).source
    declared = [n.target.id for n in ast.parse(source).body if isinstance(n, ast.AnnAssign)]
    assert len(declared) == len(source.strip().splitlines()), "one typed assignment per line"
    assert all("  # " in line for line in source.splitlines()), "every parameter needs a comment"
    assert sorted(declared) == sorted(papermill.inspect_notebook(str(path)))


@pytest.mark.parametrize("params_file", PARAMS, ids=lambda p: p.name)
def test_params_files_name_only_declared_parameters(params_file):
    params = yaml.safe_load(params_file.read_text())
    for stage, section in params.items():
        check_parameters(notebook_for(stage), section)


def test_dvc_stages_run_the_notebooks_with_their_params_section():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        nb = notebook_for(name)
        assert stage["cmd"] == f"python -m kvlib.runner {name} --params params/default.yaml"
        assert str(nb.relative_to(ROOT)) in stage["deps"]
        assert {"params/default.yaml": [name]} in stage["params"]


def test_run_stage_executes_the_notebook_and_exports_html(tmp_path):
    params = tmp_path / "params.yaml"
    out_dir = tmp_path / "alignment"
    params.write_text(yaml.safe_dump({"alignment": {"seq_len": 8, "num_sequences": 2, "out_dir": str(out_dir)}}))
    executed = run_stage("alignment", params, executed_dir=tmp_path / "executed")
    assert executed == tmp_path / "executed" / "04_alignment.ipynb"
    assert executed.with_suffix(".html").read_text().startswith("<!DOCTYPE html>")
    summary = json.loads((out_dir / "alignment.json").read_text())
    assert summary["models"]["teacher"]["model_type"] == "qwen2"
    assert {"cka.png", "layer_maps.png", "heads.png", "time_alignment.png"} <= {p.name for p in out_dir.iterdir()}


def test_unknown_stage_lists_the_stages():
    with pytest.raises(ValueError, match=r"no single notebook for stage 'trian'.*'alignment'"):
        notebook_for("trian")


def test_missing_params_section_lists_the_sections(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("alignment: {seed: 1}\n")
    with pytest.raises(ValueError, match=r"has no section 'teachers'; its sections: \['alignment'\]"):
        stage_parameters(params, "teachers")


def test_unknown_parameter_is_rejected_before_running():
    with pytest.raises(ValueError, match=r"has no parameters \['sede'\]; it declares \[.*'seed'"):
        check_parameters(notebook_for("alignment"), {"sede": 1})


def test_sets_are_parsed_as_yaml():
    assert parse_sets(["seed=1", "group=G1", "w=[0.5, 0.5]", "path="]) == {
        "seed": 1,
        "group": "G1",
        "w": [0.5, 0.5],
        "path": None,
    }


def test_sets_need_a_name_and_an_equals_sign():
    with pytest.raises(ValueError, match="--set takes name=value, got 'seed'"):
        parse_sets(["seed"])
