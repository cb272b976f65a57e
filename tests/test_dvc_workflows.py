"""README's "Explore and experiment" workflows, run for real with DVC in scratch copies of a smoke run.

An experiment with `dvc exp run -S` re-runs only what the changed parameter feeds and `dvc exp show` lists it;
`dvc push` to a folder remote and `dvc pull` into a checkout without cache or artefacts leave nothing to do
but the always-changed `inputs` stage; the section's commands run from a fresh shell, as written.

The smoke run is the session's (conftest.py's ``smoke`` fixture runs it in build/smoke); each test works in
a copy of it, so build/smoke stays as the notebooks' smoke defaults expect it.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvlib import project_root

ROOT = project_root()
SMOKE = ROOT / "build" / "smoke"
VENV_BIN = Path(sys.executable).parent
ENV = os.environ | {"DVC_NO_ANALYTICS": "1", "PATH": os.pathsep.join([str(VENV_BIN), os.environ["PATH"]])}  # `python`
NOTHING_TO_DO = {"inputs": ["always changed"]}  # re-hashes the external inputs on every repro
TRAINING = re.compile(r"^(data|teacher|teacher_kv|train_control|alignment|train|evaluate|benchmarks)(@|$)")


def _run(*command, cwd, env=ENV):
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, f"{shlex.join(map(str, command))} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _dvc(*args, cwd):
    return _run(sys.executable, "-m", "dvc", *args, cwd=cwd)


def _status(cwd):
    return json.loads(_dvc("status", "--json", cwd=cwd).stdout)


def _stages_run(output):
    return {m.group(1) for m in re.finditer(r"^Running stage '([^']+)'", output, flags=re.MULTILINE)}


def _copy(src, dest, ignore=None):
    shutil.copytree(src, dest, symlinks=True, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def smoke_run(smoke, tmp_path_factory):
    """A copy of the session's smoke run (conftest.py), complete and up to date; build/smoke stays untouched."""
    run = _copy(SMOKE, tmp_path_factory.mktemp("smoke") / "run")
    assert _status(run) == NOTHING_TO_DO
    return run


def _git_project(run, dest):
    """A copy of the run as a git checkout of the project: git ignores what README says it does, and DVC uses git."""
    project = _copy(run, dest)
    shutil.copy(ROOT / ".gitignore", project / ".gitignore")  # /artifacts/: DVC-cached, never committed
    shutil.copy(ROOT / ".dvc" / ".gitignore", project / ".dvc" / ".gitignore")  # the cache, tmp/, config.local
    _dvc("config", "--unset", "core.no_scm", cwd=project)  # `run_pipeline` made it with `dvc init --no-scm`
    _run("git", "init", "-q", cwd=project)
    _run("git", "config", "user.name", "kvlib tests", cwd=project)
    _run("git", "config", "user.email", "tests@kvlib.invalid", cwd=project)
    _run("git", "add", "-A", cwd=project)
    _run("git", "commit", "-q", "-m", "smoke run", cwd=project)
    assert not _run("git", "ls-files", "artifacts", ".dvc/cache", cwd=project).stdout
    return project


def _find_params(exp_show, key_path):
    """Each experiment's value of ``key_path`` in params/default.yaml, by name, from `dvc exp show --json`."""
    found = {}
    for baseline in exp_show:
        for exp in [baseline, *(r for e in baseline.get("experiments") or [] for r in e["revs"])]:
            value = ((exp.get("data") or {}).get("params") or {}).get("params/default.yaml", {}).get("data", {})
            for key in key_path.split("."):
                value = value.get(key, {}) if isinstance(value, dict) else {}
            found[exp.get("name") or exp["rev"]] = value
    return found


def test_an_experiment_reruns_only_what_its_parameter_feeds_and_exp_show_lists_it(smoke_run, tmp_path):
    project = _git_project(smoke_run, tmp_path / "project")
    assert _status(project) == NOTHING_TO_DO
    done = _dvc("exp", "run", "-S", "params/default.yaml:statistics.n_resamples=500", cwd=project)
    ran = _stages_run(done.stdout)
    assert "statistics" in ran and not {s for s in ran if TRAINING.match(s)}, done.stdout
    assert ran <= {"inputs", "statistics", "report"}, done.stdout
    exps = _find_params(json.loads(_dvc("exp", "show", "--json", cwd=project).stdout), "statistics.n_resamples")
    new = [name for name, value in exps.items() if value == 500 and name != "workspace"]
    assert len(new) == 1 and exps["workspace"] == 500, exps  # the workspace holds the last experiment's results
    assert "n_resamples" in _dvc("exp", "show", "--only-changed", cwd=project).stdout
    _run("git", "checkout", "-q", "--", ".", cwd=project)  # the workspace back to the committed baseline
    _dvc("exp", "apply", new[0], cwd=project)
    assert "n_resamples: 500" in (project / "params" / "default.yaml").read_text()


def _tracked_by_git(run):
    """What a git clone of the run gives another machine: no DVC cache, no artefacts."""

    def ignore(folder, names):
        if Path(folder) == run:
            return {"artifacts"} & set(names)
        if Path(folder) == run / ".dvc":
            return {"cache", "tmp"} & set(names)
        return set()

    return ignore


def test_a_folder_remote_shares_the_cache_and_pull_leaves_nothing_to_do(smoke_run, tmp_path):
    first, second, remote = tmp_path / "first", tmp_path / "second", tmp_path / "remote"
    _copy(smoke_run, first)
    _dvc("remote", "add", "-d", "shared", str(remote), cwd=first)
    _dvc("push", cwd=first)
    _copy(first, second, ignore=_tracked_by_git(first))
    assert not (second / "artifacts").exists() and not (second / ".dvc" / "cache").exists()
    assert set(_status(second)) > set(NOTHING_TO_DO)  # outputs missing: the stages that make them would re-run
    _dvc("pull", cwd=second)
    assert _status(second) == NOTHING_TO_DO
    pulled = sorted(p.relative_to(second) for p in (second / "artifacts").rglob("*") if p.is_file())
    assert pulled == sorted(p.relative_to(first) for p in (first / "artifacts").rglob("*") if p.is_file())
    assert all((second / p).read_bytes() == (first / p).read_bytes() for p in pulled)


def _readme_section_commands():
    """The commands of the first bash block under "## Explore and experiment", comments removed."""
    section = (ROOT / "README.md").read_text().split("## Explore and experiment", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_readme_says_how_a_fresh_shell_gets_the_venv():
    commands = _readme_section_commands()
    assert commands[0] == "source .venv/bin/activate"
    assert "PATH=.venv/bin:$PATH" in (ROOT / "README.md").read_text()
    assert {"dvc status", "dvc metrics show"} <= set(commands) and any(
        c.startswith("dvc plots show -o ") for c in commands
    )


@pytest.mark.parametrize("venv", ["source .venv/bin/activate &&", "PATH=.venv/bin:$PATH"])
def test_the_explore_commands_run_as_written_from_a_fresh_shell(smoke_run, tmp_path, venv):
    project = _copy(smoke_run, tmp_path / "project")
    (project / ".venv").symlink_to(VENV_BIN.parent)  # the project's own .venv, as after `make install`
    shell = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}  # no venv active, none on PATH
    shell["PATH"] = os.pathsep.join(p for p in shell["PATH"].split(os.pathsep) if Path(p) != VENV_BIN)
    plots = tmp_path / "plots"
    for command in _readme_section_commands()[1:]:
        command = command.replace("/tmp/kvlib_plots", str(plots))
        done = _run("bash", "-c", f"{venv} {command}", cwd=project, env=shell)
        if command == "dvc metrics show":
            assert "reports/metrics/accuracy.json" in done.stdout, done.stdout
    assert (plots / "index.html").is_file()
    assert _status(project) == NOTHING_TO_DO
