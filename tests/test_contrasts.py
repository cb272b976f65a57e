"""The analysis plan carried out: contrasts on common seeds, Holm over the primary ones only, the MDE."""

import numpy as np
import pytest

from kvlib.contrasts import analyse, correctness
from kvlib.stats import crossed_effect, holm, minimum_detectable_effect


def records(group, seeds, p, rng, n=300):
    return [
        {"group": group, "seed": s, "id": f"q{i}", "task": "chain", "correct": bool(c)}
        for s in seeds
        for i, c in enumerate(rng.random(n) < p)
    ]


@pytest.fixture(scope="module")
def study():
    rng = np.random.default_rng(0)
    rows = records("C", range(5), 0.2, rng) + records("S", range(5), 0.3, rng) + records("X", range(5), 0.2, rng)
    rows += records("S-w3", [0, 1], 0.25, rng)
    correct, ids = correctness(rows)
    primary, exploratory = {"P1": ["S", "C"], "P2": ["S", "X"]}, {"w3": ["S-w3", "C"]}
    return correct, analyse(correct, primary, exploratory, n_resamples=500)


def test_a_contrast_pairs_the_common_seeds_and_uses_the_crossed_effect(study):
    correct, stats = study
    row = stats["exploratory"]["w3"]
    assert row["seeds"] == [0, 1]  # C has five, S-w3 two: only seeds 0 and 1 are paired
    a, b = np.stack([correct["S-w3"][s] for s in (0, 1)]), np.stack([correct["C"][s] for s in (0, 1)])
    head = crossed_effect(a, b)
    assert (row["diff"], row["ci_low"], row["ci_high"]) == (head["diff"], head["low"], head["high"])
    assert row["p"] == head["p"]
    assert row["accuracy_b"] == pytest.approx(b.mean()) and row["accuracy_b"] != stats["accuracy"]["C"]["mean"]


def test_holm_runs_over_the_primary_contrasts_only_and_the_mde_corrects_for_them(study):
    _, stats = study
    primary = stats["primary"]
    expected = holm({n: r["p"] for n, r in primary.items()})
    assert {n: r["p_holm"] for n, r in primary.items()} == {n: e["p_adjusted"] for n, e in expected.items()}
    assert "p_holm" not in stats["exploratory"]["w3"]
    p1, w3 = primary["P1"], stats["exploratory"]["w3"]
    assert p1["mde"] == pytest.approx(minimum_detectable_effect(p1["se"], tests=2, df=p1["df"]))
    assert w3["mde"] == pytest.approx(minimum_detectable_effect(w3["se"], tests=1, df=w3["df"]))
    assert p1["mde"] > minimum_detectable_effect(p1["se"], tests=2)  # t quantiles: wider than the normal ones
    assert primary["P1"]["reject"] and primary["P1"]["diff"] > 0.05  # a 10-point effect on 5 x 300 is found


def test_every_group_gets_its_seed_spread(study):
    _, stats = study
    c = stats["accuracy"]["C"]
    assert list(c["seeds"]) == ["0", "1", "2", "3", "4"] and c["seed_sd"] > 0 and c["binomial_sd"] > 0
    assert c["mean"] == pytest.approx(np.mean(list(c["seeds"].values())))


def test_runs_missing_examples_and_contrasts_without_common_seeds_are_refused():
    rng = np.random.default_rng(1)
    rows = records("C", [0], 0.2, rng, n=10) + records("S", [1], 0.3, rng, n=10)
    with pytest.raises(ValueError, match=r"runs \['S-1'\] were not evaluated on each of the 10 test examples"):
        correctness(rows[:-1])
    correct, _ = correctness(rows)
    with pytest.raises(ValueError, match=r"groups 'S' \(seeds \[1\]\) and 'C' \(seeds \[0\]\) share no seed"):
        analyse(correct, {"P1": ["S", "C"]}, {})
    with pytest.raises(ValueError, match="pre-register one to four primary contrasts, got 5"):
        analyse(correct, {f"P{i}": ["S", "C"] for i in range(5)}, {})
