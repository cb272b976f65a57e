"""The latent study's part of ``REPORT.md``: its plan (``report.latent_plan``, fixed before any result), each arm's
accuracy beside its forward passes per answer, the regime check (CoT-SFT above No-CoT), the primary contrasts with
their Holm decisions and generated sentences, and a figure of accuracy against forward passes.

It reads the statistics stage's ``latent.json`` (``kvlib.contrasts.analyse`` on the latent runs' test records, plus
``forward_passes``: arm -> mean passes per answer) and judges contrasts exactly as ``kvlib.report`` does.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from kvlib.report import (
    ROW_KEYS,
    _pct,
    _pts,
    _sd,
    answer_sentence,
    check_described,
    check_keys,
    ci_level,
    read_json,
    results_table,
)

LATENT_PLAN_KEYS = ("question", "regime", "seeds", "arms", "contrasts")
LATENT_PLAN_OPTIONAL = ("caveats", "bounds")
REGIME_GAP = 0.15  # CoT-SFT must stand this far above No-CoT, or there is nothing for latent reasoning to recover


def load_latent_statistics(path) -> dict:
    """``latent.json``, checked to hold what this section reads (ValueError naming the missing keys)."""
    stats = read_json(path, "statistics")
    missing = [k for k in ("n_examples", "alpha", "power", "accuracy", "primary", "exploratory", "forward_passes")]
    missing = [k for k in missing if k not in stats]
    missing += [f"primary.{n}.{k}" for n, r in stats.get("primary", {}).items() for k in ROW_KEYS if k not in r]
    if missing:
        raise ValueError(f"{path} lacks {missing}; re-run the statistics stage (it writes them)")
    return stats


def check_latent_plan(plan: dict, stats: dict) -> None:
    """``report.latent_plan`` has the keys this section reads and agrees with ``latent.json``, else ValueError."""
    check_keys(plan, LATENT_PLAN_KEYS, LATENT_PLAN_OPTIONAL, "report.latent_plan")
    check_described("report.latent_plan.contrasts", plan["contrasts"], stats["primary"], "its primary contrasts")
    check_described("report.latent_plan.arms", plan["arms"], stats["accuracy"], "the arms of its runs")
    bounds = plan.get("bounds")
    if bounds is not None and (sorted(bounds) != ["cot", "nocot"] or not set(bounds.values()) <= set(plan["arms"])):
        raise ValueError(f"report.latent_plan.bounds maps cot and nocot to arms of the study, got {bounds}")


def regime_line(plan: dict, stats: dict) -> str:
    """Whether CoT-SFT stood at least ``REGIME_GAP`` above No-CoT on the test split (the regime's condition)."""
    bounds = plan.get("bounds")
    if bounds is None:
        return "- No CoT-SFT / No-CoT bounds were run, so the regime's condition is not checked here."
    cot, nocot = (stats["accuracy"][bounds[k]]["mean"] for k in ("cot", "nocot"))
    held = cot - nocot >= REGIME_GAP
    return (
        f"- **Regime check**: CoT-SFT ({bounds['cot']}) {_pct(cot)}% vs No-CoT ({bounds['nocot']}) {_pct(nocot)}%, "
        f"{_pts(cot - nocot)} points: the condition of at least {100 * REGIME_GAP:.0f} points "
        + (
            "holds; there is reasoning for the latent arms to recover."
            if held
            else "does **not** hold on the test split."
        )
    )


def latent_section(plan: dict, stats: dict) -> list[str]:
    """The latent study's Markdown: plan, arms with accuracy and forward passes, contrasts, answer, caveats."""
    check_latent_plan(plan, stats)
    alpha = stats["alpha"]
    lines = ["## 5. The latent study (continuous thoughts supervised by compressed KV)", ""]
    lines += [f"- **Question**: {plan['question']}", f"- **Regime (fixed from CE-only pilots)**: {plan['regime']}"]
    lines += [
        f"- **Test split**: {stats['n_examples']} problems; {plan['seeds']} seeds per primary arm; Holm over the "
        f"primary contrasts at alpha = {alpha}; MDE at power {stats['power']}",
        "",
        "| arm | what it is | accuracy % (mean) | seed sd | forward passes per answer |",
        "|---|---|---|---|---|",
    ]
    for arm, description in plan["arms"].items():
        a = stats["accuracy"][arm]
        lines += [
            f"| {arm} | {description} | {_pct(a['mean'])} | {_sd(a['seed_sd'])} | {stats['forward_passes'][arm]:.1f} |"
        ]
    lines += ["", regime_line(plan, stats), "", "### 5.1 Primary contrasts", ""]
    lines += results_table(stats["primary"], alpha, True)
    lines += [
        "",
        f"The {ci_level(alpha)} CI and p count seed variance (crossed random effects over seeds and test problems).",
        "",
        "### 5.2 The answer",
        "",
    ]
    lines += [
        "- " + answer_sentence(n, r, plan["contrasts"][n], alpha, "Holm over the latent study's primary contrasts")
        for n, r in stats["primary"].items()
    ]
    if stats["exploratory"]:
        lines += ["", "### 5.3 Exploratory contrasts (not corrected for multiple comparisons)", ""]
        lines += results_table(stats["exploratory"], alpha, False)
    if plan.get("caveats"):
        lines += ["", "**What this does and does not show**", ""] + [f"- {c}" for c in plan["caveats"]]
    return lines


def passes_figure(stats: dict) -> Figure:
    """Each arm's mean accuracy (with its seeds as dots) against its mean forward passes per answer."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (arm, a) in enumerate(stats["accuracy"].items()):
        x = stats["forward_passes"][arm]
        ax.plot([x] * len(a["seeds"]), [100 * v for v in a["seeds"].values()], ".", color=f"C{i}", alpha=0.5)
        ax.plot(x, 100 * a["mean"], "o", color=f"C{i}", label=arm)
    ax.set(xlabel="forward passes per answer (mean)", ylabel="test accuracy %", xscale="log")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
