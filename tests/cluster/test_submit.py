"""`safecb submit | status | logs | stop` against a real Ray head that this module starts on 127.0.0.1 (and
stops): a tiny run submitted with --wait finishes with its final.json, a second submit of the same run
joins its job, and an unreachable address, an unknown job and a failed job each end in one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml
from ray.job_submission import JobSubmissionClient
from typer.testing import CliRunner

from safecb.cli import app
from safecb.cluster.submit import SubmitError, job_config, runtime_env, submission_id
from safecb.config import parse_config
from safecb.storage import RunStore
from tests_support import assert_one_line_failure, tiny_config

HEAD_START_TIMEOUT_S = 120
runner = CliRunner()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_session(session: int) -> list[int]:
    """Kill every process of a `ray start` launched in its own session (GCS, raylet, dashboard, workers,
    job drivers): `ray stop` would end every Ray of this user, other test sessions' too. Returns the
    processes still alive afterwards."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = [p for p in psutil.process_iter() if _session(p.pid) == session and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        for process in alive:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    return [p.pid for p in alive]


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


HEAD_START_ATTEMPTS = 3  # `ray start` gives its raylet a fixed 30 s to register: a loaded CI machine can miss it


def start_head(env: dict, temp: str) -> tuple[subprocess.Popen, str, str]:
    """One `ray start --head` in a session of its own; returns (process, output, job server address)."""
    port, dashboard = free_port(), free_port()
    # Every fixed default port free-chosen: another Ray on this machine (a developer's, another test
    # session's) may hold the defaults, and a job agent that cannot bind never answers.
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "metrics-export-port", "runtime-env-agent-port",
                                                   "ray-client-server-port")]
    ray = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen([ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", *ports, "--num-cpus=3",
                             "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    out, _ = head.communicate(timeout=HEAD_START_TIMEOUT_S)
    return head, out.decode(errors="replace"), f"http://127.0.0.1:{dashboard}"


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head of its own: loopback only, its own temp dir and session; yields the job server address."""
    temp = tempfile.mkdtemp(prefix="rh")  # short: Ray's socket paths must stay < 108 chars
    # Token auth off for this loopback head: Ray reads RAY_AUTH_MODE once, at import, so the test's
    # client cannot switch to token mode here (a user of a token cluster exports RAY_AUTH_MODE=token).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # the job's `python`
    sessions = []
    try:
        for _ in range(HEAD_START_ATTEMPTS):
            head, out, address = start_head(env, temp)
            sessions.append(head.pid)
            if head.returncode == 0:
                break
            assert end_session(head.pid) == []
        assert head.returncode == 0, out[-3000:]
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:  # the dashboard's job server answers a little after `ray start` returns
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception as err:
                assert time.monotonic() < deadline, f"the Ray job server did not answer: {err}"
                time.sleep(0.5)
        yield address
    finally:
        left = [pid for session in sessions for pid in end_session(session)]
        shutil.rmtree(temp, ignore_errors=True)
        assert left == [], f"Ray processes outlived the head's teardown: {left}"


def write_config(tmp_path: Path, run_dir: Path, **overrides) -> Path:
    data = tiny_config(tmp_path, run_dir, stop={"max_iters": 1}, **overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_submit_wait_finishes_the_run_and_a_second_submit_joins_it(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path, run_dir)
    job = submission_id(parse_config(yaml.safe_load(config.read_text())))

    first = runner.invoke(app, ["submit", "--config", str(config), "--address", ray_head, "--wait"])
    assert first.exit_code == 0, first.output + first.stderr
    assert first.stdout.strip() == job
    assert (run_dir / "final.json").is_file()
    store = RunStore(str(run_dir))
    manifests = {i: store.read_text(f"iter={i:04d}/MANIFEST.json") for i in store.manifest_iterations()}
    assert sorted(manifests) == [0, 1]

    again = runner.invoke(app, ["submit", "--config", str(config), "--address", ray_head, "--wait"])
    assert again.exit_code == 0, again.output + again.stderr
    assert again.stdout.strip() == job and "joined" in again.stderr
    jobs = [j for j in JobSubmissionClient(ray_head).list_jobs() if j.submission_id == job]
    assert len(jobs) == 1  # one job ran this run, not two
    assert {i: store.read_text(f"iter={i:04d}/MANIFEST.json") for i in store.manifest_iterations()} == manifests

    status = runner.invoke(app, ["status", job, "--address", ray_head])
    assert status.exit_code == 0 and status.stdout.strip() == f"{job} SUCCEEDED"
    logs = runner.invoke(app, ["logs", job, "--address", ray_head])
    assert logs.exit_code == 0 and "collector actor" in logs.stdout, logs.stdout[-2000:]
    stopped = runner.invoke(app, ["stop", job, "--address", ray_head])
    assert stopped.exit_code == 0 and stopped.stdout.strip() == f"{job} had already ended"


def test_a_job_that_fails_is_one_line_with_the_drivers_error(ray_head, tmp_path):
    config = write_config(tmp_path, tmp_path / "run")
    (tmp_path / "prompts" / "train.txt").unlink()  # read on the cluster, where it is now missing

    result = runner.invoke(app, ["submit", "--config", str(config), "--address", ray_head, "--wait"])
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("safecb: error: ")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr  # after progress lines
    assert "FAILED" in errors[0] and "train.txt: prompt file not found" in errors[0]
    job = submission_id(parse_config(yaml.safe_load(config.read_text())))
    assert_one_line_failure(runner.invoke(app, ["status", job, "--address", ray_head]), "FAILED",
                            "train.txt: prompt file not found")
    assert_one_line_failure(runner.invoke(app, ["logs", job, "--address", ray_head]), "FAILED")
    assert not (tmp_path / "run" / "final.json").exists()


def test_an_unknown_job_is_one_line(ray_head):
    for command in ("status", "logs", "stop"):
        result = runner.invoke(app, [command, "safecb-no-such-job", "--address", ray_head])
        assert_one_line_failure(result, "safecb-no-such-job", "no such job")


def test_an_unreachable_address_is_one_line(tmp_path):
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = write_config(tmp_path, tmp_path / "run")
    for args in (["submit", "--config", str(config)], ["status", "x"], ["logs", "x"], ["stop", "x"]):
        assert_one_line_failure(runner.invoke(app, [*args, "--address", address]), address, "no Ray job server")
    assert not (tmp_path / "run").exists()


def test_the_submission_id_is_the_runs_and_the_job_carries_no_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-ship-this")
    config = parse_config(tiny_config(tmp_path, tmp_path / "run"))
    same = parse_config(tiny_config(tmp_path, tmp_path / "run", resources={"num_workers": 2}))
    other = parse_config(tiny_config(tmp_path, tmp_path / "run2"))
    assert submission_id(config) == submission_id(same) != submission_id(other)
    shipped = job_config(config)
    assert shipped.cluster.address == "auto" and shipped.config_hash() == config.config_hash()
    assert "do-not-ship-this" not in shipped.to_yaml()
    env = runtime_env(tmp_path)
    assert set(env) == {"working_dir", "py_modules", "excludes"}  # no env_vars: the cluster's own environment
    relative = parse_config(tiny_config(tmp_path, Path("runs/rel")))
    with pytest.raises(SubmitError, match="storage.run_dir: 'runs/rel' is a relative path"):
        job_config(relative)
