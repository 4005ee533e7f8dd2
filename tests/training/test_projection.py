"""Closed-form projection: μ_safe, per-code α_k, and the projected codebook on tiny hand-made data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from safecb.training.harmful_space import HarmfulSpace, HarmScores, aligned_differences, harm_scores, harmful_space
from safecb.training.projection import code_step_sizes, project_codebook, safe_mean


def scores_of(score, harmful, harmful_counts, safe_counts) -> HarmScores:
    return HarmScores(torch.tensor(score), torch.tensor(harmful_counts, dtype=torch.float64),
                      torch.tensor(safe_counts, dtype=torch.float64), torch.tensor(harmful))


# ---- safe_mean ---------------------------------------------------------------------------------

def test_safe_mean_is_usage_weighted_mean_of_normalised_codes():
    codebook = torch.tensor([[2.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    mu = safe_mean(codebook, torch.tensor([1.0, 3.0, 0.0]))
    # (1·e1 + 3·e2 + 0·…) / 4
    assert torch.allclose(mu, torch.tensor([0.25, 0.75]))


def test_safe_mean_without_safe_use_is_the_plain_mean():
    codebook = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    mu = safe_mean(codebook, torch.zeros(2))
    assert torch.allclose(mu, torch.tensor([0.5, 0.5]))


# ---- code_step_sizes ---------------------------------------------------------------------------

def test_code_step_sizes_by_hand():
    # code 0: harmful, top score, no safe use → α; code 1: harmful, half the top score, safe share 1/4;
    # code 2: not harmful (despite a positive score) → 0; code 3: not harmful → 0.
    scores = scores_of([2.0, 1.0, 3.0, -1.0], [True, True, False, False], [4.0, 3.0, 1.0, 0.0], [0.0, 1.0, 0.0, 5.0])
    alphas = code_step_sizes(scores, alpha=0.8, safe_use_damping=1.0)
    expected = torch.tensor([0.8 * 1.0 * 1.0, 0.8 * 0.5 * (1 - 0.25), 0.0, 0.0])
    assert torch.allclose(alphas, expected, atol=1e-7)


def test_code_step_sizes_damping_clamps_at_zero():
    # safe share of code 1 is 3/4; damping 2 → 1 − 1.5 < 0 → clamped to 0.
    scores = scores_of([2.0, 2.0], [True, True], [1.0, 1.0], [0.0, 3.0])
    alphas = code_step_sizes(scores, alpha=1.0, safe_use_damping=2.0)
    assert alphas.tolist() == [1.0, 0.0]


def test_code_step_sizes_zero_damping_ignores_safe_use():
    scores = scores_of([2.0, 1.0], [True, True], [1.0, 1.0], [0.0, 99.0])
    alphas = code_step_sizes(scores, alpha=1.0, safe_use_damping=0.0)
    assert torch.allclose(alphas, torch.tensor([1.0, 0.5]))


def test_code_step_sizes_saturate_at_full_score():
    # with full_score 2: scores 6 and 2 both take the whole step (a frequent code no longer holds back a
    # rarer one), 1 takes half of it; relative to the top score (None) they would get 1, 1/3, 1/6.
    scores = scores_of([6.0, 2.0, 1.0], [True, True, True], [90.0, 3.0, 2.0], [0.0, 0.0, 0.0])
    assert torch.allclose(code_step_sizes(scores, alpha=1.0, full_score=2.0), torch.tensor([1.0, 1.0, 0.5]))
    assert torch.allclose(code_step_sizes(scores, alpha=1.0, full_score=None), torch.tensor([1.0, 1 / 3, 1 / 6]))


def test_code_step_sizes_without_harmful_codes_are_zero():
    scores = scores_of([2.0, 1.0], [False, False], [3.0, 1.0], [0.0, 0.0])
    assert torch.equal(code_step_sizes(scores, alpha=1.0), torch.zeros(2))


# ---- project_codebook --------------------------------------------------------------------------

@pytest.fixture
def pipeline():
    """K = 6, D = 4. Codes 0, 1 only in harmful images; 2, 3 only in safe ones; 4 in both; 5 unused.

    n_h = (4, 2, 0, 0, 2, 0), n_s = (0, 0, 3, 3, 2, 0), N_h = N_s = 8, s = 1 → score_k = log((n_h+1)/(n_s+1)):
    code 0 log 5 (max), code 1 log 3, code 4 log 1 = 0. With score_min 1: harmful = {0, 1}.
    """
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(6, 4, generator=generator) * 3.0  # not unit-norm on purpose
    harmful_tokens = torch.tensor([[0, 0, 1, 4], [0, 0, 1, 4]])
    safe_tokens = torch.tensor([[2, 2, 3, 4], [2, 3, 3, 4]])
    scores = harm_scores(harmful_tokens, safe_tokens, num_codes=6, smoothing=1.0, score_min=1.0)
    codes_h, codes_s = aligned_differences(harmful_tokens, safe_tokens)
    space = harmful_space(codebook, codes_h, codes_s, energy=0.9)
    mu = safe_mean(codebook, scores.safe_counts)
    return codebook, scores, space, mu


def test_pipeline_scores_are_as_derived(pipeline):
    _, scores, space, _ = pipeline
    assert scores.harmful.tolist() == [True, True, False, False, False, False]
    assert scores.score[0].item() == pytest.approx(math.log(5), abs=1e-6)
    assert space.rank >= 1


def test_alpha_one_code_has_no_component_in_the_harmful_space(pipeline):
    codebook, scores, space, mu = pipeline
    alphas = code_step_sizes(scores, alpha=1.0, safe_use_damping=1.0)
    assert alphas[0].item() == 1.0  # max harm score and no safe use
    projected = project_codebook(codebook, space, alphas, mu)
    residual = space.basis.T @ (projected[0] - mu)  # (r,)
    assert residual.abs().max().item() < 1e-6
    # Before projection the code did have a component there (so the check above can fail).
    before = space.basis.T @ (F.normalize(codebook[0], dim=-1) - mu)
    assert before.abs().max().item() > 1e-2


def test_codes_without_harm_evidence_stay_bit_identical(pipeline):
    codebook, scores, space, mu = pipeline
    alphas = code_step_sizes(scores, alpha=1.0, safe_use_damping=1.0)
    projected = project_codebook(codebook, space, alphas, mu)
    for k in (2, 3, 4, 5):  # safe-only, used in both (not harmful), never used
        assert alphas[k].item() == 0.0
        assert torch.equal(projected[k], codebook[k])
    # The harmful codes did move.
    for k in (0, 1):
        assert not torch.equal(projected[k], codebook[k])
    # The input is not modified in place.
    assert not torch.equal(projected, codebook)


def test_partial_alpha_scales_only_the_in_space_component(pipeline):
    codebook, scores, space, mu = pipeline
    alphas = code_step_sizes(scores, alpha=1.0, safe_use_damping=1.0)
    assert alphas[1].item() == pytest.approx(math.log(3) / math.log(5), abs=1e-6)
    projected = project_codebook(codebook, space, alphas, mu)
    unit = F.normalize(codebook[1], dim=-1)
    a = alphas[1].item()
    # In the space: (1 − α) of the original offset from μ_safe; outside it: the normalised code, unchanged.
    inside_before = space.basis.T @ (unit - mu)
    inside_after = space.basis.T @ (projected[1] - mu)
    assert torch.allclose(inside_after, (1 - a) * inside_before, atol=1e-6)
    assert torch.allclose(space.project_out(projected[1][None]), space.project_out(unit[None]), atol=1e-6)


def test_projection_by_hand_in_two_dimensions():
    # U = e1, μ = (0.5, 0.5), code 0 = (2, 0) → ĉ = (1, 0); α = 1 → (1, 0) − ((1 − 0.5)·e1) = (0.5, 0).
    codebook = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    space = HarmfulSpace(torch.tensor([[1.0], [0.0]]), torch.ones(1), 1.0, 1)
    projected = project_codebook(codebook, space, torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))
    assert torch.allclose(projected[0], torch.tensor([0.5, 0.0]))
    assert torch.equal(projected[1], codebook[1])


def test_rank_zero_space_leaves_the_codebook_unchanged():
    codebook = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    space = HarmfulSpace(torch.zeros(2, 0), torch.zeros(0), 0.0, 0)
    projected = project_codebook(codebook, space, torch.tensor([1.0, 1.0, 0.0]), torch.zeros(2))
    assert torch.equal(projected, codebook)
