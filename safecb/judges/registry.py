"""Judges by kind: `eval.external_judges` (and the world's judge on the world model) → loaded judges."""

from __future__ import annotations

from safecb.config import ExternalJudgeSpec, RunConfig
from safecb.judges.base import Judge, JudgeLoadError


def build_judge(spec: ExternalJudgeSpec, device: str = "cpu") -> Judge:
    """Load one judge; any failure is a one-line `JudgeLoadError`."""
    name = spec.judge_name
    if spec.kind == "world":
        from safecb.judges.world import WorldJudge

        return WorldJudge.load(spec.path, 0.5 if spec.threshold is None else spec.threshold, name, device)
    if spec.kind == "nudenet":
        from safecb.judges.nudenet import DEFAULT_THRESHOLD, NudeNetJudge

        return NudeNetJudge.load(spec.classes, DEFAULT_THRESHOLD if spec.threshold is None else spec.threshold,
                                 spec.category, name)
    if spec.kind == "hf_classifier":
        from safecb.judges.hf_classifier import ClassifierFolderJudge

        return ClassifierFolderJudge.load(spec.path or "", spec.labels, 0.5 if spec.threshold is None else spec.threshold,
                                          name, device)
    raise JudgeLoadError(f"judge {name!r}: unknown kind {spec.kind!r} (expected world, nudenet or hf_classifier)")


def judge_specs(config: RunConfig) -> list[ExternalJudgeSpec]:
    """The run's external judges: `eval.external_judges`, with the world's judge first on the world
    model (unless `eval.external_judge` is off or a world judge is listed already)."""
    specs = list(config.eval.external_judges)
    world_wanted = config.model.backend == "world" and config.eval.external_judge
    if world_wanted and not any(s.kind == "world" for s in specs):
        from safecb.world import world_judge_dir

        judge_dir = world_judge_dir(config.model.path, config.eval.external_judge_path)
        specs.insert(0, ExternalJudgeSpec(kind="world", path=str(judge_dir)))
    names = [s.judge_name for s in specs]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise JudgeLoadError(f"eval.external_judges: judge names {duplicated} repeat (give each a distinct 'name')")
    return specs


def build_judges(config: RunConfig, device: str = "cpu") -> list[Judge]:
    return [build_judge(spec, device) for spec in judge_specs(config)]
