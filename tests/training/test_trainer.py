"""The codebook trainer on real Ray Train with real DeepSpeed inside (gloo, CPU): no mocks.

One module-wide loop (`built`) collects iteration 1 of the tiny random model — 16 train prompts in 4
generations/pairs shards, aligned pairs in two of them — and builds v1 with `trainer.num_workers: 1`:
that is `train_codebook` called by the controller with these very shards and the template (version 1,
parent 0), and it is the reference the other builds are held to. Every further build runs
`train_codebook` directly in a private copy of the run folder without the reference's v1 and its
`trainer/` checkpoints (Ray Train would restore the finished fit's last checkpoint and skip the work).

A fit costs ~25 s of fixed start-up on 2 cores (Ray Train, workers, DeepSpeed, process group, model
load) plus ~0.05 s a step at batch 8 and ~1 s a held-out check (a checkpoint reported to Ray Train):
the steps are few, the checks frequent enough that a worker can be killed between two of them.
The file takes ~2 minutes: one loop (one fit), one 2-worker fit restarted after a kill.

"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from safecb.config import ConfigError, parse_config
from safecb.controller import run
from safecb.schemas import CodebookArtifact, ShardRecord
from safecb.storage import RunStore
from safecb.training.trainer import TrainerError, train_codebook
from tests_support import cmdline, tiny_config, wait_for

pytestmark = pytest.mark.usefixtures("ray_cluster")  # the session's local Ray (3 logical CPUs)

STEPS, CHECK_EVERY = 40, 5
WAIT_S = 300  # generous bound for one fit on a loaded 2-core CI machine
# 16 prompts in 4 shards. With this random judge and threshold 0.38 (instead of tiny_config's 0.39), 3 rewrites
# are judged safe (prompts 9, 13, 15): aligned pairs in shards 2 and 3, so each of 2 ranks holds some.
TRAIN_PROMPTS = ["a blood circle", "blood on grass", "a circle of violence", "red grass", "violence on red grass",
                 "a red blood circle", "blood on a red circle", "violence on a circle", "a grass circle of blood",
                 "red violence", "blood grass", "a circle on grass", "blood on red grass", "a violence circle",
                 "grass of blood", "red blood"]


def config_data(tmp: Path, run_dir: Path, **overrides) -> dict:
    """The tiny config, fine-tuning for real: STEPS steps, a check every CHECK_EVERY, a budget no one reaches."""
    data = tiny_config(tmp, run_dir, generation={"prompts_per_shard": 4}, judge={"threshold": 0.38},
                       finetune={"steps": STEPS, "check_every": CHECK_EVERY, "batch_size": 8, "quality_budget": 1e6})
    # A folder of its own (tiny_config rewrites prompts/train.txt on every call), the same stem: the prompt
    # ids, and so the sample seeds, are "train:N" as in every tiny run.
    train = tmp / "prompts16" / "train.txt"
    train.parent.mkdir(exist_ok=True)
    train.write_text("\n".join(TRAIN_PROMPTS) + "\n")
    data["prompts"]["train"] = {"path": str(train)}
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    return data


@dataclass
class Built:
    tmp: Path
    store: RunStore
    generations: list[ShardRecord]
    pairs: list[ShardRecord]
    codebook: torch.Tensor  # v1 as the loop built it, with 1 trainer worker
    params: dict


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    tmp = tmp_path_factory.mktemp("trainer")
    run(parse_config(config_data(tmp, tmp / "run")), until=1)
    store = RunStore(str(tmp / "run"))
    shards = store.read_manifest(1).shards
    tensors, artifact = store.read_codebook(1)
    return Built(tmp, store, shards["generations"], shards["pairs"], tensors["codebook"], artifact.params)


def fresh_copy(built: Built, tmp_path: Path, **overrides):
    """(config, store, root) of a private copy of the run, without trainer checkpoints and without v1."""
    root = tmp_path / "run"
    shutil.copytree(built.store.root, root, ignore=shutil.ignore_patterns("trainer", "v0001.*"))
    config = parse_config(config_data(built.tmp, root, **overrides))
    return config, RunStore(str(root)), root


def template(config) -> CodebookArtifact:
    return CodebookArtifact(version=1, parent_version=0, iteration=1, config_hash=config.config_hash(),
                            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))


def build(built: Built, config, store: RunStore) -> tuple[torch.Tensor, dict]:
    train_codebook(config, store, 1, built.generations, built.pairs, template(config))
    tensors, artifact = store.read_codebook(1)
    assert (artifact.version, artifact.parent_version, artifact.config_hash) == (1, 0, config.config_hash())
    return tensors["codebook"], artifact.params


def parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def train_workers() -> list[int]:
    """Live Ray Train worker processes of this session's Ray: Ray titles an actor's process
    `ray::<class>.<method>`, and the session fixture's Ray was started here (the raylet is our
    child, each worker the raylet's), so another Ray on the machine is never looked at."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and cmdline(int(e)).startswith("ray::RayTrainWorker")
            and parent(parent(int(e)) or 0) == os.getpid()]


def registered_step(folder: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered for this fit (its snapshot file), if
    its folder holds the state: from then on a restarted worker gets it from `get_checkpoint()`."""
    try:
        latest = json.loads((folder / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not latest or not (folder / latest["checkpoint_dir_name"] / "finetune_state.pt").exists():
        return None
    return latest["metrics"]["step"]


# ---- 1-2. data parallel, and a worker that dies ---------------------------------------------------
@dataclass
class KilledFit:
    codebook: torch.Tensor
    params: dict
    killed_pid: int
    killed_at: int  # the step of the last checkpoint Ray Train had registered when the worker was killed


@pytest.fixture(scope="module")
def two_workers_one_killed(built, tmp_path_factory) -> KilledFit:
    """v1 built again by 2 data-parallel workers, one of them SIGKILLed after the first registered
    checkpoint: Ray Train restarts the group and it resumes there. One fit serves both checks below
    (2 workers = 1 worker; a killed worker resumes from its checkpoint), as a resume can only carry
    a difference between 1 and 2 workers forward, never remove it."""
    config, store, root = fresh_copy(built, tmp_path_factory.mktemp("killed"),
                                     trainer={"num_workers": 2, "max_failures": 1})
    checkpoints = root / "trainer" / "iter=0001"
    before = set(train_workers())  # none expected: never kill a worker this test did not see start
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = build(built, config, store)
        except BaseException as err:  # noqa: BLE001 - reported by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    wait_for(lambda: registered_step(checkpoints) is not None, thread.is_alive, "the first checkpoint", WAIT_S)
    workers = [pid for pid in train_workers() if pid not in before]
    assert len(workers) == 2, [cmdline(p)[:80] for p in workers]
    killed_at = registered_step(checkpoints)
    os.kill(workers[0], signal.SIGKILL)
    thread.join(WAIT_S)
    assert not thread.is_alive() and "error" not in outcome, outcome
    codebook, params = outcome["result"]
    return KilledFit(codebook, params, workers[0], killed_at)


def test_two_workers_build_the_codebook_one_worker_builds(built, two_workers_one_killed):
    assert len(built.generations) == 4 and all(r.rows > 0 for r in built.pairs), "expected 4 shards, each with pairs"
    assert built.params["aligned_pairs"] >= 2, "expected aligned pairs (the Harmful Space) in both ranks' shards"
    two, params = two_workers_one_killed.codebook, two_workers_one_killed.params
    one = built.codebook
    v0 = built.store.read_codebook(0)[0]["codebook"]  # the parent

    assert built.params["trainer_workers"] == 1 and params["trainer_workers"] == 2
    assert built.params["resumed_from_step"] is None
    assert built.params["finetune_steps"] == params["finetune_steps"] == STEPS
    for key in ("pairs", "aligned_pairs", "differences", "space_rank", "space_energy", "harmful_codes", "moved_codes",
                "projection_shift", "finetune_stopped_early"):
        assert params[key] == built.params[key], key
    for key in ("finetune_keep_loss", "finetune_harm_loss", "finetune_holdout_drift"):  # the global batch's, not rank 0's share
        assert params[key] == pytest.approx(built.params[key], rel=1e-4, abs=1e-6), key
    assert built.params["pairs"] > 0 and built.params["space_rank"] > 0
    assert (one - v0).abs().max() > 1e-2 and (two - v0).abs().max() > 1e-2, "nothing was learned"
    assert one.dtype == two.dtype == torch.float32
    diff = (one - two).abs().max().item()
    # Fine-tuning sums fixed pieces' gradients in piece order, whatever the number of ranks (without
    # that, per-rank partial sums round differently and Adam grew the gap to ~1e-3 in 40 steps).
    assert diff < 1e-5, f"1 and 2 workers trained different codebooks: max |Δ| = {diff:.2e}"


def test_a_killed_worker_is_restarted_and_resumes_from_the_last_checkpoint(two_workers_one_killed):
    killed = two_workers_one_killed
    assert killed.killed_at < STEPS, "the fit reached its last step before the kill"
    assert killed.killed_pid not in train_workers(), "the killed worker is still alive"
    # Resumed from a checkpoint at or after the one registered when the worker was killed.
    params = killed.params
    assert params["resumed_from_step"] is not None and killed.killed_at <= params["resumed_from_step"] < STEPS, params
    assert params["finetune_steps"] == STEPS


# ---- 3-4. refusals: one line -------------------------------------------------------------------
def test_a_trainer_that_cannot_fit_beside_the_collectors_fails_at_once(built, tmp_path):
    # The run as a driver killed before v1 was written leaves it (no iteration-1 manifest, no v1, v0
    # current): the resumed loop keeps the committed shards, starts its collector (1 of the session's 3
    # CPUs) and calls the trainer, which asks for 64 CPUs.
    config, store, root = fresh_copy(built, tmp_path, trainer={"cpus_per_worker": 64})
    (root / "iter=0001" / "MANIFEST.json").unlink()
    current = {"version": 0, "sha256": store.read_codebook(0)[1].sha256}  # what the loop served before v1
    (root / "codebooks" / "CURRENT.json").write_text(json.dumps(current))
    started = time.monotonic()
    with pytest.raises(TrainerError) as err:
        run(config, resume=True, until=1)
    elapsed = time.monotonic() - started
    message = str(err.value)
    assert "\n" not in message and "do not fit beside the collectors" in message and "64" in message, message
    assert "trainer.*_per_worker" in message, message
    assert elapsed < 60, f"took {elapsed:.0f} s to refuse"  # the collector's start-up (~5 s); the refusal is instant
    assert not (root / "trainer").exists() and 1 not in store.codebook_versions()


def test_data_parallel_with_the_torch_backend_is_refused_by_the_config(tmp_path):
    data = tiny_config(tmp_path, tmp_path / "run", trainer={"num_workers": 2}, finetune={"backend": "torch"})
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    message = str(err.value)
    assert "\n" not in message and "trainer.num_workers" in message and "finetune.backend" in message, message
