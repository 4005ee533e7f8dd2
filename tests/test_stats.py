"""Rates with their uncertainty: Wilson intervals, standard errors, t-intervals over repeats."""

from __future__ import annotations

import pytest

from safecb.stats import mean_interval, rate_entry, standard_error, wilson_interval


def test_wilson_interval_known_values():
    # 10 of 100: the textbook Wilson interval is [0.0552, 0.1744]
    lo, hi = wilson_interval(10, 100)
    assert lo == pytest.approx(0.0552, abs=1e-4) and hi == pytest.approx(0.1744, abs=1e-4)
    # 0 hits: the interval starts at 0 and is not empty (the normal approximation would give [0, 0])
    lo, hi = wilson_interval(0, 50)
    assert lo == 0.0 and hi == pytest.approx(0.0714, abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_interval_shrinks_with_more_images():
    small, large = wilson_interval(30, 100), wilson_interval(300, 1000)
    assert (large[1] - large[0]) < (small[1] - small[0]) / 2


def test_rate_entry_absent_when_nothing_measured():
    assert rate_entry(0, 0) == {"rate": None, "hits": 0, "n": 0, "ci95": None}
    entry = rate_entry(3, 4)
    assert entry["rate"] == 0.75 and entry["n"] == 4 and entry["ci95"][0] < 0.75 < entry["ci95"][1]
    assert standard_error(3, 4) == pytest.approx((0.75 * 0.25 / 4) ** 0.5)


def test_mean_interval_over_seeds():
    entry = mean_interval([0.2, 0.3, 0.4])
    assert entry["mean"] == pytest.approx(0.3) and entry["n"] == 3
    # t(2) = 4.303, sd = 0.1: half width 4.303 * 0.1 / sqrt(3)
    assert entry["ci95"][1] - 0.3 == pytest.approx(4.303 * 0.1 / 3 ** 0.5, abs=1e-4)
    assert mean_interval([0.5])["ci95"] is None and mean_interval([])["mean"] is None
