"""The whole DVC pipeline on the smoke params, in build/smoke (a git-ignored working copy; the ``smoke``
fixture of conftest.py runs it once per session).

The notebooks' smoke defaults read and write the same folder, so nbval (which runs after tests/)
executes every notebook against this run's outputs.
"""

import json
import subprocess
import sys

import pytest

from kvlib import project_root
from kvlib.runner import run_pipeline

ROOT = project_root()
WORKDIR = ROOT / "build" / "smoke"


def test_every_stage_ran_and_left_its_executed_notebook(smoke):
    study = smoke["study"]
    groups = [study["control"], *study["groups"], *study["tuning"]["groups"], *study["secondary"]["groups"]]
    expected = ["01_data", "04_alignment", "05_tune", "06_evaluate", "07_statistics", "08_report", "09_benchmarks"]
    expected += [f"02_teacher-{t}" for t in study["teachers"]] + [f"03_teacher_kv-{t}" for t in study["teachers"]]
    expected += [f"05_train-{g}" for g in groups]  # one stage per group, its seeds side by side
    latent = study["latent"]  # its data stage (the data notebook at its max_operand) and one stage per arm
    expected += [f"01_data-{latent['max_operand']}"] + [f"10_latent-{a}" for a in latent["arms"]]
    executed = {p.stem for p in (WORKDIR / "reports" / "notebooks").glob("*.ipynb")}
    assert executed == set(expected)
    assert all((WORKDIR / "reports" / "notebooks" / f"{name}.html").exists() for name in expected)
    assert (WORKDIR / "params" / "accelerate" / "multi_gpu.yaml").exists()  # what a `train.launch` may name


def test_every_seed_of_a_group_stage_has_its_own_student(smoke):
    study = smoke["study"]
    parts = [([study["control"], *study["groups"]], study["seeds"], "students", "students")]
    parts += [(study["secondary"]["groups"], study["secondary"]["seeds"], "students", "students")]
    parts += [(study["tuning"]["groups"], study["tuning"]["seeds"], "candidates", "tuning/runs")]
    for groups, seeds, artifacts, reports in parts:
        for g in groups:
            for s in seeds:
                summary = json.loads((WORKDIR / "reports" / reports / g / str(s) / "summary.json").read_text())
                assert (summary["seed"], summary["finished"]) == (s, True), (g, s)
                assert (WORKDIR / "artifacts" / artifacts / g / str(s) / "model").is_dir(), (g, s)


def test_metrics_cover_every_evaluated_group_and_seed_and_every_contrast(smoke):
    study = smoke["study"]
    accuracy = json.loads((WORKDIR / "reports" / "evaluation" / "accuracy.json").read_text())
    runs = {g: sorted(str(s) for s in study["seeds"]) for g in [study["control"], *study["groups"]]}
    runs |= {g: sorted(str(s) for s in study["secondary"]["seeds"]) for g in study["secondary"]["groups"]}
    assert {g: sorted(a) for g, a in accuracy.items()} == runs  # the tuning candidates are never tested
    stats = json.loads((WORKDIR / "reports" / "statistics" / "statistics.json").read_text())
    assert list(stats["primary"]) == list(smoke["statistics"]["primary"])
    assert list(stats["exploratory"]) == list(smoke["statistics"]["exploratory"])
    assert stats["n_examples"] == smoke["data"]["sizes"]["test"]
    predictions = (WORKDIR / "reports" / "evaluation" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == sum(len(seeds) for seeds in runs.values()) * stats["n_examples"]
    choices = json.loads((WORKDIR / "reports" / "tuning" / "choices.json").read_text())
    assert {f: list(c["candidates"]) for f, c in choices.items()} == smoke["tune"]["families"]


def test_benchmarks_report_every_ratio(smoke):
    results = json.loads((WORKDIR / "reports" / "benchmarks.json").read_text())
    assert results["config"] == {**results["config"], **smoke["benchmarks"]["config"]}
    assert set(results["ratios"]) >= {"kv_store_vs_ce", "online_vs_store", "alignment_share", "selection_speedup"}
    assert {"store_fp16_vs_dense_fp32", "store_budget_vs_dense_fp32"} <= set(results["ratios"])
    assert results["ratios"]["selection_speedup"]["identical_slots"] == 1.0
    assert all(r["value"] > 0 for r in results["ratios"].values() if not isinstance(r["value"], dict))


def test_report_states_the_plan_and_shows_the_figures(smoke):
    report = (WORKDIR / "reports" / "REPORT.md").read_text()
    assert report.index("Analysis plan") < report.index("## 3. Results")
    for figure in ("figures/forest.png", "figures/learning_curves.png", "figures/routing.png", "alignment/cka.png"):
        assert f"]({figure})" in report and (WORKDIR / "reports" / figure).exists()


def test_a_second_run_has_nothing_to_do_but_hash_the_inputs(smoke):
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"], cwd=WORKDIR, capture_output=True, text=True, check=True
    )
    assert json.loads(status.stdout) == {"inputs": ["always changed"]}  # re-hashed in seconds on every repro


def test_run_pipeline_refuses_the_project_itself():
    with pytest.raises(ValueError, match="is the project itself"):
        run_pipeline(ROOT / "params" / "smoke.yaml", ROOT)
