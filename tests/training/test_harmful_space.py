"""Harmful Space and harm scores on hand-made tokens and codebooks (expected values derived by hand)."""

from __future__ import annotations

import math

import pytest
import torch

from safecb.training.harmful_space import HarmfulSpace, aligned_differences, harm_scores, harmful_space

E1 = torch.tensor([1.0, 0.0, 0.0])
E2 = torch.tensor([0.0, 1.0, 0.0])
E3 = torch.tensor([0.0, 0.0, 1.0])


def split_codebook() -> torch.Tensor:
    """(4, 3): codes 0/1 are ±e1 and codes 2/3 are ±e2, at assorted norms (the space uses ĉ = c/|c|)."""
    return torch.stack([2.0 * E1, -0.5 * E1, 3.0 * E2, -1.0 * E2])


# ---- aligned_differences ------------------------------------------------------------------------

def test_aligned_differences_keeps_only_differing_positions_in_row_major_order():
    harmful = torch.tensor([[1, 2, 3], [4, 5, 6]])
    safe = torch.tensor([[1, 9, 3], [7, 5, 8]])
    codes_h, codes_s = aligned_differences(harmful, safe)
    assert codes_h.tolist() == [2, 4, 6]
    assert codes_s.tolist() == [9, 7, 8]


def test_aligned_differences_of_identical_grids_is_empty():
    grid = torch.tensor([[1, 2], [3, 4]])
    codes_h, codes_s = aligned_differences(grid, grid.clone())
    assert codes_h.numel() == 0 and codes_s.numel() == 0


def test_aligned_differences_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        aligned_differences(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


# ---- harmful_space ------------------------------------------------------------------------------

def test_differences_all_along_e1_give_rank_one_basis_e1():
    # Codes 0 and 1 are +e1 and -e1 at different norms: every normalised difference is ±2·e1.
    codebook = split_codebook()
    space = harmful_space(codebook, torch.tensor([0, 1, 0]), torch.tensor([1, 0, 1]), energy=0.9)
    assert space.rank == 1
    assert space.basis.shape == (3, 1)
    assert torch.allclose(space.basis[:, 0].abs(), E1, atol=1e-6)
    assert space.num_differences == 3
    # Three differences of norm 2 along one direction: σ1² = 3·4 = 12, all energy in the basis.
    assert space.singular_values[0].item() == pytest.approx(math.sqrt(12.0), rel=1e-6)
    assert space.energy == pytest.approx(1.0)


def test_differences_from_unnormalised_codes_use_the_normalised_codes():
    # (3, 4, 0) and (0.6, 0.8, 0)·10 normalise to the same code; (−3, 4, 0)/5 differs only along e1.
    codebook = torch.tensor([[3.0, 4.0, 0.0], [-6.0, 8.0, 0.0], [6.0, 8.0, 0.0]])
    space = harmful_space(codebook, torch.tensor([0, 0]), torch.tensor([1, 2]), energy=0.9)
    # pair (0, 2) has a zero normalised difference; pair (0, 1) is (1.2, 0, 0).
    assert space.rank == 1
    assert torch.allclose(space.basis[:, 0].abs(), E1, atol=1e-6)
    assert space.singular_values[0].item() == pytest.approx(1.2, rel=1e-6)


@pytest.fixture
def split_60_40():
    """Differences: 3 × (2·e1) and 2 × (2·e2) → σ² = (12, 8), a 0.6 / 0.4 energy split."""
    codes_h = torch.tensor([0, 0, 1, 2, 3])
    codes_s = torch.tensor([1, 1, 0, 3, 2])
    return split_codebook(), codes_h, codes_s


def test_energy_half_of_a_60_40_split_keeps_one_direction(split_60_40):
    codebook, codes_h, codes_s = split_60_40
    space = harmful_space(codebook, codes_h, codes_s, energy=0.5)
    assert space.rank == 1
    assert torch.allclose(space.basis[:, 0].abs(), E1, atol=1e-6)
    assert space.energy == pytest.approx(0.6, abs=1e-9)
    # all min(M, D) = 3 singular values are reported; the third direction (e3) holds nothing.
    assert torch.allclose(space.singular_values.square(), torch.tensor([12.0, 8.0, 0.0]), atol=1e-5)


def test_energy_exactly_at_first_share_keeps_one_direction(split_60_40):
    codebook, codes_h, codes_s = split_60_40
    assert harmful_space(codebook, codes_h, codes_s, energy=0.6).rank == 1


def test_energy_09_of_a_60_40_split_keeps_both_directions(split_60_40):
    codebook, codes_h, codes_s = split_60_40
    space = harmful_space(codebook, codes_h, codes_s, energy=0.9)
    assert space.rank == 2
    assert space.energy == pytest.approx(1.0)
    basis = space.basis
    assert torch.allclose(basis.T @ basis, torch.eye(2), atol=1e-6)
    # The span is {e1, e2}: e3 is orthogonal to it, e1 and e2 lie in it.
    projector = basis @ basis.T
    assert torch.allclose(projector, torch.diag(torch.tensor([1.0, 1.0, 0.0])), atol=1e-6)


def test_max_rank_caps_the_rank(split_60_40):
    codebook, codes_h, codes_s = split_60_40
    space = harmful_space(codebook, codes_h, codes_s, energy=0.9, max_rank=1)
    assert space.rank == 1
    assert torch.allclose(space.basis[:, 0].abs(), E1, atol=1e-6)


def test_full_energy_does_not_add_null_directions():
    # Rank-1 differences in D = 3 with energy 1.0: the numerical rank (1) caps r.
    space = harmful_space(split_codebook(), torch.tensor([0, 1]), torch.tensor([1, 0]), energy=1.0)
    assert space.rank == 1


def test_no_differences_give_rank_zero():
    codebook = split_codebook()
    empty = torch.zeros(0, dtype=torch.long)
    space = harmful_space(codebook, empty, empty)
    assert space.rank == 0
    assert space.basis.shape == (3, 0)
    assert space.energy == 0.0
    assert space.num_differences == 0
    vectors = torch.randn(5, 3)
    assert torch.equal(space.project_out(vectors), vectors)


def test_differences_between_codes_with_the_same_direction_give_rank_zero():
    # Codes 0 and 1 differ in index but normalise to the same unit vector.
    codebook = torch.stack([E1, 5.0 * E1, E2])
    space = harmful_space(codebook, torch.tensor([0, 1]), torch.tensor([1, 0]))
    assert space.rank == 0
    assert space.num_differences == 2


def test_basis_keeps_codebook_dtype():
    codebook = split_codebook().double()
    space = harmful_space(codebook, torch.tensor([0]), torch.tensor([1]))
    assert space.basis.dtype == torch.float64


# ---- project_out -------------------------------------------------------------------------------

def test_project_out_removes_the_component_along_the_basis():
    space = HarmfulSpace(basis=E1[:, None].clone(), singular_values=torch.ones(1), energy=1.0, num_differences=1)
    vectors = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 0.5, 0.0]])
    expected = torch.tensor([[0.0, 2.0, 3.0], [0.0, 0.5, 0.0]])
    assert torch.allclose(space.project_out(vectors), expected)


def test_project_out_with_an_oblique_basis():
    u = torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2.0)
    space = HarmfulSpace(basis=u[:, None], singular_values=torch.ones(1), energy=1.0, num_differences=1)
    out = space.project_out(torch.tensor([[2.0, 0.0, 5.0]]))
    # v − (v·u)u = (2,0,5) − √2·(1,1,0)/√2 = (1, −1, 5)
    assert torch.allclose(out, torch.tensor([[1.0, -1.0, 5.0]]), atol=1e-6)
    assert abs(float(out @ u)) < 1e-6


# ---- harm_scores -------------------------------------------------------------------------------

def test_harm_scores_log_odds_by_hand_three_codes():
    # n_h = (2, 1, 0), N_h = 3; n_s = (0, 1, 2), N_s = 3; s = 1, K = 3 → both denominators 6.
    harmful = torch.tensor([[0, 0, 1]])
    safe = torch.tensor([[1, 2, 2]])
    scores = harm_scores(harmful, safe, num_codes=3, smoothing=1.0, score_min=1.0)
    expected = torch.tensor([math.log((3 / 6) / (1 / 6)), math.log((2 / 6) / (2 / 6)), math.log((1 / 6) / (3 / 6))])
    assert torch.allclose(scores.score, expected, atol=1e-6)
    assert scores.harmful_counts.tolist() == [2.0, 1.0, 0.0]
    assert scores.safe_counts.tolist() == [0.0, 1.0, 2.0]
    # log 3 ≈ 1.099 > 1 is harmful; 0 and −log 3 are not.
    assert scores.harmful.tolist() == [True, False, False]


def test_harm_scores_unequal_totals_and_smoothing():
    # n_h = (3, 1, 0), N_h = 4; n_s = (0, 1, 1), N_s = 2; s = 0.5, K = 3.
    harmful = torch.tensor([0, 0, 0, 1])
    safe = torch.tensor([1, 2])
    scores = harm_scores(harmful, safe, num_codes=3, smoothing=0.5, score_min=0.0)
    rate_h = [3.5 / 5.5, 1.5 / 5.5, 0.5 / 5.5]
    rate_s = [0.5 / 3.5, 1.5 / 3.5, 1.5 / 3.5]
    expected = torch.tensor([math.log(h / s) for h, s in zip(rate_h, rate_s)])
    assert torch.allclose(scores.score, expected, atol=1e-6)
    # log((1.5/5.5)/(1.5/3.5)) < 0: code 1 is seen in harmful images but scores below 0.
    assert scores.harmful.tolist() == [True, False, False]


def test_code_unseen_in_harmful_images_is_never_harmful():
    # Code 2 never occurs in a harmful image; with a very low score_min it still is not harmful.
    scores = harm_scores(torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]), num_codes=3, score_min=-100.0)
    assert scores.harmful.tolist() == [True, True, False]


def test_top_q_selects_the_q_highest_scoring_seen_codes():
    # Equal totals (N_h = N_s = 6), s = 1, K = 5 → score_k = log((n_h,k + 1) / (n_s,k + 1)):
    # code 0: log(4/1), code 1: log(3/1), code 2: log(1/1) = 0 (never used), code 3: log(2/4),
    # code 4: log(1/4) (safe only).
    harmful = torch.tensor([0, 0, 0, 1, 1, 3])
    safe = torch.tensor([3, 3, 3, 4, 4, 4])
    scores = harm_scores(harmful, safe, num_codes=5, smoothing=1.0, top_q=1)
    assert scores.harmful.tolist() == [True, False, False, False, False]
    scores = harm_scores(harmful, safe, num_codes=5, smoothing=1.0, top_q=2)
    assert scores.harmful.tolist() == [True, True, False, False, False]
    # q larger than the number of seen codes: all seen codes (0, 1, 3), never the unseen ones, even
    # though unseen code 2 (score 0) outscores seen code 3 (score log 0.5).
    scores = harm_scores(harmful, safe, num_codes=5, smoothing=1.0, top_q=10)
    assert scores.harmful.tolist() == [True, True, False, True, False]
    assert torch.allclose(scores.score, torch.tensor([math.log(4), math.log(3), 0.0, math.log(0.5), math.log(0.25)]),
                          atol=1e-6)


def test_top_q_ignores_score_min():
    scores = harm_scores(torch.tensor([0, 1]), torch.tensor([0, 1]), num_codes=2, score_min=50.0, top_q=1)
    assert int(scores.harmful.sum()) == 1


def test_soft_scores_with_certain_judgments_equal_the_hard_scores():
    from safecb.training.harmful_space import harm_scores, soft_harm_scores

    tokens = torch.tensor([[0, 0, 1, 2], [1, 1, 2, 2], [0, 2, 2, 2]])  # 3 images of 4 tokens, 3 codes
    p = torch.tensor([1.0, 0.0, 1.0])
    soft = soft_harm_scores(tokens, p, num_codes=3, smoothing=1.0, score_min=0.0)
    hard = harm_scores(tokens[p == 1], tokens[p == 0], num_codes=3, smoothing=1.0, score_min=0.0)
    assert torch.allclose(soft.score, hard.score) and torch.equal(soft.harmful, hard.harmful)
    # code 0 only in "unsafe" images: n_h = 3, n_s = 0 → log((3+1)/(8+3)) - log((0+1)/(4+3))
    assert soft.score[0].item() == pytest.approx(math.log(4 / 11) - math.log(1 / 7), abs=1e-6)


def test_soft_scores_weigh_an_uncertain_image_partly_on_both_sides():
    from safecb.training.harmful_space import soft_harm_scores

    tokens = torch.tensor([[0, 0], [1, 1]])
    scores = soft_harm_scores(tokens, torch.tensor([0.75, 0.25]), num_codes=2, smoothing=1.0, score_min=0.0)
    assert scores.harmful_counts.tolist() == pytest.approx([1.5, 0.5])
    assert scores.safe_counts.tolist() == pytest.approx([0.5, 1.5])
    assert scores.score[0] > 0 > scores.score[1]
