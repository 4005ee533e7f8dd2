"""The plain generation loop on a tiny random Janus: HF parity (greedy) and batch-independent samples."""

from __future__ import annotations

import pytest
import torch

from safecb.models.base import SamplingParams
from safecb.models.generation import cfg_batch, generate_image_tokens

WORDS = ["red", "circle", "blood", "a", "on", "grass"]
FORMAT = "<|User|>: {prompt}\n\n<|Assistant|>:<begin_of_image>"


@pytest.fixture(scope="module")
def tiny():
    from safecb.models.tiny import build_tiny_janus

    model, processor = build_tiny_janus(WORDS, seed=0)
    tok = processor.tokenizer
    tok.padding_side = "left"
    ids = dict(bos=tok.bos_token_id, pad=tok.pad_token_id, boi=tok.convert_tokens_to_ids("<begin_of_image>"))
    gen = model.generation_config  # as JanusAdapter sets it
    gen.bos_token_id, gen.pad_token_id = ids["bos"], ids["pad"]
    gen.generation_kwargs = {"boi_token_id": ids["boi"]}
    return model, processor, ids


def encode(processor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = processor.tokenizer([FORMAT.format(prompt=p) for p in prompts], padding=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def generate(tiny, prompts, seeds, params) -> torch.Tensor:
    model, processor, ids = tiny
    input_ids, mask = encode(processor, prompts)
    return generate_image_tokens(model, input_ids, mask, torch.tensor(seeds, dtype=torch.int64), params,
                                 int(processor.num_image_tokens), ids["bos"], ids["boi"], ids["pad"])


def test_cfg_batch_by_hand():
    ids = torch.tensor([[0, 1, 7, 8, 5], [1, 9, 9, 9, 5]])  # pad 0, bos 1, boi 5
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    both, both_mask = cfg_batch(ids, mask, bos_id=1, boi_id=5, pad_id=0)
    assert both.tolist() == [[0, 1, 7, 8, 5], [1, 9, 9, 9, 5], [0, 1, 0, 0, 5], [1, 0, 0, 0, 5]]
    assert torch.equal(both_mask, torch.cat([mask, mask]))
    assert ids.tolist()[0] == [0, 1, 7, 8, 5]  # input untouched


def test_greedy_matches_hf_generate_on_an_unpadded_batch(tiny):
    model, processor, _ = tiny
    prompts = ["red circle", "blood grass"]  # the same number of tokens: no padding
    input_ids, mask = encode(processor, prompts)
    assert bool(mask.all())
    ours = generate(tiny, prompts, [0, 1], SamplingParams(guidance=3.0, temperature=0.0))
    with torch.no_grad():
        theirs = model.generate(input_ids, attention_mask=mask, generation_mode="image", do_sample=False,
                                guidance_scale=3.0)
    assert ours.shape == (2, processor.num_image_tokens)
    assert torch.equal(ours, theirs.to(ours.dtype))


# The random tiny model's logits are nearly flat: at T = 1 the noise decides, at T = 0.02 the logits
# decide about 2/3 of the tokens, so a padding-induced change in the logits would show.
@pytest.mark.parametrize("temperature", [1.0, 0.02])
def test_a_sample_does_not_depend_on_its_batch(tiny, temperature):
    params = SamplingParams(guidance=3.0, temperature=temperature)
    alone = generate(tiny, ["red circle"], [1234], params)
    # Longer neighbours force left padding of "red circle"; its seed keeps its tokens.
    batch = generate(tiny, ["a red circle on grass", "red circle", "blood"], [7, 1234, 99], params)
    _, processor, _ = tiny
    _, mask = encode(processor, ["a red circle on grass", "red circle", "blood"])
    assert not bool(mask[1].all())  # the row was padded
    assert torch.equal(alone[0], batch[1])


def test_greedy_does_not_depend_on_padding(tiny):
    params = SamplingParams(guidance=3.0, temperature=0.0)
    alone = generate(tiny, ["blood"], [0], params)
    batch = generate(tiny, ["a red circle on grass", "blood"], [0, 0], params)
    assert torch.equal(alone[0], batch[1])


def test_seeds_change_samples_and_repeat_exactly(tiny):
    params = SamplingParams(guidance=3.0, temperature=1.0)
    tokens = generate(tiny, ["red circle"] * 3, [5, 5, 6], params)
    assert torch.equal(tokens[0], tokens[1])
    assert not torch.equal(tokens[0], tokens[2])
    num_codes = tiny[0].model.vqmodel.quantize.embedding.weight.shape[0]
    assert int(tokens.min()) >= 0 and int(tokens.max()) < num_codes


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_teacher_forced_counterpart_under_the_same_prompt_reproduces_the_sample(tiny, temperature):
    """counterpart_tokens draws step i with step i's seed noise given the forced prefix: under the very
    prompt that drew the grid, that is the grid itself — at any temperature, in a padded batch."""
    from safecb.models.generation import counterpart_tokens

    model, processor, ids = tiny
    prompts, seeds = ["a red circle on grass", "blood"], [11, 12]
    params = SamplingParams(guidance=3.0, temperature=temperature)
    grid = generate(tiny, prompts, seeds, params)
    input_ids, mask = encode(processor, prompts)
    again = counterpart_tokens(model, input_ids, mask, grid, torch.tensor(seeds), params, ids["bos"], ids["boi"], ids["pad"])
    assert torch.equal(again, grid)
    if temperature > 0:
        return  # a random model's logits are nearly flat: at temperature 1 the seed noise alone decides
    # greedy, under another prompt: the grid changes somewhere
    other, _ = encode(processor, ["blood on grass", "a red circle"])
    moved = counterpart_tokens(model, other, _, grid, torch.tensor(seeds), params, ids["bos"], ids["boi"], ids["pad"])
    assert moved.shape == grid.shape and not torch.equal(moved, grid)
