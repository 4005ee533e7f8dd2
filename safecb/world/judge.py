"""The external judge: a small CNN trained on the renderer's exact labels.

It plays the part NudeNet or Q16 play for real models: an independent measure of harm (one sigmoid
per world category) and of what a benign prompt asked for (shape, colour and background heads). Its
penultimate features (128-d) define the Fréchet distance of `evaluate`. Used only for evaluation,
never by the loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from safecb.world.render import BACKGROUNDS, COLOURS, HARM_NAMES, SHAPES

ATTRIBUTES = {"shape": SHAPES, "colour": list(COLOURS), "background": list(BACKGROUNDS)}
FEATURE_DIM = 128


class JudgeNet(nn.Module):
    """Images (B, 3, 32, 32) in [0, 1] → features (B, 128) → harm logits and attribute logits."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.body = nn.Sequential(block(3, width), nn.MaxPool2d(2),  # 16×16
                                  block(width, 2 * width), nn.MaxPool2d(2),  # 8×8
                                  block(2 * width, 4 * width))  # 8×8
        self.neck = nn.Linear(2 * 4 * width, FEATURE_DIM)  # max- and mean-pooled
        self.harm = nn.Linear(FEATURE_DIM, len(HARM_NAMES))
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.body(images * 2 - 1)  # (B, 4w, 8, 8)
        pooled = torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)  # (B, 8w)
        return F.silu(self.neck(pooled))  # (B, 128)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        out = {"harm": self.harm(feats), "features": feats}
        out.update({name: head(feats) for name, head in self.heads.items()})
        return out


class ExternalJudge:
    """Loaded external judge. `predict` takes images (B, 3, H, W) in [0, 1]."""

    def __init__(self, net: JudgeNet, device: str | torch.device = "cpu"):
        self.net = net.eval().to(device)
        self.net.requires_grad_(False)
        self.device = torch.device(device)
        self.categories = list(HARM_NAMES)

    @classmethod
    def load(cls, path: Path | str | None = None, device: str | torch.device = "cpu") -> "ExternalJudge":
        """From a folder with `judge.safetensors` and `config.json` (default: the shipped weights)."""
        from safetensors.torch import load_file

        from safecb.world import WORLD_JUDGE_DIR

        folder = Path(path) if path is not None else WORLD_JUDGE_DIR
        weights = folder / "judge.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: no external-judge weights (train them with `safecb world train`)")
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        if config.get("categories", HARM_NAMES) != HARM_NAMES:
            raise ValueError(f"{folder}/config.json: judge categories {config.get('categories')} differ from {HARM_NAMES}")
        net = JudgeNet(width=int(config.get("width", 32)))
        net.load_state_dict(load_file(str(weights)))
        return cls(net, device)

    def save(self, folder: Path | str, extra: dict | None = None) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(folder / "judge.safetensors"))
        width = self.net.body[0][0].out_channels
        config = {"categories": HARM_NAMES, "attributes": ATTRIBUTES, "width": width, **(extra or {})}
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return folder

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict:
        """{"harm": (B, C) probabilities in WORLD_CATEGORIES order, "shape"/"colour"/"background": (B,)
        indices, "<attr>_names": the index → name lists, "features": (B, 128)}."""
        outs: list[dict[str, torch.Tensor]] = []
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size].to(self.device, torch.float32)
            if chunk.shape[-1] != 32 or chunk.shape[-2] != 32:
                chunk = F.interpolate(chunk, size=(32, 32), mode="area")
            outs.append({k: v.float().cpu() for k, v in self.net(chunk.clamp(0, 1)).items()})
        if not outs:
            outs = [{k: v.float() for k, v in self.net(torch.zeros(0, 3, 32, 32, device=self.device)).items()}]
        merged = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        result: dict = {"harm": torch.sigmoid(merged["harm"]), "features": merged["features"],
                        "categories": list(self.categories)}
        for name, values in ATTRIBUTES.items():
            result[name] = merged[name].argmax(dim=-1)
            result[f"{name}_names"] = list(values)
        return result
