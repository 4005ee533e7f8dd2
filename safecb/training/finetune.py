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

    def state_dict(self) -> dict: ...  # the optimiser's state, for a checkpoint

    def load_state_dict(self, state: dict) -> None: ...


class TorchAdam:
    def __init__(self, param: torch.nn.Parameter, lr: float):
        self.optimizer = torch.optim.Adam([param], lr=lr)

    def backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


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
    rank: int = 0,
    world: int = 1,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    resume: dict | None = None,
    on_check: Callable[[dict], None] | None = None,
) -> FinetuneResult:
    """Fine-tune the codebook; returns the best state within the quality budget.

    keep_tokens (S, N) with keep_targets (S, 3, H, W): safe images and their v_0 decodes.
    harm_tokens (P, N) with harm_targets (P, 3, H, W): harmful grids and their paired safe v_0 decodes
    (harm_targets None and harm_fn given: the "judge" target). space.basis (D, r). step_scale (K,).

    Data parallel (`world` ranks, a stepper that averages gradients over them, e.g. DeepSpeed): every
    rank holds the same inputs and draws the same global batch from the same seed, and computes the
    loss of rows rank::world only, scaled by world × (its rows ÷ the batch's rows). The averaged
    gradient is then exactly the one-rank gradient of the whole batch, so 1 and N ranks give the
    same codebook (up to float summation order). The held-out loss is summed over ranks
    (`all_reduce_sum`), so every rank takes the same early-stop decision and none leaves a
    collective early.

    Checkpoints: at every held-out check `on_check(state)` gets everything needed to go on (step,
    codebook, best state, RNG, optimiser state); `resume=state` continues from there exactly.
    """
    if world > 1 and all_reduce_sum is None:
        raise ValueError("finetune_codebook: world > 1 needs all_reduce_sum (the early stop must be agreed)")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(keep_tokens.shape[0], generator=generator)
    n_hold = max(1, int(round(holdout_fraction * keep_tokens.shape[0]))) if keep_tokens.shape[0] > 1 else 0
    hold_idx, train_idx = order[:n_hold], order[n_hold:]
    if train_idx.numel() == 0:
        train_idx = order

    codebook = torch.nn.Parameter(codebook_proj.detach().clone())
    anchor = codebook_proj.detach()
    stepper = make_stepper(codebook, lr)
    scale = step_scale.to(codebook.device, codebook.dtype)[:, None]  # (K, 1)
    basis = space.basis.to(codebook.device, codebook.dtype)  # (D, r)

    def holdout_loss() -> float:
        if n_hold == 0:
            return 0.0
        mine = hold_idx[rank::world]
        with torch.no_grad():
            total = torch.zeros((), dtype=torch.float64)
            if mine.numel():
                decoded = decode(keep_tokens[mine], codebook)  # (h, 3, H, W)
                total = (decoded.float() - keep_targets[mine].float().to(decoded.device)).square().mean(
                    dim=tuple(range(1, decoded.dim()))).sum().double().cpu()
            if all_reduce_sum is not None:
                total = all_reduce_sum(total)
            return float(total) / n_hold

    def part_loss(images: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        """This rank's share of a batch of `rows`: per-row MSE summed, × world ÷ rows (see the docstring)."""
        per_row = (images.float() - targets.float().to(images.device)).square().mean(dim=tuple(range(1, images.dim())))
        return per_row.sum() * (world / rows)

    start = holdout_loss() if resume is None else resume["start"]
    best, best_drift = codebook.detach().clone(), 0.0
    history: list[dict] = []
    stopped_early, steps_run = False, 0
    if resume is not None:
        with torch.no_grad():
            codebook.copy_(resume["codebook"].to(codebook.device))
        best, best_drift, history = resume["best"].to(codebook.device), resume["best_drift"], list(resume["history"])
        steps_run = resume["step"]
        generator.set_state(resume["generator"])
        stepper.load_state_dict(resume["optimizer"])
    for step in range(steps_run, steps):
        keep_batch = train_idx[torch.randint(len(train_idx), (min(batch_size, len(train_idx)),), generator=generator)]
        mine = keep_batch[rank::world]  # this rank's rows of the global batch (may be empty)
        loss_keep = part_loss(decode(keep_tokens[mine], codebook), keep_targets[mine], len(keep_batch))
        loss_harm = torch.zeros((), dtype=loss_keep.dtype, device=loss_keep.device)
        if harm_tokens.shape[0] > 0 and lambda_harm > 0:
            harm_batch = torch.randint(harm_tokens.shape[0], (min(batch_size, harm_tokens.shape[0]),), generator=generator)
            mine = harm_batch[rank::world]
            harm_images = decode(harm_tokens[mine], codebook)  # (b, 3, H, W)
            if harm_targets is not None:
                loss_harm = part_loss(harm_images, harm_targets[mine], len(harm_batch))
            elif harm_fn is not None:
                loss_harm = harm_fn(harm_images).sum() * (world / len(harm_batch))
        loss_reg = (codebook - anchor).square().sum(-1).mean()
        loss = loss_keep + lambda_harm * loss_harm + lambda_reg * loss_reg

        before = codebook.detach().clone()
        stepper.backward(loss)
        stepper.step()
        with torch.no_grad():  # the update, projected out of the Harmful Space, scaled per code
            delta = codebook - before  # (K, D)
            codebook.copy_(before + scale * (delta - (delta @ basis) @ basis.T))
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
            if on_check is not None:
                on_check({"step": steps_run, "codebook": codebook.detach().cpu().clone(), "best": best.cpu(),
                          "best_drift": best_drift, "start": start, "generator": generator.get_state(),
                          "optimizer": stepper.state_dict(), "history": history})
    return FinetuneResult(best, steps_run, stopped_early, best_drift, history)
