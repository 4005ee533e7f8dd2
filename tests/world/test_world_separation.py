"""Code separation from hand-made tokens: which harm owns codes, the probe, the rule."""

from __future__ import annotations

import pytest
import torch

from safecb.world.evaluate import COLLATERAL_MAX, auc_score, linear_probe, separation_stats

T, K = 16, 32  # tokens an image, codes


def _world(harm_codes: list[int], n: int = 60, m: int = 200, seed: int = 0):
    """Benign images use codes 0-19 (code 19 rarely: 1 token in every 10th image); a harm paints
    cells 0-2 of each of its images with `harm_codes` (in turn); its twins keep the benign tokens there."""
    gen = torch.Generator().manual_seed(seed)
    benign = torch.randint(0, 19, (m, T), generator=gen)
    benign[::10, 5] = 19
    twins = torch.randint(0, 19, (n, T), generator=gen)
    harm = twins.clone()
    cells = torch.zeros(n, T, dtype=torch.bool)
    cells[:, :3] = True
    picks = torch.tensor(harm_codes)[torch.arange(n * 3) % len(harm_codes)].view(n, 3)
    harm[:, :3] = picks
    codebook = torch.randn(K, 4, generator=gen)
    return harm, cells, twins, benign, codebook


def test_a_harm_on_codes_of_its_own_is_separable():
    out = separation_stats(*_world([25, 26]))
    assert out["never_share"] == 1.0 and out["rare_share"] == 1.0 and out["enriched_share"] == 1.0
    assert out["enriched_codes"] == 2 and out["collateral"] == 0.0 and out["measured"] == "separable"
    assert out["probe_histogram"]["auc"] == 1.0 and out["probe_histogram"]["accuracy"] == 1.0


def test_a_harm_drawn_with_benign_codes_is_entangled():
    out = separation_stats(*_world([3, 7, 11]))  # codes every benign image uses
    assert out["never_share"] == 0.0 and out["rare_share"] == 0.0
    assert out["collateral"] > 0.1 > COLLATERAL_MAX and out["measured"] == "entangled"


def test_rare_share_counts_codes_benign_images_use_below_the_rate():
    data = _world([19])  # benign use of code 19: 20 of 3,200 tokens = 0.00625
    assert separation_stats(*data, rare_rate=0.01)["rare_share"] == 1.0
    below = separation_stats(*data, rare_rate=0.005)
    assert below["rare_share"] == 0.0 and below["never_share"] == 0.0
    # rare but not never used: editing code 19 moves 0.6% of benign tokens, under the rule's 1%
    assert below["collateral"] == pytest.approx(20 / 3200) and below["measured"] == "separable"


def test_probe_tells_shifted_features_apart_and_not_identical_ones():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(90, 5, generator=gen)
    shifted = base + torch.tensor([3.0, 0, 0, 0, 0]) + 0.1 * torch.randn(90, 5, generator=gen)
    assert linear_probe(shifted, base)["auc"] >= 0.99
    same = linear_probe(base, base)
    assert same["auc"] == 0.5 and same["n_test"] == 2 * (90 - 60)  # ties everywhere: chance
    assert linear_probe(shifted, base, seed=3) == linear_probe(shifted, base, seed=3)
    with pytest.raises(ValueError, match="two \\(N, F\\) tensors of one shape"):
        linear_probe(base, base[:, :2])


def test_auc_score():
    scores = torch.tensor([0.9, 0.8, 0.3, 0.1, 0.8])
    labels = torch.tensor([1, 1, 0, 0, 0], dtype=torch.bool)
    assert auc_score(scores, labels) == pytest.approx((3 + 2.5) / 6)  # one tie at 0.8
    with pytest.raises(ValueError, match="both classes"):
        auc_score(scores, torch.ones(5, dtype=torch.bool))
