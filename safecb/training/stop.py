"""The stop rule (DESIGN.md, loop step 7): a pure function of the validation unsafe-rate history.

Each entry is a rate with its counts (`safecb.stats.rate_entry`), the self-judge's on the validation
split. An improvement counts only when it exceeds the sampling noise of the two rates, so the loop
neither stops nor goes on because of noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from safecb.stats import standard_error


@dataclass(frozen=True)
class StopDecision:
    stop: bool
    reason: str


def required_improvement(before: dict, after: dict, min_improvement: float, min_improvement_se: float) -> float:
    """The fall from `before` to `after` that counts as progress: max(floor, k × SE of the difference)."""
    se = [standard_error(e["hits"], e["n"]) or 0.0 for e in (before, after)]
    return max(min_improvement, min_improvement_se * math.hypot(*se))


def stop_decision(history: list[dict], min_improvement: float, patience: int, max_iters: int,
                  min_improvement_se: float = 0.0) -> StopDecision:
    """Decide after the newest entry of `history` = [e_0 (untreated), e_1, …, e_t], each {"rate", "hits", "n"}.

    Iteration t "stalls" when r_{t−1} − r_t < required_improvement(e_{t−1}, e_t). Stop after `patience`
    stalls in a row, or once t == max_iters.
    """
    iteration = len(history) - 1
    stalls, last_needed = 0, min_improvement
    for before, after in zip(history, history[1:]):
        last_needed = required_improvement(before, after, min_improvement, min_improvement_se)
        stalls = stalls + 1 if before["rate"] - after["rate"] < last_needed else 0
    if iteration >= 1 and stalls >= patience:
        return StopDecision(True, f"validation unsafe rate (self-judge) fell by < {last_needed:.3g} "
                                  f"(max of {min_improvement} and {min_improvement_se} standard errors) "
                                  f"for {stalls} iteration(s) in a row")
    if iteration >= max_iters:
        return StopDecision(True, f"reached max_iters={max_iters}")
    return StopDecision(False, "improving")
