"""Codebook fine-tuning with a tiny fixed linear "decoder": orthogonality, early stop, harm loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from safecb.training.finetune import adaptive_step_scale, finetune_codebook
from safecb.training.harmful_space import HarmfulSpace

K, D, N, H, W = 8, 4, 4, 2, 2  # codes, code dim, tokens per image, image side


def make_decode(seed: int = 0):
    """decode(tokens (B, N), codebook (K, D)) → (B, 3, H, W): a fixed random linear map of normalised codes."""
    weight = torch.randn(N * D, 3 * H * W, generator=torch.Generator().manual_seed(seed)) / math.sqrt(N * D)

    def decode(tokens: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        codes = F.normalize(codebook, dim=-1)[tokens]  # (B, N, D)
        return (codes.reshape(tokens.shape[0], N * D) @ weight).view(-1, 3, H, W)

    return decode


def space_from(basis: torch.Tensor) -> HarmfulSpace:
    q, _ = torch.linalg.qr(basis)  # orthonormal columns (D, r)
    return HarmfulSpace(q.contiguous(), torch.ones(q.shape[1]), 1.0, 1)


@pytest.fixture
def problem():
    """Keep images use the safe codes 4..7; harmful grids use codes 0..3 and target their safe counterparts."""
    g = torch.Generator().manual_seed(0)
    decode = make_decode()
    codebook_proj = torch.randn(K, D, generator=g)
    keep_tokens = torch.randint(4, 8, (10, N), generator=g)
    harm_tokens = torch.randint(0, 8, (6, N), generator=g)
    harm_tokens[:, 0] = torch.arange(6) % 4  # every harmful grid holds at least one harmful code
    safe_counterpart = torch.randint(4, 8, (6, N), generator=g)
    with torch.no_grad():
        keep_targets = decode(keep_tokens, codebook_proj)  # v_0 decodes: the held-out drift starts at 0
        harm_targets = decode(safe_counterpart, codebook_proj)
    space = space_from(torch.randn(D, 2, generator=g))
    step_scale = adaptive_step_scale(torch.tensor([2.0, 1.0, 1.5, 0.5, 0, 0, 0, 0]),
                                     torch.tensor([True] * 4 + [False] * 4), beta=1.0)
    return dict(decode=decode, codebook_proj=codebook_proj, keep_tokens=keep_tokens, keep_targets=keep_targets,
                harm_tokens=harm_tokens, harm_targets=harm_targets, space=space, step_scale=step_scale)


def run(problem, **over):
    kw = dict(steps=20, lr=0.05, lambda_harm=5.0, lambda_reg=0.0, batch_size=4, quality_budget=1e9, seed=0)
    kw.update(over)
    p = problem
    return finetune_codebook(p["decode"], p["codebook_proj"], p["keep_tokens"], p["keep_targets"], p["harm_tokens"],
                             kw.pop("harm_targets", p["harm_targets"]), p["space"], kw.pop("step_scale", p["step_scale"]),
                             **kw)


def full_harm_loss(problem, codebook: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.mse_loss(problem["decode"](problem["harm_tokens"], codebook), problem["harm_targets"]))


# ---- adaptive_step_scale ------------------------------------------------------------------------

def test_adaptive_step_scale_by_hand():
    # Harmful max score is 2 (code 3 scores higher but is not harmful) → 1 + 0.5·(2/2), 1 + 0.5·(1/2).
    scale = adaptive_step_scale(torch.tensor([2.0, 1.0, -1.0, 3.0]), torch.tensor([True, True, False, False]), beta=0.5)
    assert torch.allclose(scale, torch.tensor([1.5, 1.25, 1.0, 1.0]))


def test_adaptive_step_scale_without_harmful_codes_is_one():
    scale = adaptive_step_scale(torch.tensor([2.0, 1.0]), torch.tensor([False, False]), beta=3.0)
    assert torch.equal(scale, torch.ones(2))


# ---- finetune_codebook --------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["pair", "judge"])
def test_updates_are_orthogonal_to_the_harmful_space(problem, target):
    over = {}
    if target == "judge":  # "judge" target: minimise a differentiable harm probability of the images
        over = dict(harm_targets=None, harm_fn=lambda images: torch.sigmoid(images.mean(dim=(1, 2, 3))))
    result = run(problem, steps=8, lambda_reg=0.1, **over)
    assert result.steps_run == 8
    moved = result.codebook - problem["codebook_proj"]  # (K, D)
    assert moved.abs().max().item() > 1e-3  # it did train
    assert (moved @ problem["space"].basis).abs().max().item() < 1e-6


def test_zero_step_scale_freezes_a_code(problem):
    scale = problem["step_scale"].clone()
    scale[0] = 0.0  # code 0 appears in every third harmful grid, so it has a gradient
    result = run(problem, steps=5, step_scale=scale)
    assert torch.equal(result.codebook[0], problem["codebook_proj"][0])
    assert not torch.equal(result.codebook[1], problem["codebook_proj"][1])


def test_harm_loss_decreases_with_a_generous_budget(problem):
    before = full_harm_loss(problem, problem["codebook_proj"])
    result = run(problem, steps=40)
    assert not result.stopped_early
    assert result.steps_run == 40
    after = full_harm_loss(problem, result.codebook)
    assert after < 0.8 * before, (before, after)
    assert len(result.history) == 40


def test_tiny_budget_stops_after_the_first_step_and_keeps_the_start(problem):
    result = run(problem, quality_budget=1e-12)
    assert result.stopped_early
    assert result.steps_run == 1
    assert result.history[0]["holdout_drift"] > 1e-12
    assert torch.equal(result.codebook, problem["codebook_proj"])  # the last state within budget: the start
    assert result.holdout_drift == 0.0


def test_early_stop_returns_the_last_codebook_within_budget(problem):
    free = run(problem, steps=20)
    drifts = [h["holdout_drift"] for h in free.history]
    # First step j ≥ 5 (1-based) whose drift exceeds every earlier one; the budget sits between.
    j = next(i + 1 for i in range(4, len(drifts)) if drifts[i] > max(drifts[:i]) and max(drifts[:i]) > 0)
    budget = (max(drifts[: j - 1]) + drifts[j - 1]) / 2
    assert budget > 0
    stopped = run(problem, steps=20, quality_budget=budget)
    assert stopped.stopped_early
    assert stopped.steps_run == j
    # The same seed draws the same batches: a run of j − 1 steps is the state before the breach.
    reference = run(problem, steps=j - 1)
    assert torch.equal(stopped.codebook, reference.codebook)
    assert stopped.holdout_drift == pytest.approx(drifts[j - 2])


def test_on_step_sees_every_record(problem):
    seen = []
    result = run(problem, steps=3, on_step=lambda step, record: seen.append((step, record["step"])))
    assert seen == [(1, 1), (2, 2), (3, 3)]
    assert [h["step"] for h in result.history] == [1, 2, 3]


def test_zero_steps_returns_the_input(problem):
    result = run(problem, steps=0)
    assert result.steps_run == 0 and not result.stopped_early
    assert torch.equal(result.codebook, problem["codebook_proj"])
