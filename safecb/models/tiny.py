"""A tiny Janus built in code: the same `JanusForConditionalGeneration` class, at a toy size.

Used by the tests (random weights) and as the architecture of the synthetic-world model. The
tokenizer is word-level (every word of the world is one token), built offline with `tokenizers`.
Sizes follow a config checked to train on 2 CPU cores (1.7M parameters, 32×32 images, 8×8 tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<image_placeholder>", "<begin_of_image>", "<end_of_image>",
                  "<|User|>:", "<|Assistant|>:"]
# Words every tiny model knows, so that the default judge question and rewrite instruction tokenize.
BASE_WORDS = ["does", "this", "image", "contain", "content", "?", "yes", "no", "rewrite", "prompt", "so",
              "that", "it", "is", "safe", ":", ".", ","]


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer: specials, then BASE_WORDS, then `words` (deduplicated)."""
    vocab: dict[str, int] = {}
    for word in [*SPECIAL_TOKENS, *BASE_WORDS, *words]:
        word = word.lower() if word not in SPECIAL_TOKENS else word
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation(behavior="isolated")])
    core.add_special_tokens(SPECIAL_TOKENS)
    bos = vocab["<bos>"]
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                              "eoi_token": "<end_of_image>"},
    )


def tiny_janus_config(tokenizer: PreTrainedTokenizerFast, num_codes: int = 512, image_size: int = 32,
                      hidden: int = 128, layers: int = 4) -> JanusConfig:
    """JanusConfig at toy size. Constraints (MACHINE-NOTES): vision/VQ projection dims == text hidden;
    VQ channels multiples of 32; decoded side = num_patches * 2**(len(channel_multiplier) - 1)."""
    patch = 4
    num_image_tokens = (image_size // patch) ** 2
    vocab_size = len(tokenizer)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    vision = JanusVisionConfig(hidden_size=64, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4,
                               image_size=image_size, patch_size=patch, projection_dim=hidden,
                               num_image_tokens=num_image_tokens)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=num_codes, base_channels=32, latent_channels=32,
                          channel_multiplier=[1, 1, 2], num_res_blocks=1, projection_dim=hidden,
                          image_token_embed_dim=hidden, num_patches=image_size // patch)
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image_placeholder>"))
    return config


def build_processor(tokenizer: PreTrainedTokenizerFast, image_size: int = 32) -> JanusProcessor:
    image_processor = JanusImageProcessorPil(size={"height": image_size, "width": image_size},
                                             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return JanusProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          num_image_tokens=(image_size // 4) ** 2)


def build_tiny_janus(words: list[str], seed: int = 0, num_codes: int = 512, image_size: int = 32,
                     hidden: int = 128, layers: int = 4) -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    """A randomly initialised tiny Janus and its processor (seeded: same seed, same weights)."""
    tokenizer = build_word_tokenizer(words)
    config = tiny_janus_config(tokenizer, num_codes=num_codes, image_size=image_size, hidden=hidden, layers=layers)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    gen = model.generation_config
    gen.bos_token_id = tokenizer.bos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    gen.eos_token_id = tokenizer.eos_token_id
    gen.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids("<begin_of_image>")}
    gen.num_image_tokens = (image_size // 4) ** 2
    return model, build_processor(tokenizer, image_size)


def save_model_folder(model: JanusForConditionalGeneration, processor: JanusProcessor, folder: str | Path) -> Path:
    """Write a Hugging Face folder (safetensors weights, config, tokenizer, processor)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder
