"""Arrow schemas for every table the run writes, plus row <-> table helpers.

Every row carries run id, iteration, codebook version, prompt id, sample index and seed, so a
shard can be traced back to the exact call that produced it. Images are stored as VQ tokens
(small); PNG bytes are optional (nullable).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SCHEMA_VERSION: int = 2
SCHEMA_VERSION_KEY: bytes = b"safecb.schema_version"


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    meta = {SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode(), b"safecb.table": name.encode()}
    return pa.schema(fields, metadata=meta)


# One row per prompt of a run's prompt snapshot (`prompts/{name}.parquet`), in source order.
PROMPT_SCHEMA = _schema(
    "prompts",
    [
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),  # as the model sees it (after any truncation)
        pa.field("split", pa.string(), nullable=False),  # e.g. "train", "unsafe", "benign"
        pa.field("source", pa.string(), nullable=False),  # the config key it came from, e.g. "prompts.train"
        pa.field("category", pa.string(), nullable=True),  # the harm it asks for, when the source says
        # Built-in sets: the full world PromptRecord as JSON, so any process can rebuild the exact labels.
        pa.field("meta", pa.string(), nullable=True),
    ],
)

GENERATION_SCHEMA = _schema(
    "generations",
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("iteration", pa.int32(), nullable=False),
        pa.field("codebook_version", pa.int32(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("tokens", pa.list_(pa.int32()), nullable=False),
        # One probability per harm category; category order is recorded in the manifest.
        pa.field("unsafe_probs", pa.list_(pa.float32()), nullable=False),
        pa.field("max_unsafe_prob", pa.float32(), nullable=False),
        pa.field("unsafe", pa.bool_(), nullable=False),
        pa.field("role", pa.string(), nullable=False),  # "collect" | "counterpart" | "eval"
        pa.field("png", pa.binary(), nullable=True),
        # Safe rows drawn with an edited codebook (v ≥ 1): was the same grid unsafe when decoded with v0?
        # Such an image looks safe only because of earlier edits; it must not become a quality target,
        # whose pixels are the v0 decode (UpdateStatistics.add_generations). Null: not checked (v0).
        pa.field("unsafe_v0", pa.bool_(), nullable=True),
    ],
)

PAIR_SCHEMA = _schema(
    "pairs",
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("iteration", pa.int32(), nullable=False),
        pa.field("codebook_version", pa.int32(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("harmful_prompt", pa.string(), nullable=False),
        pa.field("safe_prompt", pa.string(), nullable=False),
        pa.field("harmful_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("safe_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("harmful_prob", pa.float32(), nullable=False),
        pa.field("safe_prob", pa.float32(), nullable=False),
        pa.field("counterpart", pa.string(), nullable=False),  # "rewrite" | "safe_sample"
    ],
)


def table_from_rows(schema: pa.Schema, rows: list[dict]) -> pa.Table:
    """Build a table of `schema` from a list of dicts, rejecting missing or unknown fields.

    Nullable fields may be omitted (filled with null). Errors name the row index and field.
    """
    names = schema.names
    known = set(names)
    required = {f.name for f in schema if not f.nullable}
    table_name = (schema.metadata or {}).get(b"safecb.table", b"table").decode()
    for i, row in enumerate(rows):
        keys = set(row)
        missing = sorted(required - keys)
        if missing:
            raise ValueError(f"{table_name} row {i}: missing field(s) {missing}; expected {names}")
        extra = sorted(keys - known)
        if extra:
            raise ValueError(f"{table_name} row {i}: unknown field(s) {extra}; expected {names}")
    columns = {}
    for field in schema:
        values = [row.get(field.name) for row in rows]
        if not field.nullable:
            nulls = [i for i, v in enumerate(values) if v is None]
            if nulls:
                raise ValueError(f"{table_name} row {nulls[0]}: field {field.name!r} is None but not nullable")
        try:
            columns[field.name] = _int_grids(values, field.type) or pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise ValueError(f"{table_name}: field {field.name!r} expected {field.type}: {e}") from None
    return pa.Table.from_pydict(columns, schema=schema)


def _int_grids(values: list, type_: pa.DataType) -> pa.Array | None:
    """A list<int32> column of equal-length int lists (token grids) through NumPy, ~15x faster than
    `pa.array` on Python ints; None (the caller's `pa.array` then checks and reports) for anything else
    but floats, which are refused."""
    if not (pa.types.is_list(type_) and type_.value_type == pa.int32()) or not values:
        return None
    try:
        grid = np.asarray(values)  # nulls and strings make an object or text array, and go to pa.array
    except ValueError:  # ragged
        return None
    if grid.ndim != 2 or grid.size == 0:
        return None
    if grid.dtype.kind == "f":  # pa.array would truncate 1.5 to 1 without a word
        raise TypeError("token grids hold integers, got floats")
    info = np.iinfo(np.int32)
    if grid.dtype.kind != "i" or grid.min() < info.min or grid.max() > info.max:
        return None
    width = grid.shape[1]
    offsets = pa.array(np.arange(0, (len(values) + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(grid.reshape(-1).astype(np.int32)), type=type_)


def rows_from_table(table: pa.Table) -> list[dict]:
    """Inverse of `table_from_rows`: one dict per row, Python scalars and lists."""
    return table.to_pylist()
