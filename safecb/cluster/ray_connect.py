"""Connect the driver to Ray: a local Ray on this machine by default, or an existing cluster.

`cluster.address` null starts (and later stops) a local Ray; "auto" joins the cluster this process
runs in (a RayJob's driver, `ray job submit`); "ray://head:10001" connects a Ray client. A Ray the
caller already initialised (a notebook, the tests) is used as it is and left running.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

from safecb.config import RunConfig


class ClusterError(RuntimeError):
    """Ray could not be reached or started. One line."""


def local_cpus(config: RunConfig) -> int:
    """Logical CPUs of the local Ray: the machine's cores, plus the trainer workers' reservation. The
    trainer runs only while the collectors wait for it, so its CPUs are not used twice; without them
    the collectors' reservation would leave the trainer unschedulable on a small machine."""
    cores = config.cluster.num_cpus or os.cpu_count() or 1
    return int(cores + -(-config.trainer.num_workers * config.trainer.cpus_per_worker // 1))


@contextmanager
def ray_session(config: RunConfig, num_cpus: int | None = None) -> Iterator[None]:
    """Ray for the block: the one already running, the cluster at `cluster.address`, or a local Ray
    of `num_cpus` logical CPUs (default `local_cpus`), stopped at the end."""
    import ray

    cluster = config.cluster
    if ray.is_initialized():
        yield
        return
    # Quiet by default: our own progress bars say what happens; Ray's banner and per-worker
    # deduplication notices do not help a user of `safecb run`.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # log_to_driver off: actors and Ray Train workers report through return values and exceptions (each
    # failure ends the run with one line); their own chatter (weight-loading bars, Ray Train banners)
    # would bury the progress bars. Their logs stay in the Ray session folder (/tmp/ray/session_latest/logs).
    kwargs = dict(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    try:
        if cluster.address is None:
            ray.init(num_cpus=num_cpus or local_cpus(config), include_dashboard=False, **kwargs)
        else:
            ray.init(address=cluster.address, **kwargs)
    except Exception as err:  # noqa: BLE001 - any failure to connect is one line
        where = "a local Ray" if cluster.address is None else f"the Ray cluster at {cluster.address}"
        raise ClusterError(f"cluster.address: could not start or reach {where} "
                           f"({type(err).__name__}: {' '.join(str(err).split())[:300]})") from None
    try:
        yield
    finally:
        ray.shutdown()
