import numpy as np

from kvlib.report import render, stage_figures, verdict
from kvlib.stats import compare_to_control, seed_summary

PLAN = {
    "question": "Does KV distillation help?",
    "primary_metric": "exact-match accuracy",
    "control": "G0",
    "negative_control": "NC",
    "alpha": 0.05,
    "correction": "Holm",
    "seeds": 2,
    "n_resamples": 1000,
    "groups": {"G0": "CE only", "G1": "one teacher", "NC": "shuffled"},
}


def study(effect: float, figures: dict | None = None):
    rng = np.random.default_rng(0)
    base = rng.random((2, 400)) < 0.3
    better = rng.random((2, 400)) < 0.3 + effect
    groups = {"G0": base.astype(int), "G1": better.astype(int), "NC": (rng.random((2, 400)) < 0.3).astype(int)}
    stats = {"groups": compare_to_control(groups, "G0", n_resamples=1000)}
    stats["control_seeds"] = seed_summary(groups["G0"].mean(1))
    accuracy = {g: {str(s): float(c[s].mean()) for s in range(2)} for g, c in groups.items()}
    splits = {"test": {"n": 400, "sha256": "ab" * 32}}
    teachers = {"A": {"model_type": "qwen2", "kv_spec": {"num_layers": 4, "num_kv_heads": 2, "head_dim": 16},
                      "parameters": 1000, "accuracy": 0.5, "train_seconds": 10.0}}  # fmt: skip
    figures = figures or {"Forest plot": "figures/forest.png"}
    return render(PLAN, splits, teachers, accuracy, stats, figures, identical={"NC": "G1"}), stats


def test_report_states_the_plan_before_the_results():
    text, _ = study(0.3)
    assert text.index("Analysis plan") < text.index("## 3. Results")
    assert "Holm correction across groups at alpha = 0.05" in text
    assert "![Forest plot](figures/forest.png)" in text


def test_a_planted_effect_is_reported_as_significant():
    text, stats = study(0.3)
    assert verdict(stats["groups"]["G1"]) == "significantly better"
    assert "Significantly better than the control (Holm, alpha = 0.05): G1." in text
    assert f"{100 * stats['groups']['G1']['diff']:+.1f}" in text


def test_no_effect_is_reported_as_no_significant_difference():
    text, stats = study(0.0)
    assert verdict(stats["groups"]["G1"]) == "no significant difference"
    assert "No group is significantly better than the control" in text


def test_identical_groups_are_pointed_out():
    text, _ = study(0.0)
    assert "Note: NC made exactly the same predictions as G1 for every seed and test example" in text


def test_the_report_links_the_teachers_curves_and_the_head_cka_relative_to_its_folder(tmp_path):
    reports = tmp_path / "reports"
    for path in ("teachers/A/learning_curve.png", "alignment/heads.png", "alignment/cka.png"):
        (reports / path).parent.mkdir(parents=True, exist_ok=True)
        (reports / path).write_bytes(b"png")
    (reports / "teachers" / "B").mkdir()  # a teacher that was not trained has no learning curve
    figures = stage_figures(reports, reports, ["A", "B"])
    assert figures == {
        "Teacher A: training cross-entropy": "teachers/A/learning_curve.png",
        "Teacher x student CKA per layer": "alignment/cka.png",
        "Teacher x student CKA per KV head (last layer's keys)": "alignment/heads.png",
    }
    text, _ = study(0.0, figures)
    assert "![Teacher A: training cross-entropy](teachers/A/learning_curve.png)" in text
    assert "![Teacher x student CKA per KV head (last layer's keys)](alignment/heads.png)" in text
    assert "teachers/B" not in text
