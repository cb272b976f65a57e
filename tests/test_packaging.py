import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["dev"]


def test_every_dependency_is_pinned_exactly():
    loose = [d for d in pyproject_pins() if not re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][0-9A-Za-z.]*", d)]
    assert not loose, f"pin these exactly (name==version): {loose}"


def test_environment_yml_carries_the_same_pins_as_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(p for p in pip if "==" in p) == sorted(pyproject_pins())
    assert "-e ." in pip


def test_makefile_installs_torch_first_from_the_pyproject_pin():
    makefile = (ROOT / "Makefile").read_text()
    assert not re.search(r"torch==\d", makefile)  # the pin lives in pyproject.toml only
    torch_step = makefile.index("grep -o '\"torch==")
    assert torch_step < makefile.index('pip install -e ".[dev]"')
