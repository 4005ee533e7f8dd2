"""What the codebook update learns from: the statistics must not be biased by earlier edits,
double-counted safe images, or pairs whose safe side is an unrelated picture (issue 12)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from safecb.config import ModelConfig, parse_config
from safecb.models.registry import load_model
from safecb.prompts import Prompt, load_prompts
from safecb.schemas import GENERATION_SCHEMA, PAIR_SCHEMA, table_from_rows
from safecb.stages import UpdateStatistics, collect_shard, eval_jobs, evaluate_tokens
from safecb.world import world_lexicon
from safecb.world.render import Scene, render_batch
from safecb.world.tokenizer import encode_tokens, load_patch_encoder

NUM_TOKENS, NUM_CODES, DIM = 4, 6, 3


def _config(**finetune):
    return parse_config({"categories": ["blood"], "finetune": {"sample_size": 64, **finetune}})


def _generation(prompt_id: str, tokens: list[int], unsafe: bool, role: str = "collect", unsafe_v0=None) -> dict:
    return {"run_id": "r", "iteration": 2, "codebook_version": 1, "prompt_id": prompt_id, "prompt": "p",
            "sample_index": 0, "seed": 1, "tokens": tokens, "unsafe_probs": [0.9 if unsafe else 0.1],
            "max_unsafe_prob": 0.9 if unsafe else 0.1, "unsafe": unsafe, "role": role, "unsafe_v0": unsafe_v0}


def _pair(prompt_id: str, harmful: list[int], safe: list[int], counterpart: str) -> dict:
    return {"run_id": "r", "iteration": 2, "codebook_version": 1, "prompt_id": prompt_id, "sample_index": 0, "seed": 1,
            "harmful_prompt": "h", "safe_prompt": "s", "harmful_tokens": harmful, "safe_tokens": safe,
            "harmful_prob": 0.9, "safe_prob": 0.1, "counterpart": counterpart}


def _stats() -> UpdateStatistics:
    return UpdateStatistics(torch.randn(NUM_CODES, DIM, generator=torch.Generator().manual_seed(0)), NUM_TOKENS, _config())


def test_images_unsafe_under_v0_are_not_quality_targets():
    stats = _stats()
    stats.add_generations(table_from_rows(GENERATION_SCHEMA, [
        _generation("a", [0, 0, 1, 1], unsafe=False, unsafe_v0=False),  # safe then and now: a target
        _generation("b", [5, 5, 5, 5], unsafe=False, unsafe_v0=True),  # safe only after the edits: not one
        _generation("c", [2, 2, 2, 2], unsafe=True),
    ]))
    (keep,) = stats.keep.tensors(torch.zeros(0, NUM_TOKENS, dtype=torch.long))
    assert keep.tolist() == [[0, 0, 1, 1]]
    assert stats.kept_out_v0 == 1
    # it is still a safe image for the harm scores: the judge sees it safe now
    assert stats.hard_safe[5] == 4


def test_safe_images_count_once_in_the_harm_evidence():
    """A counterpart is a generations row and a pair's safe side: its codes count once."""
    stats = _stats()
    stats.add_generations(table_from_rows(GENERATION_SCHEMA, [
        _generation("a", [1, 1, 1, 1], unsafe=True),
        _generation("a", [2, 2, 3, 3], unsafe=False, role="counterpart"),
    ]))
    stats.add_pairs(table_from_rows(PAIR_SCHEMA, [_pair("a", [1, 1, 1, 1], [2, 2, 3, 3], "rewrite")]))
    assert stats.hard_safe[2] == 2 and stats.hard_safe[3] == 2
    assert stats.hard_harm[1] == 4


def test_only_same_seed_rewrites_become_harm_targets():
    stats = _stats()
    stats.add_pairs(table_from_rows(PAIR_SCHEMA, [
        _pair("a", [1, 1, 1, 1], [2, 2, 2, 2], "rewrite"),
        _pair("b", [4, 4, 4, 4], [0, 0, 0, 0], "safe_sample"),  # another seed: an unrelated picture
    ]))
    empty = torch.zeros(0, NUM_TOKENS, dtype=torch.long)
    harm, safe = stats.harm.tensors(empty, empty)
    assert harm.tolist() == [[1, 1, 1, 1]] and safe.tolist() == [[2, 2, 2, 2]]
    # the unaligned pair still counts as harm evidence for the code scores
    assert stats.hard_harm[4] == 4 and stats.pairs == 2 and stats.aligned_pairs == 1


def test_collection_marks_images_that_were_unsafe_under_v0():
    """With an edited codebook that draws every grid harmless (each code the white background's code:
    a blank white image), the world's harmful train prompts look safe now; decoded with v0 the
    self-judge sees the harm again. (Not the codebook's mean: that decodes to a flat gray, which the
    world's self-judge takes for drugs, its green-on-gray look-alike.)"""
    config = parse_config({"run_id": "t", "categories": ["blood", "fire", "weapon", "drugs"],
                           "generation": {"samples_per_prompt": 1}, "pairing": {"builtin_lexicon": "world"},
                           "resources": {"threads": 1}})
    model = load_model(ModelConfig(backend="world"), config.categories, 0)
    v0 = model.get_codebook().clone()
    white = encode_tokens(model.model, load_patch_encoder(), render_batch([Scene("circle", "blue", "white", seed=1)]))
    blank = int(torch.mode(white.flatten()).values)  # the background's code
    model.set_codebook(v0[blank:blank + 1].expand_as(v0).clone(), 1)
    prompts = load_prompts(config.prompts.train, "prompts.train")
    harmful = [p for p in prompts if p.category][:12]
    benign = [p for p in prompts if not p.category][:12]
    result = collect_shard(model, harmful + benign, config, iteration=2, lexicon=world_lexicon(), codebook_v0=v0)
    rows = [r for r in result.generations if r["role"] == "collect"]
    safe = [r for r in rows if not r["unsafe"]]
    assert len(safe) >= 20, "a codebook of one colour should look safe"
    assert all(r["unsafe_v0"] is not None for r in safe)
    was_unsafe = {r["prompt_id"] for r in safe if r["unsafe_v0"]}
    assert len(was_unsafe & {p.prompt_id for p in harmful}) >= 8
    assert len(was_unsafe & {p.prompt_id for p in benign}) <= 2
    # without an edited codebook nothing is checked (v0 is its own reference)
    model.set_codebook(v0, 0)
    plain = collect_shard(model, benign[:4], config, iteration=1, lexicon=world_lexicon())
    assert all(r.get("unsafe_v0") is None for r in plain.generations)


@pytest.mark.parametrize("column_missing", [True, False])
def test_tables_without_the_v0_column_keep_every_safe_image(column_missing):
    """Shards of iteration 1 (drawn with v0) have nulls there: every safe image is a target."""
    rows = [_generation("a", [0, 1, 2, 3], unsafe=False), _generation("b", [3, 2, 1, 0], unsafe=False)]
    table = table_from_rows(GENERATION_SCHEMA, rows)
    if column_missing:
        table = table.drop(["unsafe_v0"])
    stats = _stats()
    stats.add_generations(table)
    (keep,) = stats.keep.tensors(torch.zeros(0, NUM_TOKENS, dtype=torch.long))
    assert keep.shape[0] == 2 and stats.kept_out_v0 == 0
    assert isinstance(table, pa.Table)


def test_an_eval_shard_decodes_each_image_once_and_measures_the_drift_of_the_benign_ones():
    """One served decode per image feeds the self-judge, the drift and the kept images; the drift is
    Σ over the benign images of the mean squared pixel difference against their v0 decode, and only
    those are decoded again, with v0."""
    config = parse_config({"run_id": "t", "categories": ["blood", "fire", "weapon", "drugs"],
                           "judge": {"batch_size": 3}, "eval": {"save_png": True}, "resources": {"threads": 1}})
    model = load_model(ModelConfig(backend="world"), config.categories, 0)
    v0 = model.get_codebook().clone()
    edited = v0.clone()
    edited[::2] = v0[1::2][: edited[::2].shape[0]]  # every other code drawn as its neighbour
    model.set_codebook(edited, 1)
    prompts = [Prompt(f"u{i}", "a red circle with blood", split="unsafe") for i in range(4)]
    prompts += [Prompt(f"b{i}", "a blue square on grass", split="benign") for i in range(3)]
    jobs = eval_jobs(prompts, config)
    tokens = torch.randint(v0.shape[0], (len(jobs), model.num_image_tokens), generator=torch.Generator().manual_seed(0))
    decoded = []
    decode = model.decode
    model.decode = lambda t, codebook=None: decoded.append((t.shape[0], codebook is not None)) or decode(t, codebook)
    try:
        rows, stats = evaluate_tokens(model, jobs, tokens, config, 1, codebook_v0=v0)
    finally:
        del model.decode
    served = sum(n for n, with_v0 in decoded if not with_v0)
    again = sum(n for n, with_v0 in decoded if with_v0)
    assert (served, again) == (len(jobs), 3)  # each image once; the 3 benign ones once more, with v0
    with torch.no_grad():
        benign = tokens[4:]
        expected = float((model.decode(benign) - model.decode(benign, v0)).pow(2).flatten(1).mean(dim=1).sum())
        probs = model.judge(model.decode(tokens), config.categories, config.judge.question)
    assert stats["drift_benign"][1] == 3 and stats["drift_benign"][0] == pytest.approx(expected, rel=1e-5)
    assert expected > 0
    assert stats["self_benign"][1] == 3 and stats["self_unsafe"][1] == 4
    assert torch.allclose(torch.tensor([r["unsafe_probs"] for r in rows]), probs.float(), atol=1e-6)
    assert all(r["png"] for r in rows)  # the kept images became the PNGs
    model.set_codebook(v0, 0)


def test_an_eval_shard_keeps_its_images_only_for_what_reads_them(monkeypatch):
    """Decoded images go to the host for PNGs or external judges; with neither (an empty judge list, as
    a run without external judges has) they are not kept, and the self-judge's counts are still there."""
    import safecb.stages as stages

    model = load_model(ModelConfig(backend="world"), ["blood", "fire"], 0)
    prompts = [Prompt("u0", "a red circle with blood", split="unsafe"), Prompt("b0", "a blue square", split="benign")]
    tokens = torch.randint(model.get_codebook().shape[0], (2, model.num_image_tokens),
                           generator=torch.Generator().manual_seed(1))
    kept, measure = [], stages._decode_and_measure
    monkeypatch.setattr(stages, "_decode_and_measure", lambda *a: kept.append(a[-1]) or measure(*a))
    for save_png, judges in ((False, []), (True, []), (False, None)):
        config = parse_config({"run_id": "t", "categories": ["blood", "fire"], "eval": {"save_png": save_png},
                               "resources": {"threads": 1}})
        rows, stats = evaluate_tokens(model, eval_jobs(prompts, config), tokens, config, 0, judges=judges)
        assert ("judge_counts" in stats) == (judges is not None)
        assert all(bool(r["png"]) == save_png for r in rows)
    assert kept == [False, True, False]
