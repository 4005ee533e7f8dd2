"""Per-iteration manifest: the only thing readers trust (they never glob shard folders)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from safecb.schemas.arrow import SCHEMA_VERSION


class ShardRecord(BaseModel):
    """One shard object. `path` is relative to the run root; `bytes` is its size.

    `attempt` names the attempt that wrote the object (it is part of `path`, so two attempts of one
    shard never overwrite each other); "" in records written before attempts existed. `actor` and
    `node` say where it ran (diagnostics only). `stats` holds small per-shard summary numbers the
    driver aggregates without reading the shard.
    """

    model_config = ConfigDict(extra="forbid")

    kind: str
    index: int = Field(ge=0)
    path: str
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    attempt: str = Field(default="", pattern=r"^([A-Za-z0-9_-]{1,64})?$")
    actor: str | None = None
    node: str | None = None
    stats: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str | bytes) -> "ShardRecord":
        return cls.model_validate_json(text)


class Manifest(BaseModel):
    """Written last for an iteration; lists exactly the shards of each kind (sorted by index).

    `categories` gives the order of `unsafe_probs` in generation rows. `extra` holds free-form
    numbers the controller wants to keep (the iteration's metrics row). `inputs` fixes what the run
    was started on — the prompt snapshots' content hashes and the model folder's fingerprint — so a
    resume with other prompts or another model is refused.
    """

    model_config = ConfigDict(extra="forbid")

    run_id: str
    iteration: int = Field(ge=0)
    schema_version: int = SCHEMA_VERSION
    codebook_version: int = Field(ge=0)
    categories: list[str]
    shards: dict[str, list[ShardRecord]] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    inputs: dict[str, Any] = Field(default_factory=dict)
    created_at: str
    config_hash: str
    git_rev: str | None = None

    @field_validator("shards")
    @classmethod
    def _sorted_and_consistent(cls, v: dict[str, list[ShardRecord]]) -> dict[str, list[ShardRecord]]:
        out = {}
        for kind, records in v.items():
            bad = [r.kind for r in records if r.kind != kind]
            if bad:
                raise ValueError(f"shards[{kind!r}] holds records of kind {bad[0]!r}")
            records = sorted(records, key=lambda r: r.index)
            idx = [r.index for r in records]
            if len(set(idx)) != len(idx):
                raise ValueError(f"shards[{kind!r}] has duplicate indices")
            out[kind] = records
        return out

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        return cls.model_validate_json(text)
