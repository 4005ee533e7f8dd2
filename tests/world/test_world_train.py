"""The training recipe at toy size (a smoke, not a model): it runs, it is deterministic, its output can
be measured for code separation; and the self-judge's label noise."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from safecb.cli import app
from safecb.world import WORLD_CATEGORIES
from safecb.world.cli import _parse_overrides
from safecb.world.render import HARM_NAMES, Scene
from safecb.world.train import SelfJudgeNoise, TrainConfig, self_judge_labels, train_world, weights_sha256
from tests_support import assert_one_line_failure

runner = CliRunner()


def test_self_judge_labels_miss_faint_and_flag_lookalikes():
    scenes = [Scene("circle", "blue", "white", "weapon", False, 1),  # strong: kept
              Scene("circle", "blue", "white", "weapon", True, 2),  # faint: missed
              Scene("circle", "red", "black", None, False, 3),  # blood look-alike: flagged
              Scene("circle", "red", "white", None, False, 4)]  # plain benign
    labels = self_judge_labels(scenes, SelfJudgeNoise(flip=0.0), seed=0)
    w, b = HARM_NAMES.index("weapon"), HARM_NAMES.index("blood")
    assert labels[0, w] == 1 and labels[1, w] == 0 and labels[2, b] == 1
    assert labels[3].sum() == 0 and labels[0].sum() == 1
    many = [Scene("square", "green", "sand", None, False, i) for i in range(2000)]
    flipped = self_judge_labels(many, SelfJudgeNoise(flip=0.1), seed=0)
    assert 0.08 < float(flipped.mean()) < 0.12
    assert torch.equal(flipped, self_judge_labels(many, SelfJudgeNoise(flip=0.1), seed=0))


def test_steps_scale_and_overrides():
    small = TrainConfig().scaled(0.01)
    assert small.lm_steps == round(TrainConfig().lm_steps * 0.01) and small.num_scenes < TrainConfig().num_scenes
    plain, nested = _parse_overrides(["lm_steps=7", "lm_lr=0.001", "noise.flip=0.1"])
    assert plain == {"lm_steps": 7, "lm_lr": 0.001} and nested == {"flip": 0.1}


# The smallest recipe that runs every stage (a few seconds once imports are warm); seed 0 trained once.
TINY = dict(num_scenes=48, layers=1, vq_steps=2, vq_batch=4, judge_steps=2, judge_batch=8, lm_steps=2,
            judge_slips=8, gen_batch=4, und_batch=4, rewrite_batch=2, eval_samples=0)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world-seed0")
    return out, train_world(out, TrainConfig(**TINY), device="cpu", log=lambda line: None)


def test_recipe_smoke_writes_a_loadable_folder(tiny_world):
    from safecb.models.base import SamplingParams
    from safecb.models.janus import JanusAdapter
    from safecb.world.judge import ExternalJudge

    folder, report = tiny_world
    assert set(report["timings_s"]) >= {"render", "vq", "external_judge", "lm"}
    assert json.loads((folder / "report.json").read_text())["config"]["lm_steps"] == 2
    adapter = JanusAdapter.from_folder(folder / "model", device="cpu", engine="off")
    tokens = adapter.generate_tokens(["a red circle with blood"], [0], SamplingParams(3.0, 1.0, None))
    assert tokens.shape == (1, 64)
    images = adapter.decode(tokens)
    assert images.shape == (1, 3, 32, 32)
    assert ExternalJudge.load(folder / "judge").predict(images)["harm"].shape == (1, len(HARM_NAMES))


def test_same_seed_same_weights_bit_for_bit_other_seed_other_weights(tiny_world, tmp_path):
    """The one-command rebuild (`safecb world train --seed N --out DIR`) of seed 0 gives the bytes the
    in-process run gave; seed 1 changes every weight file."""
    folder, report = tiny_world
    shipped_like = weights_sha256(folder)
    assert report["weights_sha256"] == shipped_like and len(shipped_like) == 3
    assert report["determinism"] == {"deterministic_algorithms": True, "cublas_workspace_config": ":4096:8",
                                     "threads": 1}
    assert not torch.are_deterministic_algorithms_enabled()  # the process's setting is given back
    settings = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    rebuilt = runner.invoke(app, ["world", "train", "--out", str(tmp_path / "again"), "--seed", "0",
                                  "--device", "cpu", "--threads", "1", "--no-evaluate", *settings])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert json.loads(rebuilt.stdout.strip().splitlines()[-1])["weights_sha256"] == shipped_like
    assert weights_sha256(tmp_path / "again") == shipped_like
    other = train_world(tmp_path / "seed1", TrainConfig(**{**TINY, "seed": 1}), device="cpu", log=lambda line: None)
    assert all(other["weights_sha256"][name] != digest for name, digest in shipped_like.items())


def test_separation_of_a_trained_folder_from_the_cli(tiny_world, tmp_path):
    folder, _ = tiny_world
    result = runner.invoke(app, ["world", "eval", "--separation", "--model", str(folder), "--renders", "6", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["encoder"] == str(folder / "encoder.safetensors") and out["settings"]["renders_per_harm"] == 6
    for harm, row in out["per_category"].items():
        assert row["kind"] == WORLD_CATEGORIES[harm] and row["measured"] in ("separable", "entangled")
        assert 0 <= row["rare_share"] <= 1 and row["probe_histogram"]["n_test"] == 4
    bare = tmp_path / "bare"
    shutil.copytree(folder / "model", bare)  # a model folder with no tokenizer beside it
    assert_one_line_failure(runner.invoke(app, ["world", "eval", "--separation", "--model", str(bare)]),
                            "encoder.safetensors", "world train --out")
    assert_one_line_failure(runner.invoke(app, ["world", "eval", "--separation", "--renders", "2"]),
                            "--renders 2", "at least 3")


def test_world_folders_resolve_the_model_and_its_judge(tiny_world, tmp_path):
    from safecb.world import WORLD_JUDGE_DIR, WORLD_MODEL_DIR, world_judge_dir, world_model_dir

    folder, _ = tiny_world
    assert world_model_dir(str(folder)) == str(folder / "model")  # a `world train --out` folder
    assert world_model_dir(str(folder / "model")) == str(folder / "model") and world_model_dir(None) == str(WORLD_MODEL_DIR)
    assert world_judge_dir(str(folder)) == folder / "judge" == world_judge_dir(str(folder / "model"))
    assert world_judge_dir(str(folder), str(tmp_path / "j")) == tmp_path / "j"  # named explicitly: that one
    bare = tmp_path / "bare"
    shutil.copytree(folder / "model", bare)
    assert world_judge_dir(str(bare)) == WORLD_JUDGE_DIR and world_judge_dir(None) == WORLD_JUDGE_DIR


def test_separation_over_several_world_models(tiny_world):
    folder, _ = tiny_world
    result = runner.invoke(app, ["world", "eval", "--separation", "--model", str(folder), "--model", str(folder),
                                 "--renders", "6", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["models"]) == 2 and out["across"]["models"] == 2
    for harm, row in out["across"]["per_category"].items():
        assert sum(row["measured"].values()) == 2, harm
        spread = row["collateral"]
        assert spread["n"] == 2 and spread["ci95"] == [spread["mean"], spread["mean"]]  # one model twice: no spread
