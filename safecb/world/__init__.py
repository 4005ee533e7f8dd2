"""The synthetic safety world: a renderer with exact labels, templated prompts, a tiny Janus trained
on it (the embedded default model), and an external judge used only for evaluation.

See MODEL_CARD.md beside this file for how the shipped weights were made and what they measure.
"""

from __future__ import annotations

from pathlib import Path

from safecb.world.render import HARMS

WEIGHTS_DIR = Path(__file__).parent / "weights"
WORLD_MODEL_DIR = WEIGHTS_DIR / "model"  # a Hugging Face Janus folder (safetensors)
WORLD_JUDGE_DIR = WEIGHTS_DIR / "judge"  # the external judge (safetensors + config.json)

# Category name → "separable" (owns codes) | "entangled" (its codes carry benign content too), as measured.
WORLD_CATEGORIES: dict[str, str] = dict(HARMS)


def world_model_dir(path: str | None) -> str:
    """The model folder of a world: the shipped one (no path), a `safecb world train --out` folder
    (its model/ inside), or a model folder itself."""
    if not path:
        return str(WORLD_MODEL_DIR)
    inside = Path(path) / "model"
    return str(inside) if inside.is_dir() else path


def world_judge_dir(model_path: str | None, judge_path: str | None = None) -> Path:
    """The external judge that measures a world: `judge_path` when given; else the judge/ that
    `safecb world train --out` wrote beside the model (each world model is measured by its own judge);
    else the shipped one. Every world judge is trained on the same renderer's exact labels."""
    if judge_path:
        return Path(judge_path)
    if model_path:
        model = Path(world_model_dir(model_path))
        for candidate in (model / "judge", model.parent / "judge"):
            if (candidate / "judge.safetensors").is_file():
                return candidate
    return WORLD_JUDGE_DIR


def world_encoder_path(model_path: str | None) -> Path | None:
    """The patch-local tokenizer of a world (`encoder.safetensors`): the shipped one (no path), else the
    one `safecb world train --out` wrote beside model/ (or inside it); None when that folder has none."""
    if not model_path:
        return WEIGHTS_DIR / "encoder.safetensors"
    model = Path(world_model_dir(model_path))
    return next((p for p in (model / "encoder.safetensors", model.parent / "encoder.safetensors") if p.is_file()), None)


def world_lexicon() -> dict[str, str]:
    """Harm word → safe replacement, explicit nouns and implicit places, for the pairing fallback.

    Keys are whole words; none is a substring of another key or of a benign word, so plain
    substring replacement is safe too.
    """
    from safecb.world.prompts import SAFE_SWAP

    return dict(SAFE_SWAP)


__all__ = ["WORLD_MODEL_DIR", "WORLD_JUDGE_DIR", "WORLD_CATEGORIES", "world_encoder_path", "world_judge_dir",
           "world_lexicon", "world_model_dir"]
