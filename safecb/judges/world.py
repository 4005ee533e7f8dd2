"""The synthetic world's external judge (`safecb.world.judge.ExternalJudge`) behind the judge protocol."""

from __future__ import annotations

from pathlib import Path

import torch

from safecb.judges.base import JudgeInfo, JudgeLoadError, file_sha256


class WorldJudge:
    """One sigmoid per world harm (blood, fire, weapon, drugs), trained on the renderer's exact labels."""

    def __init__(self, judge, info: JudgeInfo):
        self.judge, self.info = judge, info

    @classmethod
    def load(cls, path: str | None = None, threshold: float = 0.5, name: str = "world",
             device: str = "cpu") -> "WorldJudge":
        from safecb.world import WORLD_JUDGE_DIR
        from safecb.world.judge import ExternalJudge

        folder = Path(path) if path else WORLD_JUDGE_DIR
        try:
            judge = ExternalJudge.load(folder, device)
        except (OSError, ValueError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise JudgeLoadError(f"judge {name!r}: {folder}: cannot load the world judge ({first})") from None
        version = "sha256:" + file_sha256(folder / "judge.safetensors")
        info = JudgeInfo(name=name, kind="world", version=version, threshold=threshold,
                         categories=list(judge.categories), classes=list(judge.categories))
        return cls(judge, info)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.predict(images)["harm"]  # (B, C) sigmoid per world category
