"""`safecb run --resume auto`, the command a retried RayJob runs: on an empty run folder it starts the run;
after the driver is killed mid-iteration the same command continues from the last manifest, keeps every
committed shard and ends with the run an uninterrupted driver makes; on a finished run it changes nothing.

The uninterrupted run is the session's `tiny_run`; the kill is staged in iteration 2 of a copy rewound
to the end of iteration 1 (`tests_support.rewound`), so no trainer fit runs here."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from safecb.cli import app
from safecb.storage import RunStore
from tests_support import comparable, rewound, tiny_config, wait_for

WAIT_S = 300  # generous bound for one run on a loaded 2-core machine


def _auto_command(baseline, tmp_path: Path, run_dir: Path, **overrides) -> list[str]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(baseline.tmp, run_dir, **overrides)))
    return ["run", "--config", str(config), "--resume", "auto"]


def test_auto_on_an_empty_folder_starts_the_run(tiny_run, tmp_path):
    root = tmp_path / "run"
    result = CliRunner().invoke(app, [*_auto_command(tiny_run, tmp_path, root), "--until", "0"])
    assert result.exit_code == 0, result.output + result.stderr
    store = RunStore(str(root))
    assert store.manifest_iterations() == [0]
    assert comparable(store)["iter0"] == comparable(tiny_run.store)["iter0"]


@pytest.mark.usefixtures("ray_cluster")
def test_the_same_command_after_a_killed_driver_continues_the_run(tiny_run, tmp_path):
    import ray

    # The killed driver joins the session's Ray (an execution setting, not part of the run): killing
    # its one process ends it and Ray reclaims its actors, with no Ray daemons of its own to clean up.
    _, store, root = rewound(tiny_run, tmp_path)
    command = _auto_command(tiny_run, tmp_path, root, cluster={"address": ray.get_runtime_context().gcs_address})
    commits, manifest = root / "iter=0002" / "_commits", root / "iter=0002" / "MANIFEST.json"
    with open(tmp_path / "driver.log", "wb") as log:
        driver = subprocess.Popen([sys.executable, "-m", "safecb.cli", *command], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: any(commits.glob("*.json")), lambda: driver.poll() is None, "iteration 2's first commit",
                 WAIT_S, lambda: (tmp_path / "driver.log").read_text()[-2000:])
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    assert driver.returncode == -signal.SIGKILL
    assert not manifest.exists(), "the driver finished iteration 2 before it was killed"
    kept = {(kind, r.index): r for kind in ("generations", "pairs") for r in store.committed_shards(2, kind).values()}
    assert kept and store.manifest_iterations() == [0, 1]

    again = CliRunner().invoke(app, command)  # the retry: the very same command
    assert again.exit_code == 0, again.output + again.stderr
    resumed = store.read_manifest(2).shards
    for (kind, index), record in kept.items():  # a committed shard is never redone
        assert resumed[kind][index] == record
    assert comparable(store) == comparable(tiny_run.store)
    assert (root / "final.json").is_file()

    finished = {p: p.read_bytes() for p in Path(root).rglob("MANIFEST.json")}
    once_more = CliRunner().invoke(app, command)
    assert once_more.exit_code == 0, once_more.output + once_more.stderr
    assert {p: p.read_bytes() for p in Path(root).rglob("MANIFEST.json")} == finished


def test_resume_takes_only_the_word_auto(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path, tmp_path / "run")))
    for extra in (["--resume", "always"], ["auto"]):
        result = CliRunner().invoke(app, ["run", "--config", str(config), *extra])
        assert result.exit_code == 2 and "--resume auto" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
