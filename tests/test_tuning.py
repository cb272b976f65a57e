"""The tuning rule: each family's best candidate on validation, and tuned arms built from the choice."""

import itertools
import json

import pytest

from kvlib import project_root
from kvlib.config import load_params
from kvlib.distill import GroupConfig
from kvlib.tuning import choose, overlay, resolve_group

KV = {"weight": 1.0, "time_align": "span"}
GROUPS = {
    "C-lr1": {"teachers": [], "lr": 0.001},
    "C-lr2": {"teachers": [], "lr": 0.002},
    "S-lr1": {"teachers": ["A"], "lr": 0.001, "kv": KV},
    "S-lr2": {"teachers": ["A"], "lr": 0.002, "kv": KV},
    "C": {"tuned": "ce"},
    "X": {"tuned": "kv", "kv": {"shuffle_time": True}},
    "F": {"tuned": "kv", "teachers": ["A", "B"], "fusion": {"kind": "router"}},
}


def write_run(root, name, seed, accuracies):
    run = root / name / str(seed)
    run.mkdir(parents=True)
    rows = [{"step": 50 * (i + 1), "val_accuracy": a} for i, a in enumerate(accuracies)]
    (run / "validation.json").write_text(json.dumps(rows))
    (run / "summary.json").write_text(json.dumps({"group": GROUPS[name]}))


def test_the_best_mean_final_validation_accuracy_wins(tmp_path):
    # C-lr1 peaks earlier (0.5 at step 50) but ends lower: only the final accuracy counts
    for seed, (a1, a2) in zip((100, 101), ((0.20, 0.25), (0.30, 0.26))):
        write_run(tmp_path, "C-lr1", seed, [0.5, a1])
        write_run(tmp_path, "C-lr2", seed, [0.1, a2])
    choices = choose({"ce": ["C-lr1", "C-lr2"]}, [100, 101], tmp_path)
    assert choices["ce"]["chosen"] == "C-lr2"  # means 0.25 vs 0.255
    assert choices["ce"]["candidates"]["C-lr1"] == {"seeds": {"100": 0.20, "101": 0.30}, "mean": pytest.approx(0.25)}
    assert choices["ce"]["settings"] == GROUPS["C-lr2"]


def test_a_tie_goes_to_the_candidate_listed_first(tmp_path):
    for name in ("S-lr2", "S-lr1"):
        write_run(tmp_path, name, 100, [0.3])
    assert choose({"kv": ["S-lr2", "S-lr1"]}, [100], tmp_path)["kv"]["chosen"] == "S-lr2"
    assert choose({"kv": ["S-lr1", "S-lr2"]}, [100], tmp_path)["kv"]["chosen"] == "S-lr1"


def test_a_missing_candidate_run_is_named(tmp_path):
    write_run(tmp_path, "C-lr1", 100, [0.3])
    with pytest.raises(ValueError, match=r"C-lr2/100/validation.json does not exist: train the candidate first"):
        choose({"ce": ["C-lr1", "C-lr2"]}, [100], tmp_path)


def test_an_arm_is_the_chosen_candidate_with_its_own_keys_on_top():
    choices = {"ce": {"settings": GROUPS["C-lr2"]}, "kv": {"settings": GROUPS["S-lr1"]}}
    assert resolve_group(GROUPS, "C", choices) == GROUPS["C-lr2"]
    assert resolve_group(GROUPS, "X", choices) == {**GROUPS["S-lr1"], "kv": {**KV, "shuffle_time": True}}
    fused = resolve_group(GROUPS, "F", choices)
    assert fused["teachers"] == ["A", "B"] and fused["lr"] == 0.001 and fused["kv"] == KV
    assert resolve_group(GROUPS, "S-lr1", None) == GROUPS["S-lr1"]  # a plain group needs no choice
    assert GROUPS["S-lr1"]["kv"] == KV  # the overlay copied, it did not edit the candidate
    with pytest.raises(ValueError, match="is tuned by family 'ce' but no tuning choices were given"):
        resolve_group(GROUPS, "C", None)


def test_overlay_merges_mappings_and_replaces_the_rest():
    assert overlay({"a": {"x": 1, "y": 2}, "l": [1, 2]}, {"a": {"y": 3}, "l": [3]}) == {"a": {"x": 1, "y": 3}, "l": [3]}


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml", "real_qwen2_tinyllama.yaml"])
def test_no_two_compared_groups_are_identical_whatever_the_tuning_chooses(name):
    """The arms and secondary groups of each params file, resolved for every combination of candidates the tune
    stage can choose, are valid GroupConfigs and pairwise different (no arm is another by construction)."""
    params = load_params(project_root() / "params" / name)
    study, groups, families = params["study"], params["train"]["groups"], params["tune"]["families"]
    compared = [study["control"], *study["groups"], *study["secondary"]["groups"]]
    for picks in itertools.product(*families.values()):
        choices = {f: {"settings": groups[c]} for f, c in zip(families, picks)}
        resolved = {g: resolve_group(groups, g, choices) for g in compared}
        for settings in resolved.values():
            GroupConfig.from_params(settings)
        for (g1, s1), (g2, s2) in itertools.combinations(resolved.items(), 2):
            assert s1 != s2, f"{name}: {g1} and {g2} both train with {s1} when the tuning picks {picks}"
