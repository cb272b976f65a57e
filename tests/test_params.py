"""The params files: every section validated by the configs it feeds, and the study consistent across stages."""

import ast
import json

import papermill
import pytest

from kvlib import project_root
from kvlib.config import ModelConfig, check_study, load_params
from kvlib.distill import GroupConfig
from kvlib.tuning import resolve_group

PARAMS = sorted((project_root() / "params").glob("*.yaml"))


@pytest.fixture(params=PARAMS, ids=lambda p: p.name)
def params(request):
    return load_params(request.param)


def test_models_and_groups_are_valid_configs(params):
    for teacher in params["teacher"]["teachers"].values():
        ModelConfig.from_params(teacher)
    student = ModelConfig.from_params(params["train"]["student"])
    assert student.train is not None
    first = {
        family: {"settings": params["train"]["groups"][names[0]]}
        for family, names in params["tune"]["families"].items()
    }
    groups = {
        name: GroupConfig.from_params(resolve_group(params["train"]["groups"], name, first))
        for name in params["train"]["groups"]
    }
    teachers = set(params["teacher"]["teachers"])
    assert all(set(g.teachers) <= teachers for g in groups.values())


def test_the_study_agrees_with_every_stage(params):
    check_study(params)
    study = params["study"]
    every = [study["control"], *study["groups"]]
    roles = [*every, *study["tuning"]["groups"], *study["secondary"]["groups"]]
    assert sorted(params["train"]["groups"]) == sorted(roles)
    assert params["evaluate"]["groups"] == every and params["evaluate"]["seeds"] == study["seeds"]
    assert 0 in study["seeds"] and params["alignment"]["student_dir"] == f"artifacts/students/{study['control']}/0"
    assert list(params["report"]["plan"]["groups"]) == every + study["secondary"]["groups"]
    assert list(params["report"]["plan"]["contrasts"]) == list(params["statistics"]["primary"])
    assert params["alignment"]["teachers"] == study["teachers"] == list(params["teacher"]["teachers"])
    assert params["train"]["groups"][study["control"]] == {"tuned": "ce"}


def test_the_matched_control_differs_from_its_arm_only_by_the_shuffle(params):
    """P2's control X is S with the teacher KV shuffled in time: the same tuned settings, nothing else changed."""
    groups, primary = params["train"]["groups"], params["statistics"]["primary"]
    arm, control = primary["P2"]
    assert groups[control] == {**groups[arm], "kv": {**groups[arm].get("kv", {}), "shuffle_time": True}}


def test_curves_name_contrasts_of_the_statistics(params):
    contrasts = set(params["statistics"]["primary"]) | set(params["statistics"].get("exploratory", {}))
    for curve in params["report"]["plan"]["curves"].values():
        assert set(curve["points"].values()) <= contrasts
        assert all(float(x) > 0 for x in curve["points"])


def test_the_notebooks_smoke_defaults_are_the_smoke_params_run_in_build_smoke():
    """nbval runs each notebook with its defaults on the smoke run in build/smoke/: a default that differs from
    params/smoke.yaml (other than paths there) would resume that run's checkpoints under another config."""
    smoke = load_params(project_root() / "params" / "smoke.yaml")
    for notebook in sorted((project_root() / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        section = smoke[notebook.stem.split("_", 1)[1]]
        declared = papermill.inspect_notebook(str(notebook))
        for name, parameter in declared.items():
            default = ast.literal_eval(parameter["default"])
            if name not in section:  # an item of a generated stage (name, group, seed)
                continue
            expected = section[name]
            if isinstance(expected, str) and expected.split("/")[0] in ("artifacts", "reports"):
                expected = f"build/smoke/{expected}"
            if name != "plan":  # the report's wording may differ
                assert default == expected, f"{notebook.name}: {name} = {default!r}, smoke.yaml has {expected!r}"


ROOT = project_root()
SMOKE_BUILD = "`.venv/bin/python -m kvlib.runner pipeline --params params/smoke.yaml --workdir build/smoke`"


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_a_notebook_that_reads_the_smoke_run_says_in_its_first_cell_how_to_build_it(notebook):
    nb = json.loads(notebook.read_text())
    first = "".join(nb["cells"][0]["source"])
    reads_smoke = notebook.stem not in ("01_data", "09_benchmarks")  # these two run on their defaults alone
    assert (SMOKE_BUILD in first) == reads_smoke
    assert SMOKE_BUILD.strip("`") in (ROOT / "README.md").read_text()
