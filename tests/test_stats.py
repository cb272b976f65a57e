import itertools
import math

import numpy as np
import pytest
import scipy.stats

from kvlib.stats import (
    cohens_h,
    holm,
    mcnemar_test,
    paired_bootstrap_ci,
    paired_permutation_test,
    per_example_accuracy,
)

R = 2000  # resamples in tests: enough for stable 95% intervals, fast


def bernoulli(p, size, seed):
    return (np.random.default_rng(seed).random(size) < p).astype(np.int64)


# per_example_accuracy


def test_per_example_accuracy_averages_seeds_within_each_example():
    correct = np.array([[1, 0, 1, 0], [1, 1, 0, 0]])
    assert per_example_accuracy(correct).tolist() == [1.0, 0.5, 0.5, 0.0]


def test_per_example_accuracy_accepts_booleans():
    assert per_example_accuracy(np.array([[True, False]])).tolist() == [1.0, 0.0]


def test_per_example_accuracy_rejects_a_flat_array():
    with pytest.raises(ValueError, match=r"correct must be \(S seeds, N examples\) with S, N >= 1, got shape \(3,\)"):
        per_example_accuracy(np.zeros(3))


def test_per_example_accuracy_rejects_an_empty_array():
    with pytest.raises(ValueError, match=r"got shape \(2, 0\)"):
        per_example_accuracy(np.zeros((2, 0)))


def test_per_example_accuracy_rejects_values_other_than_0_and_1():
    with pytest.raises(ValueError, match=r"correct must hold 0/1 correctness, got values \[0.5, 2.0\]"):
        per_example_accuracy(np.array([[0, 1, 2, 0.5]]))


# paired_bootstrap_ci


def test_bootstrap_ci_contains_the_true_difference_and_excludes_zero():
    b = bernoulli(0.5, 2000, seed=1)
    a = bernoulli(0.6, 2000, seed=2)  # true difference 0.1, about 6 standard errors from 0
    ci = paired_bootstrap_ci(a, b, n_resamples=R)
    assert ci["method"] == "BCa"
    assert ci["diff"] == pytest.approx(a.mean() - b.mean())
    assert ci["low"] < 0.1 < ci["high"]
    assert ci["low"] > 0


@pytest.mark.parametrize("method", ["BCa", "percentile", "basic"])
def test_bootstrap_ci_agrees_with_the_normal_interval_on_a_large_sample(method):
    d = bernoulli(0.6, 2000, seed=3) - bernoulli(0.5, 2000, seed=4)
    half = 1.959964 * d.std(ddof=1) / math.sqrt(d.size)
    ci = paired_bootstrap_ci(d, np.zeros_like(d), n_resamples=R, method=method)
    assert ci["low"] == pytest.approx(d.mean() - half, abs=0.004)
    assert ci["high"] == pytest.approx(d.mean() + half, abs=0.004)


def test_bootstrap_ci_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(16)
    a = (rng.random((200, 150)) < 0.6).astype(float)  # 200 studies of 150 examples, true difference 0.1
    b = (rng.random((200, 150)) < 0.5).astype(float)
    cis = [paired_bootstrap_ci(a[i], b[i], n_resamples=1000, seed=i) for i in range(200)]
    coverage = np.mean([ci["low"] <= 0.1 <= ci["high"] for ci in cis])
    assert 0.90 <= coverage <= 0.99  # binomial sd of the coverage at 200 studies: 0.015


def test_bootstrap_ci_of_identical_scores_is_zero_and_degenerate():
    a = bernoulli(0.5, 50, seed=5)
    assert paired_bootstrap_ci(a, a.copy(), n_resamples=R) == {
        "diff": 0.0,
        "low": 0.0,
        "high": 0.0,
        "method": "degenerate",
    }


def test_bootstrap_ci_of_a_constant_shift_collapses_onto_it():
    ci = paired_bootstrap_ci(np.full(20, 2 / 3), np.full(20, 1 / 3), n_resamples=R)
    assert ci["low"] == ci["high"] == ci["diff"] == pytest.approx(1 / 3)


def test_bootstrap_ci_is_deterministic_given_the_seed():
    a, b = bernoulli(0.55, 300, seed=6), bernoulli(0.5, 300, seed=7)
    assert paired_bootstrap_ci(a, b, n_resamples=R, seed=3) == paired_bootstrap_ci(a, b, n_resamples=R, seed=3)
    assert paired_bootstrap_ci(a, b, n_resamples=R, seed=3) != paired_bootstrap_ci(a, b, n_resamples=R, seed=4)


def test_bootstrap_ci_widens_with_the_confidence():
    a, b = bernoulli(0.55, 300, seed=6), bernoulli(0.5, 300, seed=7)
    ci90 = paired_bootstrap_ci(a, b, n_resamples=R, confidence=0.90)
    ci99 = paired_bootstrap_ci(a, b, n_resamples=R, confidence=0.99)
    assert ci99["low"] < ci90["low"] < ci90["diff"] < ci90["high"] < ci99["high"]


def test_bootstrap_ci_rejects_confidence_outside_0_1():
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 95"):
        paired_bootstrap_ci([1, 0], [0, 0], confidence=95)


def test_bootstrap_ci_rejects_zero_resamples():
    with pytest.raises(ValueError, match="n_resamples must be >= 1, got 0"):
        paired_bootstrap_ci([1, 0], [0, 0], n_resamples=0)


def test_bootstrap_ci_rejects_an_unknown_method():
    with pytest.raises(ValueError, match=r"method must be one of \('BCa', 'percentile', 'basic'\), got 'bca'"):
        paired_bootstrap_ci([1, 0], [0, 0], method="bca")


def test_bootstrap_ci_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="a has 3 examples but b has 2"):
        paired_bootstrap_ci([1, 0, 1], [0, 0])


def test_bootstrap_ci_rejects_empty_scores():
    with pytest.raises(ValueError, match=r"a must be a non-empty 1-d array of per-example scores \(N,\), got shape"):
        paired_bootstrap_ci([], [])


def test_bootstrap_ci_rejects_non_finite_scores():
    with pytest.raises(ValueError, match=r"b holds non-finite values \[nan\]"):
        paired_bootstrap_ci([1, 0], [0, float("nan")])


# paired_permutation_test


def test_permutation_p_is_one_when_the_differences_cancel():
    a = np.array([1] * 10 + [0] * 10 + [1] * 30)
    b = np.array([0] * 10 + [1] * 10 + [1] * 30)  # 10 wins, 10 losses: mean difference exactly 0
    assert paired_permutation_test(a, b, n_resamples=R) == 1.0
    assert paired_permutation_test(a, a, n_resamples=R) == 1.0


def test_permutation_p_is_large_for_data_from_one_distribution():
    a, b = bernoulli(0.5, 400, seed=8), bernoulli(0.5, 400, seed=9)
    assert paired_permutation_test(a, b, n_resamples=R) > 0.2


def test_permutation_p_is_calibrated_under_the_null():
    rng = np.random.default_rng(17)
    a = rng.normal(size=(300, 100))  # 300 studies of 100 continuous scores (0/1 ties make the test conservative)
    b = rng.normal(size=(300, 100))
    p = np.array([paired_permutation_test(a[i], b[i], n_resamples=500, seed=i) for i in range(300)])
    assert 0.02 <= np.mean(p <= 0.05) <= 0.09  # binomial sd at 300 studies: 0.013
    assert 0.4 <= np.median(p) <= 0.6


def test_permutation_p_is_tiny_for_a_strong_effect_but_never_zero():
    a, b = bernoulli(0.8, 400, seed=10), bernoulli(0.4, 400, seed=11)
    p = paired_permutation_test(a, b, n_resamples=R)
    assert p == 1 / (R + 1)  # no flip reaches the observed mean: the smallest p the test can give
    assert 0 < p < 0.01


def test_permutation_p_matches_exact_enumeration_of_all_sign_flips():
    d = np.array([1.0, 1.0, 1.0, 0.5, 1.0, -1.0, 0.5, 1.0, 0.0, -0.5])
    flips = np.array(list(itertools.product([-1.0, 1.0], repeat=d.size)))  # (1024, 10)
    exact = np.mean(np.abs(flips @ d) >= abs(d.sum()) - 1e-12)
    p = paired_permutation_test(d, np.zeros_like(d), n_resamples=20000)
    assert p == pytest.approx(exact, abs=0.01)


def test_permutation_p_is_deterministic_given_the_seed():
    a, b = bernoulli(0.55, 200, seed=12), bernoulli(0.5, 200, seed=13)
    assert paired_permutation_test(a, b, R, seed=1) == paired_permutation_test(a, b, R, seed=1)


def test_permutation_test_rejects_zero_resamples():
    with pytest.raises(ValueError, match="n_resamples must be >= 1, got 0"):
        paired_permutation_test([1, 0], [0, 0], n_resamples=0)


# mcnemar_test


def test_mcnemar_counts_discordant_pairs_and_matches_the_binomial_test():
    #        a=1,b=1  a=0,b=1  a=1,b=0  a=0,b=0
    a = np.array([1] * 5 + [0] * 2 + [1] * 8 + [0] * 4)
    b = np.array([1] * 5 + [1] * 2 + [0] * 8 + [0] * 4)
    r = mcnemar_test(a, b)
    assert (r["b01"], r["b10"]) == (2, 8)
    assert r["p"] == pytest.approx(2 * (1 + 10 + 45) / 2**10)  # 2 P(X <= 2), X ~ Bin(10, 1/2)
    assert r["p"] == pytest.approx(scipy.stats.binomtest(2, 10, 0.5).pvalue)
    assert mcnemar_test(b, a) == {"b01": 8, "b10": 2, "p": r["p"]}


def test_mcnemar_p_is_one_without_discordant_pairs():
    a = np.array([1, 0, 1, 1])
    assert mcnemar_test(a, a) == {"b01": 0, "b10": 0, "p": 1.0}


def test_mcnemar_rejects_seed_averaged_scores():
    with pytest.raises(ValueError, match=r"b must hold 0/1 correctness, got values \[0.5\]"):
        mcnemar_test([1, 0, 1], [1, 0.5, 0])


# holm


def test_holm_matches_the_textbook_example():
    r = holm({"g1": 0.01, "g2": 0.04, "g3": 0.03, "g4": 0.005}, alpha=0.05)
    adjusted = {n: v["p_adjusted"] for n, v in r.items()}
    assert adjusted == pytest.approx({"g1": 0.03, "g2": 0.06, "g3": 0.06, "g4": 0.02})
    assert {n: v["reject"] for n, v in r.items()} == {"g1": True, "g2": False, "g3": False, "g4": True}
    assert r["g2"]["p"] == 0.04
    assert list(r) == ["g1", "g2", "g3", "g4"]


def test_holm_adjusted_p_values_are_monotone_capped_and_never_below_the_raw_ones():
    p = dict(zip("abcdefgh", np.random.default_rng(14).random(8) ** 2))
    r = holm(p)
    ordered = [r[n]["p_adjusted"] for n in sorted(p, key=p.get)]
    assert ordered == sorted(ordered)
    assert all(p[n] <= r[n]["p_adjusted"] <= 1 for n in p)
    assert holm({"a": 0.6, "b": 0.7}) == {
        "a": {"p": 0.6, "p_adjusted": 1.0, "reject": False},
        "b": {"p": 0.7, "p_adjusted": 1.0, "reject": False},
    }


def test_holm_leaves_a_single_p_value_unchanged():
    assert holm({"g1": 0.03}) == {"g1": {"p": 0.03, "p_adjusted": 0.03, "reject": True}}


def test_holm_rejects_alpha_outside_0_1():
    with pytest.raises(ValueError, match="alpha must be in \\(0, 1\\), got 0"):
        holm({"g1": 0.01}, alpha=0)


def test_holm_rejects_an_empty_dict():
    with pytest.raises(ValueError, match="holm needs at least one p-value"):
        holm({})


def test_holm_rejects_p_values_outside_0_1():
    with pytest.raises(ValueError, match=r"p-values must be in \[0, 1\], got \{'g1': 0.01, 'g2': 1.5\}"):
        holm({"g1": 0.01, "g2": 1.5})


# cohens_h


def test_cohens_h_golden_value_and_range_check():
    assert cohens_h(0.5, 0.25) == pytest.approx(2 * np.arcsin(np.sqrt(0.5)) - 2 * np.arcsin(np.sqrt(0.25)))
    assert cohens_h(0.3, 0.3) == 0.0
    with pytest.raises(ValueError, match="cohens_h needs proportions in"):
        cohens_h(30.0, 20.0)
