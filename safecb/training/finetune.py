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
    micro_batch: int = 8,
) -> FinetuneResult:
    """Fine-tune the codebook; returns the best state within the quality budget.

    keep_tokens (S, N) with keep_targets (S, 3, H, W): safe images and their v_0 decodes.
    harm_tokens (P, N) with harm_targets (P, 3, H, W): harmful grids and their paired safe v_0 decodes
    (harm_targets None and harm_fn given: the "judge" target). space.basis (D, r). step_scale (K,).

    Data parallel (`world` ranks, a stepper that averages gradients over them, e.g. DeepSpeed): every
    rank holds the same inputs and draws the same global batch from the same seed; the batch is cut
    into fixed pieces of `micro_batch` rows, rank r computes the gradients of pieces r::world, the
    pieces' gradients are summed over ranks (`all_reduce_sum`) and added in piece order — so every
    rank, whatever their number, steps with the same gradient and 1 and N ranks build the same
    codebook. The held-out loss is summed over ranks too, so every rank takes the same early-stop
    decision and none leaves a collective early.

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

    def row_mse(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(b,) mean squared error per row."""
        return (images.float() - targets.float().to(images.device)).square().mean(dim=tuple(range(1, images.dim())))

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
        # The global batch in fixed pieces of `micro_batch` rows, whatever the number of ranks; each rank
        # computes the gradients of pieces rank::world, and every rank adds all pieces' gradients in
        # piece order. The sum is then bit-identical for 1 and N ranks (a per-rank partial sum would
        # round differently, and Adam turns last-bit differences of near-zero gradients into full steps).
        pieces = [("keep", keep_batch[i:i + micro_batch]) for i in range(0, len(keep_batch), micro_batch)]
        if harm_tokens.shape[0] > 0 and lambda_harm > 0:
            harm_batch = torch.randint(harm_tokens.shape[0], (min(batch_size, harm_tokens.shape[0]),), generator=generator)
            pieces += [("harm", harm_batch[i:i + micro_batch]) for i in range(0, len(harm_batch), micro_batch)]
        grads = torch.zeros(len(pieces), *codebook.shape, dtype=codebook.dtype, device=codebook.device)
        losses = torch.zeros(len(pieces), dtype=torch.float64)
        for j in range(rank, len(pieces), world):
            kind, rows = pieces[j]
            if kind == "keep":
                piece = row_mse(decode(keep_tokens[rows], codebook), keep_targets[rows]).sum() / len(keep_batch)
            else:
                images = decode(harm_tokens[rows], codebook)  # (b, 3, H, W)
                per_row = row_mse(images, harm_targets[rows]) if harm_targets is not None else harm_fn(images)
                piece = per_row.sum() / len(harm_batch)
            weight = 1.0 if kind == "keep" else lambda_harm
            (grads[j],) = torch.autograd.grad(weight * piece, codebook)
            losses[j] = float(piece.detach())
        if all_reduce_sum is not None:  # each piece is non-zero on one rank only: x + 0 is exact
            grads, losses = all_reduce_sum(grads), all_reduce_sum(losses)
        loss_reg = (codebook - anchor).square().sum(-1).mean()
        (total,) = torch.autograd.grad(lambda_reg * loss_reg, codebook)
        for j in range(len(pieces)):  # fixed order
            total = total + grads[j]
        loss_keep = sum(float(losses[j]) for j, (kind, _) in enumerate(pieces) if kind == "keep")
        loss_harm = sum(float(losses[j]) for j, (kind, _) in enumerate(pieces) if kind == "harm")
        loss = loss_keep + lambda_harm * loss_harm + lambda_reg * float(loss_reg)

        before = codebook.detach().clone()
        # A surrogate whose gradient is exactly `total`: the stepper (DeepSpeed averages identical
        # gradients over ranks) sees the same gradient on every rank.
        stepper.backward((codebook * total.detach()).sum())
        stepper.step()
        with torch.no_grad():  # the update, projected out of the Harmful Space, scaled per code
            delta = codebook - before  # (K, D)
            codebook.copy_(before + scale * (delta - (delta @ basis) @ basis.T))
        steps_run = step + 1

        checking = steps_run % check_every == 0 or steps_run == steps
        drift = holdout_loss() - start if checking else None
        record = {"step": steps_run, "loss": loss, "keep": loss_keep, "harm": loss_harm, "reg": float(loss_reg),
                  "holdout_drift": drift}
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
