"""Arrow schemas, manifest and codebook artifact models (pure: no I/O)."""

from safecb.schemas.arrow import (
    GENERATION_SCHEMA,
    PAIR_SCHEMA,
    PROMPT_SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    rows_from_table,
    table_from_rows,
)
from safecb.schemas.codebook import CodebookArtifact, codebook_from_bytes, codebook_to_bytes
from safecb.schemas.manifest import Manifest, ShardRecord

__all__ = [
    "GENERATION_SCHEMA",
    "PAIR_SCHEMA",
    "PROMPT_SCHEMA",
    "SCHEMA_VERSION",
    "SCHEMA_VERSION_KEY",
    "CodebookArtifact",
    "Manifest",
    "ShardRecord",
    "codebook_from_bytes",
    "codebook_to_bytes",
    "rows_from_table",
    "table_from_rows",
]
