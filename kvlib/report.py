"""``REPORT.md`` and its figures from the pipeline's measured outputs: the pre-registered plan first, then the results.

Every number in the report is read from a file a stage wrote (splits, teacher metrics, tuning choices, statistics,
learning curves); nothing is typed by hand, and every sentence of the answer is generated from those numbers. The
only fixed text is what the design makes true whatever the outcome: the plan (``report.plan``, written before any
result) and its optional ``caveats``.

Verdicts follow the plan mechanically (issue #13's design):

- a **primary** contrast ``a - b`` says ``a > b`` or ``a < b`` only when the statistics stage's Holm decision
  rejects at the planned ``alpha`` (its seed-inclusive crossed random-effects test); otherwise "no difference
  detected", with its minimum detectable effect (MDE, at the statistics' power) and whether the CI excludes
  effects larger than the MDE (an informative null) or not (a null that cannot rule out an effect of that size);
- an **exploratory** contrast is judged by its uncorrected p < ``alpha`` and labelled so.

The statistics stage's intervals have confidence ``1 - alpha`` (95% at the planned alpha = 0.05); the report
names that level wherever it shows one.

Figures are ``matplotlib.figure.Figure`` objects (no pyplot state), built from loaded dicts; ``build_figures``
assembles all of them and ``save_figures`` writes them beside the report. Each group keeps one colour on every
panel, taken from the list of all groups (not from those a panel happens to show: a CE-only run has no KV curve).
A missing input raises ``ValueError`` naming the file and the stage that writes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from kvlib.files import save_figure

PLAN_KEYS = ("question", "primary_metric", "alpha", "correction", "seeds", "tuning", "groups", "contrasts", "curves")
PLAN_OPTIONAL = ("caveats",)
STATISTICS_KEYS = ("n_examples", "alpha", "power", "accuracy", "primary", "exploratory", "accuracy_by_task")
ROW_KEYS = ("a", "b", "seeds", "accuracy_a", "accuracy_b", "diff", "ci_low", "ci_high", "p", "mde", "per_example")
PRIMARY_KEYS = ("p_holm", "reject")
PER_EXAMPLE_KEYS = ("ci_low", "ci_high", "p")
MDE_BOUND = 0.025  # the report says whether every primary MDE is at most this (2.5 points): small enough to matter

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


# ---------------------------------------------------------------------------------------------------- inputs


def _existing(path: str | Path, stage: str, kind: str = "file") -> Path:
    """``path`` if it is an existing file (or folder), else ValueError naming it and the ``stage`` that writes it."""
    path = Path(path)
    if not (path.is_file() if kind == "file" else path.is_dir()):
        raise ValueError(f"{path} does not exist; run the {stage} stage first (it writes it)")
    return path


def read_json(path: str | Path, stage: str):
    """The JSON file ``path``, or ValueError naming it and the ``stage`` that writes it."""
    return json.loads(_existing(path, stage).read_text())


def read_jsonl(path: str | Path, stage: str) -> list[dict]:
    """The rows of the JSON-lines file ``path``, or ValueError naming it and the ``stage`` that writes it."""
    return [json.loads(line) for line in _existing(path, stage).read_text().splitlines() if line.strip()]


def load_statistics(path: str | Path) -> dict:
    """``statistics.json``, checked to hold every key the report reads (ValueError naming the missing ones)."""
    stats = read_json(path, "statistics")
    missing = [k for k in STATISTICS_KEYS if k not in stats]
    for kind, keys in (("primary", ROW_KEYS + PRIMARY_KEYS), ("exploratory", ROW_KEYS)):
        for name, row in stats.get(kind, {}).items():
            missing += [f"{kind}.{name}.{k}" for k in keys if k not in row]
            missing += [
                f"{kind}.{name}.per_example.{k}" for k in PER_EXAMPLE_KEYS if k not in row.get("per_example", {})
            ]
    if missing:
        raise ValueError(f"{path} lacks {missing}; re-run the statistics stage (it writes them)")
    return stats


def check_plan(plan: dict, stats: dict) -> None:
    """``report.plan`` has the keys the report reads and agrees with ``statistics.json``, else ValueError."""
    missing = [k for k in PLAN_KEYS if k not in plan]
    unknown = [k for k in plan if k not in PLAN_KEYS + PLAN_OPTIONAL]
    if missing or unknown:
        raise ValueError(
            f"report.plan lacks {missing} and has unknown keys {unknown}; valid keys: {list(PLAN_KEYS + PLAN_OPTIONAL)}"
        )
    if sorted(plan["contrasts"]) != sorted(stats["primary"]):
        raise ValueError(
            f"report.plan.contrasts describes {sorted(plan['contrasts'])} but the statistics hold the primary "
            f"contrasts {sorted(stats['primary'])}; describe exactly statistics.primary"
        )
    if plan["alpha"] != stats["alpha"]:
        raise ValueError(f"report.plan.alpha is {plan['alpha']} but the statistics used {stats['alpha']}; set it so")
    contrasts = stats["primary"] | stats["exploratory"]
    unknown = {
        f"{c}.{x}": n for c, curve in plan["curves"].items() for x, n in curve["points"].items() if n not in contrasts
    }
    if unknown:
        raise ValueError(f"report.plan.curves points {unknown} name no contrast of the statistics {sorted(contrasts)}")


def load_teachers(root: str | Path) -> dict[str, dict]:
    """Teacher name -> its ``metrics.json``, for every folder under ``root`` (reports/teachers)."""
    folders = sorted(_existing(root, "teacher", "folder").iterdir())
    return {p.name: read_json(p / "metrics.json", "teacher") for p in folders if p.is_dir()}


def load_curves(root: str | Path, accuracy: dict) -> dict[str, dict[str, list[dict]]]:
    """Group -> seed -> the rows of ``root/<group>-<seed>/learning_curve.jsonl``, for every group and seed of the
    statistics' ``accuracy`` (the arms and secondary runs that were compared, in their order)."""
    return {
        g: {s: read_jsonl(Path(root) / f"{g}-{s}" / "learning_curve.jsonl", "train") for s in acc["seeds"]}
        for g, acc in accuracy.items()
    }


def identical_groups(records: list[dict]) -> dict[str, str]:
    """Group -> an earlier group whose predictions it repeats exactly on every seed both have (evaluation records
    with ``group``, ``seed``, ``id``, ``generated``): two configurations that trained the same student."""
    out: dict[str, dict] = {}
    for r in records:
        out.setdefault(r["group"], {}).setdefault(r["seed"], set()).add((r["id"], r["generated"]))
    names, same = list(out), {}
    for i, g in enumerate(names):
        for h in names[:i]:
            shared = out[g].keys() & out[h].keys()
            if shared and all(out[g][s] == out[h][s] for s in shared):
                same[g] = h
                break
    return same


# ---------------------------------------------------------------------------------------------------- verdicts


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _ci(low: float, high: float) -> str:
    return f"[{_pts(low)}, {_pts(high)}]"


def _level(alpha: float) -> str:
    return f"{100 * (1 - alpha):g}%"


def _sd(x: float | None) -> str:
    return "—" if x is None else _pct(x)


def rejected(row: dict, alpha: float, primary: bool) -> bool:
    """Primary: the statistics stage's Holm decision; exploratory: the uncorrected seed-inclusive p < alpha."""
    return bool(row["reject"]) if primary else row["p"] < alpha


def bounded(row: dict) -> bool:
    """Whether the seed-inclusive CI excludes every effect larger than the MDE (in either direction)."""
    return -row["mde"] <= row["ci_low"] and row["ci_high"] <= row["mde"]


def verdict(row: dict, alpha: float, primary: bool) -> str:
    """``a > b`` / ``a < b`` when the contrast rejects, else "no difference detected" with its MDE."""
    if rejected(row, alpha, primary):
        return f"{row['a']} {'>' if row['diff'] > 0 else '<'} {row['b']}" + ("" if primary else " (uncorrected)")
    excludes = "excludes" if bounded(row) else "does not exclude"
    return f"no difference detected (MDE {100 * row['mde']:.1f} points); the CI {excludes} effects larger than the MDE"


def answer_sentence(name: str, row: dict, description: str, alpha: float, correction: str) -> str:
    """One sentence (or three) per primary contrast, every clause chosen by its numbers."""
    a, b, mde = row["a"], row["b"], f"{100 * row['mde']:.1f}"
    text = (
        f"**{name}** ({description}): {a} {_pct(row['accuracy_a'])}% vs {b} {_pct(row['accuracy_b'])}%, "
        f"{_pts(row['diff'])} points ({_level(alpha)} CI {_ci(row['ci_low'], row['ci_high'])} with seeds and "
        f"test problems random; Holm-adjusted p = {row['p_holm']:.3g})."
    )
    if row["reject"]:
        text += f" {a} is {'more' if row['diff'] > 0 else 'less'} accurate than {b} ({correction}, alpha = {alpha})."
    elif bounded(row) and row["mde"] <= MDE_BOUND:
        text += (
            f" No difference detected, and an informative null: the CI excludes effects larger than the MDE ({mde} "
            f"points), so there is no difference of {100 * MDE_BOUND:.1f} points or more in either direction."
        )
    elif bounded(row):
        text += (
            f" No difference detected; the CI excludes effects larger than the MDE ({mde} points), but the MDE is "
            f"above {100 * MDE_BOUND:.1f} points, so a difference of a few points is not ruled out."
        )
    else:
        text += (
            f" No difference detected, but the CI does not exclude effects larger than the MDE ({mde} points): "
            "this null cannot rule out a difference of that size."
        )
    seed_excludes = row["ci_low"] > 0 or row["ci_high"] < 0
    if seed_excludes and not row["reject"]:
        text += f" The {_level(alpha)} CI excludes 0, but the difference does not survive {correction}."
    pe = row["per_example"]
    pe_excludes, pe_ci = pe["ci_low"] > 0 or pe["ci_high"] < 0, _ci(pe["ci_low"], pe["ci_high"])
    if pe_excludes and not seed_excludes:
        text += (
            f" With the seeds held fixed the per-example CI {pe_ci} excludes 0: these trained students differ, but "
            "with seed variance counted the method's effect is not established."
        )
    elif seed_excludes and not pe_excludes:
        text += f" With the seeds held fixed the per-example CI {pe_ci} includes 0."
    return text


def limits(plan: dict, stats: dict) -> list[str]:
    """The bullets of "What this does and does not show": generated from the numbers, then the plan's caveats."""
    primary, alpha = stats["primary"], plan["alpha"]
    done = [f"{n} ({verdict(r, alpha, True)})" for n, r in primary.items() if r["reject"]]
    lines = [
        f"- {len(done)} of {len(primary)} primary contrasts rejected after {plan['correction']} (alpha = {alpha})"
        + (f": {', '.join(done)}." if done else ".")
    ]
    big = {n: r["mde"] for n, r in primary.items() if r["mde"] > MDE_BOUND}
    largest = max(primary, key=lambda n: primary[n]["mde"])
    if big:
        lines += [
            f"- Not every primary MDE is at most {100 * MDE_BOUND:.1f} points: "
            + ", ".join(f"{n} {100 * m:.1f}" for n, m in big.items())
            + f" points (power {stats['power']}): where such a contrast detects no difference, a true difference "
            "of up to that size may have been missed."
        ]
    else:
        lines += [
            f"- Every primary MDE is at most {100 * MDE_BOUND:.1f} points (largest: {largest}, "
            f"{100 * primary[largest]['mde']:.1f} points): each would have detected a true difference of "
            f"{100 * MDE_BOUND:.1f} points with power at least {stats['power']}."
        ]
    clear = [
        f"{n} ({_pts(r['diff'])} points, {r['a']} {'>' if r['diff'] > 0 else '<'} {r['b']})"
        for n, r in stats["exploratory"].items()
        if r["ci_low"] > 0 or r["ci_high"] < 0
    ]
    excludes = (
        f"the {_level(alpha)} CI of {clear[0]} excludes 0."
        if len(clear) == 1
        else f"the {_level(alpha)} CIs of {', '.join(clear)} exclude 0."
    )
    lines += [
        "- Exploratory (not corrected for multiple comparisons; leads for a next study, not findings): "
        + (excludes if clear else f"no exploratory {_level(alpha)} CI excludes 0.")
    ]
    return lines + [f"- {c}" for c in plan.get("caveats", [])]


# ---------------------------------------------------------------------------------------------------- Markdown


def plan_section(plan: dict, stats: dict) -> list[str]:
    """The analysis plan, the groups and the contrasts, as fixed before any result."""
    lines = ["## 1. Analysis plan (fixed in params before any result was seen)", ""]
    lines += [f"- **Question**: {plan['question']}"]
    lines += [f"- **Primary metric**: {plan['primary_metric']} on the test split ({stats['n_examples']} problems)"]
    lines += [f"- **Tuning**: {plan['tuning']}"]
    lines += [f"- **Seeds**: {plan['seeds']} per primary arm (every group's seeds are in section 3.4)"]
    lines += [
        f"- **Decision**: {plan['correction']} at alpha = {plan['alpha']}, on the seed-inclusive test (seeds and "
        f"test problems both random); minimum detectable effects (MDE) at power {stats['power']}",
        "",
    ]
    lines += ["| group | what it is |", "|---|---|"] + [f"| {g} | {d} |" for g, d in plan["groups"].items()]
    lines += ["", "Primary contrasts:", "", "| contrast | a - b | question |", "|---|---|---|"]
    lines += [f"| {n} | {r['a']} - {r['b']} | {plan['contrasts'][n]} |" for n, r in stats["primary"].items()]
    if stats["exploratory"]:
        lines += ["", "Exploratory contrasts (not corrected): "]
        lines[-1] += ", ".join(f"{n} ({r['a']} - {r['b']})" for n, r in stats["exploratory"].items()) + "."
    return lines


def data_section(splits: dict, teachers: dict) -> list[str]:
    """The splits with their hashes and the teachers with their test accuracy."""
    lines = ["| split | examples | SHA-256 |", "|---|---|---|"]
    lines += [f"| {name} | {s['n']} | `{s['sha256'][:16]}...` |" for name, s in splits.items()]
    lines += ["", "| teacher | model | KV layers x heads x dim | parameters | test accuracy | training s |"]
    lines += ["|---|---|---|---|---|---|"]
    for name, t in teachers.items():
        spec = t["kv_spec"]
        lines += [
            f"| {name} | {t['model_type']} | {spec['num_layers']} x {spec['num_kv_heads']} x {spec['head_dim']} | "
            f"{t['parameters']:,} | {_pct(t['accuracy'])}% | {t['train_seconds']} |"
        ]
    return lines


def tuning_section(choices: dict) -> list[str]:
    """Every family's candidates with their mean and per-seed validation accuracy, the chosen one marked."""
    cands = [c for f in choices.values() for c in f["candidates"].values()]
    seeds = sorted({s for c in cands for s in c["seeds"]}, key=int)
    lines = ["| family | candidate | validation accuracy % (mean) | " + " | ".join(f"seed {s}" for s in seeds)]
    lines[0] += " | chosen |"
    lines += ["|---" * (len(seeds) + 4) + "|"]
    for family, f in choices.items():
        for name, c in f["candidates"].items():
            chosen = name == f["chosen"]
            per_seed = " | ".join(_pct(c["seeds"][s]) if s in c["seeds"] else "—" for s in seeds)
            lines += [
                f"| {family} | {f'**{name}**' if chosen else name} | {_pct(c['mean'])} | {per_seed} | "
                f"{'**chosen**' if chosen else ''} |"
            ]
    lines += [""] + [
        f"- {family}: **{f['chosen']}**, trained with `{json.dumps(f['settings'])}`" for family, f in choices.items()
    ]
    return lines


def results_table(rows: dict, alpha: float, primary: bool) -> list[str]:
    """One row per contrast: accuracies, difference with both CIs, p values, MDE and verdict (points)."""
    holm = " p (Holm) |" if primary else ""
    lines = [
        f"| contrast | a - b | a % | b % | a - b, points [{_level(alpha)} CI, seeds random] | per-example CI | p | "
        f"per-example p |{holm} MDE (points) | verdict |",
        "|---" * (10 + primary) + "|",
    ]
    for n, r in rows.items():
        pe = r["per_example"]
        holm = f" {r['p_holm']:.3g} |" if primary else ""
        lines += [
            f"| {n} | {r['a']} - {r['b']} | {_pct(r['accuracy_a'])} | {_pct(r['accuracy_b'])} | "
            f"{_pts(r['diff'])} {_ci(r['ci_low'], r['ci_high'])} | {_ci(pe['ci_low'], pe['ci_high'])} | "
            f"{r['p']:.3g} | {pe['p']:.3g} |{holm} {100 * r['mde']:.1f} | {verdict(r, alpha, primary)} |"
        ]
    single = [n for n, r in rows.items() if len(r["seeds"]) == 1]
    if single:
        lines += [
            "",
            f"{', '.join(single)}: one shared seed, so the CI and p cannot count seed variance (per-example interval).",
        ]
    return lines


def accuracy_section(accuracy: dict, by_task: dict, identical: dict) -> list[str]:
    """Each group's seeds, mean, seed sd next to the sd Bernoulli noise alone gives, accuracy by task."""
    seeds = sorted({s for a in accuracy.values() for s in a["seeds"]}, key=int)
    lines = [
        "Seed sd: the spread of the seeds' accuracies; binomial sd: what Bernoulli noise over the test problems "
        "alone would give (a seed sd well above it is seed variance).",
        "",
    ]
    lines += ["| group | mean % | seed sd | binomial sd | " + " | ".join(f"seed {s}" for s in seeds) + " |"]
    lines += ["|---" * (len(seeds) + 4) + "|"]
    for g, a in accuracy.items():
        per_seed = " | ".join(_pct(a["seeds"][s]) if s in a["seeds"] else "—" for s in seeds)
        lines += [f"| {g} | {_pct(a['mean'])} | {_sd(a['seed_sd'])} | {_sd(a['binomial_sd'])} | {per_seed} |"]
    tasks = sorted({t for v in by_task.values() for t in v})
    lines += ["", "Accuracy % by task (all seeds):", "", "| group | " + " | ".join(tasks) + " |"]
    lines += ["|---" * (len(tasks) + 1) + "|"]
    lines += [f"| {g} | " + " | ".join(_pct(v[t]) if t in v else "—" for t in tasks) + " |" for g, v in by_task.items()]
    for g, same in identical.items():
        lines += [
            "",
            f"Note: {g} made exactly the same predictions as {same} on every seed and test problem they share: the two "
            "configurations trained identical students.",
        ]
    return lines


def render(
    plan: dict, stats: dict, choices: dict, splits: dict, teachers: dict, figures: dict, identical: dict | None = None
) -> str:
    """The report as Markdown: plan, data and tuning, results (primary, answer, exploratory, accuracy), figures.

    plan: ``report.plan``; stats: ``statistics.json``; choices: ``tuning/choices.json``; splits: ``splits.json``;
    teachers: name -> ``metrics.json``; figures: caption -> path relative to the report; identical: as
    ``identical_groups``.
    """
    check_plan(plan, stats)
    alpha = plan["alpha"]
    lines = ["# KV-cache distillation study: report", ""]
    lines += ["*Generated by the pipeline from its own outputs; every number below comes from a run.*", ""]
    lines += plan_section(plan, stats)
    lines += ["", "## 2. Data, teachers and tuning", ""] + data_section(splits, teachers)
    lines += ["", "### Tuning (validation split only; the test split is never read)", ""] + tuning_section(choices)
    lines += ["", "## 3. Results", "", "### 3.1 Primary contrasts", ""] + results_table(stats["primary"], alpha, True)
    lines += [
        "",
        f"The {_level(alpha)} CI and p count seed variance (crossed random-effects t interval); the per-example CI "
        "and p hold the trained students fixed (seed-averaged paired BCa bootstrap, sign-flip permutation test).",
    ]
    lines += ["", "### 3.2 The answer", ""]
    lines += [
        "- " + answer_sentence(n, r, plan["contrasts"][n], alpha, plan["correction"])
        for n, r in stats["primary"].items()
    ]
    lines += ["", "**What this does and does not show**", ""] + limits(plan, stats)
    if stats["exploratory"]:
        lines += ["", "### 3.3 Exploratory contrasts (not corrected for multiple comparisons)", ""]
        lines += results_table(stats["exploratory"], alpha, False)
    lines += ["", "### 3.4 Accuracy per group and seed (%)", ""]
    lines += accuracy_section(stats["accuracy"], stats["accuracy_by_task"], identical or {})
    if figures:
        lines += ["", "## 4. Figures", ""]
        for caption, path in figures.items():
            lines += [f"**{caption}**", "", f"![{caption}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------------- figures


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
        xlabel="accuracy difference a - b (points)", title=f"contrasts, {_level(alpha)} CI (seeds and problems random)"
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
        title=f"{name}: {_level(alpha)} CI, seeds random",
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
    alpha, level = stats["alpha"], _level(stats["alpha"])
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
