"""Pairs → Harmful Space and per-code harm scores (DESIGN.md, loop step 3).

Notation: K codes of dimension D; P pairs of aligned token grids of N tokens each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class HarmfulSpace:
    basis: torch.Tensor  # (D, r) orthonormal columns; r == 0 when there is no pair evidence
    singular_values: torch.Tensor  # (min(M, D),) all singular values of the difference matrix
    energy: float  # fraction of squared singular values that the basis holds
    num_differences: int  # M, the number of differing aligned positions used

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def project_out(self, vectors: torch.Tensor) -> torch.Tensor:
        """The component of each row (…, D) orthogonal to the space: v − U Uᵀ v."""
        return vectors - (vectors @ self.basis) @ self.basis.T


@dataclass(frozen=True)
class HarmScores:
    score: torch.Tensor  # (K,) smoothed log-odds of a code in harmful vs safe images
    harmful_counts: torch.Tensor  # (K,) occurrences in harmful images
    safe_counts: torch.Tensor  # (K,) occurrences in safe images
    harmful: torch.Tensor  # (K,) bool, the harmful codes


def aligned_differences(harmful_tokens: torch.Tensor, safe_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Code pairs at the positions where an aligned pair differs.

    harmful_tokens, safe_tokens: (P, N) int64 from the same seed, so position i of both grids was
    drawn at the same step. Returns (codes_h, codes_s), each (M,), M = number of differing positions.
    """
    if harmful_tokens.shape != safe_tokens.shape:
        raise ValueError(f"pair grids differ in shape: {tuple(harmful_tokens.shape)} vs {tuple(safe_tokens.shape)}")
    differ = harmful_tokens != safe_tokens  # (P, N)
    return harmful_tokens[differ], safe_tokens[differ]


def difference_gram(codebook: torch.Tensor, codes_h: torch.Tensor, codes_s: torch.Tensor) -> torch.Tensor:
    """DᵀD (D, D) float64 for D = [ĉ(z_h,i) − ĉ(z_s,i)] over the given code pairs (M,), (M,).

    Gram matrices of batches add up, so the Harmful Space of any number of pairs is taken from a
    (D, D) sum — readers stream shards and ranks all-reduce, nobody stacks the M rows.
    """
    unit = F.normalize(codebook.double(), dim=-1)  # (K, D)
    diffs = unit[codes_h] - unit[codes_s]  # (M, D)
    return diffs.T @ diffs


def harmful_space_from_gram(gram: torch.Tensor, num_differences: int, energy: float = 0.9,
                            max_rank: int | None = None, dtype: torch.dtype = torch.float32) -> HarmfulSpace:
    """Top eigenvectors of DᵀD (D, D) holding `energy` of Σσ² (σ² are its eigenvalues): the top right
    singular vectors of D without D. r ≥ 1 whenever there is a non-zero difference."""
    dim = gram.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.double())  # ascending
    sigma2 = eigenvalues.flip(0).clamp_min(0)  # (D,) descending σ²
    vectors = eigenvectors.flip(1)  # (D, D) matching columns
    if num_differences == 0 or float(sigma2[0]) == 0.0:
        return HarmfulSpace(torch.zeros(dim, 0, dtype=dtype), torch.zeros(0, dtype=dtype), 0.0, num_differences)
    sigma = sigma2.sqrt()[:min(num_differences, dim)]
    share = sigma.square().cumsum(0) / sigma.square().sum()  # (min(M,D),)
    rank = int((share < energy - 1e-12).sum()) + 1  # smallest r with share[r-1] >= energy
    rank = min(rank, max_rank or rank, int((sigma > sigma[0] * 1e-9).sum()))
    basis = vectors[:, :rank].contiguous()  # (D, r)
    return HarmfulSpace(basis.to(dtype), sigma.to(dtype), float(share[rank - 1]), num_differences)


def harmful_space(
    codebook: torch.Tensor,
    codes_h: torch.Tensor,
    codes_s: torch.Tensor,
    energy: float = 0.9,
    max_rank: int | None = None,
) -> HarmfulSpace:
    """Top right singular vectors of D = [ĉ(z_h,i) − ĉ(z_s,i)] that hold `energy` of Σσ².

    codebook: (K, D). ĉ is the L2-normalised code, as the VQ decoder sees it. r ≥ 1 whenever
    there is at least one non-zero difference.
    """
    gram = difference_gram(codebook, codes_h, codes_s)
    return harmful_space_from_gram(gram, int(codes_h.shape[0]), energy, max_rank, codebook.dtype)


def harm_scores(
    harmful_tokens: torch.Tensor,
    safe_tokens: torch.Tensor,
    num_codes: int,
    smoothing: float = 1.0,
    score_min: float = 1.0,
    top_q: int | None = None,
) -> HarmScores:
    """Smoothed log-odds of each code in harmful vs safe images, and the harmful codes.

    score_k = log((n_h,k + s) / (N_h + sK)) − log((n_s,k + s) / (N_s + sK)). A code is harmful when
    score_k > score_min and it occurs in a harmful image — or, with top_q, when it is among the q
    highest-scoring such codes. Shapes: tokens (P, N) or (M,); returns (K,) tensors.
    """
    n_h = torch.bincount(harmful_tokens.reshape(-1), minlength=num_codes).double()  # (K,)
    n_s = torch.bincount(safe_tokens.reshape(-1), minlength=num_codes).double()  # (K,)
    return scores_from_counts(n_h, n_s, num_codes, smoothing, score_min, top_q)


def scores_from_counts(n_h: torch.Tensor, n_s: torch.Tensor, num_codes: int, smoothing: float, score_min: float,
                        top_q: int | None) -> HarmScores:
    rate_h = (n_h + smoothing) / (n_h.sum() + smoothing * num_codes)
    rate_s = (n_s + smoothing) / (n_s.sum() + smoothing * num_codes)
    score = (rate_h.log() - rate_s.log()).float()  # (K,)
    seen = n_h > 0
    if top_q is not None:
        ranked = torch.where(seen, score.double(), torch.tensor(float("-inf"), dtype=torch.float64))
        top = ranked.topk(min(top_q, int(seen.sum()))).indices
        harmful = torch.zeros(num_codes, dtype=torch.bool)
        harmful[top] = True
    else:
        harmful = seen & (score > score_min)
    return HarmScores(score, n_h, n_s, harmful)


def soft_harm_scores(
    tokens: torch.Tensor,
    p_unsafe: torch.Tensor,
    num_codes: int,
    smoothing: float = 1.0,
    score_min: float = 1.0,
    top_q: int | None = None,
    sharpness: float = 1.0,
) -> HarmScores:
    """Harm scores from every judged image, each weighted by the self-judge's own probability.

    tokens (M, N), p_unsafe (M,) in [0, 1]. n_h,k = Σ_i p_i^s · count_ik and n_s,k = Σ_i (1 − p_i)^s ·
    count_ik, then the smoothed log-odds of `harm_scores`. A hard threshold throws away what an
    imperfect judge half-knows: an image it scores 0.4 counts wholly as "safe", and a harm it often
    misses then looks like safe usage. With p ∈ {0, 1} this is exactly `harm_scores`.
    """
    n_h, n_s = soft_code_counts(tokens, p_unsafe, num_codes, sharpness)
    return scores_from_counts(n_h, n_s, num_codes, smoothing, score_min, top_q)


def soft_code_counts(tokens: torch.Tensor, p_unsafe: torch.Tensor, num_codes: int,
                     sharpness: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_h, n_s), each (K,) float64: code counts of tokens (M, N) weighted by p^s and (1 − p)^s.

    A weighted bincount: never an images × codes matrix, and sums over batches add up.
    """
    p = p_unsafe.double().clamp(0, 1)  # (M,)
    flat = tokens.reshape(-1).long()  # (M·N,)
    per_token = tokens.shape[1] if tokens.dim() == 2 else 1
    n_h = torch.bincount(flat, weights=p.pow(sharpness).repeat_interleave(per_token), minlength=num_codes)
    n_s = torch.bincount(flat, weights=(1 - p).pow(sharpness).repeat_interleave(per_token), minlength=num_codes)
    return n_h, n_s
