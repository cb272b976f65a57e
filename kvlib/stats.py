"""The statistical methods of the study (``kvlib.contrasts`` applies them to the planned contrasts).

Every student is evaluated on the same test split, one 0/1 ``correct`` per (group, seed, example).
Comparisons are **paired by test example** (Dror et al. 2018, https://aclanthology.org/P18-1128/). The
per-example methods first average a group's seeds within each example (``per_example_accuracy``, (S, N)
-> (N,)), then resample or sign-flip the per-example differences ``d = a - b``; seeds are held fixed
inside them.

- ``paired_bootstrap_ci``: CI of ``mean(d)`` by resampling examples, BCa by default (Efron 1987,
  https://doi.org/10.1080/01621459.1987.10478410) through ``scipy.stats.bootstrap``. Resampling the
  pairs ``(a_i, b_i)`` is the same as resampling ``d_i``, so the one-sample bootstrap of ``d`` is used.
- ``paired_permutation_test``: two-sided sign-flip test of ``mean(d) = 0``, Monte Carlo with
  ``p = (k + 1) / (n + 1)``, ``k`` the flips with ``|mean| >= |observed|``; never 0 (Phipson & Smyth
  2010, https://arxiv.org/abs/1603.05766).
- ``mcnemar_test``: exact McNemar test of two single runs (binomial test on the discordant pairs).
- ``holm``: Holm-Bonferroni step-down adjusted p-values (Holm 1979), across the primary contrasts.
- ``cohens_h``: the effect size of two proportions.

Seed variance. The intervals above treat the seeds as fixed, so they answer "do these trained students
differ", not "does the method differ"; a seed's own accuracy offset is invisible in them and, when such
offsets are large, they under-cover the true difference in expected accuracy. Four functions include it:

- ``crossed_effect``: what the study uses for each contrast's CI, p-value and the se behind its MDE. The
  two-way crossed random-effects estimate (seeds and examples random, seeds paired across the arms) of
  ``Var(mean(a - b)) = s_seeds^2 / S + s_examples^2 / N + s_residual^2 / (S N)`` from the ANOVA mean
  squares of ``d = a - b`` (unbiased; floored at the paired t-test over per-seed accuracy differences),
  with a Satterthwaite t interval (Satterthwaite 1946, https://doi.org/10.2307/3002019). It counts each
  component once, so its 95% interval covers ~0.95 whether Bernoulli noise or seed offsets dominate
  (0.956 / 0.950 / 0.949 at 5 seeds, seed sd 2 points / 5 seeds, 8 points / 3 seeds, 8 points; 200
  examples, 2 x 20000 simulated studies each) and rejects a true null at ~0.05 (0.044 / 0.049 at 5
  seeds, 20000 studies). Closed form: no resampling and no seed argument.
- ``hierarchical_bootstrap``: the two-way ("pigeonhole", Owen 2007, https://doi.org/10.1214/07-AOAS122)
  bootstrap of the (S, N) seed x example arrays of two arms, kept as a conservative check and for arms
  with unpaired seeds: each resample draws seeds with
  replacement (one draw for both arms when their seeds are paired, i.e. row s shares init and data
  order, independent draws otherwise), then examples with replacement (always one draw for both), and
  takes the difference of the means over the drawn cells. Percentile CI, bootstrap se, and the
  percentile-inversion p-value ``min(1, 2 (min(k_le, k_ge) + 1) / (n + 1))``, k_le (k_ge) the resamples
  <= 0 (>= 0): the smallest 1 - confidence whose equal-tailed interval excludes 0, never 0. Its
  variance given the data is exactly seeds / S + examples / N + residual / (S N) of the two-way ANOVA
  split, so in expectation the seed x example residual (mostly each answer's Bernoulli noise) counts
  about 3 times: the interval is conservative when that noise dominates the seed offsets (at 5 seeds x
  200 examples, seed sd 2 points, 2000 simulated studies: coverage 0.994, null rejection 0.007, mean se^2
  2.3 times the true variance, so an MDE from it would be 1.5 times too large), while with 5 seeds the
  seed part is a plug-in variance with 4 df, so it is about right only by cancellation when the seed
  offsets dominate (seed sd 8 points: coverage 0.955, null rejection 0.041, se^2 1.3 times the truth;
  the limit is P(|t_4| <= 1.96 (4/5)^0.5) = 0.85). tests/test_stats_hierarchical.py holds the
  simulations and this arithmetic.
- ``minimum_detectable_effect``: ``(q_{1 - alpha / (2 tests)} + q_power) se``, the smallest true difference
  a two-sided test at the Bonferroni level (Holm's worst case) detects with the given power, with normal
  quantiles or, given ``crossed_effect``'s df (about S - 1 when seed offsets dominate), t quantiles: at 4
  df (2.78 + 0.94) se instead of 2.80 se for one test at 80% power.
- ``seed_variance``: per-seed accuracy sd next to the sd item-level Bernoulli noise alone would give, so a
  report can say how much of the seed spread is more than coin flips.

Notable choices:

- Differences that are all equal (up to ``_TOL``, e.g. a group identical to the control) give a
  degenerate CI ``low == high == diff`` with ``method == "degenerate"`` instead of a resampling error.
- Everything is deterministic given ``seed``; ``kvlib.contrasts`` uses the same seed for every
  group, so a group's numbers do not depend on which other groups are compared.
- ``crossed_effect`` of arms whose difference is constant gives ``low == high == diff``, se 0 and p 1
  when diff is 0, else 0 (the t test's limit as the spread vanishes); nothing is NaN.
- ``hierarchical_bootstrap`` draws its resamples in chunks of ``_BATCH`` as seed and example counts, so
  memory stays a few ``_BATCH x N`` arrays, never ``_BATCH x S x N``; arms whose statistic cannot move
  (paired: a - b constant; unpaired: each arm constant) give ``low == high == diff``, se 0 and the p of
  that point mass (1 when diff is 0, else the smallest, ``2 / (n + 1)``).
"""

from __future__ import annotations

import numpy as np
import scipy.stats

METHODS = ("BCa", "percentile", "basic")
_TOL = 1e-12  # differences of seed-averaged 0/1 scores closer than this are equal (float noise)
_BATCH = 1000  # resamples drawn per chunk: bounds memory to about _BATCH x N floats


def _as_scores(x, name: str) -> np.ndarray:
    """x as a non-empty, finite (N,) float64 array."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d array of per-example scores (N,), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values {np.unique(x[~np.isfinite(x)]).tolist()}")
    return x


def _differences(a, b) -> np.ndarray:
    """Paired differences (N,) of a (N,) and b (N,)."""
    a, b = _as_scores(a, "a"), _as_scores(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a has {a.size} examples but b has {b.size}; pass scores on the same examples, in order")
    return a - b


def _check_binary(x: np.ndarray, name: str) -> None:
    bad = ~np.isin(x, (0, 1))
    if bad.any():
        raise ValueError(f"{name} must hold 0/1 correctness, got values {np.unique(x[bad]).tolist()[:5]}")


def _as_correct(correct, name: str) -> np.ndarray:
    """correct as a (S, N) float64 array of 0/1 with S, N >= 1."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.ndim != 2 or correct.size == 0:
        raise ValueError(f"{name} must be (S seeds, N examples) with S, N >= 1, got shape {correct.shape}")
    _check_binary(correct, name)
    return correct


def _check_resampling(n_resamples: int, confidence: float, method: str) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}; e.g. 0.95 for a 95% interval")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _bootstrap(d: np.ndarray, statistic, n_resamples: int, confidence: float, seed: int, method: str):
    """(low, high) of ``statistic(d, axis)`` by resampling the paired differences d (N,), N >= 2."""
    res = scipy.stats.bootstrap(
        (d,),
        statistic,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method=method,
        vectorized=True,
        batch=_BATCH,
        rng=np.random.default_rng(seed),
    )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError(
            f"the {method} interval is undefined for these {d.size} paired differences (e.g. BCa's jackknife "
            "is constant); use more examples or method='percentile'"
        )
    return low, high


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def per_example_accuracy(correct) -> np.ndarray:
    """correct (S, N) 0/1 for S seeds x N test examples of one group -> (N,) mean over seeds.

    The paired unit is the test example; seeds are averaged within an example.
    """
    return _as_correct(correct, "correct").mean(axis=0)


def paired_bootstrap_ci(
    a, b, n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0, method: str = "BCa"
) -> dict:
    """CI of ``mean(a - b)`` by resampling examples; a, b (N,) per-example scores on the same examples.

    Returns ``{"diff", "low", "high", "method"}``. When all differences are equal the interval is
    ``low == high == diff`` and ``method`` is ``"degenerate"``.
    """
    _check_resampling(n_resamples, confidence, method)
    d = _differences(a, b)
    diff = float(d.mean())
    if np.ptp(d) <= _TOL:
        return {"diff": diff, "low": diff, "high": diff, "method": "degenerate"}
    low, high = _bootstrap(d, _mean, n_resamples, confidence, seed, method)
    return {"diff": diff, "low": low, "high": high, "method": method}


def paired_permutation_test(a, b, n_resamples: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of ``mean(a - b) == 0`` by random sign flips of the paired differences.

    a, b: (N,) per-example scores on the same examples. ``p = (k + 1) / (n_resamples + 1)`` where k
    counts the flips whose ``|mean|`` reaches the observed one (relative tolerance 1e-9 for ties).
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    d = _differences(a, b)
    observed = abs(d.mean())
    rng = np.random.default_rng(seed)
    k = 0
    for start in range(0, n_resamples, _BATCH):
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(min(_BATCH, n_resamples - start), d.size))  # (R, N)
        k += int(np.count_nonzero(np.abs(signs @ d) / d.size >= observed * (1 - 1e-9)))
    return (k + 1) / (n_resamples + 1)


def mcnemar_test(a, b) -> dict:
    """Exact two-sided McNemar test of two single runs; a, b (N,) 0/1 correctness on the same examples.

    Returns ``{"b01", "b10", "p"}``: b01 counts examples a got wrong and b right, b10 the reverse; p is
    the two-sided binomial test of b01 successes in b01 + b10 trials at 0.5, and 1 with no discordant pair.
    """
    d = _differences(a, b)
    _check_binary(np.asarray(a, dtype=np.float64), "a")
    _check_binary(np.asarray(b, dtype=np.float64), "b")
    b01, b10 = int(np.count_nonzero(d < 0)), int(np.count_nonzero(d > 0))
    p = 1.0 if b01 + b10 == 0 else float(scipy.stats.binomtest(b01, b01 + b10, 0.5).pvalue)
    return {"b01": b01, "b10": b10, "p": p}


def holm(pvalues: dict[str, float], alpha: float = 0.05) -> dict[str, dict]:
    """Holm-Bonferroni step-down over m named p-values.

    Sorted ascending, the j-th smallest (j = 1..m) is adjusted to ``max_{i <= j} (m - i + 1) p_(i)``,
    capped at 1; a hypothesis is rejected when its adjusted p is ``<= alpha``. Returns
    ``{name: {"p", "p_adjusted", "reject"}}`` in the input order.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not pvalues:
        raise ValueError("holm needs at least one p-value, got an empty dict")
    names = list(pvalues)
    p = np.array([pvalues[n] for n in names], dtype=np.float64)  # (m,)
    if not ((p >= 0) & (p <= 1)).all():
        raise ValueError(f"p-values must be in [0, 1], got {dict(zip(names, p.tolist()))}")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(np.maximum.accumulate((m - np.arange(m)) * p[order]), 1.0)
    return {
        n: {"p": float(p[i]), "p_adjusted": float(adjusted[i]), "reject": bool(adjusted[i] <= alpha)}
        for i, n in enumerate(names)
    }


def cohens_h(p1: float, p2: float) -> float:
    """Cohen's h effect size of two proportions: ``2 asin(sqrt(p1)) - 2 asin(sqrt(p2))``."""
    if not (0 <= p1 <= 1 and 0 <= p2 <= 1):
        raise ValueError(f"cohens_h needs proportions in [0, 1], got p1={p1}, p2={p2}")
    return float(2 * np.arcsin(np.sqrt(p1)) - 2 * np.arcsin(np.sqrt(p2)))


def _mean_squares(d: np.ndarray) -> tuple[float, float, float]:
    """(MS_seeds, MS_examples, MS_residual) of the two-way table d (S, N), S, N >= 2, one value per cell."""
    S, N = d.shape
    row, col = d.mean(axis=1), d.mean(axis=0)  # (S,), (N,)
    resid = d - row[:, None] - col[None, :] + d.mean()  # (S, N) seed x example interaction + noise
    return float(N * row.var(ddof=1)), float(S * col.var(ddof=1)), float(np.sum(resid**2) / ((S - 1) * (N - 1)))


def crossed_effect(a, b, confidence: float = 0.95) -> dict:
    """Difference ``mean(a) - mean(b)`` of two arms on paired seeds, with seeds and examples both random.

    a, b: (S, N) 0/1 correctness; row s of both used the same student seed (init and data order) and
    column i is the same test example. On d = a - b (S, N) the model is the two-way crossed
    random-effects ``d_si = mu + alpha_s + beta_i + eps_si``, so ``Var(mean d) = s_a^2 / S + s_b^2 / N +
    s_e^2 / (S N)``. With the mean squares ``MS_seeds = N var(row means)``, ``MS_examples = S var(column
    means)`` (ddof=1) and ``MS_residual`` (the double-centred cells, (S-1)(N-1) df), of expectations
    N s_a^2 + s_e^2, S s_b^2 + s_e^2 and s_e^2, the unbiased estimate is
    ``V = (MS_seeds + MS_examples - MS_residual) / (S N)``.

    Floor: ``V`` is raised to ``MS_seeds / (S N)`` when it falls below, i.e. when ``MS_examples <
    MS_residual`` and the example component ``(MS_examples - MS_residual) / S`` is negative. That value is
    the variance of the paired t-test over the S per-seed accuracy differences, so the crossed se is never
    below the seed-level one, and is exactly it (df S - 1) when the floor binds. The negative seed
    component is not truncated: it comes from a mean square with only S - 1 df, so it is negative in half
    the studies where seed offsets are small next to Bernoulli noise, and the t quantile with few df
    already pays for those low draws. Truncating it too (floor ``max(V, MS_residual / (S N))``, or every
    negative component set to 0) gave 0.979 coverage of the 95% interval at 5 seeds x 200 examples, seed
    sd 2 points (mean se^2 +19% over the true variance); also switching to the df of what is left gave
    0.926 at 3 seeds, seed sd 8 points. This floor gave 0.956 and 0.949 there, mean se^2 +3% and +2%
    (tests/test_stats_hierarchical.py, 20000 studies per number). Only when every seed has the same
    accuracy difference and ``MS_examples <= MS_residual`` is the floor 0 for non-constant d; then the
    residual-only ``MS_residual / (S N)`` is used, so se is 0 only for constant d.

    CI: ``diff +- t_{df, (1 + confidence) / 2} se`` with the Satterthwaite df of the combination used,
    ``df = (sum_j c_j MS_j)^2 / sum_j (c_j MS_j)^2 / df_j`` (c = (1, 1, -1), (1, 0, 0) when floored,
    (0, 0, 1) residual-only), clamped to >= 1; p the two-sided t test of diff = 0 with the same se and df.
    One seed (S = 1): the seed term is not estimable; the per-example paired ``var(d, ddof=1) / N`` with
    N - 1 df is used and ``method`` says so. Constant d: ``low == high == diff``, se 0, df S - 1 (N - 1
    for one seed), p 1.0 when diff is 0 and 0.0 otherwise (the limit of the t test as the spread goes to
    0: no noise, a certain shift).

    Returns ``{"diff", "low", "high", "se", "df", "p", "n_seeds": S, "n_examples": N, "method":
    "crossed"}`` (method ``"crossed (one seed: per-example)"`` for S = 1), diff in proportion units.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}; e.g. 0.95 for a 95% interval")
    a, b = _as_correct(a, "a"), _as_correct(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a {a.shape} and b {b.shape} hold different numbers of examples ({a.shape[1]} vs {b.shape[1]}); "
            "pass (S, N) correctness on the same N test examples, in order"
        )
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"crossed_effect pairs row s of a with row s of b (one shared student seed), got a {a.shape} and "
            f"b {b.shape}; pass the same seeds in both arms, or use hierarchical_bootstrap(paired_seeds=False)"
        )
    S, N = a.shape
    if N < 2:
        raise ValueError(f"crossed_effect needs at least 2 test examples for a variance, got shape {a.shape}")
    d = a - b  # (S, N)
    diff = float(d.mean())
    out = {"diff": diff, "n_seeds": S, "n_examples": N}
    out["method"] = "crossed" if S > 1 else "crossed (one seed: per-example)"
    if np.ptp(d) <= _TOL:
        p = 1.0 if abs(diff) <= _TOL else 0.0
        return out | {"low": diff, "high": diff, "se": 0.0, "df": float(S - 1 if S > 1 else N - 1), "p": p}
    if S == 1:
        ms, dfs, c = np.array([d.var(ddof=1)]), np.array([N - 1]), np.array([1.0])  # V = var(d) / N
    else:
        ms_seeds, ms_examples, ms_residual = _mean_squares(d)
        ms, dfs = np.array([ms_seeds, ms_examples, ms_residual]), np.array([S - 1, N - 1, (S - 1) * (N - 1)])
        if ms_examples > ms_residual:
            c = np.array([1.0, 1.0, -1.0])  # unbiased
        elif np.ptp(d.mean(axis=1)) > _TOL:
            c = np.array([1.0, 0.0, 0.0])  # floor: the per-seed paired t-test
        else:
            c = np.array([0.0, 0.0, 1.0])  # every seed has the same accuracy difference: residual only
    terms = c * ms  # (J,) the mean squares in V, signed
    V = float(terms.sum()) / (S * N)
    df = max(1.0, float(terms.sum() ** 2 / np.sum(terms**2 / dfs)))
    se = float(np.sqrt(V))
    half = float(scipy.stats.t.ppf((1 + confidence) / 2, df)) * se
    p = float(2 * scipy.stats.t.sf(abs(diff) / se, df))
    return out | {"low": diff - half, "high": diff + half, "se": se, "df": df, "p": p}


def _counts(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(size, n) int counts: row r holds how often each of range(n) came up in n draws with replacement."""
    draws = rng.integers(0, n, size=(size, n)) + n * np.arange(size)[:, None]  # (size, n) indices into the flat counts
    return np.bincount(draws.ravel(), minlength=size * n).reshape(size, n)  # (size, n)


def hierarchical_bootstrap(
    a, b, n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0, paired_seeds: bool | None = None
) -> dict:
    """Two-stage bootstrap of ``mean(a) - mean(b)`` that resamples seeds, then examples.

    a: (S, N) and b: (S', N) 0/1 correctness, S and S' seeds on the same N examples in order.
    ``paired_seeds`` (None: paired iff S == S') says row s of a and of b share a student seed; it
    needs S == S'. Each resample draws S (and S') seeds with replacement, one draw for both arms
    when paired, then N examples with replacement, one draw for both arms (examples are always
    paired), and takes the mean over the drawn seeds and examples of a minus the same of b.

    Returns ``{"diff", "low", "high", "se", "p", "n_seeds": [S, S'], "n_examples": N, "method":
    "hierarchical"}``: diff the observed difference in proportion units, [low, high] the percentile
    interval, se the sd (ddof=1) of the resampled statistic, p the percentile-inversion p-value
    ``min(1, 2 (min(k_le, k_ge) + 1) / (n_resamples + 1))`` with k_le (k_ge) the resamples <= 0
    (>= 0). When no resample can differ from diff (paired: a - b constant; unpaired: a and b each
    constant) the interval is [diff, diff], se 0 and p the same formula with every resample at diff.

    Conservative when item-level noise dominates: its variance counts the seed x example residual about
    3 times (Owen 2007), so at 5 seeds x 200 examples, seed sd 2 points, the 95% interval covers 0.994
    and a true null is rejected at 0.007, not 0.05; about right (0.955) at seed sd 8 points only because
    that over-count offsets the 4-df seed part. For paired seeds, ``crossed_effect`` is the calibrated
    interval the study uses; this one is the check that does not depend on the random-effects model.
    """
    if n_resamples < 2:
        raise ValueError(f"n_resamples must be >= 2 for a bootstrap sd, got {n_resamples}")
    _check_resampling(n_resamples, confidence, "percentile")
    a, b = _as_correct(a, "a"), _as_correct(b, "b")
    (Sa, N), (Sb, Nb) = a.shape, b.shape
    if N != Nb:
        raise ValueError(
            f"a {a.shape} and b {b.shape} hold different numbers of examples ({N} vs {Nb}); pass (S, N) "
            "correctness on the same N test examples, in order"
        )
    if paired_seeds is None:
        paired_seeds = Sa == Sb
    if paired_seeds and Sa != Sb:
        raise ValueError(
            f"paired_seeds=True needs one row per shared seed in both arms, got a {a.shape} and b {b.shape}; "
            "pass paired_seeds=False when the arms' seeds are unrelated"
        )
    diff = float(a.mean() - b.mean())
    out = {"diff": diff, "n_seeds": [Sa, Sb], "n_examples": N, "method": "hierarchical"}
    spread = np.ptp(a - b) if paired_seeds else max(np.ptp(a), np.ptp(b))  # 0: every resample equals diff
    if spread <= _TOL:
        k = n_resamples if abs(diff) <= _TOL else 0  # resamples on the far side of 0: all of them, or none
        return out | {"low": diff, "high": diff, "se": 0.0, "p": min(1.0, 2 * (k + 1) / (n_resamples + 1))}
    rng = np.random.default_rng(seed)
    stats = np.empty(n_resamples)  # (n_resamples,)
    for start in range(0, n_resamples, _BATCH):
        size = min(_BATCH, n_resamples - start)
        wa = _counts(rng, Sa, size) / Sa  # (size, S) weight of each seed of a
        wb = wa if paired_seeds else _counts(rng, Sb, size) / Sb  # (size, S')
        wn = _counts(rng, N, size) / N  # (size, N) weight of each example, shared by both arms
        stats[start : start + size] = np.sum((wa @ a - wb @ b) * wn, axis=1)  # (size, N) -> (size,)
    low, high = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    k = int(min(np.count_nonzero(stats <= _TOL), np.count_nonzero(stats >= -_TOL)))
    p = min(1.0, 2 * (k + 1) / (n_resamples + 1))
    return out | {"low": float(low), "high": float(high), "se": float(stats.std(ddof=1)), "p": p}


def minimum_detectable_effect(
    se: float, alpha: float = 0.05, power: float = 0.8, tests: int = 1, df: float | None = None
) -> float:
    """Smallest true difference a two-sided test at level alpha / tests detects with the given power.

    ``(q_{1 - alpha / (2 tests)} + q_{power}) se`` with ``q`` the normal quantiles, or with ``df`` (e.g.
    ``crossed_effect``'s Satterthwaite df) the t quantiles of that df, the usual approximation of the
    noncentral t (with 5 seeds the df is about 4 when seed offsets dominate, and the t MDE is a third larger
    than the normal one). Bonferroni over ``tests`` contrasts, the worst case of Holm; the chance of rejecting
    on the wrong side is neglected. se in the units of the result.
    """
    if not (np.isfinite(se) and se >= 0):
        raise ValueError(f"se must be a finite standard error >= 0, got {se}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power}; e.g. 0.8 for 80%")
    if not isinstance(tests, int | np.integer) or tests < 1:
        raise ValueError(f"tests must be an integer >= 1 (the number of contrasts corrected for), got {tests!r}")
    if df is not None and not (np.isfinite(df) and df > 0):
        raise ValueError(f"df must be a finite number of degrees of freedom > 0, got {df}")
    q = scipy.stats.norm if df is None else scipy.stats.t(df)
    return float((q.ppf(1 - alpha / (2 * tests)) + q.ppf(power)) * se)


def seed_variance(correct) -> dict:
    """How far the per-seed accuracies of one arm spread beyond item-level Bernoulli noise.

    correct: (S, N) 0/1, S >= 2 seeds. Returns ``{"accuracy_sd", "binomial_sd"}``: accuracy_sd the
    sd (ddof=1) over seeds of the per-seed accuracy; binomial_sd ``sqrt(mean_i v_i / N)`` with
    ``v_i = S / (S - 1) pbar_i (1 - pbar_i)`` the across-seed variance (ddof=1) of example i,
    pbar_i its across-seed mean. ``accuracy_sd^2 = binomial_sd^2 + sum_{i != j} cov_ij / N^2``
    exactly (cov the across-seed covariance, ddof=1); if seeds differed only by independent
    per-example coin flips the cross terms would have mean 0 and the two sds would agree on average.
    """
    correct = _as_correct(correct, "correct")
    S, N = correct.shape
    if S < 2:
        raise ValueError(f"seed_variance needs at least 2 seeds for a standard deviation, got shape {correct.shape}")
    v = correct.var(axis=0, ddof=1)  # (N,)
    return {"accuracy_sd": float(correct.mean(axis=1).std(ddof=1)), "binomial_sd": float(np.sqrt(v.mean() / N))}
