"""Each DVC stage depends on exactly the code its outputs come from, and DVC sees it so.

A stage's code is its notebook and the kvlib modules the notebook imports, directly or through other
kvlib modules (``import_closure``, read from the sources' ``import`` statements). The first test holds
dvc.yaml to that list; the second touches every kvlib module in a scratch copy of the project and asks
``dvc status`` itself which stages it marks, against a table written out here.
"""

import ast
import hashlib
import json
import shutil
from pathlib import Path

import yaml

from kvlib import project_root

ROOT = project_root()


def _kvlib_imports(source: str) -> set[str]:
    """Modules of kvlib that ``source`` imports (``from kvlib.x import y`` counts ``kvlib.x``, and
    ``kvlib.x.y`` when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kvlib":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _source(f"{node.module}.{a.name}")}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "kvlib"}
    return found


def _source(module: str) -> Path | None:
    path = ROOT / (module.replace(".", "/") + ".py")
    package = ROOT / module.replace(".", "/") / "__init__.py"
    return path if path.is_file() else package if package.is_file() else None


def _notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    lines = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))  # IPython magics


def import_closure(notebook: Path) -> list[str]:
    """The kvlib modules (paths from the project root) a notebook runs: its imports, theirs, and so on."""
    seen, todo = set(), ["kvlib", *_kvlib_imports(_notebook_code(notebook))]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += _kvlib_imports(_source(module).read_text())
    return sorted(str(_source(m).relative_to(ROOT)) for m in seen)


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_notebook_stage_depends_on_exactly_the_modules_its_notebook_imports():
    for name, stage in _stages().items():
        deps = stage.get("do", stage).get("deps", [])
        notebooks = [d for d in deps if d.startswith("notebooks/")]
        code = sorted(d for d in deps if d.startswith("kvlib/"))
        if not notebooks:
            assert code == [], f"stage {name} runs no notebook"
            continue
        want = import_closure(ROOT / notebooks[0])
        missing, extra = sorted(set(want) - set(code)), sorted(set(code) - set(want))
        assert not missing and not extra, (
            f"dvc.yaml stage {name}: deps miss {missing} and list {extra} that {notebooks[0]} does not import; "
            f"its kvlib deps are exactly {want}"
        )


def test_the_closure_follows_imports_through_modules():
    closure = import_closure(ROOT / "notebooks" / "05_train.ipynb")  # imports kvlib.launch only, of the trainers
    assert {"kvlib/launch.py", "kvlib/student.py", "kvlib/losses.py", "kvlib/resample.py"} <= set(closure)
    assert "kvlib/stats.py" not in closure and "kvlib/report.py" not in closure


# Which stages (by name, generated items together) `dvc status` marks when one module changes. What follows
# from a marked stage's outputs re-runs too (e.g. evaluate, statistics, report after training).
STUDENT = {"train_candidate", "train_control", "train", "train_secondary"}
TEACHER_SIDE = {"teacher", "teacher_kv", "alignment", "evaluate"}
EVERY_MODEL_STAGE = {"teacher", "teacher_kv", "alignment", "evaluate", "benchmarks", "latent"} | STUDENT
MARKED = {
    "__init__.py": EVERY_MODEL_STAGE | {"data", "latent_data", "tune", "statistics", "report"},
    "data.py": EVERY_MODEL_STAGE | {"data", "latent_data"},
    "files.py": EVERY_MODEL_STAGE | {"data", "latent_data", "tune", "statistics", "report"},
    "config.py": EVERY_MODEL_STAGE,
    "models.py": EVERY_MODEL_STAGE,
    "text.py": EVERY_MODEL_STAGE,
    "progress.py": EVERY_MODEL_STAGE - {"alignment"},
    "hf.py": EVERY_MODEL_STAGE - {"evaluate"},
    "checkpoints.py": EVERY_MODEL_STAGE,
    "evaluate.py": {"teacher", "evaluate", "latent"} | STUDENT,
    "batches.py": {"teacher", "benchmarks", "latent"} | STUDENT,
    "objective.py": {"teacher", "benchmarks", "latent"} | STUDENT,
    "train.py": {"teacher", "latent"} | STUDENT,
    "teacher.py": {"teacher"},
    "rope.py": {"teacher_kv", "alignment", "benchmarks", "latent"} | STUDENT,
    "kvstore.py": {"teacher_kv", "benchmarks", "latent"} | STUDENT,
    "compress.py": {"teacher_kv", "benchmarks", "latent"},
    "teacher_kv.py": {"teacher_kv", "benchmarks", "latent"},
    "resample.py": {"alignment", "benchmarks", "latent"} | STUDENT,
    "layers.py": {"alignment", "benchmarks", "latent"} | STUDENT,
    "analysis.py": {"alignment"},
    "losses.py": {"benchmarks", "latent"} | STUDENT,
    "projectors.py": {"benchmarks", "latent"} | STUDENT,
    "fusion.py": {"benchmarks", "latent"} | STUDENT,
    "distill.py": {"benchmarks", "latent"} | STUDENT,
    "student.py": STUDENT,
    "launch.py": STUDENT,
    "processes.py": STUDENT | {"latent"},
    "slot_table.py": {"latent"},
    "tuning.py": STUDENT | {"tune"},
    "stats.py": {"statistics"},
    "contrasts.py": {"statistics"},
    "report.py": {"report"},
    "report_figures.py": {"report"},
    "report_latent.py": {"report"},
    "benchmark.py": {"benchmarks"},
    "latent.py": {"latent"},
    "latent_student.py": {"latent"},
    "inputs.py": set(),  # the inputs stage runs on every repro (always_changed); its outputs are what count
    "runner.py": set(),  # runs and presents stages; no result comes from it
}


def _baseline_lock(repo) -> dict:
    """A dvc.lock recording every stage's code deps as they are now (what a run of the pipeline leaves)."""
    stages = {}
    for stage in repo.index.stages:
        deps = []
        for dep in stage.deps:
            path = Path(repo.root_dir) / dep.def_path
            if dep.def_path.startswith(("kvlib/", "notebooks/")):
                data = path.read_bytes()
                deps.append({"path": dep.def_path, "hash": "md5", "md5": hashlib.md5(data).hexdigest()})
                deps[-1]["size"] = len(data)
        stages[stage.addressing] = {"cmd": stage.cmd, "deps": deps}
    return {"schema": "2.0", "stages": stages}


def test_dvc_status_marks_exactly_the_stages_a_changed_module_feeds(tmp_path, monkeypatch):
    from dvc.repo import Repo

    for name in ("dvc.yaml", ".dvcignore", "params"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, tmp_path / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "kvlib", tmp_path / "kvlib", ignore=ignore)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks", ignore=ignore)
    monkeypatch.chdir(tmp_path)
    Repo.init(no_scm=True)
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(_baseline_lock(Repo(tmp_path)), sort_keys=False))
    modules = sorted(p.name for p in (tmp_path / "kvlib").glob("*.py"))
    assert modules == sorted(MARKED), "every kvlib module needs its row in MARKED"
    for module in modules:
        path = tmp_path / "kvlib" / module
        original = path.read_text()
        path.write_text(original + "# a change\n")
        status = Repo(tmp_path).status()
        path.write_text(original)
        marked = {
            name.split("@")[0]
            for name, changes in status.items()
            for change in changes
            if isinstance(change, dict) and change.get("changed deps", {}).get(f"kvlib/{module}") == "modified"
        }
        assert marked == MARKED[module], f"a change in kvlib/{module} marks {sorted(marked)}"


def test_readmes_stage_graph_is_the_one_dvc_builds():
    from dvc.repo import Repo

    readme = (ROOT / "README.md").read_text()
    block = readme.split("```mermaid\n", 1)[1].split("```", 1)[0]
    drawn = {tuple(part.strip() for part in line.split("-->")) for line in block.splitlines() if "-->" in line}
    graph = Repo(ROOT).index.graph  # edges from a stage to the stages it depends on
    built = {(b.addressing.split("@")[0], a.addressing.split("@")[0]) for a, b in graph.edges}
    assert drawn == built, f"README draws {sorted(drawn - built)} that dvc.yaml lacks, misses {sorted(built - drawn)}"
