"""Rates with their uncertainty. Every rate safecb reports carries its count and a 95% interval.

Wilson's score interval: unlike the normal approximation it stays inside [0, 1] and is honest at
0 or n hits, which is where a working Safe-CB run ends up. Pure Python, no tensors.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(hits: float, n: float, z: float = Z95) -> tuple[float, float] | None:
    """The 95% Wilson score interval of `hits` successes in `n` trials (None when n == 0)."""
    if n <= 0:
        return None
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    lo = 0.0 if hits <= 0 else max(0.0, centre - half)  # exact ends: no 1e-18 from rounding
    hi = 1.0 if hits >= n else min(1.0, centre + half)
    return lo, hi


def standard_error(hits: float, n: float) -> float | None:
    """The binomial standard error of the rate hits/n (None when n == 0)."""
    if n <= 0:
        return None
    p = hits / n
    return math.sqrt(p * (1 - p) / n)


def rate_entry(hits: float, n: float, digits: int = 4) -> dict:
    """{"rate", "hits", "n", "ci95": [lo, hi]}: a rate as metrics.jsonl records it; absent (rate None)
    when nothing was measured, never 0."""
    interval = wilson_interval(hits, n)
    return {"rate": round(hits / n, digits) if n else None, "hits": int(hits), "n": int(n),
            "ci95": [round(interval[0], digits), round(interval[1], digits)] if interval else None}


def mean_interval(values: list[float], digits: int = 4) -> dict:
    """Mean and a 95% t-interval over independent repeats (seeds, world models): {"mean", "n", "ci95"}."""
    n = len(values)
    if n == 0:
        return {"mean": None, "n": 0, "ci95": None}
    mean = sum(values) / n
    if n == 1:
        return {"mean": round(mean, digits), "n": 1, "ci95": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _t95(n - 1) * sd / math.sqrt(n)
    return {"mean": round(mean, digits), "n": n, "ci95": [round(mean - half, digits), round(mean + half, digits)]}


def _t95(dof: int) -> float:
    """Two-sided 95% Student-t quantile (table for small dof, normal beyond)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
    for limit in sorted(table):
        if dof <= limit:
            return table[limit]
    return Z95


def interval_text(entry: dict | None, missing: str = "—") -> str:
    """A `mean_interval` entry as table text: "0.180 [0.114, 0.246]", or the mean alone for one run."""
    if not entry or entry.get("mean") is None:
        return missing
    ci = entry.get("ci95")
    return f"{entry['mean']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
