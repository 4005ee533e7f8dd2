"""Per-sample seeded sampling: counter-based Gumbel noise, Gumbel-max, CFG mixing."""

from __future__ import annotations

import math

import pytest
import torch

from safecb.models.sampling import cfg_logits, gumbel_noise, sample_tokens

EULER_GAMMA = 0.5772156649015329
MASK = 0xFFFFFFFF


def _mix32_ref(x: int) -> int:
    """The documented murmur-style 32-bit finaliser, in Python integers (no overflow possible)."""
    x &= MASK
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK
    x ^= x >> 15
    x = (x * 0x5BD1E995) & MASK
    x ^= x >> 16
    return x


def _gumbel_ref(seed: int, step: int, index: int) -> float:
    folded = (seed & MASK) ^ ((seed >> 32) & MASK)
    key = _mix32_ref(folded ^ _mix32_ref(step * 0x27D4EB2F + 0x165667B1))
    bits = _mix32_ref(key ^ _mix32_ref(index + 0x3C6EF372))
    uniform = (bits + 0.5) / 2**32
    return -math.log(-math.log(uniform))


# ---- gumbel_noise ------------------------------------------------------------------------------

def test_noise_matches_a_python_integer_reference_including_large_and_negative_seeds():
    seeds = [0, 1, 12345, 2**40 + 7, 2**63 - 1, -1, -(2**35)]
    noise = gumbel_noise(torch.tensor(seeds, dtype=torch.int64), 17, 5)  # (7, 5)
    expected = torch.tensor([[_gumbel_ref(s, 17, i) for i in range(5)] for s in seeds], dtype=torch.float64)
    assert noise.dtype == torch.float64
    assert torch.allclose(noise, expected, rtol=0, atol=1e-12)


def test_noise_is_a_function_of_seed_step_and_index_only():
    alone = gumbel_noise(torch.tensor([42]), 3, 50)  # (1, 50)
    batch = gumbel_noise(torch.tensor([7, 42, 9]), 3, 50)  # (3, 50)
    again = gumbel_noise(torch.tensor([42]), torch.tensor(3), 50)  # step as a 0-dim tensor
    assert torch.equal(alone[0], batch[1])
    assert torch.equal(alone, again)
    # Index i does not depend on the vocabulary size.
    assert torch.equal(gumbel_noise(torch.tensor([42]), 3, 20)[0], alone[0, :20])


def test_noise_differs_across_seeds_steps_and_indices():
    base = gumbel_noise(torch.tensor([42]), 3, 64)[0]
    other_seed = gumbel_noise(torch.tensor([43]), 3, 64)[0]
    other_step = gumbel_noise(torch.tensor([42]), 4, 64)[0]
    high_bits = gumbel_noise(torch.tensor([42 + 2**32 * 5]), 3, 64)[0]  # differs only above bit 32
    for other in (other_seed, other_step, high_bits):
        assert (base != other).float().mean() > 0.9
    assert base.unique().numel() == 64


def test_noise_has_gumbel_statistics():
    noise = gumbel_noise(torch.arange(400, dtype=torch.int64), 0, 2500)  # 1e6 draws
    assert noise.mean().item() == pytest.approx(EULER_GAMMA, abs=0.01)
    assert noise.var().item() == pytest.approx(math.pi**2 / 6, abs=0.03)
    # exp(−exp(−g)) recovers the uniform: its deciles hold about 10 % each.
    uniform = torch.exp(-torch.exp(-noise))
    counts = torch.histc(uniform, bins=10, min=0.0, max=1.0) / uniform.numel()
    assert torch.allclose(counts, torch.full((10,), 0.1, dtype=counts.dtype), atol=0.005)


def test_noise_across_steps_of_one_seed_is_gumbel_too():
    noise = torch.cat([gumbel_noise(torch.tensor([5]), step, 1000) for step in range(200)])  # (200, 1000)
    assert noise.mean().item() == pytest.approx(EULER_GAMMA, abs=0.02)


# ---- sample_tokens -----------------------------------------------------------------------------

def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 2.9, 0.0], [-5.0, -4.0, -4.5]])
    for seed in range(5):
        tokens = sample_tokens(logits, torch.full((3,), seed), step=seed, temperature=0.0)
        assert tokens.tolist() == [1, 0, 1]


def test_top_k_restricts_to_the_k_largest():
    logits = torch.tensor([0.0, 1.0, 0.5, 0.9, -2.0]).repeat(2000, 1)  # top-2: indices 1 and 3
    seeds = torch.arange(2000)
    tokens = sample_tokens(logits, seeds, step=0, temperature=5.0, top_k=2)  # hot: without top_k all 5 appear
    assert set(tokens.tolist()) == {1, 3}
    assert set(sample_tokens(logits, seeds, 0, temperature=5.0).tolist()) == {0, 1, 2, 3, 4}
    assert set(sample_tokens(logits, seeds, 0, temperature=5.0, top_k=1).tolist()) == {1}


def _frequencies(tokens: torch.Tensor, size: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=size).double() / tokens.numel()


@pytest.mark.parametrize("temperature, top_k, expected", [
    (1.0, None, [0.5, 0.3, 0.2]),
    # T = 2: p ∝ p^(1/2)
    (2.0, None, [math.sqrt(0.5) / (math.sqrt(0.5) + math.sqrt(0.3) + math.sqrt(0.2)),
                 math.sqrt(0.3) / (math.sqrt(0.5) + math.sqrt(0.3) + math.sqrt(0.2)),
                 math.sqrt(0.2) / (math.sqrt(0.5) + math.sqrt(0.3) + math.sqrt(0.2))]),
    # top-2 renormalised: 0.5 / 0.8, 0.3 / 0.8
    (1.0, 2, [0.625, 0.375, 0.0]),
])
def test_frequencies_over_seeds_match_softmax(temperature, top_k, expected):
    n = 20000  # standard error ≤ 0.0036 per frequency
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2])).repeat(n, 1) + 7.0  # a shift changes nothing
    tokens = sample_tokens(logits, torch.arange(n), step=11, temperature=temperature, top_k=top_k)
    assert torch.allclose(_frequencies(tokens, 3), torch.tensor(expected, dtype=torch.float64), atol=0.02)


def test_a_row_samples_the_same_token_in_any_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 100, generator=g)
    seeds = torch.tensor([3, 1, 4, 1, 5, 9])
    batch = sample_tokens(logits, seeds, step=2, temperature=1.0, top_k=20)
    for i in range(6):
        alone = sample_tokens(logits[i:i + 1], seeds[i:i + 1], step=2, temperature=1.0, top_k=20)
        assert alone.item() == batch[i].item()


def test_sampling_depends_on_the_seed():
    logits = torch.zeros(1, 1000)  # uniform over 1000 tokens: 50 seeds should rarely collide
    tokens = torch.cat([sample_tokens(logits, torch.tensor([s]), 0, temperature=1.0) for s in range(50)])
    assert tokens.unique().numel() > 40


# ---- cfg_logits --------------------------------------------------------------------------------

def test_cfg_logits_by_hand():
    cond = torch.tensor([[1.0, 2.0]])
    uncond = torch.tensor([[0.0, 1.0]])
    assert torch.equal(cfg_logits(cond, uncond, 3.0), torch.tensor([[3.0, 4.0]]))
    assert torch.equal(cfg_logits(cond, uncond, 1.0), cond)
