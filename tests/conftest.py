"""Shared fixtures: a loopback S3 (moto_server), a `run_url` parametrised over local and S3, one local Ray
for the session and one finished tiny loop run (`tiny_run`) that several test files compare with."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can import tests_support

# Ray Train hands a worker's reports (each held-out check's checkpoint, then the last one) to its
# controller through a queue of one that the controller empties once per health check, 2 s apart by
# default: every report after the first waited up to 2 s (9 reports a fit in test_trainer.py, 2 in a
# tiny loop's), and the end of a fit was seen up to 2 s late. Set before any Ray starts, so that the
# session's Ray, and the runs tests start in their own processes, inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP spin-waiting makes 2 threads far slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

MOTO_START_TIMEOUT_S = 10.0
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_answers(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode} before answering on {url}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is up
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout_s:.0f} s")


@pytest.fixture(scope="session")
def s3_server():
    """Start `moto_server` on a free loopback port; yields {"endpoint_url": ...}."""
    saved = {k: os.environ.get(k) for k in _AWS_ENV}
    os.environ.update(_AWS_ENV)
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(exe), "-p", str(port), "-H", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_until_answers(endpoint, proc, MOTO_START_TIMEOUT_S)
        yield {"endpoint_url": endpoint}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def _s3_admin(s3_server):
    """One client that makes the tests' buckets: a new one per bucket cost ~0.2 s of CPU (botocore's models)."""
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint_url"]}, skip_instance_cache=True)


@pytest.fixture
def s3_bucket(_s3_admin):
    """A fresh, empty bucket on the loopback S3 for one test; yields its name."""
    name = f"safecb-test-{uuid.uuid4().hex[:12]}"
    _s3_admin.mkdir(name)
    yield name


@pytest.fixture(params=["local", "s3"])
def run_url(request, tmp_path):
    """(url, storage_options) of an empty run root, on a local folder and on loopback S3."""
    if request.param == "local":
        return str(tmp_path / "run"), {}
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/runs/test", {"client_kwargs": {"endpoint_url": server["endpoint_url"]}}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session: the loop reuses a Ray it finds running, so each test pays
    for its actors' model loads, not for starting Ray (~5 s). 2 cores like CI, counted as the loop
    counts them (`local_cpus`): up to two collectors plus one trainer worker, which never run at once."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=3, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@dataclass
class TinyRun:
    tmp: Path  # holds prompts/ (tiny_config's files: a run made from them has the same config hash) and run/
    config: object  # the RunConfig that made it
    metrics: list[dict]
    store: object  # RunStore of tmp/run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ray_cluster) -> TinyRun:
    """The tiny random model's uninterrupted 2-iteration loop on 1 actor (`tiny_config`, ~1 minute on 2
    cores: two trainer fits), run once for the session. Tests compare other runs with it and may read it;
    a test that changes a run works on a copy (`shutil.copytree(tiny_run.tmp / "run", ...)`)."""
    from safecb.config import parse_config
    from safecb.controller import run
    from safecb.storage import RunStore
    from tests_support import tiny_config

    tmp = tmp_path_factory.mktemp("tiny_run")
    config = parse_config(tiny_config(tmp, tmp / "run"))
    metrics = run(config)
    return TinyRun(tmp, config, metrics, RunStore(str(tmp / "run")))
