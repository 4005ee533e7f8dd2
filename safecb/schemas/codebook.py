"""Codebook artifact metadata and (de)serialisation to safetensors bytes.

Tensors live under key "codebook" (shape (K, D)) and optionally "generation_embeddings". The
artifact metadata is stored twice: in the safetensors `metadata` field (string -> string) and in
a JSON sidecar `vNNNN.json`; `sha256` is of the safetensors file bytes, so it lives only in the
sidecar (it cannot be inside the bytes it hashes).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    import torch

CODEBOOK_KEY = "codebook"
GENERATION_EMBEDDINGS_KEY = "generation_embeddings"
ALLOWED_KEYS = (CODEBOOK_KEY, GENERATION_EMBEDDINGS_KEY)


class CodebookArtifact(BaseModel):
    """Metadata of one codebook version. `sha256` is filled by the store on write."""

    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=0)
    parent_version: int | None = None
    iteration: int = Field(ge=0)
    sha256: str = ""
    shape: list[int] = Field(default_factory=list)
    dtype: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: str
    config_hash: str
    git_rev: str | None = None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> "CodebookArtifact":
        return cls.model_validate_json(text)


def _meta_dict(artifact_meta: CodebookArtifact | dict[str, Any]) -> dict[str, str]:
    if isinstance(artifact_meta, CodebookArtifact):
        d = artifact_meta.model_dump(exclude={"sha256"})
    else:
        d = {k: v for k, v in artifact_meta.items() if k != "sha256"}
    # safetensors metadata is str -> str: JSON-encode every value so it decodes losslessly.
    return {str(k): json.dumps(v, sort_keys=True) for k, v in d.items()}


def codebook_to_bytes(tensors: dict[str, "torch.Tensor"], artifact_meta: CodebookArtifact | dict[str, Any]) -> bytes:
    """Serialise `tensors` (must contain "codebook") with the artifact metadata embedded."""
    from safetensors.torch import save

    if CODEBOOK_KEY not in tensors:
        raise ValueError(f"codebook tensors must contain key {CODEBOOK_KEY!r}; got {sorted(tensors)}")
    unknown = sorted(set(tensors) - set(ALLOWED_KEYS))
    if unknown:
        raise ValueError(f"unknown codebook tensor key(s) {unknown}; allowed {list(ALLOWED_KEYS)}")
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return _canonical_header(save(clean, metadata=_meta_dict(artifact_meta)))


def _canonical_header(b: bytes) -> bytes:
    """Re-encode the safetensors JSON header with sorted keys so equal inputs give equal bytes.

    safetensors writes its metadata from a hash map (key order varies between calls), which would
    make the sha256 of a rewritten codebook unstable. Offsets are relative to the data section, so
    only the header changes; it is space-padded to a multiple of 8 bytes as safetensors does.
    """
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b[8 + n :]


def codebook_from_bytes(b: bytes) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """Inverse of `codebook_to_bytes`: (tensors, metadata dict with JSON-decoded values)."""
    from safetensors.torch import load

    tensors = load(b)
    meta = _read_metadata(b)
    return tensors, {k: json.loads(v) for k, v in meta.items()}


def _read_metadata(b: bytes) -> dict[str, str]:
    # safetensors layout: u64 little-endian header length, then a JSON header with "__metadata__".
    if len(b) < 8:
        raise ValueError("safetensors bytes too short")
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8 : 8 + n])
    return header.get("__metadata__", {}) or {}
