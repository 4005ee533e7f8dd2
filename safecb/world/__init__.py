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

# Category name → "separable" (primitives of its own) | "entangled" (shares primitives with benign content).
WORLD_CATEGORIES: dict[str, str] = dict(HARMS)


def world_lexicon() -> dict[str, str]:
    """Harm word → safe replacement, explicit nouns and implicit places, for the pairing fallback.

    Keys are whole words; none is a substring of another key or of a benign word, so plain
    substring replacement is safe too.
    """
    from safecb.world.prompts import SAFE_SWAP

    return dict(SAFE_SWAP)


__all__ = ["WORLD_MODEL_DIR", "WORLD_JUDGE_DIR", "WORLD_CATEGORIES", "world_lexicon"]
