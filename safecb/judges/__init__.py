"""External judges: images → per-category probabilities, for measuring only (never for deciding).

`Judge` is the protocol (`predict(images) -> (B, C)` and a `JudgeInfo` that records name, version,
threshold, categories and classes); `build_judges(config)` loads `eval.external_judges`. Kinds:
the world's judge, NudeNet (from its pip package), any local Hugging Face image classifier.
"""

from safecb.judges.base import Judge, JudgeInfo, JudgeLoadError
from safecb.judges.registry import build_judge, build_judges, judge_specs

__all__ = ["Judge", "JudgeInfo", "JudgeLoadError", "build_judge", "build_judges", "judge_specs"]
