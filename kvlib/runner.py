"""Run one pipeline stage: its notebook, executed by papermill with the stage's section of a params file.

    python -m kvlib.runner alignment --params params/default.yaml
    python -m kvlib.runner train --params params/default.yaml --set group=G1 --set seed=0
    python -m kvlib.runner pipeline --params params/smoke.yaml --workdir build/smoke

The notebook is ``notebooks/NN_<stage>.ipynb`` of the project root (``kvlib.project_root``, the folder
holding ``dvc.yaml`` at or above the working directory); its parameters are the keys of section
``<stage>`` of the params file, updated by ``--set name=value`` (values parsed as YAML) for the items
of a generated stage. Names the notebook's ``parameters`` cell does not declare are rejected before
anything runs (papermill itself only warns). The executed notebook and an HTML copy for readers
without Jupyter are written to ``reports/notebooks/`` (named after the stage and the ``--set``
values). The kernel runs in the project root.

``pipeline`` runs the whole DVC pipeline on another params file in a separate working folder (a copy
of ``dvc.yaml``, the notebooks, ``kvlib`` and ``params/accelerate`` with that file as
``params/default.yaml``), so that a smoke run or a real-model run never touches the default study's
``reports/``. Its notebooks import the copied ``kvlib`` (the kernel runs in the folder), the code its
``dvc.lock`` records.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbconvert
import papermill
import yaml

from kvlib import project_root


def notebook_for(stage: str, root: Path | None = None) -> Path:
    """The notebook of ``stage``: the single ``notebooks/NN_<stage>.ipynb``."""
    notebooks = (root or project_root()) / "notebooks"
    found = sorted(notebooks.glob(f"[0-9][0-9]_{stage}.ipynb"))
    if len(found) != 1:
        stages = sorted(p.stem.split("_", 1)[1] for p in notebooks.glob("[0-9][0-9]_*.ipynb"))
        raise ValueError(f"no single notebook for stage {stage!r} in {notebooks}; stages: {stages}")
    return found[0]


def stage_parameters(params_file: str | Path, stage: str) -> dict:
    """Section ``stage`` of a YAML params file."""
    params = yaml.safe_load(Path(params_file).read_text()) or {}
    if stage not in params or not isinstance(params[stage], dict):
        raise ValueError(f"{params_file} has no section {stage!r}; its sections: {sorted(params)}")
    return params[stage]


def check_parameters(notebook: Path, parameters: dict) -> None:
    """Reject parameter names the notebook does not declare, listing the ones it does."""
    declared = papermill.inspect_notebook(str(notebook))
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(f"{notebook.name} has no parameters {unknown}; it declares {sorted(declared)}")


def parse_sets(items: list[str]) -> dict:
    """``["seed=1", "group=G1"]`` -> ``{"seed": 1, "group": "G1"}`` (values parsed as YAML)."""
    parsed = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set takes name=value, got {item!r}")
        parsed[name] = yaml.safe_load(value)
    return parsed


def run_stage(stage: str, params_file: str | Path, sets: dict | None = None, executed_dir: Path | None = None) -> Path:
    """Execute the stage's notebook with its parameters (updated by ``sets``); returns the executed notebook."""
    root = project_root()
    notebook = notebook_for(stage, root)
    sets = sets or {}
    parameters = stage_parameters(params_file, stage) | sets
    check_parameters(notebook, parameters)
    executed_dir = executed_dir or root / "reports" / "notebooks"
    executed_dir.mkdir(parents=True, exist_ok=True)
    out = (executed_dir / "-".join([notebook.stem, *(str(v) for v in sets.values())])).with_suffix(".ipynb")
    print(f"[kvlib] stage {stage} {sets or ''}: {notebook.name} with {params_file}", flush=True)
    papermill.execute_notebook(
        str(notebook), str(out), parameters=parameters, cwd=str(root), log_output=True, progress_bar=False
    )
    body, _ = nbconvert.HTMLExporter(template_name="basic").from_filename(str(out))
    head = f'<head><meta charset="utf-8"><title>{out.stem}</title></head>'
    out.with_suffix(".html").write_text(f"<!DOCTYPE html>\n<html>{head}<body>{body}</body></html>\n")
    return out


def run_pipeline(params_file: str | Path, workdir: str | Path) -> Path:
    """``dvc repro`` of the whole pipeline on ``params_file`` inside ``workdir``; returns ``workdir``."""
    root, workdir, params_file = project_root(), Path(workdir).resolve(), Path(params_file).resolve()
    if workdir == root:
        raise ValueError(f"workdir {workdir} is the project itself; run `make pipeline` there instead")
    (workdir / "params").mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "dvc.yaml", workdir / "dvc.yaml")
    shutil.copy(root / ".dvcignore", workdir / ".dvcignore")
    shutil.copy(params_file, workdir / "params" / "default.yaml")
    shutil.rmtree(workdir / "params" / "accelerate", ignore_errors=True)  # launchers the params may name
    shutil.copytree(root / "params" / "accelerate", workdir / "params" / "accelerate")
    for folder in ("notebooks", "kvlib"):
        shutil.rmtree(workdir / folder, ignore_errors=True)
        shutil.copytree(root / folder, workdir / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # stages call `python`
    env = os.environ | {"DVC_NO_ANALYTICS": "1", "PATH": path}
    dvc = [sys.executable, "-m", "dvc"]
    if not (workdir / ".dvc").exists():
        subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=workdir, check=True, env=env)
    subprocess.run([*dvc, "repro"], cwd=workdir, check=True, env=env)
    return workdir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", help="a stage (its notebook notebooks/NN_<stage>.ipynb), or 'pipeline'")
    parser.add_argument("--params", default="params/default.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override one parameter")
    parser.add_argument("--workdir", help="pipeline only: the folder to run the whole pipeline in")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # papermill streams each cell's output
    if args.stage == "pipeline":
        if not args.workdir:
            parser.error("pipeline needs --workdir")
        run_pipeline(args.params, args.workdir)
    else:
        run_stage(args.stage, args.params, parse_sets(args.set))


if __name__ == "__main__":
    sys.exit(main())
