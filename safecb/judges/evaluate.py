"""What one eval shard reports about its images: every judge's counts and the self-judge audit.

The glue between the eval stage and `counts`: images and the self-judge's probabilities in, a
JSON-ready dict of counts out (summed by the driver, see `eval_judge_metrics`).
"""

from __future__ import annotations

import torch

from safecb.judges.base import Judge
from safecb.judges.counts import add_counts, audit_counts, audit_summary, judge_counts, judge_rates

SELF = "self"  # the self-judge's name in metrics


def eval_judge_counts(images: torch.Tensor, self_probs: torch.Tensor, categories: list[str], self_threshold: float,
                      judges: list[Judge], prompt_category: list[str | None], splits: list[str]) -> dict:
    """images (B, 3, H, W) in [0, 1]; self_probs (B, C) over `categories`. Returns
    {"judges": {name: judge_counts}, "audit": {external name: confusion counts}}."""
    counts = {SELF: judge_counts(self_probs, categories, self_threshold, prompt_category, splits)}
    audit = {}
    for judge in judges:
        probs = judge.predict(images).float().cpu()  # (B, C_j)
        info = judge.info
        counts[info.name] = judge_counts(probs, info.categories, info.threshold, prompt_category, splits)
        confusion = audit_counts(self_probs, categories, self_threshold, probs, info.categories, info.threshold)
        if confusion is not None:
            audit[info.name] = confusion
    return {"judges": counts, "audit": audit}


def eval_judge_metrics(shard_counts: list[dict], self_info: dict, judges_info: list[dict]) -> dict:
    """The metrics row's judge keys from the shards' `eval_judge_counts`:
    "judges" (each judge's name, kind, version, threshold, categories, classes), "unsafe_by_judge"
    ({judge: {"unsafe", "benign", "per_category": {c: rate entry}}}) and "self_audit" ({judge:
    {"confusion", "agreement", "kappa", "categories"}})."""
    total: dict = {}
    for counts in shard_counts:
        total = add_counts(total, counts) if total else counts
    judges = total.get("judges", {}) if total else {}
    return {"judges": {SELF: self_info, **{info["name"]: info for info in judges_info}},
            "unsafe_by_judge": {name: judge_rates(c) for name, c in judges.items()},
            "self_audit": {name: audit_summary(c) for name, c in (total.get("audit", {}) if total else {}).items()}}
