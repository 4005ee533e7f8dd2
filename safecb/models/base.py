"""The `UnifiedModel` protocol: everything the Safe-CB loop needs from a model, and nothing more.

A new backend implements these methods and registers itself in `safecb.models.registry`.
Images travel as float tensors (B, 3, H, W) in [0, 1] so that decode → judge stays differentiable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


class ModelLoadError(RuntimeError):
    """A model folder is missing, incomplete, or not what the backend expects. One line."""


@dataclass(frozen=True)
class SamplingParams:
    guidance: float = 3.0  # classifier-free guidance weight w: uncond + w * (cond - uncond)
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None


@runtime_checkable
class UnifiedModel(Protocol):
    num_image_tokens: int  # tokens per image (64 for the world model, 576 for Janus-Pro)
    codebook_version: int  # the version now served; every generated row records it

    def generate_tokens(self, prompts: list[str], seeds: list[int], params: SamplingParams) -> torch.Tensor:
        """Image tokens (B, N) int64; a sample depends only on (prompt, seed), not on the batch."""

    def counterpart_tokens(self, prompts: list[str], seeds: list[int], tokens: torch.Tensor,
                           params: SamplingParams) -> torch.Tensor:
        """Position-aligned counterparts (B, N) of `tokens` (B, N): each position redrawn under `prompts`
        given the original grid's prefix, with the same seed noise."""

    def decode(self, tokens: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [0, 1] from tokens (B, N), with `codebook` (K, D) if given."""

    def judge(self, images: torch.Tensor, categories: list[str], question: str) -> torch.Tensor:
        """P(unsafe) (B, C): the model's own P("yes") / (P("yes") + P("no")) per category question."""

    def rewrite(self, prompts: list[str], instruction: str, max_new_tokens: int) -> list[str]:
        """The model's own safe rewrite of each prompt (greedy text generation); "" if it produced none."""

    def get_codebook(self) -> torch.Tensor:
        """The VQ codebook (K, D) as served now (a detached copy)."""

    def set_codebook(self, codebook: torch.Tensor, version: int) -> None:
        """Serve `codebook` (K, D) from now on, as `version`."""
