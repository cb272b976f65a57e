"""Run one pipeline stage: its notebook, executed by papermill with the stage's section of a params file.

    python -m kvlib.runner alignment --params params/default.yaml
    python -m kvlib.runner train --params params/default.yaml --set group=G1 --set seed=0
    python -m kvlib.runner pipeline --params params/smoke.yaml --workdir build/smoke

The notebook is ``notebooks/NN_<stage>.ipynb`` of the project root (``kvlib.project_root``, the folder
holding ``dvc.yaml`` at or above the working directory); its parameters are the keys of section
``<stage>`` of the params file (read by ``kvlib.config.load_params``), updated by ``--set name=value``
(values parsed as the same YAML) for the items of a generated stage, and by ``--set-from name=section.key``, a
value taken from elsewhere in the same file (a list, which DVC cannot put into a command: ``--set-from
seeds=study.seeds``). Before anything runs
(``stage_parameters``): the ``study`` section must agree with the others (``kvlib.config.check_study``);
names the notebook's ``parameters`` cell does not declare are rejected (papermill itself only warns), and
each value must have the type the cell declares (``seed: int = 0``: ``--set seed=abc`` is refused); the
stage's output paths (``OUTPUTS``), taken from the project root, must lie inside it (checked on the
path's text, so an ``artifacts/`` that is a symlink to another disk is fine) unless the params file sets
``allow_outside_project: true`` at its top level. Input paths may be anywhere.

The log holds what the cells print and one ``[kvlib]`` line at the start and the end of the stage (``execute``);
``kvlib.progress`` bars of the kernel and of its subprocesses come to the runner's stderr. The executed notebook
and an HTML copy for readers without Jupyter (nbconvert's ``lab`` template: JupyterLab's styles inline) are
written to ``reports/notebooks/``, named after the stage and the ``--set`` values (characters other than letters,
digits and ``._=-`` replaced by ``_``, so ``--set data_dir=/x/y`` names ``01_data-_x_y``; output paths such as
``out_root`` and ``--set-from`` values are left out of the name). Papermill
writes ``<name>.running.ipynb`` (saved after every cell: open it to follow a run) and it is renamed onto
``<name>.ipynb`` only when every cell succeeded; a failed or interrupted run leaves the previous
complete notebook in place (under ``dvc repro``, DVC has removed a stage's outputs before it starts) and
its own as ``<name>.failed.ipynb`` for debugging (removed by the next successful run). The HTML is
written atomically (``kvlib.files``). The kernel runs in the project root.

``pipeline`` runs the whole DVC pipeline on another params file in a separate working folder (a copy
of ``dvc.yaml``, the notebooks, ``kvlib`` and ``params/accelerate`` with that file as
``params/default.yaml``), so that a smoke run or a real-model run never touches the default study's
``reports/``. The folder must be new, empty, or one this runner set up before (it holds ``MARKER``):
its copies are replaced on every run, so any other folder is refused rather than overwritten. Every
section of the params file is checked before DVC starts. Its notebooks import the copied ``kvlib``
(the kernel runs in the folder), the code its ``dvc.lock`` records.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbconvert
import nbformat
import papermill

from kvlib import project_root
from kvlib.config import OPTIONS, check_study, describe, load_params, matches, parse_yaml, value_at
from kvlib.files import atomic_write, write_text

OUTPUTS = ("out_dir", "out_root", "out_path", "report_dir", "report_root", "report_path")  # keys a stage writes to
TYPES = {"int": int, "float": float, "bool": bool, "str": str, "list": list, "dict": dict}  # of parameters cells
MARKER = ".kvlib-workdir"  # in a working folder set up by run_pipeline
KERNEL_ARGS = (  # for the notebooks' IPython kernel
    # keep file descriptors 1 and 2 the runner's: what is written there (kvlib.progress bars, subprocesses such as
    # accelerate launch) reaches the log once, instead of going into the notebook and being echoed to the log too
    "--IPKernelApp.capture_fd_output=False",
    "--IPKernelApp.log_level=ERROR",  # not its warning that, like any default kernel, it talks over local TCP
    # jupyter_client sends SIGINT before it shuts a kernel down; landing while the kernel still handles a message,
    # it is logged as an error after a successful stage. Nothing else interrupts these kernels (they run in their
    # own session, away from the terminal's Ctrl-C, which stops the runner, and a cell shows its own interrupts).
    "--IPKernelApp.exec_lines=__import__('logging').getLogger('IPKernelApp').addFilter("
    "lambda record: not record.getMessage().startswith('KeyboardInterrupt caught in kernel'))",
)


def notebook_for(stage: str, root: Path | None = None) -> Path:
    """The notebook of ``stage``: the single ``notebooks/NN_<stage>.ipynb``."""
    notebooks = (root or project_root()) / "notebooks"
    found = sorted(notebooks.glob(f"[0-9][0-9]_{stage}.ipynb"))
    if len(found) != 1:
        stages = sorted(p.stem.split("_", 1)[1] for p in notebooks.glob("[0-9][0-9]_*.ipynb"))
        raise ValueError(f"no single notebook for stage {stage!r} in {notebooks}; stages: {stages}")
    return found[0]


def check_parameters(notebook: Path, parameters: dict) -> None:
    """Reject parameter names the notebook does not declare, listing the ones it does, and values of another
    type than the one declared (TypeError; an int is not a bool, a float may be an int)."""
    declared = papermill.inspect_notebook(str(notebook))
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(f"{notebook.name} has no parameters {unknown}; it declares {sorted(declared)}")
    for name, value in parameters.items():
        kind = declared[name]["inferred_type_name"]
        if kind not in TYPES:
            raise ValueError(f"{notebook.name} declares {name}: {kind}; declare one of {list(TYPES)} there")
        if not matches(value, TYPES[kind]):
            raise TypeError(
                f"{notebook.name} parameter {name} must be {describe(TYPES[kind])}, got {value!r} "
                f"({type(value).__name__}); fix it in the params file or the --set"
            )


def check_outputs(parameters: dict, root: Path) -> None:
    """Reject output paths (``OUTPUTS`` keys) that, taken from ``root``, leave it (``..``, an absolute path)."""
    for key in OUTPUTS:
        if key in parameters and not Path(os.path.normpath(root / parameters[key])).is_relative_to(root):
            raise ValueError(
                f"{key}={parameters[key]!r} lies outside the project {root}; give a path inside it, or set "
                "allow_outside_project: true at the top of the params file"
            )


def stage_parameters(
    params_file: str | Path, stage: str, sets: dict | None = None, root: Path | None = None, takes: dict | None = None
) -> dict:
    """Section ``stage`` of a params file updated by ``sets`` and by ``takes`` (name -> the dotted path of a value in
    the same file), checked against the study, the stage's notebook (names and types) and the project ``root``
    (outputs inside it)."""
    root = root or project_root()
    params = load_params(params_file)
    check_study(params)
    if stage not in params or stage in OPTIONS:
        sections = sorted(set(params) - set(OPTIONS))
        raise ValueError(f"{params_file} has no section {stage!r}; its sections: {sections}")
    taken = {name: value_at(params, path, "--set-from names") for name, path in (takes or {}).items()}
    parameters = params[stage] | (sets or {}) | taken
    check_parameters(notebook_for(stage, root), parameters)
    if not params.get("allow_outside_project", False):
        check_outputs(parameters, root)
    return parameters


def parse_takes(items: list[str]) -> dict:
    """``["seeds=study.seeds"]`` -> ``{"seeds": "study.seeds"}``."""
    parsed = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--set-from takes name=section.key, got {item!r}")
        parsed[name] = path
    return parsed


def parse_sets(items: list[str]) -> dict:
    """``["seed=1", "group=G1"]`` -> ``{"seed": 1, "group": "G1"}`` (values parsed as params-file YAML)."""
    parsed = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set takes name=value, got {item!r}")
        parsed[name] = parse_yaml(value, f"--set {item}")
    return parsed


def executed_name(stage_notebook: Path, sets: dict) -> str:
    """``05_train`` and ``{"group": "G1", "seed": 0}`` -> ``05_train-G1-0``; unsafe characters become ``_``. Output
    paths (``OUTPUTS`` keys, e.g. the tuning runs' ``out_root``) do not name it: the group and seed do."""
    values = [v for k, v in sets.items() if k not in OUTPUTS]
    return "-".join([stage_notebook.stem, *(re.sub(r"[^A-Za-z0-9._=-]", "_", str(v)) for v in values)])


def run_stage(
    stage: str,
    params_file: str | Path,
    sets: dict | None = None,
    executed_dir: Path | None = None,
    takes: dict | None = None,
) -> Path:
    """Execute the stage's notebook with its parameters (updated by ``sets`` and ``takes``, as ``stage_parameters``
    does); returns the executed notebook, named after ``sets``."""
    root = project_root()
    notebook = notebook_for(stage, root)
    sets = sets or {}
    parameters = stage_parameters(params_file, stage, sets, root, takes)
    executed_dir = executed_dir or root / "reports" / "notebooks"
    executed_dir.mkdir(parents=True, exist_ok=True)
    name = executed_name(notebook, sets)
    out, running, failed = (executed_dir / f"{name}{suffix}.ipynb" for suffix in ("", ".running", ".failed"))
    print(f"[kvlib] stage {stage} {sets or ''}: {notebook.name} with {params_file}", flush=True)
    start = time.perf_counter()
    try:
        execute(notebook, running, parameters, root)
    except BaseException:
        if running.exists():
            os.replace(running, failed)
            print(f"[kvlib] stage {stage} failed; its executed notebook is {failed}", flush=True)
        raise
    html, _ = nbconvert.HTMLExporter(template_name="lab").from_notebook_node(
        nbformat.read(running, as_version=4), resources={"metadata": {"name": name}}
    )
    write_text(out.with_suffix(".html"), html)
    os.replace(running, out)
    failed.unlink(missing_ok=True)
    print(f"[kvlib] stage {stage} done in {time.perf_counter() - start:.0f} s: {out}", flush=True)
    return out


def execute(notebook: Path, out: Path, parameters: dict, cwd: Path) -> None:
    """Run ``notebook`` with ``parameters`` in a kernel working in ``cwd``, saving it to ``out`` after every cell.

    The log stays quiet: what cells print is streamed to this process's stdout and stderr, and nothing else (no
    cell markers; displayed values and errors are in the saved notebook, and a failed cell raises
    ``papermill.PapermillExecutionError`` with its traceback). What the kernel and its subprocesses write to the
    file descriptors 1 and 2 themselves (``kvlib.progress`` bars) goes to this process's, not into the notebook
    (``KERNEL_ARGS``)."""
    papermill.execute_notebook(
        str(notebook),
        str(out),
        parameters=parameters,
        cwd=str(cwd),
        progress_bar=False,
        stdout_file=sys.stdout,
        stderr_file=sys.stderr,
        extra_arguments=list(KERNEL_ARGS),  # a copy: nbclient appends to it
    )


def run_pipeline(params_file: str | Path, workdir: str | Path) -> Path:
    """``dvc repro`` of the whole pipeline on ``params_file`` inside ``workdir``; returns ``workdir``.

    ``workdir`` must be new, empty or set up by an earlier call (it holds ``MARKER``), else ValueError."""
    root, workdir, params_file = project_root(), Path(workdir).resolve(), Path(params_file).resolve()
    if workdir == root:
        raise ValueError(f"workdir {workdir} is the project itself; run `make pipeline` there instead")
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / MARKER).is_file():
        raise ValueError(
            f"{workdir} is not empty and was not created by kvlib.runner (no {MARKER}); its kvlib/, notebooks/, "
            "params/ and dvc.yaml would be replaced: choose an empty or new folder"
        )
    write_text(workdir / MARKER, "set up by `python -m kvlib.runner pipeline`; its copies are replaced on each run\n")
    for name in ("dvc.yaml", ".dvcignore"):
        atomic_write(workdir / name, lambda tmp, name=name: shutil.copy(root / name, tmp))
    atomic_write(workdir / "params" / "default.yaml", lambda tmp: shutil.copy(params_file, tmp))
    shutil.rmtree(workdir / "params" / "accelerate", ignore_errors=True)  # launchers the params may name
    shutil.copytree(root / "params" / "accelerate", workdir / "params" / "accelerate")
    for folder in ("notebooks", "kvlib"):
        shutil.rmtree(workdir / folder, ignore_errors=True)
        shutil.copytree(root / folder, workdir / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    copied = workdir / "params" / "default.yaml"
    for stage in sorted(set(load_params(copied)) - {"study", *OPTIONS}):  # fail now, not after hours of training
        stage_parameters(copied, stage, root=workdir)
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
    parser.add_argument(
        "--set-from", action="append", default=[], metavar="NAME=SECTION.KEY", help="a parameter from the params file"
    )
    parser.add_argument("--workdir", help="pipeline only: the folder to run the whole pipeline in")
    args = parser.parse_args(argv)
    if args.stage == "pipeline":
        if not args.workdir:
            parser.error("pipeline needs --workdir")
        run_pipeline(args.params, args.workdir)
    else:
        run_stage(args.stage, args.params, parse_sets(args.set), takes=parse_takes(args.set_from))


if __name__ == "__main__":
    sys.exit(main())
