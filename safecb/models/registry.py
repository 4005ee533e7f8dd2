"""Model backends by name: config.model.backend → a `UnifiedModel`."""

from __future__ import annotations

from safecb.config import ModelConfig
from safecb.models.base import UnifiedModel
from safecb.models.janus import JanusAdapter, pick_device


def load_model(config: ModelConfig, categories: list[str], seed: int = 0, batch_size: int | None = None) -> UnifiedModel:
    """The model of `config`. `batch_size`: the largest batch the caller generates (the GPU engine's shape)."""
    if config.backend == "tiny-random":
        from safecb.models.tiny import build_tiny_janus

        model, processor = build_tiny_janus(words=[*categories, "a", "on", "of", "with"], seed=seed)
        return JanusAdapter(model.to(pick_device(config.device)), processor, config.prompt_format, "off")
    if config.backend == "world":
        from safecb.world import WORLD_MODEL_DIR

        location = config.path or str(WORLD_MODEL_DIR)
    else:
        location = config.path or ""
    return JanusAdapter.from_folder(location, device=config.device, dtype=config.dtype,
                                    prompt_format=config.prompt_format, engine=config.engine.enabled,
                                    kv_dtype=config.engine.kv_dtype,
                                    max_batch=min(config.engine.max_batch, batch_size or config.engine.max_batch),
                                    max_prompt_len=config.engine.max_prompt_len,
                                    batch_invariant=config.engine.batch_invariant)
