"""REPORT.md says what the numbers say: the plan first, every primary contrast with its numbers, verdicts that follow
from the Holm decision and the MDE, sentences generated from the numbers, the tuning choice marked, and figures
written and linked. The inputs are synthetic files in the formats the stages write."""

import copy
import json

import pytest

from kvlib.report import (
    check_plan,
    identical_groups,
    load_curves,
    load_statistics,
    load_teachers,
    read_json,
    read_jsonl,
    render,
    verdict,
)
from kvlib.report_figures import build_figures, routing_weights, save_figures, stage_figures

PLAN = {
    "question": "Does KV distillation help?",
    "primary_metric": "exact-match accuracy",
    "alpha": 0.05,
    "correction": "Holm over the primary contrasts",
    "seeds": 2,
    "tuning": "each family at two learning rates on seeds 100 and 101",
    "groups": {"C": "CE only", "S": "teacher A", "X": "S shuffled", "S-w3": "S at weight 3"},
    "contrasts": {"P1": "does KV beat CE?", "P2": "information or regularisation?"},
    "curves": {"dose": {"x": "KV weight", "points": {"0.5": "P2", "1": "P1", "3": "w3"}}},
}


def row(a, b, acc_a, acc_b, ci, p, mde, per_example, **primary) -> dict:
    return {
        "a": a,
        "b": b,
        "seeds": [0, 1],
        "accuracy_a": acc_a,
        "accuracy_b": acc_b,
        "diff": acc_a - acc_b,
        "ci_low": ci[0],
        "ci_high": ci[1],
        "se": 0.01,
        "df": 4.0,
        "p": p,
        "mde": mde,
        "per_example": dict(zip(("ci_low", "ci_high", "p"), per_example)),
        "bootstrap": {"ci_low": ci[0] - 0.01, "ci_high": ci[1] + 0.01, "se": 0.012},
        "cohens_h": 0.1,
    } | primary


def accuracy(seeds: dict) -> dict:
    return {"seeds": seeds, "mean": sum(seeds.values()) / len(seeds), "seed_sd": 0.01 if len(seeds) > 1 else None,
            "binomial_sd": 0.008 if len(seeds) > 1 else None}  # fmt: skip


STATS = {
    "n_examples": 400,
    "alpha": 0.05,
    "power": 0.8,
    "accuracy": {
        "C": accuracy({"0": 0.25, "1": 0.27}),
        "S": accuracy({"0": 0.29, "1": 0.31}),
        "X": accuracy({"0": 0.295, "1": 0.297}),
        "S-w3": accuracy({"0": 0.23}),
    },
    "primary": {
        "P1": row("S", "C", 0.30, 0.26, (0.015, 0.065), 0.003, 0.019, (0.02, 0.06, 0.001), p_holm=0.006, reject=True),
        "P2": row("S", "X", 0.30, 0.296, (-0.011, 0.019), 0.6, 0.021, (-0.01, 0.018, 0.55), p_holm=0.6, reject=False),
    },
    "exploratory": {"w3": row("S-w3", "C", 0.23, 0.26, (-0.055, -0.005), 0.02, 0.03, (-0.05, -0.01, 0.01))},
    "accuracy_by_task": {g: {"chain": 0.2, "compare": 0.3} for g in ("C", "S", "X", "S-w3")},
}
CHOICES = {
    "ce": {
        "chosen": "C-lr2",
        "settings": {"teachers": [], "lr": 0.002},
        "candidates": {
            "C-lr1": {"seeds": {"100": 0.21, "101": 0.23}, "mean": 0.22},
            "C-lr2": {"seeds": {"100": 0.24, "101": 0.26}, "mean": 0.25},
        },
    },
    "kv": {
        "chosen": "S-lr1",
        "settings": {"teachers": ["A"], "lr": 0.001},
        "candidates": {
            "S-lr1": {"seeds": {"100": 0.28, "101": 0.30}, "mean": 0.29},
            "S-lr2": {"seeds": {"100": 0.27, "101": 0.27}, "mean": 0.27},
        },
    },
}
SPLITS = {"test": {"n": 400, "sha256": "ab" * 32}}
TEACHER = {"model_type": "qwen2", "kv_spec": {"num_layers": 4, "num_kv_heads": 2, "head_dim": 16},
           "parameters": 1000, "accuracy": 0.5, "train_seconds": 10.0}  # fmt: skip


def curve_rows(kv: bool) -> list[dict]:
    """Two logged steps in the training loop's format; KV runs also log their targets' std and the KV gradient."""
    rows = []
    for step in (10, 20):
        r = {"step": step, "ce": 3.0, "loss": 3.5, "lr": 1e-3, "grad_norm_ce": 2.0, "clipped_ce": 1.0}
        r["kv_std"] = {"student_k": [0.5, 0.7], "student_v": [0.4, 0.6]}
        if kv:
            r |= {"kv": 0.5, "grad_norm_aux": 0.3, "clipped_aux": 0.0}
            r["kv_std"] |= {"target_k": [1.0, 1.0], "target_v": [1.0, 1.0]}
        rows.append(r | ({"val_accuracy": 0.2} if step == 20 else {}))
    return rows


def write_study(root, stats=STATS) -> None:
    """The files the report stage reads, under ``root`` (a reports/ folder)."""

    def put(path, obj):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(obj))

    put("statistics/statistics.json", stats)
    put("tuning/choices.json", CHOICES)
    put("data/splits.json", SPLITS)
    put("teachers/A/metrics.json", TEACHER)
    records = []
    for g, acc in stats["accuracy"].items():
        for s in acc["seeds"]:
            (root / "students" / g / str(s)).mkdir(parents=True)
            lines = "".join(json.dumps(r) + "\n" for r in curve_rows(kv=g != "C"))
            (root / "students" / g / str(s) / "learning_curve.jsonl").write_text(lines)
            records += [{"group": g, "seed": int(s), "id": i, "generated": f"{g} {i}"} for i in range(3)]
    (root / "evaluation").mkdir()
    (root / "evaluation" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def report(root, plan=PLAN) -> str:
    """What notebook 08 does, on the synthetic reports folder ``root``."""
    stats = load_statistics(root / "statistics" / "statistics.json")
    check_plan(plan, stats)
    curves = load_curves(root / "students", stats["accuracy"])
    routed = {g: ["A", "B"] for g in routing_weights(curves)}
    links = save_figures(build_figures(plan, stats, curves, routed), root / "figures", root)
    teachers = load_teachers(root / "teachers")
    links |= stage_figures(root, root, teachers)
    identical = identical_groups(read_jsonl(root / "evaluation" / "predictions.jsonl", "evaluate"))
    choices, splits = (
        read_json(root / "tuning" / "choices.json", "tune"),
        read_json(root / "data" / "splits.json", "data"),
    )
    return render(plan, stats, choices, splits, teachers, links, identical)


def text_of(stats=STATS, plan=PLAN) -> str:
    return render(plan, stats, CHOICES, SPLITS, {"A": TEACHER}, {})


def section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end)]


def line_of(text: str, start: str) -> str:
    (line,) = [x for x in text.splitlines() if x.startswith(start)]
    return line


def with_primary(name: str, **changes) -> dict:
    stats = copy.deepcopy(STATS)
    stats["primary"][name] |= changes
    return stats


def test_the_plan_comes_before_the_results_and_holds_the_groups_and_contrasts():
    text = text_of()
    plan = section(text, "## 1. Analysis plan", "## 2.")
    assert text.index("## 1. Analysis plan") < text.index("## 2. Data") < text.index("## 3. Results")
    assert "on the test split (400 problems)" in plan
    assert "Holm over the primary contrasts at alpha = 0.05" in plan
    assert "- **Tuning**: each family at two learning rates on seeds 100 and 101" in plan
    assert "| S-w3 | S at weight 3 |" in plan
    assert "| P1 | S - C | does KV beat CE? |" in plan and "| P2 | S - X | information or regularisation? |" in plan
    assert "Exploratory contrasts (not corrected): w3 (S-w3 - C)." in plan


def test_every_primary_contrast_is_reported_with_its_numbers():
    primary = section(text_of(), "### 3.1 Primary contrasts", "### 3.2")
    assert line_of(primary, "| P1 |") == (
        "| P1 | S - C | 30.0 | 26.0 | +4.0 [+1.5, +6.5] | [+2.0, +6.0] | 0.003 | 0.001 | 0.006 | 1.9 | S > C |"
    )
    assert line_of(primary, "| P2 |").startswith("| P2 | S - X | 30.0 | 29.6 | +0.4 [-1.1, +1.9] | [-1.0, +1.8] |")
    assert "| 0.6 | 0.55 | 0.6 | 2.1 |" in line_of(primary, "| P2 |")


def test_a_rejecting_contrast_names_the_better_arm_and_a_null_its_mde():
    primary = section(text_of(), "### 3.1 Primary contrasts", "### 3.2")
    assert line_of(primary, "| P1 |").endswith("| S > C |")
    assert line_of(primary, "| P2 |").endswith(
        "| no difference detected (MDE 2.1 points); the CI excludes effects larger than the MDE |"
    )
    worse = with_primary("P1", accuracy_a=0.22, diff=-0.04, ci_low=-0.065, ci_high=-0.015)
    assert line_of(section(text_of(worse), "### 3.1", "### 3.2"), "| P1 |").endswith("| S < C |")


def test_the_verdict_follows_the_holm_decision_not_the_raw_p():
    stats = with_primary("P2", p=0.01, ci_low=0.002, ci_high=0.019, p_holm=0.06, reject=False)
    assert verdict(stats["primary"]["P2"], 0.05, primary=True).startswith("no difference detected (MDE 2.1 points)")
    assert verdict(stats["primary"]["P2"], 0.05, primary=False) == "S > X (uncorrected)"
    text = text_of(stats)
    assert "The 95% CI excludes 0, but the difference does not survive Holm over the primary contrasts." in text


def test_a_null_whose_ci_reaches_past_the_mde_is_not_called_informative():
    wide = with_primary("P2", ci_low=-0.03, ci_high=0.038)
    assert verdict(wide["primary"]["P2"], 0.05, True) == (
        "no difference detected (MDE 2.1 points); the CI does not exclude effects larger than the MDE"
    )
    low = with_primary("P2", ci_low=-0.025, ci_high=0.01)  # past the MDE on the negative side only
    assert verdict(low["primary"]["P2"], 0.05, True).endswith("the CI does not exclude effects larger than the MDE")
    assert "this null cannot rule out a difference of that size" in text_of(wide)
    assert "the CI excludes effects larger than the MDE (2.1 points)" in text_of()
    coarse = with_primary("P2", mde=0.04)  # the CI lies within +-MDE, but the MDE is above 2.5 points
    assert "but the MDE is above 2.5 points, so a difference of a few points is not ruled out." in text_of(coarse)


def test_a_null_no_accuracy_difference_could_reject_is_called_so_not_bounded():
    blind = with_primary("P2", ci_low=-0.72, ci_high=0.68, mde=2.876)  # 2 seeds: a t interval with 1 df
    assert verdict(blind["primary"]["P2"], 0.05, True) == (
        "no difference detected, nor detectable (MDE 287.6 points, above 100)"
    )
    text = text_of(blind)
    assert "No difference detected, and none could be: the MDE (287.6 points) is above the 100 points" in text
    assert "the CI excludes effects larger than the MDE (287.6" not in text
    edge = with_primary("P2", ci_low=-0.5, ci_high=0.5, mde=0.999)  # just under 100 points: bounded, as before
    assert verdict(edge["primary"]["P2"], 0.05, True).endswith("the CI excludes effects larger than the MDE")


def test_the_answer_has_one_sentence_per_primary_contrast_made_from_its_numbers():
    answer = section(text_of(), "### 3.2 The answer", "**What this")
    p1, p2 = (line_of(answer, f"- **{n}**") for n in ("P1", "P2"))
    assert p1.startswith("- **P1** (does KV beat CE?): S 30.0% vs C 26.0%, +4.0 points (95% CI [+1.5, +6.5]")
    assert "Holm-adjusted p = 0.006). S is more accurate than C (Holm over the primary contrasts, alpha = 0.05)." in p1
    assert p2.endswith(
        "No difference detected, and an informative null: the CI excludes effects larger than the MDE (2.1 points), "
        "so there is no difference of 2.5 points or more in either direction."
    )
    flipped = with_primary("P1", accuracy_a=0.22, diff=-0.04, ci_low=-0.065, ci_high=-0.015)
    assert "S is less accurate than C" in text_of(flipped)


def test_per_example_and_seed_inclusive_disagreement_is_spelled_out():
    stats = with_primary("P2", per_example={"ci_low": 0.001, "ci_high": 0.018, "p": 0.04})
    assert "With the seeds held fixed the per-example CI [+0.1, +1.8] excludes 0" in text_of(stats)
    assert "per-example CI" not in section(text_of(), "### 3.2 The answer", "**What this")
    fixed_wide = with_primary("P1", per_example={"ci_low": -0.001, "ci_high": 0.06, "p": 0.06})
    assert "With the seeds held fixed the per-example CI [-0.1, +6.0] includes 0." in text_of(fixed_wide)


def test_every_table_row_has_as_many_cells_as_its_header():
    text = text_of(plan=PLAN | {"caveats": ["x"]})
    tables = [block.splitlines() for block in text.split("\n\n") if block.startswith("|")]
    assert len(tables) == 9  # groups, contrasts, splits, teachers, tuning, primary, exploratory, accuracy, by task
    for table in tables:
        assert len({line.count("|") for line in table}) == 1, table[:2]


def test_what_it_shows_counts_rejections_checks_every_mde_and_lists_exploratory_cis_excluding_zero():
    limits = section(text_of(), "**What this does and does not show**", "### 3.3")
    assert (
        "- 1 of 2 primary contrasts rejected after Holm over the primary contrasts (alpha = 0.05): P1 (S > C)."
        in limits
    )
    assert "- Every primary MDE is at most 2.5 points (largest: P2, 2.1 points)" in limits
    assert "exploratory" in limits.lower() and "the 95% CI of w3 (-3.0 points, S-w3 < C) excludes 0." in limits
    underpowered = with_primary("P2", mde=0.04)
    assert "- Not every primary MDE is at most 2.5 points: P2 4.0 points" in text_of(underpowered)
    nothing = copy.deepcopy(STATS)
    nothing["exploratory"]["w3"] |= {"ci_low": -0.05, "ci_high": 0.01}
    nothing["primary"]["P1"] |= {"reject": False}
    assert "- 0 of 2 primary contrasts rejected" in text_of(nothing)
    assert "no exploratory 95% CI excludes 0." in text_of(nothing)


def test_the_plans_caveats_are_listed_after_the_generated_statements():
    text = text_of(plan=PLAN | {"caveats": ["One teacher seed per family.", "Tiny models."]})
    limits = section(text, "**What this does and does not show**", "### 3.3")
    assert limits.index("primary contrasts rejected") < limits.index("- One teacher seed per family.")
    assert "- Tiny models." in limits


def test_exploratory_contrasts_have_no_holm_column_and_are_labelled_uncorrected():
    exploratory = section(text_of(), "### 3.3 Exploratory contrasts (not corrected", "### 3.4")
    assert "Holm" not in exploratory
    assert line_of(exploratory, "| w3 |") == (
        "| w3 | S-w3 - C | 23.0 | 26.0 | -3.0 [-5.5, -0.5] | [-5.0, -1.0] | 0.02 | 0.01 | 3.0 | "
        "S-w3 < C (uncorrected) |"
    )


def test_a_contrast_on_one_shared_seed_says_its_ci_cannot_count_seed_variance():
    stats = copy.deepcopy(STATS)
    stats["exploratory"]["w3"]["seeds"] = [0]
    note = "w3: one shared seed, so the CI and p cannot count seed variance (per-example interval)."
    assert note in section(text_of(stats), "### 3.3", "### 3.4")
    assert "one shared seed" not in text_of()


def test_the_tuning_table_marks_the_chosen_candidate_with_its_validation_accuracy():
    tuning = section(text_of(), "### Tuning", "## 3. Results")
    assert line_of(tuning, "| ce | **C-lr2** |") == "| ce | **C-lr2** | 25.0 | 24.0 | 26.0 | **chosen** |"
    assert line_of(tuning, "| ce | C-lr1 |") == "| ce | C-lr1 | 22.0 | 21.0 | 23.0 |  |"
    assert line_of(tuning, "| kv | **S-lr1** |").endswith("| **chosen** |")
    assert tuning.count("**chosen**") == 2
    assert '- ce: **C-lr2**, trained with `{"teachers": [], "lr": 0.002}`' in tuning


def test_the_accuracy_table_shows_each_seed_and_a_missing_one_as_a_dash():
    acc = section(text_of(), "### 3.4", "Accuracy % by task")
    assert line_of(acc, "| C |") == "| C | 26.0 | 1.0 | 0.8 | 25.0 | 27.0 |"
    assert line_of(acc, "| S-w3 |") == "| S-w3 | 23.0 | — | — | 23.0 | — |"


def test_curve_and_kv_scale_figures_are_written_and_linked(tmp_path):
    write_study(tmp_path)
    text = report(tmp_path)
    for stem in ("forest", "curve_dose", "kv_scale", "grad_norms", "learning_curves"):
        assert (tmp_path / "figures" / f"{stem}.png").stat().st_size > 0
        assert f"](figures/{stem}.png)" in text
    assert "![Curve dose: difference vs KV weight](figures/curve_dose.png)" in text
    assert "routing" not in text  # no run logged fusion weights
    assert text.index("## 3. Results") < text.index("## 4. Figures") < text.index("figures/forest.png")


def test_a_missing_statistics_file_is_named_with_the_stage_that_writes_it(tmp_path):
    path = tmp_path / "statistics" / "statistics.json"
    with pytest.raises(ValueError, match=f"{path} does not exist; run the statistics stage first"):
        load_statistics(path)


def test_a_missing_learning_curve_is_named_with_the_train_stage(tmp_path):
    write_study(tmp_path)
    (tmp_path / "students" / "X" / "1" / "learning_curve.jsonl").unlink()
    with pytest.raises(ValueError, match=r"X/1/learning_curve.jsonl does not exist; run the train stage first"):
        report(tmp_path)


def test_statistics_without_a_key_the_report_reads_are_refused(tmp_path):
    stats = copy.deepcopy(STATS)
    del stats["primary"]["P2"]["mde"], stats["primary"]["P1"]["per_example"]["p"], stats["power"]
    (tmp_path / "statistics.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=r"lacks \['power', 'primary.P1.per_example.p', 'primary.P2.mde'\]; re-run"):
        load_statistics(tmp_path / "statistics.json")


def test_a_plan_that_disagrees_with_the_statistics_is_refused():
    with pytest.raises(ValueError, match=r"describes \['P1'\] but the statistics' primary contrasts are"):
        check_plan(PLAN | {"contrasts": {"P1": "x"}}, STATS)
    with pytest.raises(ValueError, match=r"points \{'dose.3': 'w9'\} name no contrast"):
        check_plan(PLAN | {"curves": {"dose": {"x": "w", "points": {"1": "P1", "3": "w9"}}}}, STATS)
    with pytest.raises(ValueError, match=r"report.plan lacks \['tuning'\] and has unknown keys \['control'\]"):
        check_plan({k: v for k, v in PLAN.items() if k != "tuning"} | {"control": "C"}, STATS)
    with pytest.raises(ValueError, match="report.plan.alpha is 0.01 but the statistics used 0.05"):
        check_plan(PLAN | {"alpha": 0.01}, STATS)


def test_identical_predictions_on_shared_seeds_are_pointed_out():
    records = [
        {"group": g, "seed": s, "id": i, "generated": str(i)} for g in ("S", "X") for s in (0, 1) for i in (0, 1)
    ]
    records += [{"group": "S-w3", "seed": 0, "id": i, "generated": str(i)} for i in (0, 1)]  # S's, on seed 0
    records += [
        {"group": "C", "seed": 0, "id": 0, "generated": "7"},
        {"group": "C", "seed": 0, "id": 1, "generated": "1"},
    ]
    records += [{"group": "F", "seed": 2, "id": i, "generated": str(i)} for i in (0, 1)]  # no seed shared with S
    assert identical_groups(records) == {"X": "S", "S-w3": "S"}
    text = render(PLAN, STATS, CHOICES, SPLITS, {"A": TEACHER}, {}, {"X": "S"})
    assert "Note: X made exactly the same predictions as S on every seed and test problem they share" in text


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
    text = render(PLAN, STATS, CHOICES, SPLITS, {"A": TEACHER}, figures)
    assert "![Teacher A: training cross-entropy](teachers/A/learning_curve.png)" in text
    assert "![Teacher x student CKA per KV head (last layer's keys)](alignment/heads.png)" in text
    assert "teachers/B" not in text
