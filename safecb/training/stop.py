"""The stop rule (DESIGN.md, loop step 7): a pure function of the unsafe-rate history."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopDecision:
    stop: bool
    reason: str


def stop_decision(unsafe_rates: list[float], min_improvement: float, patience: int, max_iters: int) -> StopDecision:
    """Decide after the newest entry of `unsafe_rates` = [r_0 (untreated), r_1, …, r_t].

    Iteration t "stalls" when r_{t−1} − r_t < min_improvement. Stop after `patience` stalls in a row,
    or once t == max_iters.
    """
    iteration = len(unsafe_rates) - 1
    stalls = 0
    for before, after in zip(unsafe_rates, unsafe_rates[1:]):
        stalls = stalls + 1 if before - after < min_improvement else 0
    if iteration >= 1 and stalls >= patience:
        return StopDecision(True, f"unsafe rate improved by < {min_improvement} for {stalls} iteration(s) in a row")
    if iteration >= max_iters:
        return StopDecision(True, f"reached max_iters={max_iters}")
    return StopDecision(False, "improving")
