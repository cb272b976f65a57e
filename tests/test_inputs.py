"""Inputs from outside the project are tracked by content: replacing one in place re-runs what it feeds."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kvlib import project_root
from kvlib.inputs import content_sha256, external_inputs, write_inputs

ROOT = project_root()
GSM8K = {"question": "Ann has 3 pens and buys 4. How many?", "answer": "She has <<3+4=7>>7.\n#### 7"}


def _checkpoint(folder):
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    return folder


def test_a_directory_hash_changes_when_a_file_in_it_is_rewritten_in_place_and_not_otherwise(tmp_path):
    folder = _checkpoint(tmp_path / "ckpt")
    before = content_sha256(folder)
    (folder / "model.safetensors").write_bytes(b"\0" * 64)  # the same bytes again
    assert content_sha256(folder) == before
    (folder / "model.safetensors").write_bytes(b"\0" * 63 + b"\1")
    assert content_sha256(folder) != before
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "extra.json").write_text("{}")
    assert content_sha256(folder) != before


def test_each_consumer_gets_the_inputs_the_params_name_for_it():
    params = {
        "data": {"files": {"test": "/d/test.jsonl", "student_train": "/d/train.jsonl"}},
        "teacher": {"teachers": {"A": {"path": "/m/qwen"}, "B": {"shape": {}, "tokenizer": {}}}},
        "train": {"student": {"path": "/m/llama"}},
        "latent": {"student": {"path": "/m/qwen-small"}},
    }
    assert external_inputs(params) == {
        "data": {"data.files.test": "/d/test.jsonl", "data.files.student_train": "/d/train.jsonl"},
        "teacher-A": {"teacher.teachers.A.path": "/m/qwen"},
        "teacher-B": {},
        "student": {"train.student.path": "/m/llama"},
        "latent_student": {"latent.student.path": "/m/qwen-small"},
    }


def test_write_inputs_records_each_files_hash_the_machine_and_drops_consumers_gone(tmp_path):
    model = _checkpoint(tmp_path / "ckpt")
    out = tmp_path / "inputs"
    out.mkdir()
    (out / "teacher-C.json").write_text("{}")  # a teacher the params no longer have
    written = write_inputs({"teacher": {"teachers": {"A": {"path": str(model)}}}}, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "data.json",
        "latent_student.json",
        "machine.json",
        "student.json",
        "teacher-A.json",
    ]
    record = json.loads((out / "teacher-A.json").read_text())
    assert record == {"teacher.teachers.A.path": {"path": str(model), "sha256": content_sha256(model)}}
    assert written["machine"]["cpus"] >= 1 and written["machine"]["torch"].startswith("2.")


def test_a_missing_input_is_refused_naming_its_key(tmp_path):
    params = {"data": {"files": {"test": str(tmp_path / "nowhere.jsonl")}}}
    with pytest.raises(ValueError, match=r"data.files.test names .*nowhere.jsonl, which does not exist; fix the path"):
        write_inputs(params, tmp_path / "inputs")


def _dvc(*args, cwd):
    env = os.environ | {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}  # `python`
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_replacing_a_gsm8k_file_in_place_makes_dvc_rerun_the_data_stage(tmp_path):
    project, gsm8k = tmp_path / "project", tmp_path / "gsm8k.jsonl"
    gsm8k.write_text(json.dumps(GSM8K) + "\n")
    project.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, project / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("kvlib", "notebooks", "params"):
        shutil.copytree(ROOT / name, project / name, ignore=ignore)
    params = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    params["data"]["files"] = {"test": str(gsm8k)}
    params["data"]["sizes"]["test"] = 1
    (project / "params" / "default.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc("init", "--no-scm", "-q", cwd=project)
    _dvc("repro", "data", cwd=project)  # runs the inputs stage, then the data stage
    assert "data:" not in _dvc("status", "data", cwd=project).stdout
    gsm8k.write_text(json.dumps(GSM8K | {"question": "Bo has 2 pens and buys 5. How many?"}) + "\n")
    _dvc("repro", "inputs", cwd=project)
    status = _dvc("status", "data", cwd=project).stdout
    assert "data:" in status and "reports/inputs/data.json" in status
    _dvc("repro", "data", cwd=project)
    splits = json.loads((project / "reports" / "data" / "splits.json").read_text())
    assert splits["test"]["source"]["sha256"] == content_sha256(gsm8k)
