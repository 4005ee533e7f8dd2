"""The training recipe at toy size (a smoke, not a model), and the self-judge's label noise."""

from __future__ import annotations

import json

import torch

from safecb.world.cli import _parse_overrides
from safecb.world.render import HARM_NAMES, Scene
from safecb.world.train import SelfJudgeNoise, TrainConfig, self_judge_labels, train_world


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


def test_recipe_smoke_writes_a_loadable_folder(tmp_path):
    from safecb.models.base import SamplingParams
    from safecb.models.janus import JanusAdapter
    from safecb.world.judge import ExternalJudge

    cfg = TrainConfig(num_scenes=48, layers=1, vq_steps=2, vq_batch=4, judge_steps=2, judge_batch=8, lm_steps=2,
                      judge_slips=8, gen_batch=4, und_batch=4, rewrite_batch=2, eval_samples=0)
    report = train_world(tmp_path, cfg, device="cpu", log=lambda line: None)
    assert set(report["timings_s"]) >= {"render", "vq", "external_judge", "lm"}
    assert json.loads((tmp_path / "report.json").read_text())["config"]["lm_steps"] == 2
    adapter = JanusAdapter.from_folder(tmp_path / "model", device="cpu", engine="off")
    tokens = adapter.generate_tokens(["a red circle with blood"], [0], SamplingParams(3.0, 1.0, None))
    assert tokens.shape == (1, 64)
    images = adapter.decode(tokens)
    assert images.shape == (1, 3, 32, 32)
    assert ExternalJudge.load(tmp_path / "judge").predict(images)["harm"].shape == (1, len(HARM_NAMES))
