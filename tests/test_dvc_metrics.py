"""dvc.yaml's metrics hold numbers only (so `dvc metrics show` is a table of headline numbers) and its
top-level plots name files that the stages write."""

import json
from numbers import Number
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STUDY = yaml.safe_load((ROOT / "params" / "default.yaml").read_text())["study"]


def _paths(entries):
    for entry in entries or []:
        yield next(iter(entry)) if isinstance(entry, dict) else entry


def _study(reference: str):
    """The study list a dvc.yaml ``${study.<path>}`` names."""
    value = STUDY
    for key in reference.removeprefix("${study.").removesuffix("}").split("."):
        value = value[key]
    return value


def _expand(path: str, stage: dict) -> list[str]:
    """Concrete paths of a (possibly generated) stage's path, for the study in params/default.yaml."""
    paths = [path.replace("${study.control}", STUDY["control"])]
    paths = [p.replace("${study.latent.max_operand}", str(STUDY["latent"]["max_operand"])) for p in paths]
    if "foreach" in stage:  # a study list: teachers, a part's groups, the latent arms
        paths = [p.replace("${item}", str(i)) for p in paths for i in _study(stage["foreach"])]
    return paths


def _declared(kind: str) -> list[str]:
    found = []
    for stage in DVC["stages"].values():
        body = stage.get("do", stage)
        for path in _paths(body.get(kind)):
            found += _expand(path, stage)
    return found


def _numbers_only(obj, where):
    if isinstance(obj, dict):
        for key, value in obj.items():
            _numbers_only(value, f"{where}.{key}")
    else:
        assert isinstance(obj, Number) and not isinstance(obj, bool), f"{where} is {obj!r}, not a number"


def test_metrics_hold_numbers_only():
    metrics = _declared("metrics")
    assert metrics
    for path in metrics:
        if (ROOT / path).is_file():
            _numbers_only(json.loads((ROOT / path).read_text()), path)


def test_plots_name_files_the_stages_write():
    outs = _declared("outs") + _declared("metrics")
    files = []
    for entry in DVC["plots"]:
        plot_id, props = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        files += list((props or {}).get("y", {})) if isinstance((props or {}).get("y"), dict) else [plot_id]
    assert files
    for path in files:
        assert any(path == out or path.startswith(out.rstrip("/") + "/") for out in outs), f"{path}: no stage writes it"


def test_learning_curves_cover_the_study():
    runs = {(g, str(s)) for g in [STUDY["control"], *STUDY["groups"]] for s in STUDY["seeds"]}
    for entry in DVC["plots"]:
        plot_id, props = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        if plot_id in ("learning_ce", "learning_val_accuracy"):
            assert {Path(p).parent.parts[-2:] for p in props["y"]} == runs, plot_id
