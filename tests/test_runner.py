import ast
import json
import os
import stat
from pathlib import Path

import matplotlib.pyplot as plt
import nbformat
import papermill
import pytest
import yaml
from test_kvstore import SPEC, synthetic_batch

from kvlib import project_root
from kvlib.config import OPTIONS, load_params
from kvlib.files import atomic_write, save_figure, write_text
from kvlib.kvstore import write_store
from kvlib.runner import (
    MARKER,
    check_parameters,
    execute,
    notebook_for,
    parse_sets,
    parse_takes,
    run_pipeline,
    run_stage,
    stage_parameters,
)

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
def test_params_sections_pass_every_check_before_running(params_file):
    params = load_params(params_file)
    assert not set(params) & set(OPTIONS), "shipped params keep their outputs inside the project"
    for stage in sorted(set(params) - {"study"}):
        assert stage_parameters(params_file, stage) == params[stage]


def test_dvc_stages_run_their_notebooks_with_their_params_section():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        cmd = body["cmd"].split()
        if name == "inputs":  # hashes what the params name outside the project (kvlib.inputs); no notebook
            assert cmd == ["python", "-m", "kvlib.inputs", "--params", "params/default.yaml", "--out", "reports/inputs"]
            continue
        assert cmd[:4] == ["python", "-m", "kvlib.runner", cmd[3]] and cmd[4:6] == ["--params", "params/default.yaml"]
        assert str(notebook_for(cmd[3]).relative_to(ROOT)) in body["deps"]


def test_sets_are_parsed_as_yaml():
    assert parse_sets(["seed=1", "group=G1", "w=[0.5, 0.5]", "path="]) == {
        "seed": 1,
        "group": "G1",
        "w": [0.5, 0.5],
        "path": None,
    }


def test_run_stage_executes_the_notebook_and_exports_styled_html_with_a_quiet_log(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("PYTEST_CURRENT_TEST")  # else the kernel leaves its stdout and stderr to pytest's capture
    params = tmp_path / "params.yaml"
    sizes = {"teacher_train": 4, "student_train": 4, "validation": 2, "test": 2}
    section = {"sizes": sizes, "out_dir": str(tmp_path / "data"), "report_dir": str(tmp_path / "report")}
    params.write_text(yaml.safe_dump({"allow_outside_project": True, "data": section}))
    stale = tmp_path / "executed" / "01_data-3.failed.ipynb"  # an earlier failed run's notebook
    stale.parent.mkdir()
    stale.write_text("{}")
    executed = run_stage("data", params, {"seed": 3}, executed_dir=tmp_path / "executed")
    assert executed == tmp_path / "executed" / "01_data-3.ipynb"
    assert sorted(p.name for p in executed.parent.iterdir()) == ["01_data-3.html", "01_data-3.ipynb"]
    html = executed.with_suffix(".html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<title>01_data-3</title>" in html
    assert html.count("<style") >= 2 and ".jp-Notebook" in html  # JupyterLab's stylesheet, inline
    splits = json.loads((tmp_path / "report" / "splits.json").read_text())
    assert {name: s["n"] for name, s in splits.items()} == sizes
    out, err = capfd.readouterr()
    assert "teacher_train       4 examples" in out  # what the cells print is streamed
    assert out.count("[kvlib]") == 2 and "Executing Cell" not in out + err and "Input Notebook" not in out + err
    assert err == ""  # no kernel warnings, no KeyboardInterrupt at its shutdown


def test_bars_reach_the_runners_stderr_from_kernel_and_subprocess_and_stay_out_of_the_notebook(
    tmp_path, capfd, monkeypatch
):
    monkeypatch.delenv("PYTEST_CURRENT_TEST")  # else the kernel leaves its stdout and stderr to pytest's capture
    child = "from kvlib.progress import progress\nfor _ in progress(range(2), desc='child bar'): pass"
    cells = [
        "n: int = 1  # bar length",
        "import subprocess, sys\nfrom kvlib.progress import progress\nfor _ in progress(range(n), desc='kernel bar'):\n"
        f"    print('a cell prints')\nsubprocess.run([sys.executable, '-c', {child!r}], check=True)",
        "log = get_ipython().kernel.log\nlog.error('KeyboardInterrupt caught in kernel.')\nlog.error('a real error')",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "bars.ipynb")
    execute(tmp_path / "bars.ipynb", tmp_path / "out.ipynb", {"n": 3}, ROOT)
    out, err = capfd.readouterr()
    assert out == "a cell prints\n" * 3
    assert "kernel bar: 100%" in err and "3/3" in err and "child bar: 100%" in err
    assert "a real error" in err and "KeyboardInterrupt" not in err  # only the shutdown's false one is dropped
    streams = [o for c in nbformat.read(tmp_path / "out.ipynb", as_version=4).cells for o in c.get("outputs", [])]
    assert "".join(o.get("text", "") for o in streams) == "a cell prints\n" * 3


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


def test_set_from_takes_a_list_from_the_params_file_and_names_a_missing_key():
    params = load_params(ROOT / "params" / "default.yaml")
    takes = parse_takes(["seeds=study.tuning.seeds"])
    parameters = stage_parameters(ROOT / "params" / "default.yaml", "train", {"group": "S-lr1"}, takes=takes)
    assert parameters == params["train"] | {"group": "S-lr1", "seeds": params["study"]["tuning"]["seeds"]}
    with pytest.raises(
        ValueError, match=r"--set-from names study.tuning.seed, but study.tuning has no 'seed' \(found: \['groups"
    ):
        stage_parameters(ROOT / "params" / "default.yaml", "train", takes={"seeds": "study.tuning.seed"})
    with pytest.raises(ValueError, match="--set-from takes name=section.key, got 'seeds='"):
        parse_takes(["seeds="])


def test_a_value_a_stage_takes_from_the_params_is_among_its_dvc_params():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    taken = 0
    for stage in stages.values():
        body = stage.get("do", stage)
        cmd = body["cmd"].split()
        for i in [i for i, word in enumerate(cmd) if word == "--set-from"]:
            path = cmd[i + 1].partition("=")[2]
            assert path in body["params"][0]["params/default.yaml"], (body["cmd"], path)  # a change re-runs it
            taken += 1
    assert taken >= 4  # the student stages take their seeds


def test_sets_need_a_name_and_an_equals_sign():
    with pytest.raises(ValueError, match="--set takes name=value, got 'seed'"):
        parse_sets(["seed"])


def test_project_root_is_found_from_a_subfolder_and_required(tmp_path):
    assert project_root(ROOT / "notebooks") == ROOT
    with pytest.raises(ValueError, match="no dvc.yaml in .* or above it"):
        project_root(tmp_path)


def test_a_failed_stage_keeps_the_previous_notebook_and_its_own_under_a_failed_name(tmp_path, capfd):
    params = tmp_path / "params.yaml"
    section = {"files": {"test": str(tmp_path / "missing.jsonl")}}
    section |= {"out_dir": str(tmp_path / "data"), "report_dir": str(tmp_path / "report")}
    params.write_text(yaml.safe_dump({"allow_outside_project": True, "data": section}))
    executed = tmp_path / "executed"
    executed.mkdir()
    for name in ("01_data.ipynb", "01_data.html"):
        (executed / name).write_text("the previous complete run")
    with pytest.raises(papermill.PapermillExecutionError, match="missing.jsonl"):
        run_stage("data", params, executed_dir=executed)
    assert sorted(p.name for p in executed.iterdir()) == ["01_data.failed.ipynb", "01_data.html", "01_data.ipynb"]
    assert all(
        (executed / name).read_text() == "the previous complete run" for name in ("01_data.ipynb", "01_data.html")
    )
    failed = nbformat.read(executed / "01_data.failed.ipynb", as_version=4)
    assert any(o.get("output_type") == "error" for c in failed.cells for o in c.get("outputs", []))
    assert (
        f"[kvlib] stage data failed; its executed notebook is {executed / '01_data.failed.ipynb'}"
        in capfd.readouterr().out
    )


def test_atomic_writes_give_files_the_mode_a_plain_open_would(tmp_path):
    fig = plt.figure()
    old = os.umask(0o027)
    try:
        write_text(tmp_path / "a.txt", "x")
        atomic_write(tmp_path / "b.bin", lambda tmp: Path(tmp).write_bytes(b"x"))
        save_figure(fig, tmp_path / "c.png")
        write_store(tmp_path / "kv", [synthetic_batch(0, [3, 2])], SPEC, meta={})
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
        plt.close(fig)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 6  # four files, the store's manifest and its shard
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o640}


def test_a_figure_that_fails_to_render_leaves_the_previous_file_and_no_temp_file(tmp_path, monkeypatch):
    fig = plt.figure()
    save_figure(fig, tmp_path / "f.png")
    before = (tmp_path / "f.png").read_bytes()
    assert before.startswith(b"\x89PNG")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fig, "savefig", full)
    with pytest.raises(OSError, match="No space left"):
        save_figure(fig, tmp_path / "f.png")
    plt.close(fig)
    assert (tmp_path / "f.png").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_the_pipeline_refuses_a_folder_it_did_not_create_and_leaves_it_untouched(tmp_path):
    (tmp_path / "kvlib").mkdir()
    (tmp_path / "kvlib" / "mine.py").write_text("my work")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(ValueError, match=r"is not empty and was not created by kvlib.runner .*choose an empty or new"):
        run_pipeline(ROOT / "params" / "smoke.yaml", tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["dvc.yaml", "kvlib", "kvlib/mine.py"]
    assert (tmp_path / "kvlib" / "mine.py").read_text() == "my work"


def test_the_pipeline_marks_its_folder_reuses_it_and_checks_every_section_before_dvc(tmp_path):
    params = load_params(ROOT / "params" / "smoke.yaml")
    params["benchmarks"]["threads"] = "2"  # the last stage: found before any training
    bad = tmp_path / "smoke.yaml"
    bad.write_text(yaml.safe_dump(params, sort_keys=False))  # the study's order is part of it
    workdir = tmp_path / "run"
    for _ in range(2):  # a new folder, then the same folder again (now holding the marker)
        with pytest.raises(TypeError, match=r"09_benchmarks.ipynb parameter threads must be an integer, got '2'"):
            run_pipeline(bad, workdir)
    assert (workdir / MARKER).is_file() and (workdir / "params" / "accelerate" / "multi_gpu.yaml").is_file()
    assert load_params(workdir / "params" / "default.yaml") == params and not (workdir / ".dvc").exists()
