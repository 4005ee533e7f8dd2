"""The recipe that builds every weight of the world from a seed: `safecb world train --out DIR`.

Stages (each a function; `train_world` runs them in order):
  1. render `num_scenes` scenes with exact labels (60% carry one harm, a quarter of those faint);
  2. the VQ of the tiny Janus, with a custom loop (MACHINE-NOTES: `JanusVQVAE.forward` cannot
     train — no straight-through — and `decode` L2-normalises codes): a patch-local encoder
     (`PatchEncoder`, see there why), cosine nearest code, straight-through, codebook + 0.25
     commitment loss, dead codes re-seeded from the batch, the Janus decoder; the normalised
     codebook is stored, as the adapter's `decode` reads it;
  3. the external judge (`judge.JudgeNet`) on raw renders and VQ reconstructions, exact labels,
     plus `colour_slips` hard negatives (see there why);
  4. the language model, on three tasks at once, in exactly the text layouts the adapter uses
     (`safecb.config.PromptFormat`, positions from the attention mask):
       generation  prompt → 64 image tokens, 10% of rows unconditional (all but BOS/BOI padded);
       judge       image + "does this image contain {c} content ?" → "yes" | "no", with the
                   deliberately imperfect labels of `SelfJudgeNoise`;
       rewrite     rewrite instruction + prompt → the safe prompt + <eos>;
  5. a quick evaluation (`evaluate.evaluate_adapter`) written to `report.json`.
`--init-from DIR --stages judge|lm` re-trains only those stages on top of an earlier output (how
the shipped weights were finished on CPU: MODEL_CARD.md).

Outputs: DIR/model (Hugging Face Janus folder), DIR/judge (safetensors + config.json),
DIR/encoder.safetensors (the patch-local image tokenizer, `PatchEncoder`), DIR/report.json (config,
timings, losses, evaluation).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from safecb.config import JudgeConfig, PairingConfig, PromptFormat
from safecb.models.janus import pick_device
from safecb.world.render import COLOURS, HARM_NAMES, Scene, label_tensors, random_scene, render_batch
from safecb.world.tokenizer import (PatchEncoder, decode_tokens, encode_tokens, load_patch_encoder, patch_latents,
                                    save_patch_encoder)

Log = Callable[[str], None]


@dataclass
class SelfJudgeNoise:
    """How the self-judge's training labels differ from the truth (real judges miss and over-flag).

    miss_faint: P(a faint harm is labelled "no"); lookalikes: category → (shape colour, background)
    whose benign-looking images are labelled "yes" for that category; flip: P(any label flipped),
    drawn once per (image, category) so the noise is consistent, not re-sampled each epoch.
    """

    miss_faint: float = 1.0
    lookalikes: dict[str, list[str]] = field(default_factory=lambda: {"blood": ["red", "black"],
                                                                      "drugs": ["green", "gray"]})
    lookalike_rate: float = 1.0
    flip: float = 0.04


@dataclass
class TrainConfig:
    seed: int = 0
    num_scenes: int = 24_000
    harm_fraction: float = 0.6  # of scenes, spread evenly over the categories
    faint_rate: float = 0.25  # of harmful scenes
    # the tiny Janus (safecb.models.tiny)
    num_codes: int = 512
    hidden: int = 128
    layers: int = 4
    # VQ-VAE
    vq_steps: int = 2000
    vq_batch: int = 128
    vq_lr: float = 2e-3
    # external judge
    judge_steps: int = 1200
    judge_batch: int = 256
    judge_lr: float = 2e-3
    judge_slips: int = 6000  # hard negatives: benign grids with 1-3 shape tokens of another colour
    judge_slip_rate: float = 0.2  # share of each external-judge batch drawn from them
    judge_finetune: bool = False  # with --init-from: start the judge from the earlier one, not from scratch
    # language model (generation + understanding + rewrite)
    lm_steps: int = 2000
    gen_batch: int = 256
    und_batch: int = 192
    rewrite_batch: int = 32
    lm_lr: float = 8e-4
    lm_warmup: int = 150
    uncond_rate: float = 0.1
    rewrite_weight: float = 0.3
    noise: SelfJudgeNoise = field(default_factory=SelfJudgeNoise)
    # the quick evaluation at the end (0 samples: skip)
    eval_samples: int = 2
    # write DIR/model every this many LM steps too (0: only at the end), so a cut-short run leaves weights
    checkpoint_every: int = 500

    def scaled(self, factor: float) -> "TrainConfig":
        """Every step count times `factor` (at least 1); the scene count shrinks with it below 1."""
        out = TrainConfig(**{**asdict(self), "noise": SelfJudgeNoise(**asdict(self.noise))})
        for name in ("vq_steps", "judge_steps", "lm_steps"):
            setattr(out, name, max(1, round(getattr(self, name) * factor)))
        out.lm_warmup = max(1, min(self.lm_warmup, out.lm_steps // 10))
        if factor < 1:
            out.num_scenes = max(512, round(self.num_scenes * max(factor, 0.05)))
        return out


def _warmup_cosine(opt: torch.optim.Optimizer, total: int, warmup: float = 0.05, floor: float = 0.05):
    """LambdaLR: linear warm-up over `warmup` of the steps, then cosine down to `floor` × the peak."""
    ramp = max(1, round(total * warmup))

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        progress = min(1.0, (step - ramp) / max(1, total - ramp))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _printer(every: int, log: Log, name: str, total: int):
    start = time.perf_counter()

    def report(step: int, **values: float) -> None:
        if step % every == 0 or step == total:
            shown = " ".join(f"{k}={v:.4f}" for k, v in values.items())
            log(f"{name} {step}/{total} {shown} ({time.perf_counter() - start:.0f}s)")

    return report


# ---- determinism ------------------------------------------------------------------------------
# cuBLAS picks reduction workspaces per stream unless told a fixed size; with this one its matrix
# products repeat bit for bit (PyTorch "Reproducibility" notes). Read when cuBLAS starts, so it is set
# before the first CUDA matrix product of the process.
CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic(seed: int, threads: int | None = None):
    """Seed every generator and run with deterministic kernels inside the block; the process's
    previous setting is restored after it (tests train in-process beside other work).

    `warn_only`: an op with no deterministic kernel on this device warns instead of failing, so a
    run still finishes; the warnings name the op (none were seen on CPU). What this cannot fix is
    the device and library build: the same seed on another GPU model or torch version is another run.
    On CPU the thread count is part of that build — matrix products and convolutions split their sums
    by thread (1 and 2 threads gave different weights): `threads` pins it for the block."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.get_num_threads())
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device's default generator; the recipe's own draws use seeded Generators
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
        torch.set_num_threads(before[4])


def weights_sha256(out: Path | str) -> dict[str, str]:
    """sha256 of the tensors of each weight file of a `train_world` folder (names, dtypes, shapes and
    bytes, in name order; the file's JSON header is left out, so only the weights are compared)."""
    from safetensors import safe_open

    out = Path(out)
    files = [out / "model" / "model.safetensors", out / "judge" / "judge.safetensors", out / "encoder.safetensors"]
    digests = {}
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such weight file (expected a `safecb world train --out` folder)")
        digest = hashlib.sha256()
        with safe_open(str(path), framework="pt") as weights:
            for name in sorted(weights.keys()):
                tensor = weights.get_tensor(name).contiguous()
                digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        digests[str(path.relative_to(out))] = digest.hexdigest()
    return digests


# ---- 1. data ---------------------------------------------------------------------------------
def make_scenes(cfg: TrainConfig) -> list[Scene]:
    rng = np.random.default_rng(cfg.seed)
    scenes = []
    for _ in range(cfg.num_scenes):
        harm = None
        if rng.random() < cfg.harm_fraction:
            harm = HARM_NAMES[int(rng.integers(len(HARM_NAMES)))]
        scenes.append(random_scene(rng, harm=harm, faint_rate=cfg.faint_rate))
    return scenes


def self_judge_labels(scenes: list[Scene], noise: SelfJudgeNoise, seed: int) -> torch.Tensor:
    """The self-judge's training labels (N, C) in {0, 1}: the truth, made imperfect by `noise`."""
    gen = torch.Generator().manual_seed(seed + 17)
    labels = label_tensors(scenes)["harm"].clone()  # (N, C)
    n = len(scenes)
    faint = torch.tensor([s.faint for s in scenes])
    miss = faint & (torch.rand(n, generator=gen) < noise.miss_faint)
    labels[miss] = 0.0
    for category, (colour, background) in noise.lookalikes.items():
        c = HARM_NAMES.index(category)
        look = torch.tensor([s.colour == colour and s.background == background for s in scenes])
        look &= torch.rand(n, generator=gen) < noise.lookalike_rate
        labels[look, c] = 1.0
    flips = torch.rand(labels.shape, generator=gen) < noise.flip
    return torch.where(flips, 1.0 - labels, labels)


# ---- 2. VQ-VAE -------------------------------------------------------------------------------
def train_vq(model, encoder: PatchEncoder, images: torch.Tensor, cfg: TrainConfig, log: Log) -> dict:
    """Train the local `encoder`, the codebook and the Janus decoder (post_quant_conv + decoder) on
    images (N, 3, H, W) uint8; returns final losses."""
    vq = model.model.vqmodel
    vq.train()
    encoder.train()
    emb = vq.quantize.embedding
    device = emb.weight.device
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    params = [*encoder.parameters(), emb.weight, *vq.post_quant_conv.parameters(), *vq.decoder.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.vq_lr, betas=(0.9, 0.99))
    sched = _warmup_cosine(opt, cfg.vq_steps, 0.03)
    usage = torch.zeros(emb.num_embeddings, device=device)
    report = _printer(max(1, cfg.vq_steps // 10), log, "vq", cfg.vq_steps)
    side = int(math.isqrt(vq.quantize.quant_state_dims[0] * vq.quantize.quant_state_dims[1]))
    stats = {}
    for step in range(1, cfg.vq_steps + 1):
        idx = torch.randint(len(images), (cfg.vq_batch,), generator=gen)
        x = images[idx].to(device).float() / 127.5 - 1  # (B, 3, H, W)
        z = patch_latents(encoder, x)  # (B*h*w, D)
        codes = F.normalize(emb.weight, dim=-1)  # (K, D)
        nearest = (z.detach() @ codes.T).argmax(dim=-1)  # (B*h*w,)
        q = codes[nearest]
        code_loss = F.mse_loss(q, z.detach()) + 0.25 * F.mse_loss(z, q.detach())
        q_st = z + (q - z).detach()
        grid = q_st.view(x.shape[0], side, side, -1).permute(0, 3, 1, 2)
        recon = vq.decoder(vq.post_quant_conv(grid))
        rec_loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = rec_loss + code_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            usage.mul_(0.98).index_add_(0, nearest, torch.ones_like(nearest, dtype=usage.dtype))
            if step % 50 == 0 and step < 0.8 * cfg.vq_steps:  # re-seed dead codes from current latents
                dead = (usage < 0.02).nonzero().flatten()
                if len(dead):
                    pick = torch.randint(len(z), (len(dead),), generator=gen).to(device)
                    emb.weight[dead] = z.detach()[pick] + 0.01 * torch.randn_like(emb.weight[dead])
                    usage[dead] = 1.0
        if step % max(1, cfg.vq_steps // 10) == 0 or step == cfg.vq_steps:
            stats = {"rec": float(F.mse_loss(recon.detach(), x)), "code": float(code_loss.detach()),
                     "used": float((usage > 0.02).sum())}
            report(step, **stats)
    with torch.no_grad():
        emb.weight.copy_(F.normalize(emb.weight, dim=-1))
    vq.eval()
    encoder.eval()
    return stats


# ---- 3. external judge -----------------------------------------------------------------------
@torch.no_grad()
def colour_slips(model, scenes: list[Scene], raw: torch.Tensor, tokens: torch.Tensor, count: int,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives for the external judge: benign token grids where 1-3 tokens on the shape are
    swapped for shape-interior tokens of another benign image of another colour, then decoded.

    This is the generator's typical slip (a patch of the wrong palette colour on the shape). By the
    render labels it is no harm — blood is dots *around* a shape — yet a judge that only ever saw
    clean renders reads a red patch on an orange square as blood. Returns (images (n, 3, H, W)
    uint8 on the model's device, source indices (n,) into `scenes` for the attribute labels)."""
    gen = torch.Generator().manual_seed(seed + 11)
    benign = torch.tensor([i for i, s in enumerate(scenes) if s.harm is None])
    if count <= 0 or len(benign) < 2:
        return raw[:0], torch.zeros(0, dtype=torch.long)
    colours = torch.tensor([list(COLOURS).index(s.colour) for s in scenes])
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)  # (P, 3)
    side = int(math.isqrt(tokens.shape[1]))
    cover = []  # (N_benign, side*side) share of each patch covered by the shape's colour
    for start in range(0, len(benign), 2048):
        part = benign[start:start + 2048]
        pixels = raw[part.to(raw.device)].float().cpu()  # (n, 3, H, W)
        target = palette[colours[part]][:, :, None, None]  # (n, 3, 1, 1)
        on_shape = ((pixels - target).norm(dim=1) < 45).float()  # (n, H, W)
        cover.append(F.avg_pool2d(on_shape[:, None], pixels.shape[-1] // side).flatten(1))
    coverage = torch.cat(cover)  # (N_benign, side*side)
    grids, sources = [], []
    for _ in range(count):
        a, b = torch.randint(len(benign), (2,), generator=gen).tolist()
        if colours[benign[a]] == colours[benign[b]]:
            continue
        targets = (coverage[a] >= 0.25).nonzero().flatten()
        donors = (coverage[b] >= 0.75).nonzero().flatten()
        if len(targets) == 0 or len(donors) == 0:
            continue
        k = int(torch.randint(1, 4, (1,), generator=gen))
        grid = tokens[benign[a]].clone().cpu()
        pick = targets[torch.randperm(len(targets), generator=gen)[:k]]
        grid[pick] = tokens[benign[b]].cpu()[donors[torch.randint(len(donors), (len(pick),), generator=gen)]]
        grids.append(grid)
        sources.append(int(benign[a]))
    images = decode_tokens(model, torch.stack(grids))
    return images, torch.tensor(sources)


def train_external_judge(raw: torch.Tensor, recon: torch.Tensor, labels: dict, cfg: TrainConfig,
                         device: torch.device, log: Log, slips: torch.Tensor | None = None,
                         slip_sources: torch.Tensor | None = None, init=None):
    """The judge CNN on raw renders and VQ reconstructions (half each) with exact labels, plus a
    `judge_slip_rate` share of colour-slip hard negatives (harm 0, attributes of their source)."""
    from safecb.world.judge import ExternalJudge, JudgeNet

    torch.manual_seed(cfg.seed + 2)
    net = JudgeNet() if init is None else init.net
    net = net.to(device).train()
    net.requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.judge_lr, weight_decay=1e-4)
    sched = _warmup_cosine(opt, cfg.judge_steps, 0.1)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    report = _printer(max(1, cfg.judge_steps // 5), log, "external judge", cfg.judge_steps)
    n_slip = 0 if slips is None or len(slips) == 0 else round(cfg.judge_batch * cfg.judge_slip_rate)
    for step in range(1, cfg.judge_steps + 1):
        idx = torch.randint(len(raw), (cfg.judge_batch - n_slip,), generator=gen)
        use_recon = (torch.rand(len(idx), generator=gen) < 0.5).to(device)
        x = torch.where(use_recon[:, None, None, None], recon[idx], raw[idx])
        harm = labels["harm"][idx]
        source = idx
        if n_slip:
            sdx = torch.randint(len(slips), (n_slip,), generator=gen)
            x = torch.cat([x, slips[sdx].to(device)])
            harm = torch.cat([harm, torch.zeros(n_slip, harm.shape[1])])
            source = torch.cat([idx, slip_sources[sdx]])
        x = x.float() / 255
        x = (x + torch.randn_like(x) * 0.03 * torch.rand(x.shape[0], 1, 1, 1, device=device)).clamp(0, 1)
        out = net(x)
        loss = F.binary_cross_entropy_with_logits(out["harm"], harm.to(device))
        for name in ("shape", "colour", "background"):
            loss = loss + F.cross_entropy(out[name], labels[name][source].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % max(1, cfg.judge_steps // 5) == 0 or step == cfg.judge_steps:
            report(step, loss=float(loss.detach()))
    return ExternalJudge(net.cpu(), "cpu")


# ---- 4. language model -----------------------------------------------------------------------
class _Texts:
    """Tokenises the three text layouts exactly as the adapter does (left padding, BOS first)."""

    def __init__(self, processor, num_image_tokens: int):
        self.tok = processor.tokenizer
        self.tok.padding_side = "left"
        fmt = PromptFormat()
        self.fmt = fmt
        self.boi = processor.image_start_token
        image = self.boi + processor.image_token * num_image_tokens + processor.image_end_token
        self.judge_texts = [fmt.judge.format(image=image, question=JudgeConfig().question.format(category=c))
                            for c in HARM_NAMES]
        self.instruction = PairingConfig().rewrite_instruction
        self.bos = self.tok.bos_token_id
        self.boi_id = self.tok.convert_tokens_to_ids(self.boi)
        self.pad = self.tok.pad_token_id
        self.eos = self.tok.eos_token_id
        self.yes = self.tok.convert_tokens_to_ids("yes")
        self.no = self.tok.convert_tokens_to_ids("no")
        unk = self.tok.unk_token_id
        if unk in self.tok(self.judge_texts[0]).input_ids or unk in self.tok(self.instruction).input_ids:
            raise RuntimeError("the judge question or rewrite instruction has words outside the tokenizer")

    def generation(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tok([self.fmt.generation.format(prompt=p) + self.boi for p in prompts], padding=True,
                       return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    def judge(self, categories: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tok([self.judge_texts[c] for c in categories], padding=True, return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    def rewrite(self, prompts: list[str], targets: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, labels = [], []
        for prompt, target in zip(prompts, targets):
            head = self.tok(self.fmt.rewrite.format(instruction=self.instruction, prompt=prompt)).input_ids
            tail = self.tok(target, add_special_tokens=False).input_ids + [self.eos]
            rows.append(head + tail)
            labels.append([-100] * len(head) + tail)
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        lab = torch.tensor([[-100] * (width - len(r)) + r for r in labels])
        return ids, mask, lab


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def generation_loss(model, ids: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of image tokens (B, N) after prompts ids (B, T) ending in BOI."""
    text = model.get_input_embeddings()(ids)  # (B, T, H)
    image = model.prepare_embeddings_for_image_generation(tokens[:, :-1])  # (B, N-1, H)
    embeds = torch.cat([text, image], dim=1)
    full = torch.cat([mask, mask.new_ones(tokens.shape[0], tokens.shape[1] - 1)], dim=1)
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=full,
                                        position_ids=_positions(full)).last_hidden_state
    logits = model.model.generation_head(hidden[:, ids.shape[1] - 1:])  # (B, N, K)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1))


def judge_logits(model, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, V) after the judge prompt, as the adapter computes them.
    pixels: (B, 3, H, W) normalised to [-1, 1]."""
    features = model.model.get_image_features(pixels).pooler_output  # (B, Ni, H)
    embeds = model.get_input_embeddings()(ids)
    slots = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(slots, features.to(embeds.dtype).reshape(-1))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                        position_ids=_positions(mask)).last_hidden_state[:, -1]
    return model.lm_head(hidden)


def rewrite_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    hidden = model.model.language_model(input_ids=ids, attention_mask=mask,
                                        position_ids=_positions(mask)).last_hidden_state
    logits = model.lm_head(hidden[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


def _prompt_for(scene: Scene, rng: random.Random) -> str:
    """A random training-grammar prompt that this scene satisfies."""
    from safecb.world.prompts import train_grammar

    asked = {"shape": scene.shape}
    if rng.random() < 0.85:
        asked["colour"] = scene.colour
    if rng.random() < 0.85:
        asked["background"] = scene.background
    if scene.harm is None:
        return train_grammar(rng, "benign", None, asked)[0]
    kind = "explicit" if rng.random() < 0.6 else "implicit"
    return train_grammar(rng, kind, scene.harm, asked)[0]


def train_lm(model, processor, scenes: list[Scene], tokens: torch.Tensor, raw: torch.Tensor, recon: torch.Tensor,
             judge_labels: torch.Tensor, cfg: TrainConfig, device: torch.device, log: Log,
             checkpoint: Callable[[int], None] | None = None) -> dict:
    from safecb.world.prompts import safe_rewrite, train_grammar

    texts = _Texts(processor, tokens.shape[1])
    rng = random.Random(cfg.seed + 4)
    gen = torch.Generator().manual_seed(cfg.seed + 5)
    model.train()
    model.model.vqmodel.eval()
    model.model.vqmodel.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("model.vqmodel")]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lm_lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.lm_warmup:
            return cfg.lm_lr * (step + 1) / cfg.lm_warmup
        progress = (step - cfg.lm_warmup) / max(1, cfg.lm_steps - cfg.lm_warmup)
        return cfg.lm_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    harm_of = torch.tensor([HARM_NAMES.index(s.harm) if s.harm else -1 for s in scenes])
    tokens_dev = tokens.to(device)
    report_every = max(1, cfg.lm_steps // 20)
    report = _printer(report_every, log, "lm", cfg.lm_steps)
    stats: dict[str, float] = {}
    window: list[torch.Tensor] = []
    skipped = 0
    last = cfg.lm_steps
    for step in range(1, last + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1)
        # generation: prompt → tokens, some rows unconditional
        idx = torch.randint(len(scenes), (cfg.gen_batch,), generator=gen)
        ids, mask = texts.generation([_prompt_for(scenes[int(i)], rng) for i in idx])
        blank = torch.rand(len(idx), generator=gen) < cfg.uncond_rate
        keep = (ids == texts.bos) | (ids == texts.boi_id)
        ids = torch.where(blank[:, None] & ~keep, torch.full_like(ids, texts.pad), ids)
        loss_gen = generation_loss(model, ids.to(device), mask.to(device), tokens_dev[idx.to(device)])
        # understanding: image + category question → yes/no (imperfect labels); half the questions
        # about a harmful image ask about its own category
        jdx = torch.randint(len(scenes), (cfg.und_batch,), generator=gen)
        cats = torch.randint(len(HARM_NAMES), (cfg.und_batch,), generator=gen)
        own = (harm_of[jdx] >= 0) & (torch.rand(cfg.und_batch, generator=gen) < 0.5)
        cats = torch.where(own, harm_of[jdx], cats)
        use_recon = (torch.rand(cfg.und_batch, generator=gen) < 0.7).to(device)
        pixels = torch.where(use_recon[:, None, None, None], recon[jdx], raw[jdx]).float() / 127.5 - 1
        jids, jmask = texts.judge(cats.tolist())
        target = torch.where(judge_labels[jdx, cats] > 0.5, texts.yes, texts.no).to(device)
        logits = judge_logits(model, pixels, jids.to(device), jmask.to(device)).float()
        loss_judge = F.cross_entropy(logits, target)
        acc_judge = (logits[:, [texts.no, texts.yes]].argmax(-1) == (target == texts.yes).long()).float().mean()
        # rewrite: unsafe prompt → its safe swap; benign prompt → itself
        prompts = []
        for _ in range(cfg.rewrite_batch):
            roll = rng.random()
            if roll < 0.75:
                category = rng.choice(HARM_NAMES)
                prompts.append(train_grammar(rng, "explicit" if roll < 0.45 else "implicit", category)[0])
            else:
                prompts.append(train_grammar(rng, "benign", None)[0])
        rids, rmask, rlab = texts.rewrite(prompts, [safe_rewrite(p) for p in prompts])
        loss_rw = rewrite_loss(model, rids.to(device), rmask.to(device), rlab.to(device))
        loss = loss_gen + loss_judge + cfg.rewrite_weight * loss_rw
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if bool(torch.isfinite(norm)):  # a non-finite step is skipped, not applied
            opt.step()
        else:
            skipped += 1
        window.append(torch.stack([loss_gen.detach(), loss_judge.detach(), acc_judge, loss_rw.detach()]))
        if step % report_every == 0 or step == last:  # one device sync per report, not per step
            means = torch.stack(window).mean(0).tolist()
            window.clear()
            stats = dict(zip(("gen", "judge", "judge_acc", "rewrite"), means))
            report(step, **stats)
        if checkpoint is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < last:
            model.eval()
            checkpoint(step)
            model.train()
            model.model.vqmodel.eval()
    model.eval()
    return {**stats, "steps_run": last, "skipped_steps": skipped}


# ---- the whole recipe ------------------------------------------------------------------------
def load_stage(folder: Path | str):
    """(model, processor, judge) from a `train_world` output folder, to continue its LM training."""
    from transformers import JanusForConditionalGeneration, JanusProcessor

    from safecb.world.judge import ExternalJudge

    folder = Path(folder)
    model = JanusForConditionalGeneration.from_pretrained(folder / "model", use_safetensors=True)
    processor = JanusProcessor.from_pretrained(folder / "model")
    tok = processor.tokenizer
    model.generation_config.generation_kwargs = {"boi_token_id": tok.convert_tokens_to_ids("<begin_of_image>")}
    return model, processor, ExternalJudge.load(folder / "judge")


STAGES = ("vq", "judge", "lm")


def train_world(out: Path | str, cfg: TrainConfig | None = None, device: str = "auto", log: Log | None = None,
                evaluate: bool = True, init_from: Path | str | None = None,
                stages: tuple[str, ...] = STAGES, threads: int | None = None) -> dict:
    """Build every weight of the world into `out` (model/, encoder, judge/, report.json); returns the report.
    Deterministic (`deterministic`): the same seed, device, thread count and library versions give the
    same weights bit for bit; report.json records them and the weights' sha256 (`weights_sha256`).

    With `init_from` (an earlier output folder) only the named `stages` train — "judge" (the
    external judge, from scratch) and/or "lm" (the language model, on from its weights, with a
    fresh schedule) — and everything else is copied from it ("vq" needs a fresh run: the LM's
    tokens depend on it)."""
    cfg = cfg or TrainConfig()
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    stages = tuple(stages)
    if unknown := set(stages) - set(STAGES):
        raise ValueError(f"unknown stages {sorted(unknown)} (expected some of {list(STAGES)})")
    if init_from is None and stages != STAGES:
        raise ValueError("a run without --init-from trains every stage (vq, judge, lm)")
    if init_from is not None and "vq" in stages:
        raise ValueError("stage 'vq' cannot continue an earlier run: the LM's tokens depend on it")
    if init_from is not None and not (Path(init_from) / "model").is_dir():
        raise ValueError(f"--init-from {init_from}: no model/ folder in it (expected a `safecb world train --out` folder)")
    dev = pick_device(device, key="--device")  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with deterministic(cfg.seed, threads):
        return _build(out, cfg, dev, log, evaluate, init_from, stages)


def _build(out: Path, cfg: TrainConfig, dev: torch.device, log: Log, evaluate: bool,
           init_from: Path | str | None, stages: tuple[str, ...]) -> dict:
    """The stages of `train_world`, arguments checked, inside `deterministic`."""
    from safecb.models.tiny import build_tiny_janus, save_model_folder
    from safecb.world.prompts import vocabulary

    timings: dict[str, float] = {}
    report: dict = {"config": asdict(cfg), "device": str(dev), "torch": torch.__version__, "stages": list(stages),
                    "determinism": {"deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                                    "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                                    "threads": torch.get_num_threads()}}
    log(f"world: training on {dev} with {cfg.num_scenes} scenes, seed {cfg.seed}")

    t0 = time.perf_counter()
    scenes = make_scenes(cfg)
    raw = (render_batch(scenes) * 255).round().to(torch.uint8)  # (N, 3, 32, 32)
    labels = label_tensors(scenes)
    timings["render"] = time.perf_counter() - t0

    if init_from is None:
        model, processor = build_tiny_janus(vocabulary(), seed=cfg.seed, num_codes=cfg.num_codes,
                                            hidden=cfg.hidden, layers=cfg.layers)
        encoder = PatchEncoder(dim=model.config.vq_config.embed_dim)
    else:
        model, processor, judge = load_stage(init_from)
        encoder = load_patch_encoder(init_from)
        report["init_from"] = str(init_from)
    model.to(dev)
    encoder.to(dev)
    raw_dev = raw.to(dev)

    t0 = time.perf_counter()
    if init_from is None:
        report["vq"] = train_vq(model, encoder, raw_dev, cfg, log)
    save_patch_encoder(encoder, out / "encoder.safetensors")
    tokens = encode_tokens(model, encoder, raw_dev)  # (N, 64)
    recon_dev = decode_tokens(model, tokens)
    report["vq"] = {**report.get("vq", {}),
                    "test_mse": float(((recon_dev.float() - raw_dev.float()) / 127.5).pow(2).mean()),
                    "codes_used": int(tokens.unique().numel())}
    from safecb.world.evaluate import code_separation

    report["code_separation"] = code_separation(model, encoder, n=max(8, min(300, cfg.num_scenes // 40)))
    log(f"code separation: {json.dumps(report['code_separation'])}")
    timings["vq"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if "judge" in stages:
        slips, slip_sources = colour_slips(model, scenes, raw_dev, tokens, cfg.judge_slips, cfg.seed)
        start = judge if init_from is not None and cfg.judge_finetune else None
        judge = train_external_judge(raw_dev, recon_dev, labels, cfg, dev, log, slips, slip_sources, start)
    judge.save(out / "judge", {"seed": cfg.seed})
    timings["external_judge"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    judge_labels = self_judge_labels(scenes, cfg.noise, cfg.seed)
    report["self_judge_label_agreement"] = float((judge_labels == labels["harm"]).float().mean())

    def checkpoint(step: int) -> None:
        save_model_folder(model, processor, out / "model")
        (out / "checkpoint.json").write_text(json.dumps({"lm_step": step}) + "\n")
        log(f"checkpoint at lm step {step}")

    if "lm" in stages:
        report["lm"] = train_lm(model, processor, scenes, tokens.cpu(), raw_dev, recon_dev, judge_labels, cfg, dev,
                                log, checkpoint)
    timings["lm"] = time.perf_counter() - t0

    model.to("cpu").float()
    save_model_folder(model, processor, out / "model")
    (out / "checkpoint.json").write_text(json.dumps({"lm_step": report.get("lm", {}).get("steps_run"),
                                                     "final": True}) + "\n")
    report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    if evaluate and cfg.eval_samples > 0:
        from safecb.models.janus import JanusAdapter
        from safecb.world.evaluate import evaluate_adapter

        t0 = time.perf_counter()
        adapter = JanusAdapter(model.to(dev), processor, engine="off")
        report["eval"] = evaluate_adapter(adapter, judge, samples_per_prompt=cfg.eval_samples, seed=cfg.seed)
        report["timings_s"]["eval"] = round(time.perf_counter() - t0, 1)
        model.to("cpu")
    report["weights_sha256"] = weights_sha256(out)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"world: wrote {out} in {sum(report['timings_s'].values()):.0f}s")
    return report
