"""The study's analysis plan carried out: each pre-registered contrast ``a - b`` between two groups.

Every evaluated student has one 0/1 ``correct`` per test example; a group's runs are keyed by seed. A
contrast compares its two groups on the seeds both have (row s of each used student seed s: the same
initialisation and data order), on the same test examples, so it is paired twice. Per contrast:

- the headline, **with seed variance**: ``kvlib.stats.crossed_effect`` (seeds and examples both random:
  a t interval with Satterthwaite df, and its test), whose standard error and df also give the minimum
  detectable effect at the planned power (``minimum_detectable_effect`` with t quantiles, Bonferroni over
  the primary contrasts: the worst case of Holm; exploratory contrasts at alpha);
- the per-example view of the earlier analysis (seeds averaged per example first, so seeds are fixed):
  the paired BCa bootstrap CI and the sign-flip permutation test;
- the two-stage (seeds, then examples) bootstrap, a conservative check of the headline CI;
- Cohen's h of the two accuracies.

Holm's correction runs over the primary contrasts only, on the headline p-values; exploratory contrasts
are reported unadjusted and labelled so.
"""

from __future__ import annotations

import numpy as np

from kvlib.stats import (
    cohens_h,
    crossed_effect,
    hierarchical_bootstrap,
    holm,
    minimum_detectable_effect,
    paired_bootstrap_ci,
    paired_permutation_test,
    seed_variance,
)


def correctness(records: list[dict]) -> tuple[dict[str, dict[int, np.ndarray]], list]:
    """Evaluation records (``group``, ``seed``, ``id``, ``correct``) as group -> seed -> (N,) 0/1, on the sorted
    example ids (returned too); every run must hold every example once."""
    ids = sorted({r["id"] for r in records})
    position = {i: k for k, i in enumerate(ids)}
    runs: dict[tuple, np.ndarray] = {}
    seen: dict[tuple, int] = {}
    for r in records:
        key = (r["group"], int(r["seed"]))
        row = runs.setdefault(key, np.full(len(ids), -1, dtype=np.int64))
        row[position[r["id"]]] = int(bool(r["correct"]))
        seen[key] = seen.get(key, 0) + 1
    incomplete = sorted(f"{g}-{s}" for (g, s), row in runs.items() if (row < 0).any() or seen[g, s] != len(ids))
    if incomplete:
        raise ValueError(
            f"runs {incomplete} were not evaluated on each of the {len(ids)} test examples exactly once; re-run the "
            "evaluate stage"
        )
    out: dict[str, dict[int, np.ndarray]] = {}
    for (g, s), row in sorted(runs.items()):
        out.setdefault(g, {})[s] = row
    return out, ids


def accuracy_summary(runs: dict[int, np.ndarray]) -> dict:
    """One group's accuracy per seed, its mean, and (two seeds or more) ``seed_variance``'s two sds."""
    seeds = sorted(runs)
    table = np.stack([runs[s] for s in seeds])  # (S, N)
    spread = seed_variance(table) if len(seeds) > 1 else {"accuracy_sd": None, "binomial_sd": None}
    return {
        "seeds": {str(s): float(table[k].mean()) for k, s in enumerate(seeds)},
        "mean": float(table.mean()),
        "seed_sd": spread["accuracy_sd"],
        "binomial_sd": spread["binomial_sd"],
    }


def contrast(
    correct: dict[str, dict[int, np.ndarray]],
    a: str,
    b: str,
    alpha: float,
    power: float,
    tests: int,
    n_resamples: int,
    seed: int,
) -> dict:
    """``a - b`` on their common seeds (see the module docstring); ``tests``: contrasts the MDE corrects for."""
    for g in (a, b):
        if g not in correct:
            raise ValueError(f"group {g!r} has no evaluated run (groups: {sorted(correct)}); evaluate it first")
    seeds = sorted(set(correct[a]) & set(correct[b]))
    if not seeds:
        raise ValueError(
            f"groups {a!r} (seeds {sorted(correct[a])}) and {b!r} (seeds {sorted(correct[b])}) share no seed; a "
            "contrast pairs runs of the same seed"
        )
    ta, tb = (np.stack([correct[g][s] for s in seeds]) for g in (a, b))  # (S, N) each
    head = crossed_effect(ta, tb, confidence=1 - alpha)
    ea, eb = ta.mean(0), tb.mean(0)  # (N,) per-example accuracy over the seeds
    per_example = paired_bootstrap_ci(ea, eb, n_resamples=n_resamples, confidence=1 - alpha, seed=seed)
    boot = hierarchical_bootstrap(ta, tb, n_resamples=n_resamples, confidence=1 - alpha, seed=seed)
    return {
        "a": a,
        "b": b,
        "seeds": seeds,
        "accuracy_a": float(ta.mean()),
        "accuracy_b": float(tb.mean()),
        "diff": head["diff"],
        "ci_low": head["low"],
        "ci_high": head["high"],
        "se": head["se"],
        "df": head["df"],
        "p": head["p"],
        "method": head["method"],
        "mde": minimum_detectable_effect(head["se"], alpha=alpha, power=power, tests=tests, df=head["df"]),
        "per_example": {
            "ci_low": per_example["low"],
            "ci_high": per_example["high"],
            "p": paired_permutation_test(ea, eb, n_resamples=n_resamples, seed=seed),
        },
        "bootstrap": {"ci_low": boot["low"], "ci_high": boot["high"], "se": boot["se"]},
        "cohens_h": cohens_h(float(ta.mean()), float(tb.mean())),
    }


def analyse(
    correct: dict[str, dict[int, np.ndarray]],
    primary: dict[str, list[str]],
    exploratory: dict[str, list[str]],
    alpha: float = 0.05,
    power: float = 0.8,
    n_resamples: int = 10000,
    seed: int = 0,
) -> dict:
    """Every group's accuracy and every contrast (name -> [a, b]); Holm over ``primary`` (1 to 4 contrasts)."""
    if not 1 <= len(primary) <= 4:
        raise ValueError(f"pre-register one to four primary contrasts, got {len(primary)}: {sorted(primary)}")
    rows = {
        kind: {
            name: contrast(correct, a, b, alpha, power, len(primary) if kind == "primary" else 1, n_resamples, seed)
            for name, (a, b) in contrasts.items()
        }
        for kind, contrasts in (("primary", primary), ("exploratory", exploratory))
    }
    adjusted = holm({name: row["p"] for name, row in rows["primary"].items()}, alpha=alpha)
    for name, row in rows["primary"].items():
        row["p_holm"], row["reject"] = adjusted[name]["p_adjusted"], adjusted[name]["reject"]
    accuracy = {g: accuracy_summary(runs) for g, runs in correct.items()}
    return {"alpha": alpha, "power": power, "accuracy": accuracy} | rows
