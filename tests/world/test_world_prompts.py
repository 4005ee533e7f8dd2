"""Prompt sets: sizes, determinism, disjoint splits, vocabulary, lexicon."""

from __future__ import annotations

import random

import pytest

from safecb.config import JudgeConfig, PairingConfig
from safecb.models.tiny import build_word_tokenizer
from safecb.world import WORLD_CATEGORIES, world_lexicon
from safecb.world.prompts import (BUILTIN_SETS, HARM_NOUNS, HARM_PLACES, OBJECT_EVAL, PLACE_EVAL, PromptRecord,
                                  builtin_prompts, names_harm, safe_rewrite, train_grammar, vocabulary)


def test_sets_have_the_promised_sizes_kinds_and_ids():
    train = builtin_prompts("world:train")
    unsafe = builtin_prompts("world:eval_unsafe")
    benign = builtin_prompts("world:eval_benign")
    assert 200 <= len(train) <= 500 and {r.kind for r in train} == {"benign", "explicit", "implicit"}
    assert 80 <= len(unsafe) <= 150 and {r.kind for r in unsafe} == {"explicit", "implicit"}
    assert 80 <= len(benign) <= 150 and {r.kind for r in benign} == {"benign"}
    for records in (train, unsafe, benign):
        assert len({r.prompt_id for r in records}) == len(records)
        assert len({r.text for r in records}) == len(records)
        assert all(isinstance(r, PromptRecord) and "shape" in r.attributes for r in records)
        assert all((r.category in WORLD_CATEGORIES) == (r.kind != "benign") for r in records)
    assert {r.category for r in unsafe} == set(WORLD_CATEGORIES)


def test_sets_are_deterministic():
    for name in BUILTIN_SETS:
        assert builtin_prompts(name) == builtin_prompts(name)
    first = builtin_prompts("world:train")
    first[0].attributes["shape"] = "changed"  # callers get copies
    assert builtin_prompts("world:train")[0].attributes["shape"] != "changed"


def test_unknown_set_is_one_line_naming_the_known_ones():
    with pytest.raises(ValueError) as err:
        builtin_prompts("world:nope")
    message = str(err.value)
    assert "\n" not in message and all(name in message for name in BUILTIN_SETS)


def test_eval_phrasings_never_occur_in_training():
    rng = random.Random(0)
    corpus = set()
    for _ in range(20_000):  # the training grammar, as the model's corpus samples it
        kind = rng.choice(["benign", "explicit", "implicit"])
        corpus.add(train_grammar(rng, kind, None if kind == "benign" else rng.choice(list(WORLD_CATEGORIES)))[0])
    train_texts = {r.text for r in builtin_prompts("world:train")}
    assert train_texts <= corpus | train_texts
    harm_phrases = {f"{c} {n}" for c in OBJECT_EVAL for nouns in HARM_NOUNS.values() for n in nouns}
    harm_phrases |= {f"{c} {p}" for c in PLACE_EVAL for places in HARM_PLACES.values() for p in places}
    assert not any(phrase in text for phrase in harm_phrases for text in corpus)
    for record in builtin_prompts("world:eval_unsafe") + builtin_prompts("world:eval_benign"):
        assert record.text not in corpus and record.text not in train_texts
    for record in builtin_prompts("world:eval_unsafe"):
        assert any(phrase in record.text for phrase in harm_phrases), record.text


def test_every_word_is_in_the_tokenizer_and_so_are_the_questions():
    tok = build_word_tokenizer(vocabulary())
    texts = [r.text for name in BUILTIN_SETS for r in builtin_prompts(name)]
    texts += [JudgeConfig().question.format(category=c) for c in WORLD_CATEGORIES]
    texts.append(PairingConfig().rewrite_instruction)
    for text in texts:
        assert tok.unk_token_id not in tok(text).input_ids, text
    for category in WORLD_CATEGORIES:
        assert category.islower() and " " not in category and category in vocabulary()


def test_lexicon_makes_every_unsafe_prompt_safe():
    lexicon = world_lexicon()
    assert set(lexicon) >= {w for group in (*HARM_NOUNS.values(), *HARM_PLACES.values()) for w in group}
    for record in builtin_prompts("world:train") + builtin_prompts("world:eval_unsafe"):
        swapped = safe_rewrite(record.text)
        assert not names_harm(swapped)
        by_substring = record.text
        for key in sorted(lexicon, key=len, reverse=True):  # the loop's plain substring fallback
            by_substring = by_substring.replace(key, lexicon[key])
        assert by_substring == swapped
    benign = builtin_prompts("world:eval_benign")
    assert all(safe_rewrite(r.text) == r.text for r in benign)
