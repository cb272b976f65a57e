"""``REPORT.md`` from the pipeline's measured outputs: the pre-registered plan first, then the results.

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

Its figures are built by ``kvlib.report_figures``. A missing input raises ``ValueError`` naming the file and
the stage that writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

PLAN_KEYS = ("question", "primary_metric", "alpha", "correction", "seeds", "tuning", "groups", "contrasts", "curves")
PLAN_OPTIONAL = ("caveats",)
STATISTICS_KEYS = ("n_examples", "alpha", "power", "accuracy", "primary", "exploratory", "accuracy_by_task")
ROW_KEYS = ("a", "b", "seeds", "accuracy_a", "accuracy_b", "diff", "ci_low", "ci_high", "p", "mde", "per_example")
PRIMARY_KEYS = ("p_holm", "reject")
PER_EXAMPLE_KEYS = ("ci_low", "ci_high", "p")
MDE_BOUND = 0.025  # the report says whether every primary MDE is at most this (2.5 points): small enough to matter

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


def check_keys(given: dict, required: tuple, optional: tuple, name: str) -> None:
    """``given`` (the params mapping ``name``) has every ``required`` key and no key outside ``required + optional``."""
    missing = [k for k in required if k not in given]
    unknown = [k for k in given if k not in required + optional]
    if missing or unknown:
        raise ValueError(
            f"{name} lacks {missing} and has unknown keys {unknown}; valid keys: {list(required + optional)}"
        )


def check_described(name: str, described, held, what: str) -> None:
    """The plan's ``name`` describes exactly the names ``held`` (``what`` they are), else ValueError."""
    if sorted(described) != sorted(held):
        raise ValueError(f"{name} describes {sorted(described)} but {what} are {sorted(held)}; describe exactly those")


def check_plan(plan: dict, stats: dict) -> None:
    """``report.plan`` has the keys the report reads and agrees with ``statistics.json``, else ValueError."""
    check_keys(plan, PLAN_KEYS, PLAN_OPTIONAL, "report.plan")
    check_described("report.plan.contrasts", plan["contrasts"], stats["primary"], "the statistics' primary contrasts")
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
    """Group -> seed -> the rows of ``root/<group>/<seed>/learning_curve.jsonl``, for every group and seed of the
    statistics' ``accuracy`` (the arms and secondary runs that were compared, in their order)."""
    return {
        g: {s: read_jsonl(Path(root) / g / str(s) / "learning_curve.jsonl", "train") for s in acc["seeds"]}
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


def ci_level(alpha: float) -> str:
    return f"{100 * (1 - alpha):g}%"


def _sd(x: float | None) -> str:
    return "—" if x is None else _pct(x)


def rejected(row: dict, alpha: float, primary: bool) -> bool:
    """Primary: the statistics stage's Holm decision; exploratory: the uncorrected seed-inclusive p < alpha."""
    return bool(row["reject"]) if primary else row["p"] < alpha


def bounded(row: dict) -> bool:
    """Whether the seed-inclusive CI excludes every effect larger than the MDE (in either direction)."""
    return -row["mde"] <= row["ci_low"] and row["ci_high"] <= row["mde"]


def uninformative(row: dict) -> bool:
    """Whether the MDE is 100 points or more: no accuracy difference could be detected (e.g. 2 seeds, whose
    seed-inclusive t interval has 1 degree of freedom), and "the CI excludes effects larger than it" says nothing."""
    return row["mde"] >= 1.0


def verdict(row: dict, alpha: float, primary: bool) -> str:
    """``a > b`` / ``a < b`` when the contrast rejects, else "no difference detected" with its MDE."""
    if rejected(row, alpha, primary):
        return f"{row['a']} {'>' if row['diff'] > 0 else '<'} {row['b']}" + ("" if primary else " (uncorrected)")
    if uninformative(row):
        return f"no difference detected, nor detectable (MDE {100 * row['mde']:.1f} points, above 100)"
    excludes = "excludes" if bounded(row) else "does not exclude"
    return f"no difference detected (MDE {100 * row['mde']:.1f} points); the CI {excludes} effects larger than the MDE"


def answer_sentence(name: str, row: dict, description: str, alpha: float, correction: str) -> str:
    """One sentence (or three) per primary contrast, every clause chosen by its numbers."""
    a, b, mde = row["a"], row["b"], f"{100 * row['mde']:.1f}"
    text = (
        f"**{name}** ({description}): {a} {_pct(row['accuracy_a'])}% vs {b} {_pct(row['accuracy_b'])}%, "
        f"{_pts(row['diff'])} points ({ci_level(alpha)} CI {_ci(row['ci_low'], row['ci_high'])} with seeds and "
        f"test problems random; Holm-adjusted p = {row['p_holm']:.3g})."
    )
    if row["reject"]:
        text += f" {a} is {'more' if row['diff'] > 0 else 'less'} accurate than {b} ({correction}, alpha = {alpha})."
    elif uninformative(row):
        text += (
            f" No difference detected, and none could be: the MDE ({mde} points) is above the 100 points an accuracy "
            "difference can reach, so with these seeds the seed-inclusive test says nothing either way."
        )
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
        text += f" The {ci_level(alpha)} CI excludes 0, but the difference does not survive {correction}."
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
        f"the {ci_level(alpha)} CI of {clear[0]} excludes 0."
        if len(clear) == 1
        else f"the {ci_level(alpha)} CIs of {', '.join(clear)} exclude 0."
    )
    lines += [
        "- Exploratory (not corrected for multiple comparisons; leads for a next study, not findings): "
        + (excludes if clear else f"no exploratory {ci_level(alpha)} CI excludes 0.")
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
        f"| contrast | a - b | a % | b % | a - b, points [{ci_level(alpha)} CI, seeds random] | per-example CI | p | "
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
    plan: dict,
    stats: dict,
    choices: dict,
    splits: dict,
    teachers: dict,
    figures: dict,
    identical: dict | None = None,
    latent: list[str] = (),
) -> str:
    """The report as Markdown: plan, data and tuning, results (primary, answer, exploratory, accuracy), figures,
    then the latent study's section (``latent``: its lines, ``kvlib.report_latent.latent_section``).

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
        f"The {ci_level(alpha)} CI and p count seed variance (crossed random-effects t interval); the per-example CI "
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
    if latent:
        lines += ["", *latent]
    return "\n".join(lines).rstrip() + "\n"
