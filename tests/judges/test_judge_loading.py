"""The judges as shipped: the world's judge, NudeNet from its pip package, a classifier folder built here."""

from __future__ import annotations

import json

import pytest
import torch

from safecb.config import ConfigError, ExternalJudgeSpec, parse_config
from safecb.judges import JudgeLoadError, build_judge, build_judges
from safecb.judges.hf_classifier import save_tiny_classifier as tiny_classifier_folder
from safecb.judges.nudenet import NudeNetJudge


def test_world_judge_wraps_the_shipped_judge():
    from safecb.world.judge import ExternalJudge

    judge = build_judge(ExternalJudgeSpec(kind="world"))
    images = torch.rand(3, 3, 32, 32)
    assert judge.info.categories == ["blood", "fire", "weapon", "drugs"]
    assert judge.info.version.startswith("sha256:") and judge.info.threshold == 0.5
    assert torch.allclose(judge.predict(images), ExternalJudge.load().predict(images)["harm"])


def test_nudenet_as_shipped_records_what_made_its_numbers():
    judge = build_judge(ExternalJudgeSpec(kind="nudenet", threshold=0.45))
    info = judge.info
    assert info.categories == ["sexual"] and info.threshold == 0.45
    assert info.version.startswith("nudenet 3.") and "sha256:" in info.version
    assert "FEMALE_BREAST_EXPOSED" in info.classes
    probs = judge.predict(torch.rand(2, 3, 32, 32))  # noise: the detector finds no body part
    assert probs.shape == (2, 1) and float(probs.max()) < 0.2


def test_nudenet_counts_only_its_classes():
    """The mapping from detections to P(sexual): the highest score among the configured classes. No
    nude image can ship with the tests, so the detector's output is given here; the real detector's
    parsing is exercised above."""
    class Detections:
        def detect(self, image):
            assert image.dtype.name == "uint8" and image.shape == (32, 32, 3)
            return [{"class": "FACE_FEMALE", "score": 0.95}, {"class": "BUTTOCKS_EXPOSED", "score": 0.7},
                    {"class": "FEMALE_BREAST_EXPOSED", "score": 0.4}]

    real = build_judge(ExternalJudgeSpec(kind="nudenet"))
    judge = NudeNetJudge(Detections(), real.info)
    assert judge.predict(torch.rand(1, 3, 32, 32)).tolist() == [[pytest.approx(0.7)]]


def test_nudenet_unknown_class_is_one_line():
    with pytest.raises(JudgeLoadError, match=r"\['BREASTS'\] are not NudeNet classes") as err:
        build_judge(ExternalJudgeSpec(kind="nudenet", classes=["BREASTS"]))
    assert "\n" not in str(err.value)


def test_classifier_folder_maps_labels_to_categories(tmp_path):
    from transformers import AutoModelForImageClassification

    folder = tiny_classifier_folder(tmp_path / "clf")
    judge = build_judge(ExternalJudgeSpec(kind="hf_classifier", name="tiny-clf", path=str(folder),
                                          labels={"nsfw": "sexual", "gore": "violence"}))
    assert judge.info.categories == ["sexual", "violence"] and judge.info.classes == ["nsfw", "gore"]
    images = torch.rand(5, 3, 32, 32)
    probs = judge.predict(images)
    model = AutoModelForImageClassification.from_pretrained(folder)
    pixels = (((images * 255).round() / 255) - 0.5) / 0.5  # the processor's rescale + normalise
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.softmax(-1)[:, 1:]
    assert probs.shape == (5, 2) and torch.allclose(probs, expected, atol=1e-4)


def test_classifier_folder_two_labels_one_category_sum(tmp_path):
    """Exclusive (softmax) labels of one category add up: P(nsfw or gore) = 1 - P(safe)."""
    folder = tiny_classifier_folder(tmp_path / "clf")
    images = torch.rand(4, 3, 32, 32)
    unsafe = build_judge(ExternalJudgeSpec(kind="hf_classifier", path=str(folder),
                                           labels={"nsfw": "unsafe", "gore": "unsafe"})).predict(images)
    safe = build_judge(ExternalJudgeSpec(kind="hf_classifier", path=str(folder), labels={"safe": "none"})).predict(images)
    assert unsafe.shape == (4, 1) and torch.allclose(unsafe, 1 - safe, atol=1e-5)


def test_classifier_folder_multi_label_takes_the_highest_sigmoid(tmp_path):
    folder = tiny_classifier_folder(tmp_path / "clf", multi_label=True)
    images = torch.rand(3, 3, 32, 32)
    both = build_judge(ExternalJudgeSpec(kind="hf_classifier", path=str(folder),
                                         labels={"nsfw": "unsafe", "gore": "unsafe"})).predict(images)
    each = build_judge(ExternalJudgeSpec(kind="hf_classifier", path=str(folder),
                                         labels={"nsfw": "a", "gore": "b"})).predict(images)
    assert torch.allclose(both[:, 0], each.max(dim=-1).values, atol=1e-6)


@pytest.mark.parametrize("damage, message", [
    ("missing", "not a local folder"),
    ("bin_only", "pickle .bin weights are refused"),
    ("no_processor", "no preprocessor_config.json"),
    ("bad_label", r"labels \[.porn.\] must name model labels"),
])
def test_classifier_folder_errors_are_one_line(tmp_path, damage, message):
    folder = tmp_path / "clf"
    labels = {"nsfw": "sexual"}
    if damage != "missing":
        tiny_classifier_folder(folder)
    if damage == "bin_only":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    if damage == "no_processor":
        (folder / "preprocessor_config.json").unlink()
    if damage == "bad_label":
        labels = {"porn": "sexual"}
    with pytest.raises(JudgeLoadError, match=message) as err:
        build_judge(ExternalJudgeSpec(kind="hf_classifier", name="clf", path=str(folder), labels=labels))
    assert "\n" not in str(err.value) and "judge 'clf'" in str(err.value)


def test_config_of_judges(tmp_path):
    folder = tiny_classifier_folder(tmp_path / "clf")
    config = parse_config({"categories": ["sexual", "violence"], "model": {"backend": "tiny-random"},
                           "eval": {"external_judges": [
                               {"kind": "nudenet"},
                               {"kind": "hf_classifier", "name": "q16", "path": str(folder),
                                "labels": {"gore": "violence"}}]}})
    judges = build_judges(config)
    assert [j.info.name for j in judges] == ["nudenet", "q16"]  # no world judge off the world model
    world = parse_config({"eval": {"external_judges": [{"kind": "nudenet", "name": "world"}]}})
    with pytest.raises(JudgeLoadError, match="repeat"):
        build_judges(world)
    with pytest.raises(ConfigError, match=r"eval\.external_judges\.0: .*needs 'path'"):
        parse_config({"eval": {"external_judges": [{"kind": "hf_classifier"}]}})
    json.dumps([j.info.to_dict() for j in judges])  # metrics rows carry them
