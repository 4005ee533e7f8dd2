"""The load generator (scale and fault tests only): deterministic, batch-independent, tunable judge,
differentiable decode, and wired into the registry and the loop's stages."""

from __future__ import annotations

import pytest
import torch

from safecb.config import ModelConfig, parse_config
from safecb.models.base import SamplingParams, UnifiedModel
from safecb.models.load_generator import LoadGenerator
from safecb.models.registry import load_model, model_fingerprint, prompt_token_counter
from safecb.prompts import Prompt

PARAMS = SamplingParams()
CATEGORIES = ["blood", "fire", "weapon", "drugs"]


def _prompts(n: int) -> tuple[list[str], list[int]]:
    return [f"prompt {i} unsafe red circle" for i in range(n)], [1000 + 7 * i for i in range(n)]


def test_is_a_unified_model_with_the_default_sizes():
    model = LoadGenerator()
    assert isinstance(model, UnifiedModel)
    assert model.num_image_tokens == 64 and model.codebook_version == 0
    assert model.get_codebook().shape == (512, 8)
    images = model.decode(model.generate_tokens(*_prompts(2), PARAMS))
    assert images.shape == (2, 3, 32, 32) and 0 < images.min() and images.max() < 1


def test_tokens_are_a_pure_function_of_prompt_and_seed():
    prompts, seeds = _prompts(6)
    a = LoadGenerator().generate_tokens(prompts, seeds, PARAMS)
    b = LoadGenerator().generate_tokens(prompts, seeds, SamplingParams(guidance=7.0, temperature=0.0))
    assert a.dtype == torch.int64 and a.shape == (6, 64)
    assert torch.equal(a, b)  # a fresh instance, other sampling params: the same tokens
    assert int(a.min()) >= 0 and int(a.max()) < 512
    other_seed = LoadGenerator().generate_tokens(prompts[:1], [seeds[0] + 1], PARAMS)
    other_prompt = LoadGenerator().generate_tokens([prompts[0] + "!"], seeds[:1], PARAMS)
    assert not torch.equal(a[:1], other_seed) and not torch.equal(a[:1], other_prompt)
    assert not torch.equal(LoadGenerator(seed=1).get_codebook(), LoadGenerator(seed=0).get_codebook())


def test_every_output_is_batch_independent():
    model = LoadGenerator()
    prompts, seeds = _prompts(9)
    batch = model.generate_tokens(prompts, seeds, PARAMS)
    images = model.decode(batch)
    probs = model.judge(images, CATEGORIES, "q")
    for i in (0, 4, 8):
        alone = model.generate_tokens([prompts[i]], [seeds[i]], PARAMS)
        assert torch.equal(alone[0], batch[i])
        torch.testing.assert_close(model.decode(alone)[0], images[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(model.judge(model.decode(alone), CATEGORIES, "q")[0], probs[i], rtol=0, atol=1e-5)
    reordered = model.generate_tokens(prompts[::-1], seeds[::-1], PARAMS)
    assert torch.equal(reordered, batch.flip(0))
    # the counterpart: aligned with the grid it redraws, and as pure
    safe = model.rewrite(prompts, "", 32)
    twin = model.counterpart_tokens(safe, seeds, batch, PARAMS)
    assert torch.equal(twin[3], model.counterpart_tokens([safe[3]], [seeds[3]], batch[3:4], PARAMS)[0])
    same = (twin == batch).float().mean().item()
    assert 0.65 < same < 0.85  # 1 in 4 positions redrawn (a redraw hits the same code 1 time in 512)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("num_categories", [1, 4])
def test_judge_calls_about_the_asked_fraction_unsafe(fraction, num_categories):
    model = LoadGenerator(unsafe_fraction=fraction)
    prompts, seeds = _prompts(3000)
    probs = model.judge(model.decode(model.generate_tokens(prompts, seeds, PARAMS)), CATEGORIES[:num_categories], "q")
    assert probs.shape == (3000, num_categories) and 0 <= probs.min() and probs.max() <= 1
    unsafe = (probs.max(dim=1).values >= 0.5).float().mean().item()
    assert abs(unsafe - fraction) < 0.04, unsafe


def test_judge_extremes():
    tokens = LoadGenerator().generate_tokens(*_prompts(50), PARAMS)
    for fraction, expected in ((0.0, 0.0), (1.0, 1.0)):
        model = LoadGenerator(unsafe_fraction=fraction)
        assert (model.judge(model.decode(tokens), CATEGORIES, "q").max(dim=1).values >= 0.5).float().mean() == expected
    with pytest.raises(ValueError, match="unsafe_fraction"):
        LoadGenerator(unsafe_fraction=1.5)


def test_decode_and_judge_are_differentiable_in_the_codebook():
    model = LoadGenerator()
    tokens = model.generate_tokens(*_prompts(4), PARAMS)
    codebook = model.get_codebook().requires_grad_(True)
    images = model.decode(tokens, codebook)
    loss = images.square().mean() + model.judge(images, CATEGORIES, "q").sum()
    loss.backward()
    used = torch.zeros(512, dtype=torch.bool)
    used[tokens.unique()] = True
    assert codebook.grad is not None and torch.isfinite(codebook.grad).all()
    assert (codebook.grad[used].abs().sum(dim=1) > 0).all()
    assert (codebook.grad[~used] == 0).all()


def test_codebook_is_served_and_versioned():
    model = LoadGenerator()
    tokens = model.generate_tokens(*_prompts(3), PARAMS)
    before = model.decode(tokens)
    moved = model.get_codebook() * -1
    model.set_codebook(moved, 3)
    assert model.codebook_version == 3 and torch.equal(model.get_codebook(), moved)
    assert not torch.allclose(model.decode(tokens), before)
    torch.testing.assert_close(model.decode(tokens, LoadGenerator().get_codebook()), before)
    moved.zero_()  # the model holds its own copy
    assert model.get_codebook().abs().sum() > 0
    with pytest.raises(ValueError, match="does not match"):
        model.set_codebook(torch.zeros(10, 8), 4)


def test_rewrite_drops_the_word_or_appends_safe():
    model = LoadGenerator()
    assert model.rewrite(["a UNSAFE red unsafe circle", "a red circle", "unsafe"], "ignored", 32) == [
        "a red circle", "a red circle safe", ""]
    assert model.rewrite(["one two three"], "", 2) == ["one two"]


def test_registry_knows_the_backend():
    config = ModelConfig(backend="load-generator")
    model = load_model(config, CATEGORIES, seed=5)
    assert isinstance(model, LoadGenerator) and model.seed == 5
    assert prompt_token_counter(config, CATEGORIES)(["a red  circle", "x", ""]) == [5, 3, 2]
    fingerprint = model_fingerprint(config, CATEGORIES, seed=5)
    assert fingerprint == model_fingerprint(config, ["other"], seed=5)  # categories do not change it
    assert fingerprint != model_fingerprint(config, CATEGORIES, seed=6)
    assert fingerprint != model_fingerprint(ModelConfig(backend="tiny-random"), CATEGORIES, seed=5)


def test_the_loops_stages_run_on_it(tmp_path):
    """collect → statistics → projection + fine-tuning, in process: the update path runs end to end."""
    from safecb.stages import UpdateStatistics, collect_shard, update_codebook
    from safecb.schemas import GENERATION_SCHEMA, PAIR_SCHEMA, table_from_rows

    config = parse_config({"categories": CATEGORIES, "model": {"backend": "load-generator"},
                           "pairing": {"rewrite": "model"}, "generation": {"samples_per_prompt": 2},
                           "finetune": {"steps": 3, "batch_size": 8}, "storage": {"run_dir": str(tmp_path)}})
    model = load_model(config.model, config.categories)
    prompts = [Prompt(f"p:{i}", f"prompt {i} unsafe red circle") for i in range(40)]
    result = collect_shard(model, prompts, config, 1, {})
    collected = [r for r in result.generations if r["role"] == "collect"]
    assert len(collected) == 80
    assert 0.3 < sum(r["unsafe"] for r in collected) / 80 < 0.7
    assert result.pairs and all(p["safe_prompt"] == p["harmful_prompt"].replace(" unsafe", "") for p in result.pairs
                                if p["counterpart"] == "rewrite")
    again = collect_shard(load_model(config.model, config.categories), prompts, config, 1, {})
    assert again.generations == result.generations  # a retried shard writes the same rows
    codebook = model.get_codebook()
    stats = UpdateStatistics(codebook, model.num_image_tokens, config)
    stats.add_pairs(table_from_rows(PAIR_SCHEMA, result.pairs))
    stats.add_generations(table_from_rows(GENERATION_SCHEMA, result.generations))
    update = update_codebook(model, codebook, codebook, stats, config)
    assert update.codebook.shape == (512, 8) and torch.isfinite(update.codebook).all()
    assert update.report["pairs"] == len(result.pairs)
    assert update.report["space_rank"] > 0 and update.report["finetune_steps"] == 3  # fine-tuning ran
