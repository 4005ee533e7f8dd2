"""DeepSpeed stepper (real DeepSpeed, gloo, CPU): same result as TorchAdam, updates stay out of the
Harmful Space, ZeRO-3 refused, process-group set-up and tear-down, 2-rank data parallel."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from safecb.training.finetune import TorchAdam, adaptive_step_scale, finetune_codebook
from safecb.training.harmful_space import HarmfulSpace

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
ROOT = Path(__file__).resolve().parents[2]
K, D, N, H, W = 8, 4, 4, 2, 2  # codes, code dim, tokens per image, image side


def make_problem() -> dict:
    """Tiny linear decoder; keep images use safe codes 4..7, harmful grids target a safe counterpart."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(N * D, 3 * H * W, generator=g) / math.sqrt(N * D)

    def decode(tokens: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        return (F.normalize(codebook, dim=-1)[tokens].reshape(tokens.shape[0], N * D) @ weight).view(-1, 3, H, W)

    codebook_proj = torch.randn(K, D, generator=g)
    keep_tokens = torch.randint(4, 8, (12, N), generator=g)
    harm_tokens = torch.randint(0, 8, (8, N), generator=g)
    harm_tokens[:, 0] = torch.arange(8) % 4
    safe_tokens = torch.randint(4, 8, (8, N), generator=g)
    with torch.no_grad():
        keep_targets, harm_targets = decode(keep_tokens, codebook_proj), decode(safe_tokens, codebook_proj)
    basis, _ = torch.linalg.qr(torch.randn(D, 2, generator=g))
    space = HarmfulSpace(basis.contiguous(), torch.ones(2), 1.0, 1)
    scale = adaptive_step_scale(torch.tensor([2.0, 1.0, 1.5, 0.5, 0, 0, 0, 0]), torch.arange(K) < 4, beta=1.0)
    return dict(decode=decode, codebook_proj=codebook_proj, keep_tokens=keep_tokens, keep_targets=keep_targets,
                harm_tokens=harm_tokens, harm_targets=harm_targets, space=space, step_scale=scale)


def finetune(p: dict, make_stepper, rank: int = 0, world: int = 1) -> torch.Tensor:
    """finetune_codebook on this rank's shard (rows rank::world); the budget is never reached."""
    return finetune_codebook(
        p["decode"], p["codebook_proj"], p["keep_tokens"][rank::world], p["keep_targets"][rank::world],
        p["harm_tokens"][rank::world], p["harm_targets"][rank::world], p["space"], p["step_scale"],
        steps=12, lr=0.05, lambda_harm=5.0, lambda_reg=0.1, batch_size=4, quality_budget=1e9, seed=0,
        make_stepper=make_stepper).codebook


def harmful_component(p: dict, codebook: torch.Tensor) -> float:
    return float(((codebook - p["codebook_proj"]) @ p["space"].basis).abs().max())


@pytest.fixture(scope="module")
def ds_group():
    """One single-rank gloo group for the in-process tests, destroyed at the end of the module."""
    from safecb.training import deepspeed_engine

    yield deepspeed_engine
    deepspeed_engine.shutdown()


def test_module_imports_without_deepspeed():
    # A meta-path finder that refuses deepspeed: the module and the factory must not need it.
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'deepspeed': raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from safecb.training.deepspeed_engine import deepspeed_stepper, launch_data_parallel, shutdown\n"
            "deepspeed_stepper(2); shutdown()\n"
            "assert 'deepspeed' not in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def test_zero3_is_refused_with_one_line_error():
    from safecb.training.deepspeed_engine import deepspeed_stepper

    with pytest.raises(ValueError, match="ZeRO-3") as err:
        deepspeed_stepper(zero_stage=3)
    assert "\n" not in str(err.value) and "zero_stage 0, 1 or 2" in str(err.value)
    with pytest.raises(ValueError, match="zero_stage must be"):
        deepspeed_stepper(zero_stage=4)


@needs_deepspeed
def test_single_rank_group_fills_only_unset_env(ds_group, monkeypatch):
    import torch.distributed as dist

    ds_group.shutdown()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    port = str(ds_group._free_port())
    monkeypatch.setenv("MASTER_PORT", port)  # as a launcher would have set it
    ds_group.ensure_process_group()
    assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    assert os.environ["MASTER_PORT"] == port and os.environ["RANK"] == "0"
    ds_group.shutdown()
    assert not dist.is_initialized()
    assert "RANK" not in os.environ and "MASTER_ADDR" not in os.environ and os.environ["MASTER_PORT"] == port


@needs_deepspeed
@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_matches_torch_adam_and_stays_out_of_harmful_space(ds_group, zero_stage):
    # ZeRO 1/2 keep an fp32 master copy: without writing the loop's projection back into it, the result
    # drifts from TorchAdam's (by ~0.3 here) and can pick up a harmful component.
    p = make_problem()
    ref = finetune(p, TorchAdam)
    got = finetune(p, ds_group.deepspeed_stepper(zero_stage))
    assert (got - p["codebook_proj"]).abs().max() > 1e-2  # it trained
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert harmful_component(p, got) < 1e-6


# ---- 2 ranks: data parallel -------------------------------------------------------------------

def _lone_param_losses(param: torch.Tensor, rank: int) -> torch.Tensor:
    target = torch.randn(K, D, generator=torch.Generator().manual_seed(100 + rank))
    return ((param - target) ** 2 * (rank + 1)).sum()


def _two_rank_worker(rank: int, world: int, zero_stage: int):
    from safecb.training.deepspeed_engine import deepspeed_stepper

    p = make_problem()
    codebook = finetune(p, deepspeed_stepper(zero_stage), rank, world)
    param = torch.nn.Parameter(torch.zeros(K, D))  # a bare stepper on a rank-specific loss
    stepper = deepspeed_stepper(zero_stage)(param, 0.1)
    for _ in range(3):
        stepper.backward(_lone_param_losses(param, rank))
        stepper.step()
    return codebook, param.detach().clone()


@needs_deepspeed
def test_two_ranks_all_reduce_and_agree():
    from safecb.training.deepspeed_engine import launch_data_parallel

    (cb0, lone0), (cb1, lone1) = launch_data_parallel(_two_rank_worker, 2, 2)
    p = make_problem()
    assert torch.equal(cb0, cb1)  # identical codebooks on every rank
    solo = finetune(p, TorchAdam, 0, 2)  # rank 0's shard alone: the all-reduce must have changed the result
    assert (cb0 - solo).abs().max() > 1e-3
    assert harmful_component(p, cb0) < 1e-6
    # The gradients were averaged: Adam on the mean of the two ranks' losses.
    param = torch.nn.Parameter(torch.zeros(K, D))
    adam = TorchAdam(param, 0.1)
    for _ in range(3):
        adam.backward((_lone_param_losses(param, 0) + _lone_param_losses(param, 1)) / 2)
        adam.step()
    assert torch.equal(lone0, lone1)
    torch.testing.assert_close(lone0, param.detach(), atol=1e-6, rtol=1e-6)
