"""The codebook trainer: one Safe-CB update as a Ray Train `TorchTrainer` with DeepSpeed inside.

This file only moves data and calls the math (`safecb.stages.update_codebook` → `safecb.training.*`).
Each rank reads its slice of the iteration's committed shards itself (shards[rank::world]), one at a
time, and the statistics are all-reduced: code counts (K,), the difference Gram matrix (D, D) the
Harmful Space is taken from, and the bounded fine-tuning samples (merged, so every rank holds what
one rank reading every shard would hold). Fine-tuning is then data-parallel through DeepSpeed: each
rank takes its rows of the same global batch, DeepSpeed averages the gradients, and the early-stop
check is summed over ranks — so 1 and N workers give the same codebook.

Checkpoints (the fine-tuning state at every held-out check) go under the run folder,
`{run}/trainer/iter=NNNN/`; a worker that dies is restarted by Ray Train (`trainer.max_failures`) and
training resumes from the last checkpoint. Rank 0 writes the codebook artifact (safetensors +
sha256 + parent + the update's report); the driver verifies it before the broadcast.

A `fit()` has a fixed cost (worker start-up, process group, the model load): ~17 s on 2 CPU cores,
~30 s on one H200 (MACHINE-NOTES.md). It is paid once per iteration, against collection times that
grow with the prompt count; the README says what it costs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from safecb.config import RunConfig, parse_config
from safecb.schemas import GENERATION_SCHEMA, PAIR_SCHEMA, CodebookArtifact, ShardRecord
from safecb.storage import RunStore

CHECKPOINT_FILE = "finetune_state.pt"


class TrainerError(RuntimeError):
    """The trainer could not build the codebook. One line."""


def _train_worker(job: dict) -> None:
    """One rank of the update (runs inside a Ray Train worker)."""
    import ray.train
    import torch.distributed as dist

    from safecb.models.registry import load_model
    from safecb.stages import UpdateStatistics, update_codebook

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    config = parse_config(job["config"], "config")
    torch.set_num_threads(config.trainer.threads or config.resources.threads or max(1, int(config.trainer.cpus_per_worker)))
    store = RunStore(job["run_url"], job["storage_options"])
    artifact = CodebookArtifact.model_validate(job["artifact"])
    model = load_model(config.model, config.categories, config.seed, batch_size=config.generation.batch_size)
    parent = store.read_codebook(artifact.parent_version)[0]["codebook"]
    codebook_v0 = store.read_codebook(0)[0]["codebook"]

    stats = UpdateStatistics(parent, model.num_image_tokens, config)
    pairs = [ShardRecord.model_validate(r) for r in job["pairs"]][rank::world]
    generations = [ShardRecord.model_validate(r) for r in job["generations"]][rank::world]
    for table in store.iter_shard_tables(pairs, PAIR_SCHEMA):
        stats.add_pairs(table)
    for table in store.iter_shard_tables(generations, GENERATION_SCHEMA):
        stats.add_generations(table)

    reduce_sum = gather = None
    if world > 1:
        # gloo reduces CPU tensors; under NCCL they travel on the rank's device and come back.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

        def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            moved = tensor.to(device).clone()
            dist.all_reduce(moved)
            return moved.to(tensor.device)

        def gather(obj):
            out = [None] * world
            dist.all_gather_object(out, obj)
            return out

        stats.all_reduce(reduce_sum, gather)

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            resume = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=False)

    def on_check(state: dict) -> None:
        # Every rank reports at the same steps (the early-stop decision is agreed); rank 0 carries the state.
        if rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                torch.save(state, Path(folder) / CHECKPOINT_FILE)
                ray.train.report({"step": state["step"]}, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report({"step": state["step"]})

    update = update_codebook(model, parent, codebook_v0, stats, config, rank=rank, world=world,
                             all_reduce_sum=reduce_sum, resume=resume, on_check=on_check)
    if rank == 0:
        report = {**update.report, "trainer_workers": world, "resumed_from_step": resume["step"] if resume else None}
        store.write_codebook({"codebook": update.codebook.detach().float().contiguous()},
                             artifact.model_copy(update={"params": report}))
    ray.train.report({"done": 1})


def _storage(store: RunStore, iteration: int) -> tuple[str, object | None, str]:
    """(storage_path, storage_filesystem, name) for Ray Train's checkpoints under the run folder."""
    if store.is_local:
        return str(Path(store.root).resolve() / "trainer"), None, f"iter={iteration:04d}"
    import pyarrow.fs

    return f"{store.root}/trainer", pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs)), f"iter={iteration:04d}"


def _check_fits(config: RunConfig, per_worker: dict[str, float]) -> None:
    """On a fixed cluster (no autoscaler to add nodes), a trainer that cannot be placed would wait
    forever: refuse it with one line instead."""
    import ray

    if config.cluster.address not in (None,):
        return  # an existing cluster may autoscale: let Ray wait for nodes
    free = ray.available_resources()
    for key, amount in per_worker.items():
        need = amount * config.trainer.num_workers
        if need > free.get(key, 0.0) + 1e-9:
            raise TrainerError(f"trainer: {config.trainer.num_workers} worker(s) x {per_worker} do not fit beside the "
                               f"collectors ({key}: {free.get(key, 0.0):g} free); lower trainer.*_per_worker or "
                               "resources.*_per_worker (on one GPU, e.g. 0.5 each)")


def train_codebook(config: RunConfig, store: RunStore, iteration: int, generations: list[ShardRecord],
                   pairs: list[ShardRecord], artifact: CodebookArtifact) -> None:
    """Build codebook v(iteration) from the iteration's committed shards on a Ray Train `TorchTrainer`;
    rank 0 writes the artifact to `store`. Ray must be initialised (the controller's session)."""
    try:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer
    except ImportError as err:
        raise TrainerError(f"trainer: Ray Train is not available ({err}); install ray[train]") from None
    if config.finetune.backend == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise TrainerError(f"finetune.backend: deepspeed is not importable ({err})") from None

    trainer_cfg = config.trainer
    resources = {"CPU": float(trainer_cfg.cpus_per_worker)}
    if trainer_cfg.gpus_per_worker:
        resources["GPU"] = float(trainer_cfg.gpus_per_worker)
    _check_fits(config, resources)
    storage_path, filesystem, name = _storage(store, iteration)
    job = {"config": config.model_dump(mode="json"), "run_url": config.storage.run_dir,
           "storage_options": dict(config.storage.options), "artifact": artifact.model_dump(mode="json"),
           "generations": [r.model_dump(mode="json") for r in generations],
           "pairs": [r.model_dump(mode="json") for r in pairs]}
    trainer = TorchTrainer(
        _train_worker, train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=trainer_cfg.num_workers, use_gpu=bool(trainer_cfg.gpus_per_worker),
                                     resources_per_worker=resources),
        run_config=TrainRunConfig(name=name, storage_path=storage_path, storage_filesystem=filesystem,
                                  failure_config=FailureConfig(max_failures=trainer_cfg.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 - a failed fit is one line; the cause's last line says why
        text = " ".join(str(getattr(err, "__cause__", None) or err).split())
        raise TrainerError(f"trainer: the update of iteration {iteration} failed: {text[-400:]}") from None
