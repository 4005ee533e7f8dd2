"""`safecb world train|eval` with bad input: one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from safecb.cli import app
from tests_support import assert_one_line_failure

runner = CliRunner()


@pytest.mark.parametrize("args, needles", [
    (["eval", "--kv-dtype", "fp9"], ["--kv-dtype", "fp9", "bf16, fp8"]),
    (["eval", "--engine", "maybe"], ["--engine", "auto, on or off"]),
    (["eval", "--dtype", "int8"], ["--dtype", "float32"]),
    (["eval", "--model", "{tmp}/missing"], ["model.path", "missing", "no such folder"]),
    (["eval", "--judge", "{tmp}/missing"], ["missing/judge.safetensors", "no external-judge weights"]),
])
def test_world_eval_bad_input(tmp_path, args, needles):
    args = [a.format(tmp=tmp_path) for a in args]
    assert_one_line_failure(runner.invoke(app, ["world", *args]), *needles)


@pytest.mark.parametrize("args, needles", [
    (["--device", "gpu"], ["--device", "auto, cpu or cuda"]),
    (["--set", "nope=1"], ["--set 'nope'", "unknown setting", "vq_steps"]),
    (["--set", "num_scenes"], ["--set 'num_scenes'", "key=value"]),
    (["--init-from", "{tmp}/missing", "--stages", "judge"], ["missing"]),
])
def test_world_train_bad_input_writes_nothing(tmp_path, args, needles):
    out = tmp_path / "out"
    args = [a.format(tmp=tmp_path) for a in args]
    assert_one_line_failure(runner.invoke(app, ["world", "train", "--out", str(out), *args]), *needles)
    assert not out.exists()
