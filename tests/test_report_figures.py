"""The report's figures say what they plot: each line's label and colour name the group whose data it draws, on
every panel, and the forest plot's legend names the verdict of each group drawn in its colour."""

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from kvlib.report import (
    TERMS,
    VERDICT_COLORS,
    forest_figure,
    group_colors,
    learning_curves_figure,
    mean_curve,
    routing_figure,
    routing_weights,
    verdict,
)

GROUPS = ["G0", "G1", "G2", "G3"]


def run(k: int, seed: int) -> list[dict]:
    """Group k's rows: CE = k + 1, KV = 10 (k + 1), validation accuracy = (k + 1) %, each + 0.1 * seed; G0 has no KV."""
    rows = []
    for step in (10, 20, 30):
        r = {"step": step, "ce": k + 1 + 0.1 * seed, "val_accuracy": (k + 1 + 0.1 * seed) / 100}
        if k > 0:
            r["kv"] = 10 * (k + 1) + 0.1 * seed
        rows.append(r)
    return rows


CURVES = {g: {str(s): run(k, s) for s in range(2)} for k, g in enumerate(GROUPS)}


def expected(group: str, term: str) -> list[float] | None:
    """What the figure must draw for ``group`` on ``term``'s panel, computed from the synthetic values, not by kvlib."""
    k = GROUPS.index(group)
    if term == "kv":
        return None if k == 0 else [10 * (k + 1) + 0.05] * 3
    return [k + 1.05] * 3  # CE, and validation accuracy in %


def mislabelled(fig, curves: dict) -> list[str]:
    """Every way the figure misnames a line: a label or legend entry that is not the group whose values the line
    plots, a group missing from a panel it has data for, or a group drawn in two colours or two groups in one."""
    problems, colour_of = [], {}
    titles = {title: t for t, (title, _, _) in TERMS.items()}
    for ax in fig.axes:
        t = titles[ax.get_title()]
        drawn = set()
        for line in ax.get_lines():
            owners = [g for g in curves if (e := expected(g, t)) is not None and np.allclose(line.get_ydata(), e)]
            if owners != [line.get_label()]:
                problems.append(f"{t}: the line labelled {line.get_label()} plots the data of {owners}")
            colour_of.setdefault(line.get_label(), set()).add(to_rgba(line.get_color()))
            drawn.add(line.get_label())
        missing = {g for g in curves if expected(g, t) is not None} - drawn
        if missing:
            problems.append(f"{t}: no line for {sorted(missing)}")
        legend = ax.get_legend()
        entries = [(x.get_text(), to_rgba(h.get_color())) for x, h in zip(legend.get_texts(), legend.legend_handles)]
        lines = [(line.get_label(), to_rgba(line.get_color())) for line in ax.get_lines()]
        if entries != lines:
            problems.append(f"{t}: the legend shows {entries}, the lines are {lines}")
    for g, colours in colour_of.items():
        if len(colours) > 1:
            problems.append(f"{g} is drawn in {len(colours)} colours")
    if len({c for cs in colour_of.values() for c in cs}) < len(colour_of):
        problems.append("two groups share a colour")
    return problems


def test_every_line_on_every_panel_is_labelled_and_coloured_as_the_group_it_plots():
    fig = learning_curves_figure(CURVES)
    assert [ax.get_title() for ax in fig.axes] == [title for title, _, _ in TERMS.values()]
    assert mislabelled(fig, CURVES) == []


def test_the_check_catches_colours_shifted_on_the_panel_without_the_control():
    """The old bug: the KV panel lacks G0, so numbering colours per panel gave each group the previous one's."""
    fig = learning_curves_figure(CURVES)
    kv = fig.axes[list(TERMS).index("kv")]
    for i, line in enumerate(kv.get_lines()):
        line.set_color(f"C{i}")
    assert "G1 is drawn in 2 colours" in mislabelled(fig, CURVES)


def test_the_check_catches_a_label_on_another_groups_data():
    fig = learning_curves_figure(CURVES)
    ce = fig.axes[0].get_lines()
    ce[1].set_label("G2")
    assert "ce: the line labelled G2 plots the data of ['G1']" in mislabelled(fig, CURVES)


def test_a_group_keeps_its_colour_when_a_panel_lacks_another_group():
    assert group_colors(GROUPS) == {"G0": "C0", "G1": "C1", "G2": "C2", "G3": "C3"}
    assert group_colors(GROUPS)["G1"] == group_colors(["G0", "G1"])["G1"]


def test_every_axis_says_what_it_measures():
    fig = learning_curves_figure(CURVES)
    for ax, (_, ylabel, _) in zip(fig.axes, TERMS.values()):
        assert ax.get_xlabel() == "optimizer step"
        assert ax.get_ylabel() == ylabel
    assert fig.axes[-1].get_ylabel() == "exact-match accuracy (%)"


def test_the_mean_curve_is_the_mean_over_seeds_and_none_for_a_term_not_logged():
    steps, mean = mean_curve(CURVES["G2"], "kv")
    assert steps == [10, 20, 30]
    np.testing.assert_allclose(mean, [30.05] * 3)
    assert mean_curve(CURVES["G0"], "kv") is None


def test_seeds_logged_at_different_steps_are_refused():
    runs = {"0": run(1, 0), "1": run(1, 1)[:2]}
    with pytest.raises(ValueError, match=r"different steps \(\{'0': 3, '1': 2\} rows per seed\); finish or re-run"):
        mean_curve(runs, "ce")


STATS = {
    "G1": {"diff": 0.05, "ci_low": 0.01, "ci_high": 0.09, "reject": True},
    "G2": {"diff": -0.04, "ci_low": -0.07, "ci_high": -0.01, "reject": True},
    "G3": {"diff": 0.03, "ci_low": -0.01, "ci_high": 0.07, "reject": False},
    "NC": {"diff": -0.01, "ci_low": -0.04, "ci_high": 0.02, "reject": False},
}


def misnamed_verdicts(fig, stats: dict) -> list[str]:
    """Every group drawn in a colour whose legend entry is not its verdict, or at a difference not its own."""
    ax, legend = fig.axes[0], fig.legends[0]
    key = {to_rgba(h.get_color()[0]): x.get_text() for x, h in zip(legend.get_texts(), legend.legend_handles)}
    names = [t.get_text() for t in ax.get_yticklabels()]
    problems = []
    for container in ax.containers:
        points = container.lines[0]
        shown = key.get(to_rgba(points.get_color()))
        for x, y in zip(points.get_xdata(), points.get_ydata()):
            g = names[int(y)]
            if shown != verdict(stats[g]) or not np.isclose(x, 100 * stats[g]["diff"]):
                problems.append(f"{g} at {x:+.1f} points is keyed {shown!r}, its verdict is {verdict(stats[g])!r}")
    return problems


def test_the_forest_legend_names_the_verdict_of_each_colour():
    fig = forest_figure(STATS, "G0")
    assert misnamed_verdicts(fig, STATS) == []
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(VERDICT_COLORS)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["NC", "G3", "G2", "G1"]
    assert fig.axes[0].get_xlabel() == "accuracy difference to G0 (points)"
    assert fig.axes[0].get_ylabel() == "group"


def test_the_forest_check_catches_a_colour_key_that_is_not_the_verdict():
    flipped = STATS | {"G3": STATS["G3"] | {"reject": True}}
    assert misnamed_verdicts(forest_figure(flipped, "G0"), STATS) == [
        "G3 at +3.0 points is keyed 'significantly better', its verdict is 'no significant difference'"
    ]


def test_the_forest_legend_lists_only_the_verdicts_it_shows():
    fig = forest_figure({g: STATS[g] for g in ("G3", "NC")}, "G0")
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["no significant difference"]


def test_routing_weights_are_the_last_rows_mean_over_seeds_for_routed_groups_only():
    routed = {
        s: [
            {"step": 1, "fusion_weights": {"chain": [[0.0, 1.0]]}},
            {"step": 2, "fusion_weights": {"chain": [[w, 1 - w]]}},
        ]
        for s, w in (("0", 0.2), ("1", 0.4))
    }
    weights = routing_weights({"G0": CURVES["G0"], "G6": routed})
    assert list(weights) == ["G6"]
    np.testing.assert_allclose(weights["G6"]["chain"], [[0.3, 0.7]])
    fig = routing_figure(weights, {"G6": ["A", "B"]})
    ax, colorbar = fig.axes
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("G6: chain", "teacher", "student layer")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "B"]
    assert colorbar.get_ylabel() == "router weight (a row sums to 1)"
