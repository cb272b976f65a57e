"""Run one pipeline stage: its notebook, executed by papermill with the stage's section of a params file.

    python -m kvlib.runner alignment --params params/default.yaml
    python -m kvlib.runner train --params params/default.yaml --set group=G1 --set seed=0

The notebook is ``notebooks/NN_<stage>.ipynb``; its parameters are the keys of section ``<stage>``
of the params file, updated by ``--set name=value`` (values parsed as YAML) for the items of a
generated stage. Names the notebook's ``parameters`` cell does not declare are rejected before
anything runs (papermill itself only warns). The executed notebook and an HTML copy for readers
without Jupyter are written to ``reports/notebooks/`` (named after the stage and the ``--set`` values).
The kernel runs in the project root.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbconvert
import papermill
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
EXECUTED = ROOT / "reports" / "notebooks"


def notebook_for(stage: str) -> Path:
    """The notebook of ``stage``: the single ``notebooks/*_<stage>.ipynb``."""
    found = sorted(NOTEBOOKS.glob(f"[0-9][0-9]_{stage}.ipynb"))
    if len(found) != 1:
        stages = sorted(p.stem.split("_", 1)[1] for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
        raise ValueError(f"no single notebook for stage {stage!r} in {NOTEBOOKS}; stages: {stages}")
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


def run_stage(stage: str, params_file: str | Path, sets: dict | None = None, executed_dir: Path = EXECUTED) -> Path:
    """Execute the stage's notebook with its parameters (updated by ``sets``); returns the executed notebook."""
    notebook = notebook_for(stage)
    sets = sets or {}
    parameters = stage_parameters(params_file, stage) | sets
    check_parameters(notebook, parameters)
    executed_dir.mkdir(parents=True, exist_ok=True)
    out = executed_dir / "-".join([notebook.stem, *(str(v) for v in sets.values())])
    out = out.with_suffix(".ipynb")
    print(f"[kvlib] stage {stage}: {notebook.relative_to(ROOT)} with {params_file}", flush=True)
    papermill.execute_notebook(str(notebook), str(out), parameters=parameters, cwd=str(ROOT), progress_bar=True)
    html, _ = nbconvert.HTMLExporter().from_filename(str(out))
    out.with_suffix(".html").write_text(html)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage")
    parser.add_argument("--params", default=str(ROOT / "params" / "default.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override one parameter")
    args = parser.parse_args(argv)
    run_stage(args.stage, args.params, parse_sets(args.set))


if __name__ == "__main__":
    sys.exit(main())
