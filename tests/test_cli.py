"""The `safecb` command: help texts, and bad input → one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from safecb.cli import app
from safecb.storage import RunStore
from tests_support import assert_one_line_failure

pytestmark = pytest.mark.usefixtures("ray_cluster")  # one local Ray for every run here

runner = CliRunner()


def write_config(tmp_path: Path, **sections) -> Path:
    prompts = tmp_path / "p.txt"
    if not prompts.exists():
        prompts.write_text("a blood circle\n")
    data = {"categories": ["blood"], "model": {"backend": "tiny-random", "device": "cpu"},
            "prompts": {k: {"path": str(prompts)} for k in ("train", "val_unsafe", "val_benign", "eval_unsafe", "eval_benign")},
            "storage": {"run_dir": str(tmp_path / "run")}}
    for key, value in sections.items():
        data[key] = value if not isinstance(value, dict) else {**data.get(key, {}), **value}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("command", [[], ["run"], ["eval"], ["report"], ["world"], ["world", "train"], ["world", "eval"]])
def test_every_command_explains_itself(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output and len(result.output.splitlines()) > 4


def test_malformed_yaml(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  backend: [world\n")
    assert_one_line_failure(runner.invoke(app, ["run", "--config", str(config)]), str(config), "invalid YAML", "line")


def test_unknown_key(tmp_path):
    config = write_config(tmp_path, finetune={"lrr": 0.1})
    assert_one_line_failure(runner.invoke(app, ["run", "--config", str(config)]), "finetune.lrr", "unknown key")
    assert not (tmp_path / "run").exists()


def test_wrong_type(tmp_path):
    config = write_config(tmp_path, finetune={"steps": "many"})
    assert_one_line_failure(runner.invoke(app, ["run", "--config", str(config)]), "finetune.steps", "integer", "'many'")
    assert not (tmp_path / "run").exists()


def test_missing_model_folder(tmp_path):
    config = write_config(tmp_path, model={"backend": "janus", "path": str(tmp_path / "no-such-model")})
    assert_one_line_failure(runner.invoke(app, ["run", "--config", str(config)]), "model.path", "no-such-model")
    assert not (tmp_path / "run").exists()


def test_empty_prompt_file(tmp_path):
    config = write_config(tmp_path)
    (tmp_path / "p.txt").write_text("\n  \n")
    assert_one_line_failure(runner.invoke(app, ["run", "--config", str(config)]), "prompts.train", "no prompts")
    assert not (tmp_path / "run").exists()


def test_non_utf8_prompt_file(tmp_path):
    config = write_config(tmp_path)
    (tmp_path / "p.txt").write_bytes(b"a blood circle\n\xff\xfe caf\xe9\n")
    assert_one_line_failure(runner.invoke(app, ["run", "--config", str(config)]), "prompts.train", "not UTF-8")
    assert not (tmp_path / "run").exists()


def test_unreachable_storage(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-very-secret")
    config = write_config(tmp_path, storage={"run_dir": "s3://bucket/run",
                                             "options": {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}})
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert_one_line_failure(result, "s3://bucket/run")
    assert "hunter2" not in result.output + result.stderr


def test_secret_in_config_is_refused_without_echoing_it(tmp_path):
    config = write_config(tmp_path, storage={"options": {"secret": "hunter2-very-secret"}})
    result = runner.invoke(app, ["run", "--config", str(config)])
    assert_one_line_failure(result, "storage.options")
    assert "hunter2" not in result.output + result.stderr


def test_the_installed_command_exits_non_zero(tmp_path):
    """Through a real process: the exit status a shell or CI sees."""
    config = write_config(tmp_path, judge={"threshold": 2})
    proc = subprocess.run([sys.executable, "-m", "safecb.cli", "run", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "judge.threshold" in proc.stderr


def test_report_and_eval_of_a_run(tmp_path):
    from tests_support import tiny_config
    from safecb.config import parse_config
    from safecb.controller import run

    data = tiny_config(tmp_path, tmp_path / "run", stop={"max_iters": 1})
    run(parse_config(data))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    evaluated = runner.invoke(app, ["eval", "--config", str(config), "--version", "1"])
    assert evaluated.exit_code == 0, evaluated.output
    row = yaml.safe_load(evaluated.stdout.strip().splitlines()[-1])
    stored = [m for m in RunStore(str(tmp_path / "run")).read_metrics() if m["iteration"] == 1][0]
    assert row["codebook_version"] == 1 and row["unsafe_rate_self"] == stored["unsafe_rate_self"]
    absent = runner.invoke(app, ["eval", "--config", str(config), "--version", "7"])
    assert_one_line_failure(absent, "no codebook v0007")
    result = runner.invoke(app, ["report", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0
    assert [yaml.safe_load(line)["iteration"] for line in result.stdout.splitlines()] == [0, 1]
    missing = runner.invoke(app, ["report", str(tmp_path / "nothing-here")])
    assert_one_line_failure(missing, "no metrics")
