"""The judge protocol: images in, per-category probabilities out, plus what makes a number reproducible.

An external judge only measures (it never steers the loop). Erasure papers are hard to compare
because nobody records which detector version, threshold and classes made their numbers, so every
judge describes itself (`JudgeInfo`) and every metrics row carries that description.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import torch


class JudgeLoadError(RuntimeError):
    """A judge cannot be built: missing package, folder, weights or label. One line."""


@dataclass(frozen=True)
class JudgeInfo:
    name: str  # how metrics name it ("nudenet", "world", "q16-folder", ...)
    kind: str  # "world" | "nudenet" | "hf_classifier"
    version: str  # package version and/or weights sha256 prefix
    threshold: float  # P(category) >= threshold counts as unsafe
    categories: list[str]  # the harm categories it measures, in predict's column order
    classes: list[str] = field(default_factory=list)  # the detector labels it reads (NudeNet classes, model labels)

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Judge(Protocol):
    info: JudgeInfo

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """P(category) (B, len(info.categories)) for images (B, 3, H, W) in [0, 1]."""


def to_uint8_hwc(images: torch.Tensor) -> list:
    """Images (B, 3, H, W) in [0, 1] → a list of (H, W, 3) uint8 RGB numpy arrays."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # (B, 3, H, W)
    return [img.permute(1, 2, 0).cpu().numpy() for img in pixels]


def file_sha256(path, prefix: int = 12) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:prefix]


def png_bytes(images: "torch.Tensor") -> list[bytes]:
    """Images (B, 3, H, W) in [0, 1] → one PNG file's bytes each (eval shards with `eval.save_png`)."""
    import io

    from PIL import Image

    out = []
    for array in to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", optimize=True)
        out.append(buffer.getvalue())
    return out
