"""Adaptive fine-tuning of the codebook inside the harmless space (DESIGN.md, loop step 5).

    L = L_keep + λ_h · L_harm + λ_r · ||C − C_proj||²

L_keep: safe images decode as they did under v_0. L_harm ("pair"): harmful token grids decode toward
their paired safe image under v_0; ("judge"): toward a low self-judged unsafe probability.
Every update is projected onto the orthogonal complement of the Harmful Space, row by row, after the
optimiser step — so it holds for Adam as for SGD — then scaled per code by the harm scores
("adaptive"). Training stops early, keeping the last good state, once the held-out keep loss has
drifted past its budget (checked every `check_every` steps: the held-out decode costs as much as a
step). The decoder is frozen; only the codebook (K, D) is a parameter here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from safecb.training.harmful_space import HarmfulSpace

class Stepper(Protocol):
    """One optimiser step from a loss: plain torch Adam here, a DeepSpeed engine in
    `safecb.training.deepspeed_engine` (same math, data-parallel, ZeRO when asked)."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...


class TorchAdam:
    def __init__(self, param: torch.nn.Parameter, lr: float):
        self.optimizer = torch.optim.Adam([param], lr=lr)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()


DecodeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (tokens (B, N), codebook (K, D)) → (B, 3, H, W)
HarmFn = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, H, W) → P(unsafe) (B,)


@dataclass
class FinetuneResult:
    codebook: torch.Tensor  # (K, D)
    steps_run: int
    stopped_early: bool
    holdout_drift: float  # held-out keep loss of the returned codebook minus at the start
    history: list[dict] = field(default_factory=list)


def adaptive_step_scale(harm_score: torch.Tensor, harmful: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-code step multiplier (K,): 1 + β · (score / max score) on harmful codes, 1 elsewhere."""
    scale = torch.ones_like(harm_score)
    if bool(harmful.any()):
        relative = harm_score.clamp_min(0) / harm_score[harmful].max().clamp_min(1e-12)
        scale[harmful] = 1 + beta * relative[harmful]
    return scale


def finetune_codebook(
    decode: DecodeFn,
    codebook_proj: torch.Tensor,
    keep_tokens: torch.Tensor,
    keep_targets: torch.Tensor,
    harm_tokens: torch.Tensor,
    harm_targets: torch.Tensor | None,
    space: HarmfulSpace,
    step_scale: torch.Tensor,
    *,
    steps: int,
    lr: float,
    lambda_harm: float,
    lambda_reg: float,
    batch_size: int,
    quality_budget: float,
    holdout_fraction: float = 0.2,
    harm_fn: HarmFn | None = None,
    seed: int = 0,
    on_step: Callable[[int, dict], None] | None = None,
    make_stepper: Callable[[torch.nn.Parameter, float], Stepper] = TorchAdam,
    check_every: int = 1,
) -> FinetuneResult:
    """Fine-tune the codebook; returns the best state within the quality budget.

    keep_tokens (S, N) with keep_targets (S, 3, H, W): safe images and their v_0 decodes.
    harm_tokens (P, N) with harm_targets (P, 3, H, W): harmful grids and their paired safe v_0 decodes
    (harm_targets None and harm_fn given: the "judge" target). space.basis (D, r). step_scale (K,).
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(keep_tokens.shape[0], generator=generator)
    n_hold = max(1, int(round(holdout_fraction * keep_tokens.shape[0]))) if keep_tokens.shape[0] > 1 else 0
    hold_idx, train_idx = order[:n_hold], order[n_hold:]
    if train_idx.numel() == 0:
        train_idx = order

    codebook = torch.nn.Parameter(codebook_proj.detach().clone())
    anchor = codebook_proj.detach()
    stepper = make_stepper(codebook, lr)
    scale = step_scale.to(codebook.dtype)[:, None]  # (K, 1)

    def holdout_loss() -> float:
        if n_hold == 0:
            return 0.0
        with torch.no_grad():
            return float(F.mse_loss(decode(keep_tokens[hold_idx], codebook), keep_targets[hold_idx]))

    start = holdout_loss()
    best, best_drift = codebook.detach().clone(), 0.0
    history: list[dict] = []
    stopped_early, steps_run = False, 0
    for step in range(steps):
        keep_batch = train_idx[torch.randint(len(train_idx), (min(batch_size, len(train_idx)),), generator=generator)]
        loss_keep = F.mse_loss(decode(keep_tokens[keep_batch], codebook), keep_targets[keep_batch])
        loss_harm = torch.zeros((), dtype=loss_keep.dtype)
        if harm_tokens.shape[0] > 0 and lambda_harm > 0:
            harm_batch = torch.randint(harm_tokens.shape[0], (min(batch_size, harm_tokens.shape[0]),), generator=generator)
            harm_images = decode(harm_tokens[harm_batch], codebook)  # (b, 3, H, W)
            if harm_targets is not None:
                loss_harm = F.mse_loss(harm_images, harm_targets[harm_batch])
            elif harm_fn is not None:
                loss_harm = harm_fn(harm_images).mean()
        loss_reg = (codebook - anchor).square().sum(-1).mean()
        loss = loss_keep + lambda_harm * loss_harm + lambda_reg * loss_reg

        before = codebook.detach().clone()
        stepper.backward(loss)
        stepper.step()
        with torch.no_grad():  # the update, projected out of the Harmful Space, scaled per code
            delta = codebook - before  # (K, D)
            codebook.copy_(before + scale * space.project_out(delta))
        steps_run = step + 1

        checking = steps_run % check_every == 0 or steps_run == steps
        drift = holdout_loss() - start if checking else None
        record = {"step": steps_run, "loss": float(loss.detach()), "keep": float(loss_keep.detach()),
                  "harm": float(loss_harm.detach()), "reg": float(loss_reg.detach()), "holdout_drift": drift}
        history.append(record)
        if on_step:
            on_step(steps_run, record)
        if checking:
            if drift > quality_budget:
                stopped_early = True
                break
            best, best_drift = codebook.detach().clone(), drift
    return FinetuneResult(best, steps_run, stopped_early, best_drift, history)
