"""Submit a run to any Ray cluster as a Ray job, and follow it (`safecb submit | status | logs | stop`).

The job's driver is `safecb run --config config.yaml --resume auto` on the cluster. Its runtime
environment carries the validated config (as the job's working folder) and this package (a
`py_modules` entry, so the job runs the submitter's code even on an image with another version);
the package's dependencies must already be on the cluster (the image of infra/Dockerfile).
Credentials never travel with the job: the cluster's own environment provides them (on Kubernetes, the
standard AWS variables from a Secret), and configs that hold them are refused before this point.

The submission id is derived from the run (run_id and run folder), so submitting the same run again
joins the job that runs it instead of starting a second copy; a job of it that failed or was stopped
is replaced by a fresh one, which resumes the run from its last manifest.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from safecb.config import RunConfig

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
POLL_S = 1.0
AGENT_WAIT_S = 60.0  # how long a fresh head's job agent may take to come up


class SubmitError(RuntimeError):
    """A job could not be submitted, found or followed, or it failed. One line."""


@dataclass(frozen=True)
class Submitted:
    job_id: str
    action: str  # "submitted" | "joined" | "resubmitted"
    status: str


def submission_id(config: RunConfig) -> str:
    """Stable per run: the run_id (readable) and a hash of run_id + run folder (unique)."""
    digest = hashlib.sha256(f"{config.run_id}\0{config.storage.run_dir.rstrip('/')}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", config.run_id.lower()).strip("-")[:40] or "run"
    return f"safecb-{slug}-{digest}"


def job_config(config: RunConfig) -> RunConfig:
    """The config the job runs: the same run, its driver joining the cluster it is submitted to.

    Local paths are read on the cluster, inside the job's temporary working folder: a relative one
    would silently point there, so it is refused (`cluster.address` is execution, not identity, so
    the run's config hash is unchanged)."""
    for key, value in _paths(config.model_dump(mode="json")):
        if value and "://" not in value and not Path(value).is_absolute():
            raise SubmitError(f"{key}: {value!r} is a relative path, which the job would resolve in its temporary "
                              "working folder on the cluster; give an absolute path there or an object-store URL")
    return config.model_copy(update={"cluster": config.cluster.model_copy(update={"address": "auto"})})


def _paths(node, prefix: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, str) and (key == "path" or key.endswith("_path") or dotted == "storage.run_dir"):
                yield dotted, value
            else:
                yield from _paths(value, dotted + ".")


def _safe(address: str) -> str:
    """The address as it may be printed: without user:password@."""
    parts = urlsplit(address)
    if parts.username or parts.password:
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urlunsplit(parts)


def connect(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # noqa: BLE001 - unreachable, refused, not a Ray dashboard: one line
        raise SubmitError(f"--address {_safe(address)}: no Ray job server answers there "
                          f"({type(err).__name__}: {_short(err)})") from None


def _short(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


def state_of(info) -> str:
    return getattr(info.status, "value", str(info.status))


def job_info(client, job_id: str, address: str, must_exist: bool = True):
    try:
        return client.get_job_info(job_id)
    except Exception as err:  # noqa: BLE001 - Ray raises RuntimeError for a 404
        if "does not exist" in str(err) or "404" in str(err) or "not found" in str(err).lower():
            if must_exist:
                raise SubmitError(f"job {job_id}: no such job at {_safe(address)}") from None
            return None
        raise SubmitError(f"job {job_id}: {_safe(address)} did not answer ({type(err).__name__}: {_short(err)})") from None


def runtime_env(working_dir: Path) -> dict:
    import safecb

    return {"working_dir": str(working_dir), "py_modules": [str(Path(safecb.__file__).parent)],
            "excludes": ["__pycache__", "*.pyc"]}


ENTRYPOINT = "python -m safecb.cli run --config config.yaml --resume auto"


def submit(config: RunConfig, address: str) -> Submitted:
    """Submit the run, or join the job that already runs it. Returns at once (see `wait`)."""
    shipped = job_config(config)
    client = connect(address)
    job_id = submission_id(config)
    existing = job_info(client, job_id, address, must_exist=False)
    if existing is not None:
        theirs = (existing.metadata or {}).get("config_hash")
        if theirs != config.config_hash():
            raise SubmitError(f"job {job_id}: already runs {config.run_id} in {config.storage.run_dir} with another "
                              f"config (hash {theirs} vs {config.config_hash()}); choose another --run-dir")
        if state_of(existing) not in ("FAILED", "STOPPED"):
            return Submitted(job_id, "joined", str(existing.status))
        client.delete_job(job_id)  # its record only: the run folder keeps what it finished
    metadata = {"run_id": config.run_id, "run_dir": config.storage.run_dir, "config_hash": config.config_hash()}
    with tempfile.TemporaryDirectory(prefix="safecb-job-") as folder:
        (Path(folder) / "config.yaml").write_text(shipped.to_yaml())
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                client.submit_job(entrypoint=ENTRYPOINT, submission_id=job_id, runtime_env=runtime_env(Path(folder)),
                                  metadata=metadata)
                break
            except Exception as err:  # noqa: BLE001
                if "already exists" in str(err):  # a concurrent submit of the same run won: join it
                    return Submitted(job_id, "joined", state_of(job_info(client, job_id, address)))
                # A head that has just started answers before its job agent is up: wait for it a little.
                if "No available agent" in str(err) and time.monotonic() < deadline:
                    time.sleep(POLL_S)
                    continue
                raise SubmitError(f"job {job_id}: {_safe(address)} refused it ({type(err).__name__}: {_short(err)})") from None
    return Submitted(job_id, "resubmitted" if existing is not None else "submitted", "PENDING")


def status(address: str, job_id: str):
    """The job's JobDetails (status, message, start/end times)."""
    client = connect(address)
    return job_info(client, job_id, address)


def wait(address: str, job_id: str, on_change: Callable[[str], None] = lambda s: None,
         timeout_s: float | None = None) -> str:
    """Poll until the job ends; returns SUCCEEDED, raises SubmitError for FAILED / STOPPED / timeout."""
    client = connect(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    while True:
        info = job_info(client, job_id, address)
        state = state_of(info)
        if state != last:
            on_change(state)
            last = state
        if state in TERMINAL:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {job_id}: still {state} after {timeout_s:.0f} s")
        time.sleep(POLL_S)
    if state != "SUCCEEDED":
        raise SubmitError(failure_line(client, job_id, state, info.message))
    return state


def failure_line(client, job_id: str, state: str, message: str | None) -> str:
    """Why a job ended badly, in one line: the driver's own `safecb: error:` line when it printed one."""
    try:
        logs = client.get_job_logs(job_id)
    except Exception:  # noqa: BLE001 - the reason without the log line is still an answer
        logs = ""
    ours = [line for line in logs.splitlines() if line.startswith("safecb: error: ")]
    reason = ours[-1][len("safecb: error: "):] if ours else _short(Exception(message or "no message"))
    return f"job {job_id} {state}: {reason}"


def logs(address: str, job_id: str, follow: bool, write: Callable[[str], None]) -> str:
    """Write the job's logs (all so far, or streamed until it ends); returns its final status."""
    client = connect(address)
    job_info(client, job_id, address)
    if follow:
        async def stream() -> None:
            async for chunk in client.tail_job_logs(job_id):
                write(chunk)

        asyncio.run(stream())
    else:
        write(client.get_job_logs(job_id))
    info = job_info(client, job_id, address)
    if state_of(info) == "FAILED":
        raise SubmitError(failure_line(client, job_id, "FAILED", info.message))
    return state_of(info)


def stop(address: str, job_id: str) -> bool:
    """Ask the job to stop; False if it had already ended."""
    client = connect(address)
    job_info(client, job_id, address)
    try:
        return bool(client.stop_job(job_id))
    except Exception as err:  # noqa: BLE001
        raise SubmitError(f"job {job_id}: could not be stopped ({type(err).__name__}: {_short(err)})") from None
