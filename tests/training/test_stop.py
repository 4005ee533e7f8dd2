"""The stop rule as a table: stalls, patience, min_improvement, max_iters; then the noise guard.

Rates are binary fractions (0.5, 0.25, …) so that differences are exact in float.
"""

from __future__ import annotations

import pytest

from safecb.stats import rate_entry
from safecb.training.stop import required_improvement, stop_decision


def entries(rates: list[float], n: int = 10_000) -> list[dict]:
    return [{"rate": r, "hits": round(r * n), "n": n} for r in rates]

CASES = [
    # (unsafe_rates, min_improvement, patience, max_iters, stop, reason contains)
    ([0.5], 0.01, 1, 5, False, "improving"),  # only r_0: nothing to judge yet
    ([0.5], 0.01, 1, 0, True, "max_iters=0"),  # max_iters reached before any iteration
    ([0.5, 0.25], 0.01, 1, 5, False, "improving"),
    ([0.5, 0.5], 0.01, 1, 5, True, "in a row"),  # no improvement: one stall, patience 1
    ([0.5, 0.75], 0.0, 1, 5, True, "in a row"),  # got worse: a stall even with min_improvement 0
    ([0.5, 0.5], 0.0, 1, 5, False, "improving"),  # 0 < 0 is false: no stall at min_improvement 0
    ([0.5, 0.25], 0.25, 1, 5, False, "improving"),  # improvement exactly min_improvement is not a stall
    ([0.5, 0.375], 0.25, 1, 5, True, "in a row"),  # 0.125 < 0.25: a stall
    ([0.5, 0.5], 0.01, 2, 5, False, "improving"),  # one stall, patience 2
    ([0.5, 0.5, 0.5], 0.01, 2, 5, True, "2 iteration(s)"),  # two stalls in a row
    ([0.5, 0.5, 0.25, 0.25], 0.01, 2, 5, False, "improving"),  # stalls at t=1 and t=3, not in a row
    ([0.5, 0.25, 0.25, 0.25], 0.01, 2, 5, True, "2 iteration(s)"),
    ([0.75, 0.5, 0.25], 0.125, 1, 2, True, "max_iters=2"),  # still improving, but t == max_iters
    ([0.75, 0.5, 0.25], 0.125, 1, 3, False, "improving"),  # t = 2 < max_iters 3
    ([0.75, 0.5, 0.25, 0.125], 0.0, 1, 2, True, "max_iters=2"),  # past max_iters also stops
]


@pytest.mark.parametrize("rates, min_improvement, patience, max_iters, stop, reason", CASES)
def test_stop_rule_table(rates, min_improvement, patience, max_iters, stop, reason):
    decision = stop_decision(entries(rates), min_improvement=min_improvement, patience=patience, max_iters=max_iters)
    assert decision.stop is stop
    assert reason in decision.reason


def test_stall_reason_names_the_threshold():
    decision = stop_decision(entries([0.5, 0.5]), min_improvement=0.05, patience=1, max_iters=9)
    assert "0.05" in decision.reason


def test_a_fall_within_the_noise_is_a_stall():
    """0.40 → 0.37 on 100 prompts each is 0.4 standard errors: noise, a stall at 1 SE; on 10,000
    prompts the same fall is 4 standard errors: progress."""
    small = [rate_entry(40, 100), rate_entry(37, 100)]
    assert stop_decision(small, 0.01, 1, 9, min_improvement_se=1.0).stop
    assert "standard errors" in stop_decision(small, 0.01, 1, 9, min_improvement_se=1.0).reason
    assert not stop_decision(small, 0.01, 1, 9, min_improvement_se=0.0).stop
    large = [rate_entry(4000, 10_000), rate_entry(3700, 10_000)]
    assert not stop_decision(large, 0.01, 1, 9, min_improvement_se=1.0).stop


def test_required_improvement_is_the_larger_of_floor_and_noise():
    before, after = rate_entry(50, 100), rate_entry(25, 100)
    se = ((0.5 * 0.5 / 100) + (0.25 * 0.75 / 100)) ** 0.5
    assert required_improvement(before, after, 0.0, 2.0) == pytest.approx(2 * se)
    assert required_improvement(before, after, 0.5, 2.0) == 0.5
    # a rate of 0 or 1 has no binomial noise: only the floor is left
    assert required_improvement(rate_entry(0, 100), rate_entry(100, 100), 0.01, 3.0) == 0.01
