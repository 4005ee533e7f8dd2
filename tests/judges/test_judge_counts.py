"""Per-category counts, their sums over shards, and the self-judge audit, on hand-made tensors."""

from __future__ import annotations

import pytest
import torch

from safecb.judges.counts import (add_counts, audit_counts, audit_summary, cohen_kappa, judge_counts, judge_rates,
                                  prompt_categories)


def test_prompt_categories_split_i2p_lists():
    assert prompt_categories("sexual, Shocking") == ["sexual", "shocking"]
    assert prompt_categories(None) == [] and prompt_categories("") == []


def test_counts_per_category_only_where_the_judge_measures_it():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.1], [0.1, 0.7], [0.8, 0.0], [0.1, 0.6]])  # (5, 2): sexual, violence
    cats = ["sexual", "sexual, violence", "hate", None, None]
    splits = ["unsafe", "unsafe", "unsafe", "unsafe", "benign"]
    counts = judge_counts(probs, ["sexual", "violence"], 0.5, cats, splits)
    # image 1 names two categories: counted in both, a hit in neither; "hate" is not measured: absent
    assert counts["category"] == {"sexual": [1, 2], "violence": [0, 1]}
    assert counts["unsafe"] == [3, 4]  # images 0, 2, 3 reach the threshold in some category
    assert counts["benign"] == [1, 1]


def test_counts_add_over_shards_and_become_rates_with_intervals():
    a = judge_counts(torch.tensor([[0.9], [0.1]]), ["sexual"], 0.5, ["sexual", "sexual"], ["unsafe", "unsafe"])
    b = judge_counts(torch.tensor([[0.7], [0.2]]), ["sexual"], 0.5, ["sexual", None], ["unsafe", "benign"])
    total = add_counts(a, b)
    assert total["category"]["sexual"] == [2, 3] and total["unsafe"] == [2, 3] and total["benign"] == [0, 1]
    rates = judge_rates(total)
    entry = rates["per_category"]["sexual"]
    assert entry["hits"] == 2 and entry["n"] == 3 and entry["rate"] == pytest.approx(2 / 3, abs=1e-4)
    lo, hi = entry["ci95"]
    assert lo < 2 / 3 < hi and 0 <= lo and hi <= 1


def test_audit_on_shared_categories_and_kappa():
    self_probs = torch.tensor([[0.9, 0.0], [0.9, 0.0], [0.1, 0.0], [0.1, 0.9]])  # sexual, hate
    ext = torch.tensor([[0.8], [0.1], [0.1], [0.1]])  # sexual only
    conf = audit_counts(self_probs, ["sexual", "hate"], 0.5, ext, ["sexual"], 0.5)
    # image 3's self flag is for hate, which the external judge does not measure: not a disagreement
    assert conf == {"tp": 1, "fp": 1, "fn": 0, "tn": 2, "categories": ["sexual"]}
    assert audit_counts(self_probs, ["sexual", "hate"], 0.5, ext, ["violence"], 0.5) is None
    summary = audit_summary(add_counts(conf, conf))
    assert summary["confusion"] == {"tp": 2, "fp": 2, "fn": 0, "tn": 4}
    assert summary["agreement"]["hits"] == 6 and summary["agreement"]["n"] == 8
    # κ = (0.75 - 0.5) / (1 - 0.5) with both raters at their marginals (1/2 and 1/4)
    assert summary["kappa"] == pytest.approx((0.75 - (0.5 * 0.25 + 0.5 * 0.75)) / (1 - (0.5 * 0.25 + 0.5 * 0.75)), abs=1e-4)


def test_kappa_edges():
    assert cohen_kappa(0, 0, 0, 0) is None
    assert cohen_kappa(5, 0, 0, 5) == pytest.approx(1.0)
    assert cohen_kappa(0, 5, 5, 0) == pytest.approx(-1.0)
    assert cohen_kappa(0, 0, 0, 7) == 1.0  # both always say safe: perfect agreement


def test_eval_shard_statistics_sum_into_metrics_with_judge_metadata():
    """Two shards through judge_eval_shard (the world's judge as the external one), summed by the driver."""
    from safecb.config import ExternalJudgeSpec
    from safecb.judges import build_judge
    from safecb.judges.evaluate import judge_eval_shard, judge_metrics_from_stats
    from safecb.prompts import Prompt

    judge = build_judge(ExternalJudgeSpec(kind="world"))
    palette = torch.rand(16, 3, 32, 32)
    categories = ["blood", "fire", "weapon", "drugs"]
    prompts = [Prompt("u1", "x", category="blood"), Prompt("u2", "y", category="weapon, fire"),
               Prompt("b1", "z", split="benign")]
    stats = []
    for shard in range(2):
        images = palette[shard * 3:shard * 3 + 3]  # the shard's decoded images
        self_probs = torch.tensor([[0.9, 0.0, 0.0, 0.0], [0.1, 0.0, 0.2, 0.0], [0.0, 0.0, 0.0, 0.6]])
        extra, pngs = judge_eval_shard(images, self_probs, prompts, categories, 0.5, "q {category}",
                                       [judge], keep_png=shard == 0)
        assert (pngs is not None and len(pngs) == 3 and pngs[0][:4] == b"\x89PNG") == (shard == 0)
        stats.append(extra)
    external = judge.predict(palette[:6])
    metrics = judge_metrics_from_stats([{"self_unsafe": [0, 0]}, *stats])
    assert metrics["judges"]["world"]["version"].startswith("sha256:") and metrics["judges"]["self"]["threshold"] == 0.5
    world = metrics["unsafe_by_judge"]["world"]
    unsafe_rows = [0, 1, 3, 4]  # two unsafe prompts in each shard
    assert world["unsafe"]["n"] == 4
    assert world["unsafe"]["hits"] == int((external[unsafe_rows].max(dim=-1).values >= 0.5).sum())
    assert world["per_category"]["blood"]["hits"] == int((external[[0, 3], 0] >= 0.5).sum())
    assert world["per_category"]["fire"]["n"] == 2 and world["per_category"]["weapon"]["n"] == 2
    assert metrics["unsafe_by_judge"]["self"]["unsafe"]["hits"] == 2  # u1 in both shards
    assert metrics["unsafe_by_judge"]["self"]["benign"] == {"rate": 1.0, "hits": 2, "n": 2, "ci95": [0.3424, 1.0]}
    confusion = metrics["self_audit"]["world"]["confusion"]
    assert sum(confusion.values()) == 6 and metrics["self_audit"]["world"]["categories"] == categories
    assert judge_metrics_from_stats([{"self_unsafe": [1, 2]}]) == {}
