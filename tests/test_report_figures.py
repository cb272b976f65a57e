"""The report's figures say what they plot: each line's label and colour name the group whose data it draws, on
every panel; the forest plot keys primary and exploratory contrasts apart; a curve puts each contrast at its x with
its CI; the K/V scale figure draws the layer-mean std of each group's student and, for KV runs, of its targets."""

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from kvlib.report_figures import (
    FOREST_STYLE,
    GRAD_TERMS,
    TERMS,
    curve_figure,
    curves_figure,
    forest_figure,
    group_colors,
    kv_scale_figure,
    mean_curve,
    routing_figure,
    routing_weights,
)

GROUPS = ["C", "S", "X", "F"]


def run(k: int, seed: int) -> list[dict]:
    """Group k's rows: CE = k + 1, KV = 10 (k + 1), validation accuracy = (k + 1) %, CE gradient norm = k + 2, KV one
    = 2 (k + 1), each + 0.1 * seed; student K std per layer (k + 1) * [1, 3] + 0.1 * seed, V the half of it, targets
    [1, 1] and [2, 2]. The control C (k = 0) has no KV term, KV gradient or targets."""
    rows = []
    for step in (10, 20, 30):
        r = {"step": step, "ce": k + 1 + 0.1 * seed, "val_accuracy": (k + 1 + 0.1 * seed) / 100}
        r |= {"grad_norm_ce": k + 2 + 0.1 * seed}
        kv_k = [(k + 1) * f + 0.1 * seed for f in (1, 3)]
        r["kv_std"] = {"student_k": kv_k, "student_v": [v / 2 for v in kv_k]}
        if k > 0:
            r |= {"kv": 10 * (k + 1) + 0.1 * seed, "grad_norm_aux": 2 * (k + 1) + 0.1 * seed}
            r["kv_std"] |= {"target_k": [1.0, 1.0], "target_v": [2.0, 2.0]}
        rows.append(r)
    return rows


CURVES = {g: {str(s): run(k, s) for s in range(2)} for k, g in enumerate(GROUPS)}


def expected(group: str, term: str) -> list[float] | None:
    """What the figure must draw for ``group`` on ``term``'s panel, computed from the synthetic values, not by kvlib."""
    k = GROUPS.index(group)
    values = {
        "ce": k + 1.05,
        "val_accuracy": k + 1.05,  # in %
        "kv": None if k == 0 else 10 * (k + 1) + 0.05,
        "grad_norm_ce": k + 2.05,
        "grad_norm_aux": None if k == 0 else 2 * (k + 1) + 0.05,
        "grad_norm": None,  # joint clipping: not logged by these runs
    }[term]
    return None if values is None else [values] * 3


def mislabelled(fig, curves: dict, terms: dict) -> list[str]:
    """Every way the figure misnames a line: a label or legend entry that is not the group whose values the line
    plots, a group missing from a panel it has data for, or a group drawn in two colours or two groups in one."""
    problems, colour_of = [], {}
    titles = {title: t for t, (title, _, _) in terms.items()}
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
    fig = curves_figure(CURVES, TERMS)
    assert [ax.get_title() for ax in fig.axes] == [title for title, _, _ in TERMS.values()]
    assert mislabelled(fig, CURVES, TERMS) == []


def test_the_gradient_norm_panels_are_those_logged_on_a_log_axis():
    fig = curves_figure(CURVES, GRAD_TERMS, yscale="log")
    assert [ax.get_title() for ax in fig.axes] == [GRAD_TERMS[t][0] for t in ("grad_norm_ce", "grad_norm_aux")]
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log"]
    assert mislabelled(fig, CURVES, GRAD_TERMS) == []


def test_the_check_catches_colours_shifted_on_the_panel_without_the_control():
    """The old bug: the KV panel lacks the control, so per-panel colour numbers gave each group the previous one's."""
    fig = curves_figure(CURVES, TERMS)
    kv = fig.axes[list(TERMS).index("kv")]
    for i, line in enumerate(kv.get_lines()):
        line.set_color(f"C{i}")
    assert "S is drawn in 2 colours" in mislabelled(fig, CURVES, TERMS)


def test_the_check_catches_a_label_on_another_groups_data():
    fig = curves_figure(CURVES, TERMS)
    ce = fig.axes[0].get_lines()
    ce[1].set_label("X")
    assert "ce: the line labelled X plots the data of ['S']" in mislabelled(fig, CURVES, TERMS)


def test_a_group_keeps_its_colour_when_a_panel_lacks_another_group():
    assert group_colors(GROUPS) == {"C": "C0", "S": "C1", "X": "C2", "F": "C3"}
    assert group_colors(GROUPS)["S"] == group_colors(["C", "S"])["S"]


def test_more_groups_than_the_colour_cycle_still_get_distinct_colours():
    colors = group_colors([f"g{i}" for i in range(13)])
    assert len({to_rgba(c) for c in colors.values()}) == 13


def test_every_axis_says_what_it_measures():
    fig = curves_figure(CURVES, TERMS)
    for ax, (_, ylabel, _) in zip(fig.axes, TERMS.values()):
        assert ax.get_xlabel() == "optimizer step"
        assert ax.get_ylabel() == ylabel
    assert fig.axes[-1].get_ylabel() == "exact-match accuracy (%)"


def test_the_mean_curve_is_the_mean_over_seeds_and_none_for_a_term_not_logged():
    steps, mean = mean_curve(CURVES["X"], "kv")
    assert steps == [10, 20, 30]
    np.testing.assert_allclose(mean, [30.05] * 3)
    assert mean_curve(CURVES["C"], "kv") is None
    _, k = mean_curve(CURVES["X"], "kv_std.student_k")  # layer mean of [3, 9] + 0.1 seed, mean over seeds
    np.testing.assert_allclose(k, [6.05] * 3)
    assert mean_curve(CURVES["C"], "kv_std.target_k") is None


def test_seeds_logged_at_different_steps_are_refused():
    runs = {"0": run(1, 0), "1": run(1, 1)[:2]}
    with pytest.raises(ValueError, match=r"different steps \(\{'0': 3, '1': 2\} rows per seed\); finish or re-run"):
        mean_curve(runs, "ce")


def test_the_kv_scale_figure_draws_each_students_and_targets_layer_mean_std_on_a_log_axis():
    fig = kv_scale_figure(CURVES)
    colors = group_colors(CURVES)
    for ax, kind, half in zip(fig.axes, "KV", (1.0, 0.5)):
        assert ax.get_yscale() == "log" and ax.get_ylabel() == f"std of {kind} (mean over layers)"
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {f"{g} student" for g in GROUPS} | {f"{g} target" for g in GROUPS[1:]}
        for k, g in enumerate(GROUPS):
            student = lines[f"{g} student"]
            np.testing.assert_allclose(student.get_ydata(), [half * 2 * (k + 1) + half * 0.05] * 3)
            assert student.get_linestyle() == "-" and to_rgba(student.get_color()) == to_rgba(colors[g])
            if k:
                target = lines[f"{g} target"]
                np.testing.assert_allclose(target.get_ydata(), [1.0 if kind == "K" else 2.0] * 3)
                assert target.get_linestyle() == "--" and to_rgba(target.get_color()) == to_rgba(colors[g])


def contrast(a, b, diff, low, high) -> dict:
    return {"a": a, "b": b, "diff": diff, "ci_low": low, "ci_high": high}


PRIMARY = {"P1": contrast("S", "C", 0.05, 0.01, 0.09), "P2": contrast("S", "X", -0.01, -0.04, 0.02)}
EXPLORATORY = {
    "w3": contrast("S-w3", "C", -0.04, -0.07, -0.01),
    "n150": contrast("S-n150", "C-n150", 0.03, -0.01, 0.07),
}


def drawn(fig) -> dict[str, tuple[str, float, float, float]]:
    """Tick label -> (legend label of its series, x, CI low, CI high) of every point on the forest plot."""
    ax, legend = fig.axes[0], fig.legends[0]
    key = {to_rgba(h.get_color()): x.get_text() for x, h in zip(legend.get_texts(), legend.legend_handles)}
    names = [t.get_text() for t in ax.get_yticklabels()]
    points = {}
    for container in ax.containers:
        marks, (bars,) = container.lines[0], container.lines[2]
        for x, y, seg in zip(marks.get_xdata(), marks.get_ydata(), bars.get_segments()):
            points[names[int(y)]] = (key[to_rgba(marks.get_color())], *np.round([x, seg[0][0], seg[1][0]], 9))
    return points


def test_the_forest_plot_keys_primary_and_exploratory_contrasts_apart_at_their_cis():
    fig = forest_figure(PRIMARY, EXPLORATORY, 0.05)
    primary, exploratory = FOREST_STYLE["primary"][2], FOREST_STYLE["exploratory"][2]
    assert drawn(fig) == (
        {
            "P1: S - C": (primary, 5.0, 1.0, 9.0),
            "P2: S - X": (primary, -1.0, -4.0, 2.0),
            "w3: S-w3 - C": (exploratory, -4.0, -7.0, -1.0),
            "n150: S-n150 - C-n150": (exploratory, 3.0, -1.0, 7.0),
        }
    )
    names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert names[-1] == "P1: S - C" and names[0] == "n150: S-n150 - C-n150"  # the first primary on top
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [primary, exploratory]
    assert fig.axes[0].get_xlabel() == "accuracy difference a - b (points)"


def test_the_forest_legend_lists_only_the_kinds_it_shows():
    fig = forest_figure(PRIMARY, {}, 0.05)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [FOREST_STYLE["primary"][2]]


def curve_points(fig) -> list[tuple[float, float, float, float]]:
    """(x, y, CI low, CI high) of every point of a curve figure, in drawing order."""
    ax = fig.axes[0]
    container = ax.containers[0]
    marks, (bars,) = container.lines[0], container.lines[2]
    xs, ys, segs = marks.get_xdata(), marks.get_ydata(), bars.get_segments()
    return [tuple(np.round([x, y, seg[0][1], seg[1][1]], 9)) for x, y, seg in zip(xs, ys, segs)]


def test_a_curve_puts_each_contrast_at_its_x_with_its_ci_in_x_order():
    contrasts = PRIMARY | EXPLORATORY
    curve = {"x": "KV weight", "points": {"3": "w3", "0.3": "P2", "1": "P1"}}
    fig = curve_figure("dose", curve, contrasts, 0.05)
    assert curve_points(fig) == [(0.3, -1.0, -4.0, 2.0), (1.0, 5.0, 1.0, 9.0), (3.0, -4.0, -7.0, -1.0)]
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"  # 0.3 .. 3 spans 10x
    assert [t.get_text() for t in ax.texts] == ["P2: S - X", "P1: S - C", "w3: S-w3 - C"]
    spans = [list(line.get_ydata()) for line in ax.get_lines() if list(line.get_xdata()) == [0, 1]]
    assert spans == [[0, 0]]  # the zero line, across the whole axis
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("KV weight", "accuracy difference a - b (points)")


def test_a_curve_spanning_less_than_ten_times_stays_linear_and_an_unknown_contrast_is_refused():
    fig = curve_figure(
        "data", {"x": "training problems", "points": {"150": "n150", "600": "P1"}}, PRIMARY | EXPLORATORY, 0.05
    )
    assert fig.axes[0].get_xscale() == "linear"
    with pytest.raises(ValueError, match=r"curve 'data' names contrasts \['n300'\] absent from the statistics"):
        curve_figure("data", {"x": "n", "points": {"300": "n300"}}, PRIMARY, 0.05)


def test_routing_weights_are_the_last_rows_mean_over_seeds_for_routed_groups_only():
    routed = {
        s: [
            {"step": 1, "fusion_weights": {"chain": [[0.0, 1.0]]}},
            {"step": 2, "fusion_weights": {"chain": [[w, 1 - w]]}},
        ]
        for s, w in (("0", 0.2), ("1", 0.4))
    }
    weights = routing_weights({"C": CURVES["C"], "F": routed})
    assert list(weights) == ["F"]
    np.testing.assert_allclose(weights["F"]["chain"], [[0.3, 0.7]])
    fig = routing_figure(weights, {"F": ["A", "B"]})
    ax, colorbar = fig.axes
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("F: chain", "teacher", "student layer")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["A", "B"]
    assert colorbar.get_ylabel() == "router weight (a row sums to 1)"
