"""Hyperparameters chosen on validation, by one rule for every arm (an equal tuning budget).

A **family** is a list of candidate groups (``train.groups`` entries, e.g. the CE-only student at three
learning rates, and the KV student at the same three). Each candidate is trained on the tuning seeds,
which the study's arms do not use, and scored by its final validation accuracy (the training loop's last
``val_accuracy``, on the whole validation split); ``choose`` takes, per family, the candidate with the
highest mean over the tuning seeds (a tie goes to the one listed first). The test split is never read.

An arm names its family instead of repeating a configuration: ``{tuned: kv, kv: {shuffle_time: true}}``
is the chosen KV candidate with the time-shuffled control on top. ``resolve_group`` builds it: the chosen
candidate's settings overlaid by the arm's own keys (mappings merged key by key, anything else replaced),
so an arm and its matched control differ in exactly the keys the arm states. The choice file records each
chosen candidate's settings too, so that an arm is trained again whenever they change.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

TUNED = "tuned"  # the key of an arm that takes a family's chosen candidate


def final_validation(report_dir: str | Path) -> float:
    """The last validation accuracy a training run logged (its ``validation.json``, written by the train stage)."""
    path = Path(report_dir) / "validation.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: train the candidate first (its train stage writes it)")
    rows = json.loads(path.read_text())
    if not rows:
        raise ValueError(f"{path} holds no validation accuracy; set eval_every > 0 in the student's train section")
    return float(rows[-1]["val_accuracy"])


def choose(families: dict[str, list[str]], seeds: list[int], runs_root: str | Path) -> dict:
    """Per family: every candidate's validation accuracy per tuning seed and its mean, and the chosen one with
    the settings it trained with (``{"chosen", "settings", "candidates": {name: {"seeds": {seed: acc},
    "mean"}}}``), read from the runs' reports ``runs_root/<candidate>/<seed>/`` (``validation.json``, and the
    settings in ``summary.json``)."""
    if not seeds:
        raise ValueError("tuning needs at least one seed")
    choices = {}
    for family, names in families.items():
        if not names or len(set(names)) != len(names):
            raise ValueError(f"tuning family {family!r} must list distinct candidates, got {names!r}")
        scores = {n: {str(s): final_validation(Path(runs_root) / n / str(s)) for s in seeds} for n in names}
        means = {n: sum(v.values()) / len(v) for n, v in scores.items()}
        best = max(names, key=lambda n: (means[n], -names.index(n)))
        settings = [json.loads((Path(runs_root) / best / str(s) / "summary.json").read_text())["group"] for s in seeds]
        if any(x != settings[0] for x in settings):
            raise ValueError(f"the runs of candidate {best!r} trained with different settings: {settings}")
        if TUNED in settings[0]:
            raise ValueError(f"candidate {best!r} of family {family!r} is a tuned arm itself; give it settings")
        choices[family] = {
            "chosen": best,
            "settings": settings[0],
            "candidates": {n: {"seeds": scores[n], "mean": means[n]} for n in names},
        }
    return choices


def overlay(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` on top: nested mappings merged key by key, other values replaced."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = overlay(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_group(groups: dict, name: str, choices: dict | None) -> dict:
    """The settings group ``name`` trains with: its own, or for ``tuned: <family>`` the chosen candidate's of
    that family (``choices``, from ``choose``) overlaid by its other keys."""
    if name not in groups:
        raise ValueError(f"group {name!r} is not among the groups {sorted(groups)}")
    group = groups[name]
    if TUNED not in group:
        return group
    family = group[TUNED]
    if not choices:
        raise ValueError(
            f"group {name!r} is tuned by family {family!r} but no tuning choices were given; run the tune stage "
            "and set the train section's tuning to its choices file"
        )
    if family not in choices:
        raise ValueError(f"group {name!r} is tuned by family {family!r}, but the choices hold {sorted(choices)}")
    return overlay(choices[family]["settings"], {k: v for k, v in group.items() if k != TUNED})
