"""The Janus adapter: `UnifiedModel` on `transformers.JanusForConditionalGeneration`.

Loads a local Hugging Face folder (Janus-Pro-1B/7B, or the bundled world model) or an object-store
prefix (copied once to a local cache), safetensors only, `trust_remote_code` off. Text layouts come
from `PromptFormat` (Janus-Pro's SFT format by default). Generation runs the fast engine on a GPU
when it is available and enabled, the plain loop (`safecb.models.generation`) elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from safecb.config import PromptFormat
from safecb.models.base import ModelLoadError, SamplingParams
from safecb.models.generation import counterpart_tokens, generate_image_tokens
from safecb.models.vq_decoder import decode_latents

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_folder(location: str) -> Path:
    """A local folder for `location`: itself if local, else a cached copy of the object-store prefix."""
    if "://" not in location or location.startswith("file://"):
        folder = Path(location.removeprefix("file://")).expanduser()
    else:
        import fsspec

        cache = Path(os.environ.get("SAFECB_CACHE", Path.home() / ".cache" / "safecb")) / "models"
        folder = cache / hashlib.sha256(location.encode()).hexdigest()[:16]
        if not (folder / ".complete").exists():
            try:
                fs, root = fsspec.core.url_to_fs(location)
                fs.get(root.rstrip("/") + "/", str(folder), recursive=True)
            except Exception as err:  # noqa: BLE001 - any backend failure becomes one line
                raise ModelLoadError(f"model.path: cannot copy {location.split('?')[0]}: {type(err).__name__}") from None
            (folder / ".complete").write_text("ok")
    if not folder.is_dir():
        raise ModelLoadError(f"model.path: {folder}: no such folder (expected a Hugging Face Janus checkpoint folder)")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model.path: {folder}: no config.json (expected a Hugging Face Janus checkpoint folder)")
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(f"model.path: {folder}: no *.safetensors weights (only safetensors are loaded)")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        raise ModelLoadError(f"model.path: {folder}/config.json: not valid JSON") from None
    if model_type != "janus":
        raise ModelLoadError(f"model.path: {folder}: model_type is {model_type!r}, expected 'janus'")
    return folder


def pick_device(device: str, key: str = "model.device") -> torch.device:
    """"auto" → CUDA when present, else CPU. `key` names the setting in the error (one line)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"{key}: 'cuda' requested but no CUDA device is available")
    return torch.device(device)


class JanusAdapter:
    """One model replica. Not thread-safe; one per actor / process."""

    def __init__(self, model, processor, prompt_format: PromptFormat | None = None, engine: str = "auto",
                 kv_dtype: str = "bf16", max_batch: int = 256, max_prompt_len: int = 128,
                 batch_invariant: bool = True):
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.format = prompt_format or PromptFormat()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.num_image_tokens = int(processor.num_image_tokens)
        self.codebook_version = 0
        tok = self.tokenizer
        self.bos_id = tok.bos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.boi_token = processor.image_start_token
        self.boi_id = tok.convert_tokens_to_ids(self.boi_token)
        self.image_token_id = model.config.image_token_id
        self.yes_ids = self._single_token_ids(["yes", "Yes", " yes", " Yes"])
        self.no_ids = self._single_token_ids(["no", "No", " no", " No"])
        if not self.yes_ids or not self.no_ids:
            raise ModelLoadError("tokenizer: no single-token 'yes'/'no' answer found; the self-judge needs one")
        image_processor = processor.image_processor
        self.pixel_mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.pixel_std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.judge_size = int(model.config.vision_config.image_size)
        gen = model.generation_config
        gen.bos_token_id, gen.pad_token_id = self.bos_id, self.pad_id
        gen.generation_kwargs = {"boi_token_id": self.boi_id}
        self._engine = None
        self._engine_mode, self._kv_dtype, self._max_batch = engine, kv_dtype, max_batch
        self._max_prompt_len = max_prompt_len
        self._batch_invariant = batch_invariant
        # Judge one batch on a side CUDA stream while the engine generates the next (generate_and_judge).
        # Off by default: measured on an H200 (Janus-Pro-1B shapes, bf16 cache, 512 prompts), collection
        # took 36.8 s with it and 35.4 s without; with the generation's stream at the highest priority,
        # 33.6 s against 33.1 s: the decode steps leave no idle units for the judge.
        self.overlap_judge = False
        # The VQ decoder's GroupNorm + SiLU as one Triton pass where no gradient must flow
        # (safecb/models/vq_decoder.py), its convolutions in channels-last layout (cuDNN's tensor-core
        # kernels take NHWC; in NCHW a third of their time went to layout changes). On an H100, Janus-Pro-1B
        # shapes: 487 images/s fused in channels-last, 393 fused in NCHW, 255 for Hugging Face's forward
        # (which stays in NCHW: in channels-last PyTorch's GroupNorm makes it slower, 171).
        # benchmarks/decode_judge.py times them; cuDNN autotuning changed nothing (278.1 against 278.3).
        self.fused_decoder = True
        self.decoder_channels_last = True
        # The fused decoder's upsampling convolutions as 2×2 kernels over the input (vq_decoder's
        # subpixel_upsample: 16 products a weight instead of 36, no upsampled tensor). Checked on the CPU
        # only so far; off until benchmarks/decode_judge.py has timed it on a GPU.
        self.decoder_subpixel_upsample = False
        self._decoder_layout = torch.contiguous_format
        # The judge's language-model pass on the engine's fused weights where the engine runs: 213 against
        # 167 images/s on an H200 (Janus-Pro-1B shapes, 7 categories, batch 128; benchmarks/decode_judge.py).
        self.fused_judge = True

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def from_folder(cls, location: str | Path, device: str = "auto", dtype: str = "float32",
                    prompt_format: PromptFormat | None = None, engine: str = "auto", kv_dtype: str = "bf16",
                    max_batch: int = 256, max_prompt_len: int = 128, batch_invariant: bool = True) -> "JanusAdapter":
        from transformers import JanusForConditionalGeneration, JanusProcessor

        folder = resolve_model_folder(str(location))
        target = pick_device(device)
        try:
            model = JanusForConditionalGeneration.from_pretrained(
                folder, use_safetensors=True, trust_remote_code=False, dtype=_DTYPES[dtype])
            processor = JanusProcessor.from_pretrained(folder, trust_remote_code=False)
        except Exception as err:  # noqa: BLE001 - transformers raises many kinds; report one line
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ModelLoadError(f"model.path: {folder}: cannot load Janus checkpoint: {first}") from None
        return cls(model.to(target), processor, prompt_format, engine, kv_dtype, max_batch, max_prompt_len,
                   batch_invariant)

    def _single_token_ids(self, words: list[str]) -> list[int]:
        ids = set()
        for word in words:
            encoded = self.tokenizer.encode(word, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] != self.tokenizer.unk_token_id:
                ids.add(encoded[0])
        return sorted(ids)

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(texts, padding=True, return_tensors="pt")
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    # ---- generation ----------------------------------------------------------------------------
    @property
    def uses_engine(self) -> bool:
        """Whether generation runs on the fast GPU engine (else the plain loop)."""
        return self._fast_engine() is not None

    def _fast_engine(self):
        if self._engine_mode == "off" or self.device.type != "cuda":
            return None
        if self._engine is None:
            try:
                from safecb.models.engine import JanusEngine, engine_available
            except ImportError as err:
                if self._engine_mode == "on":
                    raise ModelLoadError(f"model.engine.enabled: 'on' but the engine cannot load: {err}") from None
                return None
            ok, reason = engine_available(self.device)
            if not ok:
                if self._engine_mode == "on":
                    raise ModelLoadError(f"model.engine.enabled: 'on' but {reason}")
                log.info("fast engine off: %s", reason)
                self._engine_mode = "off"
                return None
            self._engine = JanusEngine(self.model, max_batch=self._max_batch, max_prompt_len=self._max_prompt_len,
                                       num_image_tokens=self.num_image_tokens, kv_dtype=self._kv_dtype,
                                       batch_invariant=self._batch_invariant)
        return self._engine

    def generation_inputs(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.format.generation.format(prompt=p) + self.boi_token for p in prompts]
        return self._encode(texts)

    @torch.no_grad()
    def generate_tokens(self, prompts: list[str], seeds: list[int], params: SamplingParams) -> torch.Tensor:
        return self._generate_on_device(prompts, seeds, params).cpu()

    def _generate_on_device(self, prompts: list[str], seeds: list[int], params: SamplingParams) -> torch.Tensor:
        """Image tokens (B, N) on the model's device; on CUDA the work may still be in flight."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        input_ids, mask = self.generation_inputs(prompts)
        seed_tensor = torch.tensor(seeds, dtype=torch.int64, device=self.device)
        engine = self._fast_engine()
        if engine is not None:
            return engine.generate(input_ids, mask, seed_tensor, params, self.bos_id, self.boi_id, self.pad_id)
        return generate_image_tokens(self.model, input_ids, mask, seed_tensor, params, self.num_image_tokens,
                                     self.bos_id, self.boi_id, self.pad_id)

    @torch.no_grad()
    def generate_and_judge(self, prompts: list[str], seeds: list[int], params: SamplingParams, categories: list[str],
                           question: str, generate_batch: int, judge_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, N) and self-judged P(yes) per category (B, C), generated in batches of
        `generate_batch` and decoded + judged in batches of `judge_batch` (both on the CPU when returned).

        On the fast engine the decode + judge of batch i runs on a side CUDA stream while batch i+1
        generates: the decode steps are bound by KV-cache bandwidth and the judge by arithmetic, so the
        two could share the GPU instead of taking turns (`overlap_judge`, off by default: on an H200 it
        was 4% slower, see __init__). The same kernels on the same inputs: the same tokens and scores
        either way (tested on the GPU).
        """
        side = gen = None
        if self.overlap_judge and self.device.type == "cuda" and self._fast_engine() is not None:
            # Priorities: the block scheduler hands a freed SM to the generation's kernels first, so the
            # judge only fills what the decode steps leave idle instead of taking turns with them.
            gen = torch.cuda.Stream(device=self.device, priority=-100)  # out of range: the highest there is
            side = torch.cuda.Stream(device=self.device, priority=0)
            gen.wait_stream(torch.cuda.current_stream(self.device))
        main = torch.cuda.current_stream(self.device) if side is not None else None
        tokens, probs, waiting = [], [], None  # waiting: (tokens, event) generated, not yet judged

        def judge_on_side(batch_tokens: torch.Tensor, ready) -> None:
            with torch.cuda.stream(side):
                side.wait_event(ready)
                probs.append(self._decode_and_judge(batch_tokens, categories, question, judge_batch))

        for start in range(0, len(prompts), generate_batch):
            with torch.cuda.stream(gen) if gen is not None else contextlib.nullcontext():
                batch_tokens = self._generate_on_device(prompts[start:start + generate_batch],
                                                        seeds[start:start + generate_batch], params)  # (b, N)
            tokens.append(batch_tokens)
            if side is None:
                probs.append(self._decode_and_judge(batch_tokens, categories, question, judge_batch))
                continue
            ready = torch.cuda.Event()
            ready.record(gen)
            # Issue order matters: batch i+1's steps are queued before batch i's judge, whose host
            # syncs (small copies) then wait for the side stream only, never for the generation.
            if waiting is not None:
                judge_on_side(*waiting)
            waiting = (batch_tokens, ready)
        if waiting is not None:
            judge_on_side(*waiting)
        if side is not None:
            main.wait_stream(gen)  # the copies below run on the main stream
            main.wait_stream(side)
        num_cat = len(categories)
        return (torch.cat(tokens).cpu() if tokens else torch.zeros(0, self.num_image_tokens, dtype=torch.long),
                torch.cat(probs).float().cpu() if probs else torch.zeros(0, num_cat))

    def _decode_and_judge(self, tokens: torch.Tensor, categories: list[str], question: str, batch: int) -> torch.Tensor:
        """(B, C) P(yes) on the device for tokens (B, N), decoded with the served codebook."""
        return torch.cat([self.judge(self.decode(tokens[i:i + batch]), categories, question).float()
                          for i in range(0, tokens.shape[0], batch)])

    @torch.no_grad()
    def counterpart_tokens(self, prompts: list[str], seeds: list[int], tokens: torch.Tensor,
                           params: SamplingParams) -> torch.Tensor:
        """Position-aligned counterparts (B, N) of `tokens` under `prompts` (see generation.counterpart_tokens)."""
        input_ids, mask = self.generation_inputs(prompts)
        seed_tensor = torch.tensor(seeds, dtype=torch.int64, device=self.device)
        return counterpart_tokens(self.model, input_ids, mask, tokens.to(self.device), seed_tensor, params,
                                  self.bos_id, self.boi_id, self.pad_id).cpu()

    # ---- decode --------------------------------------------------------------------------------
    def decode(self, tokens: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [0, 1]; differentiable with respect to `codebook` (K, D)."""
        vq = self.model.model.vqmodel
        weight = vq.quantize.embedding.weight if codebook is None else codebook
        side = vq.quantize.quant_state_dims
        codes = F.normalize(weight.to(self.device, self.dtype), dim=-1)[tokens.to(self.device)]  # (B, N, D)
        grid = codes.view(tokens.shape[0], side[0], side[1], -1).permute(0, 3, 1, 2)  # (B, D, h, w)
        # A gradient must reach the codebook (fine-tuning), or no GPU: Hugging Face's forward, in NCHW.
        fused = self.fused_decoder and self.device.type == "cuda" and not (torch.is_grad_enabled() and grid.requires_grad)
        layout = torch.channels_last if fused and self.decoder_channels_last else torch.contiguous_format
        if layout != self._decoder_layout:  # the weights change layout only when the path does (not per call)
            vq.post_quant_conv.to(memory_format=layout)
            vq.decoder.to(memory_format=layout)
            self._decoder_layout = layout
        latents = vq.post_quant_conv(grid.contiguous(memory_format=layout))
        # (B, 3, H, W) in about [-1, 1]
        pixels = decode_latents(vq.decoder, latents, self.decoder_subpixel_upsample) if fused else vq.decoder(latents)
        return ((pixels.float() + 1) / 2).clamp(0, 1)

    # ---- self-judge ----------------------------------------------------------------------------
    def judge_texts(self, categories: list[str], question: str) -> list[str]:
        image = self.boi_token + self.processor.image_token * self.num_image_tokens + self.processor.image_end_token
        return [self.format.judge.format(image=image, question=question.format(category=c)) for c in categories]

    def _judge_pixels(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.to(self.device, torch.float32)
        if pixels.shape[-1] != self.judge_size:
            pixels = F.interpolate(pixels, size=(self.judge_size, self.judge_size), mode="bicubic", align_corners=False)
        return ((pixels - self.pixel_mean.to(self.device)) / self.pixel_std.to(self.device)).to(self.dtype)

    def _yes_probability(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden).float()  # (R, V)
        return torch.sigmoid(logits[:, self.yes_ids].logsumexp(-1) - logits[:, self.no_ids].logsumexp(-1))  # (R,)

    def judge(self, images: torch.Tensor, categories: list[str], question: str) -> torch.Tensor:
        """P(yes) / (P(yes) + P(no)) per image and category question: (B, C). Differentiable in `images`.

        The C questions about one image share everything up to the category word — the image's
        hundreds of tokens above all — so that prefix runs once per image, and the C questions' own
        few tokens then run together in one forward over its KV cache, side by side in one sequence:
        a block mask lets each question see the prefix and itself only, and each restarts its
        positions where the prefix ends, so each is computed exactly as if it ran alone. For
        Janus-Pro's 576 image tokens and 7 categories this is ~6x less work than C full sequences
        (`_judge_unshared` is that plain form; the tests hold the two together). Where the fast engine
        runs, this language-model pass runs on its fused weights (`safecb.models.judge_pass`).
        """
        texts = self.judge_texts(categories, question)
        rows = [self.tokenizer(t, add_special_tokens=True).input_ids for t in texts]
        shared = 0
        while all(len(r) > shared + 1 and r[shared] == rows[0][shared] for r in rows):
            shared += 1
        if any(self.image_token_id in r[shared:] for r in rows):  # the questions differ before the image
            return self._judge_unshared(images, categories, question)
        batch = images.shape[0]
        features = self.model.model.get_image_features(self._judge_pixels(images)).pooler_output  # (B, Ni, H)
        prefix = torch.tensor(rows[0][:shared], device=self.device).expand(batch, -1)  # (B, P)
        embeds = self.model.get_input_embeddings()(prefix)  # (B, P, H)
        slots = (prefix == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, features.to(embeds.dtype).reshape(-1))
        suffixes = [r[shared:] for r in rows]
        lengths = torch.tensor([len(x) for x in suffixes])  # (C,)
        total = int(lengths.sum())
        ids = torch.tensor([t for x in suffixes for t in x], device=self.device).expand(batch, -1)  # (B, ΣS)
        positions = torch.cat([torch.arange(shared, shared + len(x)) for x in suffixes]).to(self.device)
        question = torch.repeat_interleave(torch.arange(len(suffixes)), lengths)  # (ΣS,) which question
        order = torch.arange(total)
        visible = (question[:, None] == question[None, :]) & (order[None, :] <= order[:, None])  # (ΣS, ΣS)
        visible = torch.cat([torch.ones(total, shared, dtype=torch.bool), visible], dim=1)  # (ΣS, P + ΣS)
        question_embeds = self.model.get_input_embeddings()(ids)  # (B, ΣS, H)
        engine = self._judge_engine(images, shared, total)
        if engine is not None:  # the same pass on the engine's fused weights (safecb.models.judge_pass)
            from safecb.models.judge_pass import question_states

            hidden = question_states(engine, embeds, question_embeds, positions, visible)  # (B, ΣS, H)
        else:
            lm = self.model.model.language_model
            prefix_out = lm(inputs_embeds=embeds, use_cache=True)  # the prefix, once per image
            cache = getattr(prefix_out, "cache", None) or prefix_out.past_key_values
            mask = torch.zeros(visible.shape, dtype=embeds.dtype).masked_fill(~visible, torch.finfo(embeds.dtype).min)
            hidden = lm(inputs_embeds=question_embeds, position_ids=positions.expand(batch, -1),
                        attention_mask=mask.to(self.device)[None, None].expand(batch, 1, -1, -1),
                        cache=cache, use_cache=True).last_hidden_state  # (B, ΣS, H)
        last = (lengths.cumsum(0) - 1).to(self.device)  # (C,) each question's final token
        return self._yes_probability(hidden[:, last].reshape(batch * len(suffixes), -1)).view(batch, -1)  # (B, C)

    def _judge_engine(self, images: torch.Tensor, prefix_len: int, suffix_len: int):
        """The fast engine for the judge's language-model pass, or None for Hugging Face's layers: off
        the engine, with `fused_judge` off, when a gradient must flow to the images (the codebook's
        fine-tuning against the judge), or past the engine's RoPE table."""
        if not self.fused_judge or (torch.is_grad_enabled() and images.requires_grad):
            return None
        engine = self._fast_engine()
        if engine is None:
            return None
        from safecb.models.judge_pass import fits

        return engine if fits(engine, prefix_len, suffix_len) else None

    def _judge_unshared(self, images: torch.Tensor, categories: list[str], question: str) -> torch.Tensor:
        """The judge as B × C full sequences, one per image and question: (B, C)."""
        batch, num_cat = images.shape[0], len(categories)
        features = self.model.model.get_image_features(self._judge_pixels(images)).pooler_output  # (B, Ni, H)
        ids, mask = self._encode(self.judge_texts(categories, question))  # (C, T)
        ids = ids.repeat(batch, 1)  # (B*C, T), image-major
        mask = mask.repeat(batch, 1)
        embeds = self.model.get_input_embeddings()(ids)  # (B*C, T, H)
        feats = features.repeat_interleave(num_cat, dim=0).to(embeds.dtype)  # (B*C, Ni, H)
        slots = (ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, feats.reshape(-1))
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self.model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                                 position_ids=positions).last_hidden_state[:, -1]  # (B*C, H)
        return self._yes_probability(hidden).view(batch, num_cat)

    # ---- rewrite -------------------------------------------------------------------------------
    @torch.no_grad()
    def rewrite(self, prompts: list[str], instruction: str, max_new_tokens: int) -> list[str]:
        texts = [self.format.rewrite.format(instruction=instruction, prompt=p) for p in prompts]
        input_ids, mask = self._encode(texts)
        from transformers.utils import logging as hf_logging

        # Janus's text-mode `generate` itself passes guidance_scale beside a generation config and a
        # default max_length, and transformers warns about both on every call (once per shard): noise
        # about its internals, not about this call, so it is silenced here only.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            out = self.model.generate(input_ids, attention_mask=mask, generation_mode="text", do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=self.pad_id,
                                      eos_token_id=self.tokenizer.eos_token_id)
        finally:
            hf_logging.set_verbosity(verbosity)
        new = out[:, input_ids.shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    # ---- codebook ------------------------------------------------------------------------------
    def get_codebook(self) -> torch.Tensor:
        return self.model.model.vqmodel.quantize.embedding.weight.detach().float().cpu().clone()

    def set_codebook(self, codebook: torch.Tensor, version: int) -> None:
        weight = self.model.model.vqmodel.quantize.embedding.weight
        if tuple(codebook.shape) != tuple(weight.shape):
            raise ValueError(f"codebook shape {tuple(codebook.shape)} does not match the model's {tuple(weight.shape)}")
        with torch.no_grad():
            weight.copy_(codebook.to(weight.device, weight.dtype))
        self.codebook_version = int(version)
