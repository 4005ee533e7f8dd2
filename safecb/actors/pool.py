"""The pool supervisor: keeps N collector actors busy, survives their deaths, never loops.

Thin Ray code, no math. Each actor gets at most `cluster.max_in_flight_per_actor` calls at a time
(Ray queues them inside the actor, so the next shard starts the moment the last one ends); the
driver waits on whichever finishes first (`ray.wait`). Failures split in two:
- infrastructure (the actor or its node died, an object was lost): the shard goes back to the
  queue under a new attempt name, and the actor is recovered — Ray restarts it (its constructor
  reloads the model and reads the run's current codebook) and the pool re-sends the current
  codebook before giving it work again; past `cluster.max_actor_restarts` the pool starts a fresh
  actor in the same placement-group bundle. A shard that keeps killing actors fails after
  `cluster.max_infra_attempts`.
- application errors (an exception in our code): retried up to `cluster.max_task_attempts` times,
  then the run fails with one line naming the shard and the cause.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from typing import Callable, Iterable, Iterator

import ray
from ray.exceptions import (ActorUnavailableError, GetTimeoutError, LocalRayletDiedError, NodeDiedError, ObjectLostError,
                            OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError)
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from safecb.actors.collector import Collector, ShardResult, ShardTask
from safecb.config import RunConfig

INFRA_ERRORS = (RayActorError, ObjectLostError, NodeDiedError, WorkerCrashedError, LocalRayletDiedError,
                OutOfMemoryError)
RemoteCollector = ray.remote(Collector)


class PoolError(RuntimeError):
    """The pool cannot finish its work. One line."""


def _cause(err: BaseException) -> str:
    """The one-line message of what our code raised inside an actor (not Ray's traceback)."""
    inner = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
    text = " ".join(str(inner).split())
    if isinstance(err, RayTaskError) and "Traceback" in text:  # Ray's own rendering: keep the last line
        text = text.rsplit(":", 1)[-1].strip() or text
    return f"{type(inner).__name__}: {text}"[:400]


class CollectorPool:
    """N long-lived `Collector` actors in one placement group, one bundle each."""

    def __init__(self, config: RunConfig, run_url: str, storage_options: dict | None = None):
        self.config, self.cluster = config, config.cluster
        self._args = (config.model_dump(mode="json"), run_url, dict(storage_options or {}))
        res = config.resources
        bundle = {"CPU": float(res.cpus_per_worker), **({"GPU": float(res.gpus_per_worker)} if res.gpus_per_worker else {})}
        self.bundle = bundle
        self.group = placement_group([bundle] * res.num_workers, strategy=self.cluster.placement)
        try:
            ray.get(self.group.ready(), timeout=self.cluster.startup_timeout_s)
        except GetTimeoutError:
            remove_placement_group(self.group)
            raise PoolError(f"resources: {res.num_workers} actor(s) x {bundle} did not fit on the Ray cluster within "
                            f"{self.cluster.startup_timeout_s:.0f} s (it has {ray.cluster_resources()}); lower "
                            "resources.num_workers / cpus_per_worker / gpus_per_worker") from None
        self.actors = [self._start(i) for i in range(res.num_workers)]
        self.current: tuple[ray.ObjectRef, int, str] | None = None  # (codebook bytes, version, sha256)
        self.info = self._gather([a.ready.remote() for a in self.actors], "start")

    # ---- actors --------------------------------------------------------------------------------
    def _start(self, index: int):
        return RemoteCollector.options(
            num_cpus=self.bundle["CPU"], num_gpus=self.bundle.get("GPU", 0),
            max_restarts=self.cluster.max_actor_restarts, max_task_retries=0,  # the pool re-queues, not Ray
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index),
        ).remote(*self._args, name=f"collector-{index}")

    def _gather(self, refs: list, what: str) -> list:
        try:
            return ray.get(refs, timeout=self.cluster.startup_timeout_s)
        except RayTaskError as err:
            raise PoolError(f"collector actors failed to {what}: {_cause(err)}") from None
        except RayActorError as err:  # a constructor that raised: Ray's message ends with our one line
            last = [line for line in str(err).splitlines() if line.strip()]
            raise PoolError(f"collector actors failed to {what}: {last[-1].strip() if last else type(err).__name__}") from None
        except GetTimeoutError:
            raise PoolError(f"collector actors did not {what} within {self.cluster.startup_timeout_s:.0f} s") from None

    def _probe(self, index: int):
        """A call that returns once actor `index` is up again and serves the current codebook."""
        actor = self.actors[index]
        if self.current is None:
            return actor.ready.remote()
        return actor.set_codebook.remote(*self.current)

    def _replace(self, index: int) -> None:
        """Ray gave up restarting actor `index`: a fresh one takes its bundle."""
        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:  # noqa: BLE001 - it is already gone
            pass
        self.actors[index] = self._start(index)

    def _recover_after(self, index: int, err: BaseException, since: float) -> bool:
        """A probe of actor `index` failed: wait if Ray is restarting it, else start a fresh one.
        (A probe sent after a death queues until the restart is done; it fails only when Ray gave up.)
        Returns whether the actor was lost (replaced); a restart in progress is not a loss, however
        many probes it takes on a slow machine, up to `cluster.startup_timeout_s` since `since`."""
        if isinstance(err, ActorUnavailableError):
            if time.monotonic() - since > self.cluster.startup_timeout_s:
                raise PoolError(f"collector-{index} was still restarting after {self.cluster.startup_timeout_s:.0f} s")
            time.sleep(0.5)
            return False
        self._replace(index)
        return True

    def broadcast(self, blob: bytes, version: int, sha256: str) -> None:
        """Put the codebook artifact in the object store once; every actor swaps it and acknowledges
        (version, sha256). Returns only when all have: nothing of the next iteration is scheduled before."""
        self.current = (ray.put(blob), version, sha256)
        for index in range(len(self.actors)):
            since, lost = time.monotonic(), 0
            while True:
                try:
                    ack = ray.get(self._probe(index), timeout=self.cluster.startup_timeout_s)
                    break
                except INFRA_ERRORS as err:
                    if not isinstance(err, ActorUnavailableError):
                        lost += 1
                        if lost >= self.cluster.max_infra_attempts:
                            raise PoolError(f"collector-{index} died {lost} times while taking codebook v{version:04d}") from None
                    self._recover_after(index, err, since)
                except RayTaskError as err:
                    raise PoolError(f"collector-{index} refused codebook v{version:04d}: {_cause(err)}") from None
            if tuple(ack) != (version, sha256):
                raise PoolError(f"collector-{index} acknowledged {tuple(ack)}, expected (v{version}, {sha256[:12]}..)")

    # ---- work ----------------------------------------------------------------------------------
    def run(self, tasks: Iterable[ShardTask], method: str, on_result: Callable[[ShardResult], None],
            on_progress: Callable[[int], None] | None = None) -> None:
        """Run every task on the pool (`method`: "collect" | "evaluate"); call `on_result` once per task
        that succeeds, in completion order. Tasks are pulled lazily: the driver never lists them all."""
        fresh: Iterator[ShardTask] = iter(tasks)
        retry: deque[ShardTask] = deque()
        failures: dict[tuple[str, int], list[int]] = {}  # (kind, index) → [application, infrastructure]
        pending: dict = {}  # ObjectRef → (actor index, task)
        probes: dict = {}  # ObjectRef → actor index being recovered
        load = [0] * len(self.actors)
        recovering: set[int] = set()
        replaced: dict[int, int] = {}
        unavailable_since: dict[int, float] = {}  # actor index → when its recovery began

        def count_failure(key: tuple[str, int], which: int, limit: int) -> int | None:
            """Count one failure (0: application, 1: infrastructure); the count once it reaches `limit`."""
            counts = failures.setdefault(key, [0, 0])
            counts[which] += 1
            return counts[which] if counts[which] >= limit else None

        def next_task() -> ShardTask | None:
            task = retry.popleft() if retry else next(fresh, None)
            if task is None:
                return None
            tries = sum(failures.get((task.kind, task.index), [0, 0]))
            return ShardTask(**{**task.__dict__, "attempt": f"a{tries}-{uuid.uuid4().hex[:8]}"})

        exhausted = False
        while True:
            # Round-robin, one call per actor per pass: a short queue spreads over every actor
            # instead of filling the first one up to its limit.
            for depth in range(1, self.cluster.max_in_flight_per_actor + 1):
                for index in range(len(self.actors)):
                    if exhausted or index in recovering or load[index] >= depth:
                        continue
                    task = next_task()
                    if task is None:
                        exhausted = not retry
                        break
                    pending[getattr(self.actors[index], method).remote(task)] = (index, task)
                    load[index] += 1
            if not pending and not probes:
                if retry:  # every actor is recovering or was just freed: go round again
                    exhausted = False
                    continue
                return
            done, _ = ray.wait([*pending, *probes], num_returns=1)
            ref = done[0]
            if ref in probes:
                index = probes.pop(ref)
                try:
                    ray.get(ref)
                    recovering.discard(index)
                    unavailable_since.pop(index, None)
                except INFRA_ERRORS as err:
                    if not isinstance(err, ActorUnavailableError):  # a restart in progress is not a loss
                        replaced[index] = replaced.get(index, 0) + 1
                        if replaced[index] > self.cluster.max_infra_attempts:
                            raise PoolError(f"collector-{index} cannot be brought back: {type(err).__name__}") from None
                    self._recover_after(index, err, unavailable_since.setdefault(index, time.monotonic()))
                    probes[self._probe(index)] = index
                except RayTaskError as err:
                    raise PoolError(f"collector-{index} could not come back: {_cause(err)}") from None
                continue
            index, task = pending.pop(ref)
            load[index] -= 1
            key = (task.kind, task.index)
            try:
                result = ray.get(ref)
            except INFRA_ERRORS as err:
                tries = count_failure(key, 1, self.cluster.max_infra_attempts)
                if tries is None:
                    retry.append(task)
                else:
                    raise PoolError(f"{task.kind} shard {task.index} (rows {task.start}-{task.stop}): lost "
                                    f"{tries} times to infrastructure failures, last {type(err).__name__}") from None
                exhausted = False
                if index not in recovering:
                    recovering.add(index)
                    probes[self._probe(index)] = index
                continue
            except RayTaskError as err:
                tries = count_failure(key, 0, self.cluster.max_task_attempts)
                if tries is None:
                    retry.append(task)
                else:
                    raise PoolError(f"{task.kind} shard {task.index} (rows {task.start}-{task.stop}) failed "
                                    f"{tries} times, last on collector-{index}: {_cause(err)}") from None
                exhausted = False
                continue
            failures.pop(key, None)
            on_result(result)
            if on_progress is not None:
                on_progress(1)

    def call(self, method: str, *args):
        """One call on one actor (the codebook update, v0), with the same failure rules as shards."""
        counts = [0, 0]
        index = 0
        while True:
            try:
                return ray.get(getattr(self.actors[index], method).remote(*args))
            except INFRA_ERRORS as err:
                counts[1] += 1
                if counts[1] >= self.cluster.max_infra_attempts:
                    raise PoolError(f"{method}: lost {counts[1]} times to infrastructure failures, "
                                    f"last {type(err).__name__}") from None
                try:  # wait for the actor to come back (or replace it) before the next try
                    ray.get(self._probe(index), timeout=self.cluster.startup_timeout_s)
                except INFRA_ERRORS as again:
                    self._recover_after(index, again)
            except RayTaskError as err:
                counts[0] += 1
                if counts[0] >= self.cluster.max_task_attempts:
                    raise PoolError(f"{method} failed {counts[0]} times: {_cause(err)}") from None

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        try:
            remove_placement_group(self.group)
        except Exception:  # noqa: BLE001 - the cluster may be going away
            pass
