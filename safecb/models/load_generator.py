"""The load generator: a `UnifiedModel` that costs almost nothing and knows nothing.

    STAND-IN FOR SCALE AND FAULT TESTS ONLY. NEVER EVIDENCE THAT THE ALGORITHM WORKS.

`model.backend: load-generator` runs the whole pipeline (snapshots, actors, shards, commits,
manifests, the codebook update, evaluation) at the speed of the framework alone: no network, no
weights, no real images. Its "images" are a fixed linear map of the codebook rows; its "judge"
calls a tuned fraction of them unsafe by a fixed random projection, which has nothing to do with
harm; its "rewrite" drops one fixed word or appends "safe". Unsafe rates, pair counts and codebook
shifts of a run on it say how much data flowed through the pipeline, never whether Safe-CB makes a
model safer: use it to measure throughput and driver memory, and to break things on purpose
(actor deaths, retries, resumes) at a million prompts.

Everything is a pure function of its inputs, so a retried or resumed shard redraws the same rows:
  * tokens: SHAKE-128 of (seed, prompt) → `num_image_tokens` codes out of K, uniform (a sample does
    not depend on its batch, nor on torch's RNG or version);
  * decode: L2-normalised codes → a fixed linear map (D → 3·p·p per token, p = image_size / grid)
    → sigmoid → (B, 3, H, W); differentiable with respect to the codebook, so fine-tuning runs;
  * judge: C fixed projections of the pixels, standardised on a fixed calibration set of the
    initial codebook's images, thresholded so that `unsafe_fraction` of such images have
    max_c P(unsafe) ≥ 0.5 (the judge is fixed: changing the codebook changes what it says);
  * rewrite: the prompt without `drop_word` if it holds it, else the prompt + " safe".
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from safecb.models.base import SamplingParams

BACKEND = "load-generator"
CALIBRATION_IMAGES = 4096  # fixed grids that set the judge's scale and threshold
_CALIBRATION_BATCH = 512


def _draw(tag: str, prompts: list[str], seeds: list[int], count: int) -> np.ndarray:
    """(B, count) uint32, a pure function of (tag, seed, prompt) per row."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    blob = b"".join(hashlib.shake_128(f"{tag}|{int(s)}|{p}".encode()).digest(4 * count) for p, s in zip(prompts, seeds))
    return np.frombuffer(blob, dtype="<u4").reshape(len(prompts), count)


class LoadGenerator:
    """A fast, deterministic `UnifiedModel` for scale and fault tests ONLY (see the module docstring).

    Not a model of anything: no run on it is evidence that Safe-CB works. Defaults: K=512 codes of
    D=8, an 8x8 token grid (64 tokens), 32x32 images, half the images judged unsafe. Runs on the CPU.
    `sampling params` (guidance, temperature, top-k) are accepted and ignored.
    """

    backend = BACKEND

    def __init__(self, num_codes: int = 512, code_dim: int = 8, grid: int = 8, image_size: int = 32,
                 unsafe_fraction: float = 0.5, seed: int = 0, drop_word: str = "unsafe", sharpness: float = 4.0):
        if not 0.0 <= unsafe_fraction <= 1.0:
            raise ValueError(f"unsafe_fraction must be in [0, 1], got {unsafe_fraction}")
        if image_size % grid:
            raise ValueError(f"image_size {image_size} must be a multiple of grid {grid}")
        if not 2 <= num_codes <= 2**32 or code_dim < 1 or grid < 1:
            raise ValueError(f"bad sizes: num_codes={num_codes}, code_dim={code_dim}, grid={grid}")
        self.num_codes, self.code_dim, self.grid, self.image_size = num_codes, code_dim, grid, image_size
        self.unsafe_fraction, self.seed, self.drop_word, self.sharpness = unsafe_fraction, seed, drop_word, sharpness
        self.num_image_tokens = grid * grid
        self.codebook_version = 0
        self.device = torch.device("cpu")
        self.patch = image_size // grid
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"load-generator|{seed}".encode()).digest()[:7], "little"))
        self._codebook = torch.randn(num_codes, code_dim, generator=g)
        self._codebook_v0 = self._codebook.clone()  # what the judge is calibrated on, never changed
        self._pixel_map = torch.randn(code_dim, 3 * self.patch ** 2, generator=g) * 1.5  # fixed: code → patch
        self._pixel_bias = torch.randn(3 * self.patch ** 2, generator=g) * 0.25
        self._calibration = torch.randint(num_codes, (CALIBRATION_IMAGES, self.num_image_tokens), generator=g)
        self._judges: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}

    def settings(self) -> dict:
        """What determines every output (the registry's fingerprint hashes this)."""
        return {"backend": BACKEND, "num_codes": self.num_codes, "code_dim": self.code_dim, "grid": self.grid,
                "image_size": self.image_size, "unsafe_fraction": self.unsafe_fraction, "seed": self.seed,
                "drop_word": self.drop_word, "sharpness": self.sharpness, "calibration_images": CALIBRATION_IMAGES}

    # ---- generation ----------------------------------------------------------------------------
    def generate_tokens(self, prompts: list[str], seeds: list[int], params: SamplingParams | None = None) -> torch.Tensor:
        """(B, N) int64: uniform codes drawn from SHAKE-128 of (seed, prompt); batch-independent."""
        bits = _draw("tokens", prompts, seeds, self.num_image_tokens)
        return torch.from_numpy((bits % self.num_codes).astype(np.int64))

    def counterpart_tokens(self, prompts: list[str], seeds: list[int], tokens: torch.Tensor,
                           params: SamplingParams | None = None) -> torch.Tensor:
        """(B, N): the grid drawn under `prompts` where a coin of the seed alone says so (1 in 4
        positions), `tokens` elsewhere: position-aligned, a pure function of (prompt, seed, tokens)."""
        if tokens.shape != (len(prompts), self.num_image_tokens):
            raise ValueError(f"tokens of shape {tuple(tokens.shape)}, expected ({len(prompts)}, {self.num_image_tokens})")
        fresh = self.generate_tokens(prompts, seeds)
        redraw = torch.from_numpy(_draw("redraw", [""] * len(seeds), seeds, self.num_image_tokens) % 4 == 0)
        return torch.where(redraw, fresh, tokens.cpu().long())

    # ---- decode --------------------------------------------------------------------------------
    def decode(self, tokens: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) in (0, 1): sigmoid of a fixed linear map of each token's normalised code,
        one p x p patch a token. Differentiable with respect to `codebook` (K, D)."""
        weight = self._codebook if codebook is None else codebook
        codes = F.normalize(weight.float(), dim=-1)[tokens.long().cpu()]  # (B, N, D)
        patches = codes @ self._pixel_map + self._pixel_bias  # (B, N, 3·p·p)
        b, g, p = tokens.shape[0], self.grid, self.patch
        pixels = patches.view(b, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, g * p, g * p)
        return torch.sigmoid(pixels)

    # ---- judge ---------------------------------------------------------------------------------
    def _judge_params(self, num_categories: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(projection (3HW, C), mean (C,), std (C,), threshold) for C categories, calibrated once."""
        if num_categories not in self._judges:
            pixels = 3 * self.image_size ** 2
            columns = []
            for c in range(num_categories):  # column c is the same whatever C is
                g = torch.Generator().manual_seed(int.from_bytes(
                    hashlib.sha256(f"load-generator|judge|{self.seed}|{c}".encode()).digest()[:7], "little"))
                columns.append(torch.randn(pixels, generator=g) / math.sqrt(pixels))
            projection = torch.stack(columns, dim=1)
            with torch.no_grad():
                raw = torch.cat([self.decode(self._calibration[i:i + _CALIBRATION_BATCH], self._codebook_v0).flatten(1)
                                 @ projection for i in range(0, CALIBRATION_IMAGES, _CALIBRATION_BATCH)])
            mean, std = raw.mean(0), raw.std(0).clamp_min(1e-12)
            top = ((raw - mean) / std).max(dim=1).values.double()
            if self.unsafe_fraction <= 0.0:
                threshold = math.inf
            elif self.unsafe_fraction >= 1.0:
                threshold = -math.inf
            else:  # a fraction f of the calibration images have max_c z_c above it
                threshold = float(torch.quantile(top, 1.0 - self.unsafe_fraction))
            self._judges[num_categories] = (projection, mean, std, threshold)
        return self._judges[num_categories]

    def judge(self, images: torch.Tensor, categories: list[str], question: str = "") -> torch.Tensor:
        """P(unsafe) (B, C) = sigmoid(sharpness · (z_c − t)): z_c a fixed standardised projection of the
        pixels per category position, t set so that `unsafe_fraction` of the initial codebook's images
        reach 0.5 in some category. Names and question are ignored. Differentiable in `images`."""
        projection, mean, std, threshold = self._judge_params(len(categories))
        pixels = images.float().cpu()
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        z = (pixels.flatten(1) @ projection - mean) / std
        if math.isinf(threshold):
            return torch.full_like(z, 0.0 if threshold > 0 else 1.0) + 0.0 * z  # keeps the graph
        return torch.sigmoid(self.sharpness * (z - threshold))

    # ---- rewrite -------------------------------------------------------------------------------
    def rewrite(self, prompts: list[str], instruction: str = "", max_new_tokens: int = 32) -> list[str]:
        """Each prompt without the word `drop_word` (case-insensitive) if it holds it, else + " safe";
        at most `max_new_tokens` words; "" when nothing is left."""
        out = []
        for prompt in prompts:
            words = prompt.split()
            kept = [w for w in words if w.lower() != self.drop_word.lower()]
            new = kept if len(kept) < len(words) else [*words, "safe"]
            out.append(" ".join(new[:max_new_tokens]))
        return out

    # ---- codebook ------------------------------------------------------------------------------
    def get_codebook(self) -> torch.Tensor:
        return self._codebook.detach().clone()

    def set_codebook(self, codebook: torch.Tensor, version: int) -> None:
        if tuple(codebook.shape) != tuple(self._codebook.shape):
            raise ValueError(f"codebook shape {tuple(codebook.shape)} does not match the model's {tuple(self._codebook.shape)}")
        self._codebook = codebook.detach().float().cpu().clone()
        self.codebook_version = int(version)


def count_prompt_tokens(prompts: list[str]) -> list[int]:
    """The load generator's prompt length: whitespace words + 2 (begin of text, begin of image)."""
    return [len(p.split()) + 2 for p in prompts]
