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


def self_judge_info(categories: list[str], threshold: float, question: str) -> dict:
    """The self-judge described like the external ones (the model itself, asked `question` per category)."""
    return {"name": SELF, "kind": "self", "version": "the served model and codebook", "threshold": threshold,
            "categories": list(categories), "classes": [question]}


@torch.no_grad()
def judge_eval_shard(images: torch.Tensor, self_probs: torch.Tensor, prompts: list, categories: list[str],
                     threshold: float, question: str, judges: list[Judge], keep_png: bool) -> tuple[dict, list[bytes] | None]:
    """An eval shard's judge statistics and (with `keep_png`) its images as PNG bytes.

    images (B, 3, H, W) in [0, 1]: the shard decoded with the served codebook; self_probs (B, C);
    prompts: one `Prompt` per image (its category and split). Returns
    ({"judge_counts": eval_judge_counts, "judge_info": {name: info}}, PNGs or None).
    """
    from safecb.judges.base import png_bytes

    splits = ["benign" if p.split == "benign" else "unsafe" for p in prompts]
    counts = eval_judge_counts(images, self_probs, categories, threshold, judges, [p.category for p in prompts], splits)
    info = {SELF: self_judge_info(categories, threshold, question), **{j.info.name: j.info.to_dict() for j in judges}}
    return {"judge_counts": counts, "judge_info": info}, (png_bytes(images) if keep_png else None)


def judge_metrics_from_stats(stats: list[dict]) -> dict:
    """The metrics row's judge keys from eval shards' stats (those of `judge_eval_shard`); {} if none had any."""
    with_counts = [s for s in stats if "judge_counts" in s]
    if not with_counts:
        return {}
    info = with_counts[0].get("judge_info", {})
    return eval_judge_metrics([s["judge_counts"] for s in with_counts], info.get(SELF, {}),
                              [v for k, v in info.items() if k != SELF])
