"""The latent study's report section: every number from latent.json, the regime check either way, bad plans
refused."""

import json

import numpy as np
import pytest

from kvlib.contrasts import analyse
from kvlib.report_latent import check_latent_plan, latent_section, load_latent_statistics, passes_figure, regime_line

ACC = {"latent": 0.30, "kava": 0.40, "cot": 0.55, "nocot": 0.25}
PLAN = {
    "question": "Does KaVa help?",
    "regime": "easy problems",
    "seeds": 3,
    "arms": {"latent": "no KV", "kava": "self KV", "cot": "CoT-SFT", "nocot": "No-CoT"},
    "contrasts": {"L1": "kava - latent"},
    "bounds": {"cot": "cot", "nocot": "nocot"},
}


def stats(acc=ACC, n=400):
    rng = np.random.default_rng(0)
    correct = {g: {s: (rng.random(n) < p).astype(np.int64) for s in range(3)} for g, p in acc.items()}
    out = analyse(correct, {"L1": ["kava", "latent"]}, {}, n_resamples=200)
    return out | {"n_examples": n, "forward_passes": {"latent": 10.0, "kava": 10.0, "cot": 28.5, "nocot": 5.5}}


def test_the_section_shows_each_arm_with_its_passes_and_the_contrast_with_its_verdict():
    s = stats()
    text = "\n".join(latent_section(PLAN, s))
    for arm, a in s["accuracy"].items():
        assert f"| {arm} | {PLAN['arms'][arm]} | {100 * a['mean']:.1f} |" in text
    assert "| 28.5 |" in text and "| 5.5 |" in text
    row = s["primary"]["L1"]
    assert f"{100 * row['diff']:+.1f}" in text and "**L1** (kava - latent)" in text


def test_the_regime_check_says_whether_cot_stood_15_points_above_no_cot():
    assert "holds" in regime_line(PLAN, stats())
    low = stats(ACC | {"cot": 0.30})
    assert "does **not** hold" in regime_line(PLAN, low)
    assert "not checked" in regime_line({k: v for k, v in PLAN.items() if k != "bounds"}, stats())


@pytest.mark.parametrize(
    "change, match",
    [
        ({"contrasts": {"L9": "x"}}, "primary contrasts"),
        ({"arms": {"latent": "x"}}, "arms"),
        ({"bounds": {"cot": "cot"}}, "bounds"),
        ({"extra": 1}, "unknown keys"),
    ],
)
def test_a_plan_that_disagrees_with_the_statistics_is_refused(change, match):
    with pytest.raises(ValueError, match=match):
        check_latent_plan(PLAN | change, stats())


def test_missing_statistics_are_named(tmp_path):
    path = tmp_path / "latent.json"
    path.write_text(json.dumps({k: v for k, v in stats().items() if k != "forward_passes"}, default=float))
    with pytest.raises(ValueError, match="forward_passes"):
        load_latent_statistics(path)


def test_the_figure_has_one_point_per_arm_at_its_passes():
    fig = passes_figure(stats())
    means = [line for line in fig.axes[0].lines if line.get_marker() == "o"]
    assert [line.get_xdata()[0] for line in means] == [10.0, 10.0, 28.5, 5.5]
