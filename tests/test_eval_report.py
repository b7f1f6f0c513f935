"""Win rates, bootstrap intervals and report files on constructed scores with known answers."""

import csv

import numpy as np
import pytest
from scipy import stats

from spin_jax.eval import report


def test_win_rate_counts_ties_half():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    b = np.array([0.0, 2.0, 5.0, 1.0])
    np.testing.assert_array_equal(report.win_indicator(a, b), [1.0, 0.5, 0.0, 1.0])
    assert report.win_rate(a, b) == 0.625
    assert report.win_rate(b, a) == 0.375
    assert report.win_rate(a, a) == 0.5
    with pytest.raises(ValueError, match="same length"):
        report.win_rate(a, b[:3])


def test_bootstrap_constant_and_seeded():
    assert report.bootstrap_ci(np.full(50, 0.3)) == pytest.approx((0.3, 0.3))
    x = np.random.default_rng(0).normal(size=200)
    a = report.bootstrap_ci(x, resamples=500, seed=7)
    assert a == report.bootstrap_ci(x, resamples=500, seed=7)
    assert a != report.bootstrap_ci(x, resamples=500, seed=8)
    assert a[0] < x.mean() < a[1]
    with pytest.raises(ValueError, match="non-empty"):
        report.bootstrap_ci(np.zeros(0))
    with pytest.raises(ValueError, match="confidence"):
        report.bootstrap_ci(x, confidence=1.0)


def test_bootstrap_of_wins_matches_the_binomial():
    # k wins of n: the bootstrap mean is Binomial(n, k/n) / n, so the percentile interval is
    # its quantiles (up to one step of 1/n from the resampling noise).
    n, k = 40, 28
    wins = np.r_[np.ones(k), np.zeros(n - k)]
    lo, hi = report.bootstrap_ci(wins, resamples=20000, confidence=0.9, seed=0)
    exact = stats.binom.ppf([0.05, 0.95], n, k / n) / n
    assert abs(lo - exact[0]) <= 1 / n + 1e-9
    assert abs(hi - exact[1]) <= 1 / n + 1e-9


def test_bootstrap_of_normal_mean_has_the_normal_width():
    x = np.random.default_rng(1).normal(2.0, 3.0, size=2000)
    lo, hi = report.bootstrap_ci(x, resamples=4000, seed=0)
    half = 1.959964 * x.std() / np.sqrt(x.size)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.08)
    assert (lo + hi) / 2 == pytest.approx(x.mean(), abs=0.1 * half)


def _scores():
    n = 8
    base = {"pickscore": np.arange(n, dtype=float), "hpsv2": np.zeros(n)}
    better = {
        "pickscore": np.arange(n) + np.array([1, 1, 1, 1, 1, 1, -1, 0]),  # 6 wins, 1 tie
        "hpsv2": np.array([1, 1, 1, 1, -1, -1, -1, -1], float),  # 4 wins
    }
    return {"base": base, "better": better}


def test_summarize_known_answers():
    s = report.summarize(_scores(), ["base", "better"], ["pickscore", "hpsv2"], resamples=300)
    rows = {(r["model"], r["metric"]): r for r in s["rows"]}
    assert rows["base", "pickscore"]["mean"] == 3.5
    assert rows["base", "pickscore"]["median"] == 3.5
    assert rows["base", "pickscore"]["win_rate"] is None
    assert rows["better", "pickscore"]["win_rate"] == 6.5 / 8
    assert rows["better", "hpsv2"]["win_rate"] == 0.5
    assert rows["better", "hpsv2"]["mean"] == 0.0
    (avg,) = s["average"]
    assert avg["win_rate"] == pytest.approx((6.5 / 8 + 0.5) / 2)
    lo, hi = avg["win_ci"]
    assert lo <= avg["win_rate"] <= hi
    assert s["n"] == 8 and s["base"] == "base"


def test_summarize_rejects_mismatched_counts():
    scores = _scores()
    scores["better"]["hpsv2"] = scores["better"]["hpsv2"][:5]
    with pytest.raises(ValueError, match="better/hpsv2"):
        report.summarize(scores, ["base", "better"], ["pickscore", "hpsv2"])
    with pytest.raises(ValueError, match="no aesthetic"):
        report.summarize(_scores(), ["base", "better"], ["aesthetic"])


def test_report_files(tmp_path):
    scores = _scores()
    s = report.summarize(scores, ["base", "better"], ["pickscore", "hpsv2"], resamples=100)
    text = report.markdown(
        s,
        display={"pickscore": "PickScore"},
        skipped={"imagereward": "scorers.imagereward.weights is not set"},
        grids=[("grids/grid_000.png", ["a cat"])],
    )
    assert "| better | 0.8125 [" in text
    assert "ImageReward" not in text and "imagereward: scorers.imagereward.weights" in text
    assert "![grid](grids/grid_000.png)" in text and "1. a cat" in text
    path = str(tmp_path / "report.csv")
    report.write_csv(s, path)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5  # 2 models x 2 metrics + the average row
    assert float(rows[-1]["win_rate"]) == pytest.approx(0.65625)
    groups = report.group_means(scores, ["x"] * 4 + ["y"] * 4, ["base", "better"], ["hpsv2"])
    assert groups["x"]["better"]["hpsv2"] == 1.0 and groups["y"]["better"]["hpsv2"] == -1.0
    img = np.zeros((8, 6, 3), np.uint8)
    report.save_comparison_grid([[img, img], [img, img]], str(tmp_path / "g.png"), size=4, gap=2)
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (2 * 3 + 2, 2 * 4 + 2)
