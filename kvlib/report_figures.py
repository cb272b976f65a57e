"""The figures of ``REPORT.md``, from the same loaded inputs as ``kvlib.report``: contrasts with their CIs, the
planned curves (dose-response, data size), K/V scale and gradient norms over training, learning curves, routing.

Figures are ``matplotlib.figure.Figure`` objects (no pyplot state), built from loaded dicts; ``build_figures``
assembles all of them and ``save_figures`` writes them beside the report. Each group keeps one colour on every
panel, taken from the list of all groups (not from those a panel happens to show: a CE-only run has no KV curve).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from kvlib.files import save_figure
from kvlib.report import ci_level

# each learning-curve term: (panel title, y-axis label, factor applied to the logged value)
TERMS = {
    "ce": ("cross-entropy loss", "CE (nats per token)", 1.0),
    "kv": ("KV distillation loss", "KV distance (unweighted, mean over layers)", 1.0),
    "val_accuracy": ("validation accuracy", "exact-match accuracy (%)", 100.0),
}
GRAD_TERMS = {
    "grad_norm": ("gradient norm before clipping (joint)", "L2 norm", 1.0),
    "grad_norm_ce": ("CE gradient norm before clipping", "L2 norm", 1.0),
    "grad_norm_aux": ("KV (auxiliary) gradient norm before clipping", "L2 norm", 1.0),
}
KV_SIDES = {"student": "-", "target": "--"}  # kv_std side -> line style
FOREST_STYLE = {  # kind -> (colour, marker, legend label)
    "primary": ("tab:blue", "o", "primary (Holm-corrected decision)"),
    "exploratory": ("tab:orange", "s", "exploratory (uncorrected)"),
}


def group_colors(groups) -> dict[str, str | tuple]:
    """One colour per group, by its place among all groups, so a panel that lacks a group shifts no one's colour:
    the default cycle up to 10 groups, else evenly spaced on ``turbo`` (the cycle would repeat)."""
    groups = list(groups)
    if len(groups) <= 10:
        return {g: f"C{i}" for i, g in enumerate(groups)}
    return {g: tuple(c) for g, c in zip(groups, colormaps["turbo"](np.linspace(0.05, 0.95, len(groups))))}


def _value(row: dict, term: str) -> float | None:
    """A logged scalar, or for ``kv_std.<name>`` the layer mean of that per-layer std; None if not logged."""
    if term.startswith("kv_std."):
        stds = row.get("kv_std", {}).get(term.removeprefix("kv_std."))
        return None if stds is None else float(np.mean(stds))
    return row.get(term)


def mean_curve(runs: dict[str, list[dict]], term: str) -> tuple[list[int], np.ndarray] | None:
    """``(steps, mean over seeds)`` of ``term`` (a logged key, or ``kv_std.student_k`` etc.: its layer mean) in one
    group's runs (seed -> logged rows), or None if not logged."""
    logged = {seed: [(r["step"], v) for r in rows if (v := _value(r, term)) is not None] for seed, rows in runs.items()}
    if not any(logged.values()):
        return None
    steps = {seed: [s for s, _ in pairs] for seed, pairs in logged.items()}
    if len({tuple(s) for s in steps.values()}) > 1:
        lengths = {seed: len(s) for seed, s in steps.items()}
        raise ValueError(
            f"the seeds logged {term!r} at different steps ({lengths} rows per seed); finish or re-run the "
            "unfinished training runs before the report"
        )
    mean = np.mean([[v for _, v in pairs] for pairs in logged.values()], axis=0)  # (n_steps,)
    return next(iter(steps.values())), mean


def logged(curves: dict[str, dict[str, list[dict]]], terms) -> bool:
    """Whether any run logged any of ``terms``."""
    return any(
        _value(r, t) is not None for runs in curves.values() for rows in runs.values() for r in rows for t in terms
    )


def curves_figure(curves: dict[str, dict[str, list[dict]]], terms: dict, yscale: str = "linear") -> Figure:
    """One panel per logged term of ``terms`` (e.g. ``TERMS``, ``GRAD_TERMS``), one line per group, mean over seeds.

    curves: group -> seed -> the rows of its ``learning_curve.jsonl``.
    """
    colors = group_colors(curves)
    panels = {t: {g: c for g, runs in curves.items() if (c := mean_curve(runs, t))} for t in terms}
    panels = {t: lines for t, lines in panels.items() if lines}
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    for ax, (t, lines) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        title, ylabel, factor = terms[t]
        for g, (steps, mean) in lines.items():
            ax.plot(steps, factor * mean, label=g, color=colors[g], marker="." if t.startswith("val_") else None)
        ax.set(xlabel="optimizer step", ylabel=ylabel, title=title, yscale=yscale)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(5, len(lines)), fontsize=7, frameon=False)
    return fig


def kv_scale_figure(curves: dict[str, dict[str, list[dict]]]) -> Figure:
    """K and V panels: per group the mean over seeds of the layer-mean std of the student's cache (solid) and, for
    KV runs, of its targets (dashed), against the step on a log axis, so that a scale collapse shows."""
    colors = group_colors(curves)
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    for ax, kind in zip(fig.subplots(1, 2), "kv"):
        for g, runs in curves.items():
            for side, style in KV_SIDES.items():
                if (c := mean_curve(runs, f"kv_std.{side}_{kind}")) is not None:
                    ax.plot(c[0], c[1], style, color=colors[g], label=f"{g} {side}")
        ax.set(xlabel="optimizer step", ylabel=f"std of {kind.upper()} (mean over layers)", yscale="log")
        ax.set_title(f"{kind.upper()} scale: student (solid), its target (dashed)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, fontsize=7, frameon=False)
    return fig


def forest_figure(primary: dict, exploratory: dict, alpha: float) -> Figure:
    """Every contrast's ``a - b`` with its seed-inclusive CI (level ``1 - alpha``), the first primary on top;
    primary and exploratory ones in the colours and markers of ``FOREST_STYLE``, named in the legend."""
    rows = [("primary", n, r) for n, r in primary.items()] + [("exploratory", n, r) for n, r in exploratory.items()]
    rows = rows[::-1]
    fig = Figure(figsize=(7, 1.4 + 0.4 * len(rows)), layout="constrained")
    ax = fig.subplots()
    for kind, (color, marker, label) in FOREST_STYLE.items():
        ys = [i for i, (k, _, _) in enumerate(rows) if k == kind]
        if not ys:
            continue
        d, lo, hi = (100 * np.array([rows[i][2][key] for i in ys]) for key in ("diff", "ci_low", "ci_high"))
        ax.errorbar(d, ys, xerr=[d - lo, hi - d], fmt=marker, color=color, capsize=3, label=label)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{n}: {r['a']} - {r['b']}" for _, n, r in rows])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set(
        xlabel="accuracy difference a - b (points)",
        title=f"contrasts, {ci_level(alpha)} CI (seeds and problems random)",
    )
    fig.legend(loc="outside lower center", ncol=2, fontsize=7)
    return fig


def curve_figure(name: str, curve: dict, contrasts: dict, alpha: float) -> Figure:
    """One ``report.plan.curves`` entry: x = its points' values (log axis if positive and spanning >= 10x), y = each
    point's contrast difference with its seed-inclusive CI (level ``1 - alpha``), a zero line, each point named.

    curve: ``{"x": axis label, "points": {x value as string: contrast name}}``; contrasts: name -> statistics row.
    """
    unknown = sorted(c for c in curve["points"].values() if c not in contrasts)
    if unknown:
        raise ValueError(f"curve {name!r} names contrasts {unknown} absent from the statistics {sorted(contrasts)}")
    points = sorted((float(x), c) for x, c in curve["points"].items())
    x = np.array([p for p, _ in points])
    d, lo, hi = (100 * np.array([contrasts[c][key] for _, c in points]) for key in ("diff", "ci_low", "ci_high"))
    fig = Figure(figsize=(5.5, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.errorbar(x, d, yerr=[d - lo, hi - d], fmt="o-", color="C0", capsize=3)
    ax.axhline(0, color="black", lw=0.8)
    for xi, di, (_, c) in zip(x, d, points):
        r = contrasts[c]
        ax.annotate(f"{c}: {r['a']} - {r['b']}", (xi, di), textcoords="offset points", xytext=(5, 5), fontsize=7)
    if x.min() > 0 and x.max() / x.min() >= 10:
        ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.minorticks_off()
    ax.set(
        xlabel=curve["x"],
        ylabel="accuracy difference a - b (points)",
        title=f"{name}: {ci_level(alpha)} CI, seeds random",
    )
    return fig


def routing_weights(curves: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, np.ndarray]]:
    """Routed group -> task -> its teachers' weights per student layer (Ls, N), mean over seeds, last logged row."""
    routed = {g: runs for g, runs in curves.items() if "fusion_weights" in next(iter(runs.values()))[-1]}
    return {
        g: {
            task: np.mean([rows[-1]["fusion_weights"][task] for rows in runs.values()], axis=0)  # (Ls, N)
            for task in sorted(next(iter(runs.values()))[-1]["fusion_weights"])
        }
        for g, runs in routed.items()
    }


def routing_figure(weights: dict[str, dict[str, np.ndarray]], teachers: dict[str, list[str]]) -> Figure:
    """A heatmap per routed group (rows) and task (columns) of ``routing_weights``; teachers: group -> names."""
    tasks = sorted({task for w in weights.values() for task in w})
    fig = Figure(figsize=(4 * len(tasks) + 1, 2.6 * len(weights)), layout="constrained")
    axes = fig.subplots(len(weights), len(tasks), squeeze=False)
    for row, (g, by_task) in zip(axes, weights.items()):
        for ax, task in zip(row, tasks):
            w = by_task[task]  # (Ls, N)
            im = ax.imshow(w, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for (i, j), v in np.ndenumerate(w):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.5 else "black", fontsize=8)
            ax.set_xticks(range(w.shape[1]), teachers[g])
            ax.set_yticks(range(w.shape[0]))
            ax.set(title=f"{g}: {task}", xlabel="teacher", ylabel="student layer")
    fig.colorbar(im, ax=axes, label="router weight (a row sums to 1)")
    return fig


def build_figures(plan: dict, stats: dict, curves: dict, routed_teachers: dict) -> dict[str, tuple[str, Figure]]:
    """File stem -> (caption, figure) of every report figure whose data exist: the forest plot, one per
    ``plan["curves"]`` entry, K/V scale, gradient norms, learning curves and routing weights.

    curves: as ``load_curves``; routed_teachers: routed group -> its teachers' names (its ``summary.json``).
    """
    contrasts = stats["primary"] | stats["exploratory"]
    alpha, level = stats["alpha"], ci_level(stats["alpha"])
    figs = {"forest": (f"All contrasts, {level} CI", forest_figure(stats["primary"], stats["exploratory"], alpha))}
    for name, curve in plan["curves"].items():
        figs[f"curve_{name}"] = (
            f"Curve {name}: difference vs {curve['x']}",
            curve_figure(name, curve, contrasts, alpha),
        )
    if logged(curves, ["kv_std.student_k", "kv_std.student_v"]):
        figs["kv_scale"] = ("K/V scale over training (student and target std)", kv_scale_figure(curves))
    if logged(curves, GRAD_TERMS):
        figs["grad_norms"] = ("Gradient norms before clipping", curves_figure(curves, GRAD_TERMS, yscale="log"))
    if logged(curves, TERMS):
        figs["learning_curves"] = ("Learning curves (losses, validation accuracy)", curves_figure(curves, TERMS))
    if weights := routing_weights(curves):
        figs["routing"] = ("Routing weights per layer and task", routing_figure(weights, routed_teachers))
    return figs


def save_figures(figs: dict[str, tuple[str, Figure]], folder: str | Path, report_dir: str | Path) -> dict[str, str]:
    """Save each of ``build_figures``'s figures to ``folder/<stem>.png``; caption -> path relative to report_dir."""
    links = {}
    for stem, (caption, fig) in figs.items():
        path = Path(folder) / f"{stem}.png"
        save_figure(fig, path, dpi=110)
        links[caption] = Path(os.path.relpath(path, report_dir)).as_posix()
    return links


def stage_figures(reports: str | Path, report_dir: str | Path, teachers) -> dict[str, str]:
    """Caption -> path relative to ``report_dir`` of the figures earlier stages wrote under ``reports``, those that
    exist: each teacher's learning curve (a teacher that was not trained has none) and the alignment figures."""
    reports = Path(reports)
    found = {
        f"Teacher {name}: training cross-entropy": reports / "teachers" / name / "learning_curve.png"
        for name in teachers
    }
    alignment = reports / "alignment"
    found |= {
        "Teacher x student CKA per layer": alignment / "cka.png",
        "Teacher x student CKA per KV head (last layer's keys)": alignment / "heads.png",
        "Layer maps": alignment / "layer_maps.png",
        "Time alignment": alignment / "time_alignment.png",
    }
    return {caption: Path(os.path.relpath(p, report_dir)).as_posix() for caption, p in found.items() if p.exists()}
