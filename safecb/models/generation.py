"""The plain (portable) image-token generation loop for Janus, with per-sample seeds.

Same algorithm as `JanusForConditionalGeneration.generate(generation_mode="image")` — conditional and
unconditional rows in one batch, CFG mixing `uncond + w (cond − uncond)`, next-token embeddings from
the generation table — with two differences that the Safe-CB loop needs:
  * sampling draws from `safecb.models.sampling`, so a sample depends on its seed, not its batch;
  * positions follow the attention mask, so left padding does not shift a prompt's positions.
With greedy decoding and an unpadded batch it yields exactly HF's tokens (tested). The fast GPU path
(`safecb.models.engine`) implements the same contract with a static cache and a CUDA graph.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from safecb.models.base import SamplingParams
from safecb.models.sampling import cfg_logits, sample_tokens


def cfg_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_id: int, boi_id: int, pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack conditional rows over unconditional ones: (2B, T) ids and mask.

    The unconditional prompt keeps only BOS and BOI and pads every other token, as HF does.
    """
    uncond = input_ids.clone()
    keep = (uncond == bos_id) | (uncond == boi_id)
    uncond[~keep] = pad_id
    return torch.cat([input_ids, uncond]), torch.cat([attention_mask, attention_mask])


@torch.no_grad()
def generate_image_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    seeds: torch.Tensor,
    params: SamplingParams,
    num_image_tokens: int,
    bos_id: int,
    boi_id: int,
    pad_id: int,
) -> torch.Tensor:
    """Image tokens (B, N) for left-padded prompts input_ids (B, T) ending in BOI, seeds (B,) int64."""
    batch = input_ids.shape[0]
    ids, mask = cfg_batch(input_ids, attention_mask, bos_id, boi_id, pad_id)  # (2B, T)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (2B, T)
    embeds = model.get_input_embeddings()(ids)  # (2B, T, H)
    language_model = model.model.language_model
    cache = DynamicCache(config=model.config.text_config)
    out = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    tokens = torch.empty(batch, num_image_tokens, dtype=torch.long, device=input_ids.device)
    seeds = seeds.to(input_ids.device)
    last_position = positions[:, -1:]  # (2B, 1)
    for step in range(num_image_tokens):
        logits = model.model.generation_head(out.last_hidden_state[:, -1, :]).float()  # (2B, V)
        cond, uncond = logits[:batch], logits[batch:]
        guided = cfg_logits(cond, uncond, params.guidance)  # (B, V)
        next_token = sample_tokens(guided, seeds, step, params.temperature, params.top_k)  # (B,)
        tokens[:, step] = next_token
        if step == num_image_tokens - 1:
            break
        step_embeds = model.prepare_embeddings_for_image_generation(torch.cat([next_token, next_token])[:, None])
        mask = torch.cat([mask, mask.new_ones(2 * batch, 1)], dim=1)
        last_position = last_position + 1
        out = language_model(inputs_embeds=step_embeds, attention_mask=mask, position_ids=last_position,
                             cache=out.cache if hasattr(out, "cache") else out.past_key_values, use_cache=True)
    return tokens


@torch.no_grad()
def counterpart_tokens(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    forced: torch.Tensor,
    seeds: torch.Tensor,
    params: SamplingParams,
    bos_id: int,
    boi_id: int,
    pad_id: int,
) -> torch.Tensor:
    """Position-aligned counterpart (B, N): what the prompt would draw at each position of `forced`.

    One teacher-forced pass: the context at step i is the prompt plus forced[:, :i] (the harmful
    grid), and the token at i is drawn with the same seed noise as step i of a free sample. Where the
    new prompt agrees with the old grid the token stays; where it does not (the harm), it changes —
    so the pair differs at the harm and not everywhere after the first divergence, as a free
    same-seed resample does (autoregressive drift).
    """
    batch, num_tokens = forced.shape
    ids, mask = cfg_batch(input_ids, attention_mask, bos_id, boi_id, pad_id)  # (2B, T)
    prompt_embeds = model.get_input_embeddings()(ids)  # (2B, T, H)
    image_embeds = model.prepare_embeddings_for_image_generation(torch.cat([forced, forced])[:, :-1])  # (2B, N-1, H)
    embeds = torch.cat([prompt_embeds, image_embeds.to(prompt_embeds.dtype)], dim=1)
    full_mask = torch.cat([mask, mask.new_ones(2 * batch, num_tokens - 1)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=full_mask,
                                        position_ids=positions).last_hidden_state  # (2B, T+N-1, H)
    logits = model.model.generation_head(hidden[:, ids.shape[1] - 1:]).float()  # (2B, N, V)
    guided = cfg_logits(logits[:batch], logits[batch:], params.guidance)  # (B, N, V)
    seeds = seeds.to(forced.device)
    return torch.stack([sample_tokens(guided[:, i], seeds, i, params.temperature, params.top_k)
                        for i in range(num_tokens)], dim=1)
