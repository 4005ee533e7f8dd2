"""Closed-form projection of harmful codes out of the Harmful Space (DESIGN.md, loop step 4).

c_k ← ĉ_k − α_k U Uᵀ (ĉ_k − μ_safe), for harmful codes only; every other row is returned bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from safecb.training.harmful_space import HarmfulSpace, HarmScores


def safe_mean(codebook: torch.Tensor, safe_counts: torch.Tensor) -> torch.Tensor:
    """μ_safe (D,): mean normalised code over all safe-image tokens (usage-weighted)."""
    weights = safe_counts.to(codebook.dtype)
    if float(weights.sum()) == 0:
        weights = torch.ones_like(weights)
    unit = F.normalize(codebook, dim=-1)  # (K, D)
    return (weights[:, None] * unit).sum(0) / weights.sum()


def code_step_sizes(scores: HarmScores, alpha: float, safe_use_damping: float = 1.0,
                    full_score: float | None = None) -> torch.Tensor:
    """α_k (K,): alpha × strength_k × (1 − damping × safe share), clamped ≥ 0; codes that are not harmful get 0.

    strength_k = min(1, score_k / full_score): a code at least e^full_score times more frequent in
    harmful than in safe images takes the whole step. With full_score None, strength is relative to
    the largest score, which lets one very frequent code (say a big flame) hold back every rarer but
    just as harmful one (a few blood dots) — measured on the world: MODEL_CARD.md.
    The safe share n_s,k / (n_s,k + n_h,k) is how much of a code's use is in safe images: a code that
    safe images need moves less.
    """
    harmful = scores.harmful
    alphas = torch.zeros_like(scores.score)
    if not bool(harmful.any()):
        return alphas
    positive = scores.score.clamp_min(0)
    scale = positive[harmful].max() if full_score is None else torch.tensor(full_score, dtype=positive.dtype)
    strength = (positive / scale.clamp_min(1e-12)).clamp(max=1.0)  # (K,) in [0, 1]
    total = (scores.safe_counts + scores.harmful_counts).clamp_min(1)
    safe_share = (scores.safe_counts / total).to(alphas.dtype)  # (K,)
    damping = (1 - safe_use_damping * safe_share).clamp(0, 1)
    alphas[harmful] = (alpha * strength * damping)[harmful]
    return alphas


def project_codebook(codebook: torch.Tensor, space: HarmfulSpace, alphas: torch.Tensor, mu_safe: torch.Tensor) -> torch.Tensor:
    """The projected codebook (K, D). Rows with α_k == 0 are the input rows, untouched.

    Moved rows live in normalised space (the VQ decoder normalises every row before use), so that
    with α_k = 1: Uᵀ (c_k − μ_safe) = 0 exactly, up to float rounding.
    """
    out = codebook.clone()
    moving = alphas > 0
    if space.rank == 0 or not bool(moving.any()):
        return out
    unit = F.normalize(codebook[moving], dim=-1)  # (m, D)
    basis = space.basis.to(codebook.dtype)  # (D, r)
    along = ((unit - mu_safe) @ basis) @ basis.T  # (m, D) component inside the Harmful Space
    out[moving] = unit - alphas[moving, None].to(codebook.dtype) * along
    return out
