"""Schemas: version metadata, row validation, manifest strictness, codebook bytes round trip."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from safecb.schemas import (
    GENERATION_SCHEMA,
    PAIR_SCHEMA,
    PROMPT_SCHEMA,
    SCHEMA_VERSION,
    CodebookArtifact,
    Manifest,
    ShardRecord,
    codebook_from_bytes,
    codebook_to_bytes,
    rows_from_table,
    table_from_rows,
)

SHA = "ab" * 32


def gen_row(i: int = 0, **over) -> dict:
    row = dict(
        run_id="r1", iteration=2, codebook_version=1, prompt_id=f"p{i}", prompt="a cat", sample_index=i,
        seed=1234 + i, tokens=[1, 2, 3], unsafe_probs=[0.1, 0.9], max_unsafe_prob=0.9, unsafe=True, role="collect",
    )
    row.update(over)
    return row


def manifest(**over) -> Manifest:
    kw = dict(
        run_id="r1", iteration=3, codebook_version=2, categories=["sexual", "violence"],
        shards={"generations": [
            ShardRecord(kind="generations", index=5, path="iter=0003/generations/shard-000005.parquet", rows=2, bytes=10, sha256=SHA),
            ShardRecord(kind="generations", index=1, path="iter=0003/generations/shard-000001.parquet", rows=3, bytes=11, sha256=SHA),
        ]},
        extra={"threshold": 0.5}, created_at="2026-11-28T00:00:00Z", config_hash="cafe", git_rev=None,
    )
    kw.update(over)
    return Manifest(**kw)


@pytest.mark.parametrize("schema", [PROMPT_SCHEMA, GENERATION_SCHEMA, PAIR_SCHEMA])
def test_schema_version_in_metadata(schema):
    assert SCHEMA_VERSION == 2  # 2: generations gained unsafe_v0
    assert schema.metadata[b"safecb.schema_version"] == b"2"


def test_generation_field_types():
    assert GENERATION_SCHEMA.field("tokens").type == pa.list_(pa.int32())
    assert GENERATION_SCHEMA.field("unsafe_probs").type == pa.list_(pa.float32())
    assert GENERATION_SCHEMA.field("seed").type == pa.int64()
    assert GENERATION_SCHEMA.field("png").nullable
    assert PAIR_SCHEMA.field("counterpart").type == pa.string()


def test_table_round_trip_and_optional_png():
    rows = [gen_row(0), gen_row(1, png=b"\x89PNG")]
    t = table_from_rows(GENERATION_SCHEMA, rows)
    assert t.schema.equals(GENERATION_SCHEMA, check_metadata=True)
    back = rows_from_table(t)
    assert back[0]["png"] is None and back[1]["png"] == b"\x89PNG"
    assert back[1]["tokens"] == [1, 2, 3] and back[1]["seed"] == 1235


def test_table_from_rows_names_missing_field():
    row = gen_row()
    del row["seed"]
    with pytest.raises(ValueError, match=r"missing.*'seed'"):
        table_from_rows(GENERATION_SCHEMA, [gen_row(), row])


def test_table_from_rows_names_extra_field():
    with pytest.raises(ValueError, match=r"unknown.*'colour'"):
        table_from_rows(GENERATION_SCHEMA, [gen_row(colour="red")])


def test_table_from_rows_rejects_bad_type():
    with pytest.raises(ValueError, match="sample_index"):
        table_from_rows(GENERATION_SCHEMA, [gen_row(sample_index="zero")])


def test_token_grids_build_the_same_column_as_arrow_and_bad_ones_are_still_refused():
    """Equal-length int grids take a NumPy path: the same column as `pa.array`; ragged grids are still
    stored; floats, out-of-range ints and nulls are refused naming the field, as before."""
    grids = [[i * 7 + j for j in range(5)] for i in range(4)]
    fast = table_from_rows(GENERATION_SCHEMA, [gen_row(i, tokens=g) for i, g in enumerate(grids)]).column("tokens")
    assert fast.combine_chunks().equals(pa.array(grids, type=pa.list_(pa.int32())))
    ragged = table_from_rows(GENERATION_SCHEMA, [gen_row(0, tokens=[1, 2]), gen_row(1, tokens=[3])])
    assert ragged.column("tokens").to_pylist() == [[1, 2], [3]]
    for bad in ([1.5, 2.0], [2 ** 40, 1], None):
        with pytest.raises(ValueError, match="tokens"):
            table_from_rows(GENERATION_SCHEMA, [gen_row(0, tokens=[1, 2]), gen_row(1, tokens=bad)])


def test_manifest_json_round_trip_sorts_shards():
    m = manifest()
    assert [r.index for r in m.shards["generations"]] == [1, 5]
    assert Manifest.from_json(m.to_json()) == m


def test_manifest_rejects_unknown_keys():
    with pytest.raises(ValidationError, match="surprise"):
        manifest(surprise=1)
    data = manifest().model_dump()
    data["shards"]["generations"][0]["extra_field"] = 1
    with pytest.raises(ValidationError, match="extra_field"):
        Manifest.model_validate(data)


def test_manifest_rejects_kind_mismatch():
    rec = ShardRecord(kind="pairs", index=0, path="x", rows=0, bytes=0, sha256=SHA)
    with pytest.raises(ValidationError, match="pairs"):
        manifest(shards={"generations": [rec]})


def test_codebook_bytes_round_trip():
    cb = torch.randn(8, 4)
    emb = torch.randn(16, 4, dtype=torch.float16)
    art = CodebookArtifact(version=4, parent_version=3, iteration=3, shape=[8, 4], dtype="float32",
                           params={"alpha": 0.5, "rank": 2}, created_at="t", config_hash="cafe", git_rev="abc")
    b = codebook_to_bytes({"codebook": cb, "generation_embeddings": emb}, art)
    assert b == codebook_to_bytes({"codebook": cb, "generation_embeddings": emb}, art)  # deterministic
    tensors, meta = codebook_from_bytes(b)
    assert torch.equal(tensors["codebook"], cb) and torch.equal(tensors["generation_embeddings"], emb)
    assert meta["version"] == 4 and meta["parent_version"] == 3 and meta["params"] == {"alpha": 0.5, "rank": 2}
    assert "sha256" not in meta
    assert CodebookArtifact.model_validate({**meta, "sha256": ""}) == art


def test_codebook_to_bytes_requires_codebook_key():
    art = CodebookArtifact(version=0, iteration=0, created_at="t", config_hash="c")
    with pytest.raises(ValueError, match="'codebook'"):
        codebook_to_bytes({"weights": torch.zeros(2, 2)}, art)


def test_shard_record_new_fields_default_for_old_json():
    old = '{"kind": "pairs", "index": 3, "path": "iter=0001/pairs/shard-000003.parquet", "rows": 2, "bytes": 9, "sha256": "%s"}' % SHA
    rec = ShardRecord.from_json(old)
    assert (rec.attempt, rec.actor, rec.node, rec.stats) == ("", None, None, {})
    new = rec.model_copy(update={"attempt": "a-1", "actor": "act", "node": "n", "stats": {"unsafe": 1}})
    assert ShardRecord.from_json(new.to_json()) == new
    with pytest.raises(ValidationError, match="surprise"):
        ShardRecord.from_json(old[:-1] + ', "surprise": 1}')
    with pytest.raises(ValidationError, match="attempt"):
        ShardRecord(kind="pairs", index=0, path="x", rows=0, bytes=0, sha256=SHA, attempt="../x")
