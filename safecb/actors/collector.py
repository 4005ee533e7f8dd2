"""The collector: one model replica that turns a shard task into shard objects on storage.

A plain class, so that it runs (and is tested) without Ray; `safecb.actors.pool` wraps it with
`ray.remote`, one per GPU or CPU slot. The model loads once, in the constructor. Each call reads
its own prompt rows from the run's snapshot, does the work, writes its shards straight to storage
under its attempt's own object names (one PUT each) and returns only the small shard records; the
driver alone commits them. A constructor re-run by Ray after a crash serves the run's *current*
codebook (`codebooks/CURRENT.json`), so a restarted actor never draws with a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from safecb.config import parse_config
from safecb.prompts import read_prompt_range
from safecb.schemas import GENERATION_SCHEMA, PAIR_SCHEMA, ShardRecord, table_from_rows
from safecb.schemas.codebook import codebook_from_bytes
from safecb.stages import collect_shard, eval_jobs, evaluate_tokens, generate_eval_tokens, token_matrix
from safecb.storage import CURRENT_CODEBOOK, RunStore


class CodebookMismatch(RuntimeError):
    """The codebook an actor was sent is not the artifact it claims to be. One line."""


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: rows [start, stop) of a prompt snapshot, for one iteration.

    kind "collect": train prompts → generations + pairs shards; "val" / "eval": the validation / test
    prompts → a shard of that kind (iteration 0 draws the tokens; later iterations decode the tokens
    of `eval_tokens`, the committed iteration-0 shard of the same kind and index). `attempt` names
    this try's objects.
    """

    kind: str
    iteration: int
    index: int
    start: int
    stop: int
    codebook_version: int
    codebook_sha256: str
    attempt: str = ""
    eval_tokens: ShardRecord | None = None


@dataclass
class ShardResult:
    task: ShardTask
    records: dict[str, ShardRecord] = field(default_factory=dict)  # kind → the attempt's record
    seconds: dict[str, float] = field(default_factory=dict)  # the call's steps, timed on the actor


class StepClock:
    """Seconds per named step of one call: where an actor's time goes (the driver only sees the whole)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, step: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[step] = self.seconds.get(step, 0.0) + time.perf_counter() - start


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # noqa: BLE001 - identification only
        pass
    return socket.gethostname()


def _release_cached_gpu_memory() -> None:
    """Hand the allocator's cached blocks back after a shard. On one GPU the trainer runs while the
    collectors wait (0.5 / 0.5): a cache grown by the judge's activations (tens of GB at Janus-Pro
    shapes beside a 71 GB KV cache) would leave it no room (seen: the update ran out of memory)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Collector:
    def __init__(self, config: dict, run_url: str, storage_options: dict | None = None, name: str = "collector-0"):
        from safecb.models.registry import load_model

        self.config = parse_config(config, "config")
        self.name, self.node = name, _node_id()
        self.store = RunStore(run_url, storage_options)
        threads = self.config.resources.threads or max(1, int(self.config.resources.cpus_per_worker))
        torch.set_num_threads(threads)
        self.model = load_model(self.config.model, self.config.categories, self.config.seed,
                                batch_size=self.config.generation.batch_size)
        self.lexicon = dict(self.config.pairing.lexicon)
        if self.config.pairing.builtin_lexicon == "world":
            from safecb.world import world_lexicon

            self.lexicon = {**world_lexicon(), **self.lexicon}
        self.external = None
        if self.config.model.backend == "world" and self.config.eval.external_judge:
            from safecb.world import world_judge_dir
            from safecb.world.judge import ExternalJudge

            self.external = ExternalJudge.load(world_judge_dir(self.config.model.path,
                                                               self.config.eval.external_judge_path))
        from safecb.judges import build_judges

        # Per-category measures of the test split (the world's judge on the world model, NudeNet, folders).
        self.judges = build_judges(self.config, device=str(getattr(self.model, "device", "cpu")))
        self.codebook_sha256 = ""  # the model's own codebook until the driver sends v0's artifact
        self._v0: torch.Tensor | None = None
        if self.store.exists(CURRENT_CODEBOOK):
            current = json.loads(self.store.read_text(CURRENT_CODEBOOK))
            self._serve_stored(current["version"], current["sha256"])

    # ---- codebook ------------------------------------------------------------------------------
    def ready(self) -> dict:
        """Who this is and what it serves: the supervisor's acknowledgement after a (re)start."""
        return {"actor": self.name, "node": self.node, "pid": os.getpid(),
                "version": self.model.codebook_version, "sha256": self.codebook_sha256}

    def own_codebook(self) -> torch.Tensor:
        """The model's codebook as loaded (v0 of a new run)."""
        return self.model.get_codebook()

    def set_codebook(self, blob: bytes, version: int, sha256: str) -> tuple[int, str]:
        """Serve the codebook artifact `blob` (safetensors bytes) from the next call on; ack (version, sha256)."""
        got = hashlib.sha256(blob).hexdigest()
        if got != sha256:
            raise CodebookMismatch(f"codebook v{version:04d}: expected sha256 {sha256[:12]}.., got {got[:12]}..")
        tensors, meta = codebook_from_bytes(blob)
        if meta.get("version") != version:
            raise CodebookMismatch(f"codebook v{version:04d}: the artifact says version {meta.get('version')}")
        self.model.set_codebook(tensors["codebook"], version)
        self.codebook_sha256 = sha256
        return version, sha256

    def _serve_stored(self, version: int, sha256: str) -> None:
        tensors, artifact = self.store.read_codebook(version)  # verifies the bytes against the sidecar
        if sha256 and artifact.sha256 != sha256:
            raise CodebookMismatch(f"codebook v{version:04d}: storage holds sha256 {artifact.sha256[:12]}.., "
                                   f"expected {sha256[:12]}..")
        self.model.set_codebook(tensors["codebook"], version)
        self.codebook_sha256 = artifact.sha256

    def _check_codebook(self, task: ShardTask) -> None:
        # The driver broadcasts before it schedules, so this only fires after a restart raced a broadcast.
        if (self.model.codebook_version, self.codebook_sha256) != (task.codebook_version, task.codebook_sha256):
            self._serve_stored(task.codebook_version, task.codebook_sha256)

    # ---- work ----------------------------------------------------------------------------------
    def _codebook_v0(self) -> torch.Tensor | None:
        """The untreated codebook (None while v0 itself is served): edits are measured against it."""
        if self.model.codebook_version == 0:
            return None
        if self._v0 is None:
            self._v0 = self.store.read_codebook(0)[0]["codebook"]
        return self._v0

    def collect(self, task: ShardTask) -> ShardResult:
        """Generate, self-judge, rewrite and pair the task's train prompts; write both shards."""
        clock = StepClock()
        with clock("read"):
            self._check_codebook(task)
            prompts = read_prompt_range(self.store, "train", task.start, task.stop)
        with clock("generate + judge + pair"):
            result = collect_shard(self.model, prompts, self.config, task.iteration, self.lexicon, self._codebook_v0())
        collected = [r for r in result.generations if r["role"] == "collect"]
        with clock("build tables"):
            generations = table_from_rows(GENERATION_SCHEMA, result.generations)
            pairs = table_from_rows(PAIR_SCHEMA, result.pairs)
        stats = {"collect": [sum(r["unsafe"] for r in collected), len(collected)]}
        _release_cached_gpu_memory()
        with clock("write"):
            records = {"generations": self._write(task, "generations", generations, stats),
                       "pairs": self._write(task, "pairs", pairs,
                                            {"aligned": sum(p["counterpart"] == "rewrite" for p in result.pairs)})}
        return ShardResult(task, records, clock.seconds)

    def evaluate(self, task: ShardTask) -> ShardResult:
        """Decode + self-judge the task's validation or test images (the test split also by the external
        judge, which only measures); write the shard of the task's kind."""
        clock = StepClock()
        with clock("read"):
            self._check_codebook(task)
            prompts = read_prompt_range(self.store, task.kind, task.start, task.stop)
            jobs = eval_jobs(prompts, self.config)
            codebook_v0 = self._codebook_v0()
        if task.eval_tokens is None:
            with clock("generate"):
                tokens = generate_eval_tokens(self.model, jobs, self.config)
        else:
            with clock("read"):
                stored = self.store.read_shard(task.eval_tokens, GENERATION_SCHEMA, columns=["tokens"])
                tokens = token_matrix(stored.column("tokens"), self.model.num_image_tokens)
            if tokens.shape[0] != len(jobs):
                raise ValueError(f"{task.eval_tokens.path}: holds {tokens.shape[0]} eval images, expected {len(jobs)}")
        external = self.external if task.kind == "eval" else None
        with clock("decode + judge + drift"):
            rows, stats = evaluate_tokens(self.model, jobs, tokens, self.config, task.iteration, external,
                                          codebook_v0, self.judges if task.kind == "eval" else None)
        with clock("build tables"):
            table = table_from_rows(GENERATION_SCHEMA, rows)
        _release_cached_gpu_memory()
        with clock("write"):
            record = self._write(task, task.kind, table, stats)
        return ShardResult(task, {task.kind: record}, clock.seconds)

    def _write(self, task: ShardTask, kind: str, table, stats: dict) -> ShardRecord:
        return self.store.write_attempt(task.iteration, kind, task.index, table, task.attempt, actor=self.name,
                                        node=self.node, stats=stats)
