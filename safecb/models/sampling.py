"""Per-sample seeded sampling that does not depend on batch composition.

`torch.multinomial` draws from one generator for the whole batch, so a sample's tokens change when
its neighbours change. Here every random number is a pure function of (seed, step, vocab index):
a counter-based hash turned into Gumbel noise, and Gumbel-max picks the token. Same seed → same
tokens, in any batch, on any device that computes float64 logs identically (CPU vs GPU noise is the
same; logits may differ in the last bits). Pure torch, no Python loop over the batch, capturable
in a CUDA graph.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (murmur-style) on int64 tensors holding values < 2**32.

    Multipliers stay < 2**31 so that products never overflow a signed int64.
    """
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    x = x ^ (x >> 16)
    return x


def gumbel_noise(seeds: torch.Tensor, step: int | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel(0, 1) noise of shape (B, V), a pure function of (seed, step, index).

    seeds: (B,) int64. step: decode step (int or 0-dim int64 tensor, so a CUDA graph can replay it).
    """
    seeds = seeds.to(torch.int64)
    folded = (seeds & _MASK32) ^ ((seeds >> 32) & _MASK32)  # (B,)
    step_t = torch.as_tensor(step, dtype=torch.int64, device=seeds.device)
    key = _mix32(folded ^ _mix32(step_t * 0x27D4EB2F + 0x165667B1))  # (B,)
    index = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)  # (V,)
    bits = _mix32(key[:, None] ^ _mix32(index[None, :] + 0x3C6EF372))  # (B, V)
    uniform = (bits.to(torch.float64) + 0.5) / 4294967296.0  # (B, V) in (0, 1)
    return -torch.log(-torch.log(uniform))


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance as Janus does it: uncond + w * (cond - uncond). (B, V) each."""
    return uncond + guidance * (cond - uncond)


def sample_tokens(
    logits: torch.Tensor,
    seeds: torch.Tensor,
    step: int | torch.Tensor,
    temperature: float,
    top_k: int | None = None,
) -> torch.Tensor:
    """Pick one token per row. logits: (B, V); returns (B,) int64.

    temperature == 0 is greedy (argmax). Otherwise Gumbel-max over logits / temperature, restricted
    to the top_k logits when top_k is set — the same distribution as softmax sampling.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature  # (B, V)
    if top_k is not None and 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    noise = gumbel_noise(seeds, step, scaled.shape[-1]).to(scaled.dtype)  # (B, V)
    return (scaled + noise).argmax(dim=-1)
