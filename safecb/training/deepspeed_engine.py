"""The codebook fine-tuning step (DESIGN.md, loop step 5) run by a DeepSpeed engine.

`deepspeed_stepper(zero_stage)` returns a `make_stepper(param, lr) -> Stepper` for
`safecb.training.finetune.finetune_codebook`: the same torch Adam, driven by `engine.backward` /
`engine.step`, so gradients are all-reduced across ranks and ZeRO 1/2 partition the optimiser state.
With one rank and ZeRO 0 the result equals `TorchAdam`'s.

Process group: if none exists, a single-rank one is made from env defaults (MASTER_ADDR=127.0.0.1,
a free MASTER_PORT, RANK=0, WORLD_SIZE=1, LOCAL_RANK=0), filling only variables that are unset, so a
launcher's (torchrun, Ray Train, `launch_data_parallel`) win. Backend: gloo on CPU, NCCL on CUDA.
`shutdown()` destroys the group this module made (and is registered at exit: an undestroyed gloo
group sometimes aborts the interpreter at exit).

Data parallel: every rank runs `finetune_codebook` with the same starting codebook, the same `seed`
and its own shard of the data (e.g. `keep_tokens[rank::world]`, `harm_tokens[rank::world]` with their
targets). Each step, each rank draws `batch_size` rows from its shard and `engine.backward` averages
the gradients over ranks, so a step optimises the mean of the per-rank losses — a global batch of
world × batch_size — and every rank applies the same Adam update and the same projection: the
codebooks stay identical on every rank without any broadcast. Caveat: `finetune_codebook` decides the
early stop from each rank's own held-out split; ranks that disagree would stop at different steps
and the others would wait in the all-reduce until the gloo/NCCL timeout. Until that decision is
reduced across ranks, run data-parallel with a `quality_budget` no rank will reach.

ZeRO-3 is refused: it partitions the parameter and gathers it only inside a module's forward, while
`finetune_codebook` reads the bare parameter (its gradient comes back empty).

`import deepspeed` happens only inside functions: this module imports without DeepSpeed installed.
"""

from __future__ import annotations

import atexit
import os
import pickle
import socket
import sys
from typing import Any, Callable

import torch

from safecb.training.finetune import Stepper

_ENV_SET: list[str] = []  # env variables this module filled in for a single-rank group
_CREATED_GROUP = False
_ATEXIT_REGISTERED = False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _set_env_defaults(defaults: dict[str, str]) -> None:
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = value
            _ENV_SET.append(key)


def ensure_process_group(dist_backend: str | None = None) -> None:
    """Initialise DeepSpeed's communication (single-rank unless a launcher set the env) if needed."""
    global _CREATED_GROUP, _ATEXIT_REGISTERED
    import deepspeed
    import deepspeed.ops
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # else a 78 s JIT build in init_distributed
    if dist_backend is None:
        dist_backend = "nccl" if get_accelerator().device_name() == "cuda" else "gloo"
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            _set_env_defaults({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT") or str(_free_port()),
                               "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        deepspeed.init_distributed(dist_backend=dist_backend, verbose=False)
        _CREATED_GROUP = True
        if not _ATEXIT_REGISTERED:
            atexit.register(shutdown)
            _ATEXIT_REGISTERED = True
    else:
        deepspeed.init_distributed(dist_backend=dist_backend, verbose=False)  # wraps the existing group


def shutdown() -> None:
    """Destroy the process group this module created and unset the env defaults it filled in."""
    global _CREATED_GROUP
    if _CREATED_GROUP:
        import torch.distributed as dist

        if dist.is_initialized():
            _destroy_group()
        _CREATED_GROUP = False
    while _ENV_SET:
        os.environ.pop(_ENV_SET.pop(), None)


def _destroy_group() -> None:
    """Destroy the default group through DeepSpeed when it is loaded: torch's own call leaves DeepSpeed's
    cached world group behind, and the next engine in this process fails on it ("group not registered")."""
    import sys

    import torch.distributed as dist

    comm = sys.modules.get("deepspeed.comm.comm")  # its `cdb` is live; the package re-exports a stale copy
    if comm is not None and getattr(comm, "cdb", None) is not None:
        comm.destroy_process_group()
    else:
        dist.destroy_process_group()


class _Codebook(torch.nn.Module):
    def __init__(self, param: torch.nn.Parameter):
        super().__init__()
        self.codebook = param

    def forward(self) -> torch.Tensor:  # never called: finetune_codebook reads the parameter directly
        return self.codebook


class DeepSpeedStepper:
    """`Stepper` over a DeepSpeed engine that owns one parameter (the codebook) and a torch Adam."""

    def __init__(self, param: torch.nn.Parameter, lr: float, zero_stage: int = 0):
        _check_stage(zero_stage)
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator().device_name()
        if param.device.type != accel:  # the engine would move the parameter, the loop's other tensors not
            raise ValueError(f"codebook is on {param.device.type} but DeepSpeed's accelerator is {accel}: put the "
                             f"codebook (and decoder) on {accel}, or set DS_ACCELERATOR={param.device.type}")
        ensure_process_group()
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: the loop forms its own batches
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; TorchAdam does not clip
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": False},  # the parameter's own dtype, as TorchAdam (ZeRO 1/2 keep an fp32 master)
            "steps_per_print": 2**31 - 1,
        }
        self.param = param
        self.zero_stage = zero_stage
        # A torch optimiser, not {"optimizer": {"type": "Adam"}}: the latter JIT-builds fused_adam (78 s on CPU).
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=_Codebook(param), optimizer=torch.optim.Adam([param], lr=lr), config=ds_config)

    def backward(self, loss: torch.Tensor) -> None:
        # The loop edits the parameter in place after each step (projection, per-code scale). ZeRO 1/2 keep
        # a separate fp32 master copy that the next step would overwrite it from: write the edit back.
        if hasattr(self.param, "_hp_mapping"):
            from deepspeed.utils import safe_set_full_fp32_param

            safe_set_full_fp32_param(self.param, self.param.detach().float())
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


_ZERO3_MESSAGE = ("ZeRO-3 partitions the codebook and gathers it only inside a module forward, but finetune_codebook "
                  "reads the bare parameter (its gradient comes back empty); use zero_stage 0, 1 or 2 — the codebook "
                  "is small and the frozen decoder is not in the engine, so ZeRO-3 would save nothing here")


def _check_stage(zero_stage: int) -> None:
    if zero_stage == 3:
        raise ValueError(_ZERO3_MESSAGE)
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2, got {zero_stage!r}")


def deepspeed_stepper(zero_stage: int = 0) -> Callable[[torch.nn.Parameter, float], Stepper]:
    """`make_stepper` for `finetune_codebook`: a DeepSpeed engine with ZeRO `zero_stage` (0, 1 or 2).

    Raises ValueError here, before any set-up, for ZeRO-3 (see the module doc) or another stage.
    """
    _check_stage(zero_stage)

    def make_stepper(param: torch.nn.Parameter, lr: float) -> Stepper:
        return DeepSpeedStepper(param, lr, zero_stage=zero_stage)

    return make_stepper


# ---- data parallel on one host --------------------------------------------------------------------

def _spawned(rank: int, fn: Callable, world_size: int, port: int, queue: Any, args: tuple) -> None:
    global _CREATED_GROUP
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    try:
        result = fn(rank, world_size, *args)
        queue.put((rank, pickle.dumps(result)))  # plain bytes: no shared-memory handles outliving the child
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # destroying the group avoids most of the intermittent SIGABRTs at exit
            _destroy_group()
        _CREATED_GROUP = False
    # The result is delivered (SimpleQueue.put writes the pipe before returning) and the group is gone: end
    # here, skipping the interpreter's teardown, where a library thread still joinable at exit could abort
    # the process ("terminate called without an active exception", seen once in a full CI run under load).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launch_data_parallel(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` local processes (torch.multiprocessing spawn).

    Each process gets MASTER_ADDR/MASTER_PORT/RANK/LOCAL_RANK/WORLD_SIZE, so a `deepspeed_stepper`
    inside joins one group of `world_size` ranks (gloo on CPU). `fn` must be importable (module level);
    its return values (picklable) come back as a list indexed by rank. A failing rank raises here.
    """
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    context = mp.spawn(_spawned, args=(fn, world_size, _free_port(), queue, args), nprocs=world_size, join=False)
    results: dict[int, Any] = {}

    def drain() -> None:
        while not queue.empty():
            rank, payload = queue.get()
            results[rank] = pickle.loads(payload)

    while not context.join(timeout=0.1):  # drain while waiting: a large result would block a child's put
        drain()
    drain()
    return [results[r] for r in range(world_size)]
