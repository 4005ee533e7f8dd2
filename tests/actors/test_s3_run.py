"""A run whose folder is on S3 (moto_server on loopback), through the actor pool and the trainer.

In its own process, as a user runs it: the local Ray it starts inherits the environment, so the
collector actors and the trainer workers read the credentials from it — never from the config.
"""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from safecb.schemas import GENERATION_SCHEMA
from safecb.storage import RunStore
from tests_support import tiny_config


def test_a_run_on_s3_goes_through_the_actors_and_the_trainer(tmp_path, s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/runs/one"
    options = {"client_kwargs": {"endpoint_url": s3_server["endpoint_url"]}}
    data = tiny_config(tmp_path, tmp_path / "unused", storage={"run_dir": url, "options": options},
                       cluster={"num_cpus": 2}, finetune={"steps": 2})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the session's
    proc = subprocess.run([sys.executable, "-m", "safecb.cli", "run", "--config", str(config_file), "--until", "1"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    store = RunStore(url, options)
    assert [m.iteration for m in store.valid_manifests()] == [0, 1]
    assert store.exists("prompts/train.parquet") and store.exists("prompts/eval.parquet")
    manifest = store.read_manifest(1)
    for kind in ("generations", "pairs", "eval"):
        for record in manifest.shards[kind]:
            assert record.actor and record.node and record.attempt, record
    generations = store.read_table(manifest, "generations", GENERATION_SCHEMA)
    assert set(generations.column("codebook_version").to_pylist()) == {0}
    evals = store.read_table(manifest, "eval", GENERATION_SCHEMA)
    assert set(evals.column("codebook_version").to_pylist()) == {1}
    artifact = store.read_codebook(1)[1]
    assert artifact.parent_version == 0
    if artifact.params.get("finetune_steps"):  # a fine-tuning that ran reported checkpoints: they live here
        names = [name.rsplit("/", 1)[-1] for name in store.fs.ls(f"{s3_bucket}/runs/one/trainer")]
        assert "iter=0001" in names, names
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in store.read_text("config.yaml")
