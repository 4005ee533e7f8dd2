"""RunStore on a local folder and on loopback S3 (moto_server)."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest
import torch

from safecb.schemas import GENERATION_SCHEMA, PAIR_SCHEMA, CodebookArtifact, Manifest, table_from_rows
from safecb.storage import RunStore, StorageError, strip_credentials

SECRET = "SUPERSECRETvalue123"


def gen_table(n: int, start: int = 0) -> pa.Table:
    rows = [
        dict(run_id="r1", iteration=3, codebook_version=0, prompt_id=f"p{i}", prompt=f"prompt {i}", sample_index=0,
             seed=100 + i, tokens=[i, i + 1, i + 2], unsafe_probs=[0.1, 0.2], max_unsafe_prob=0.2, unsafe=False,
             role="collect")
        for i in range(start, start + n)
    ]
    return table_from_rows(GENERATION_SCHEMA, rows)


def make_manifest(iteration: int, shards: dict) -> Manifest:
    return Manifest(run_id="r1", iteration=iteration, codebook_version=0, categories=["sexual", "violence"],
                    shards=shards, extra={"n": 1}, created_at="2026-11-28T00:00:00Z", config_hash="cafe", git_rev=None)


def artifact(version: int = 4) -> CodebookArtifact:
    return CodebookArtifact(version=version, parent_version=version - 1, iteration=3, params={"alpha": 0.5},
                            created_at="2026-11-28T00:00:00Z", config_hash="cafe", git_rev="abc123")


@pytest.fixture
def store(run_url):
    url, opts = run_url
    return RunStore(url, opts)


def test_shard_commit_manifest_read_round_trip(store):
    store.check_reachable()
    assert store.shard_path(3, "generations", 17) == "iter=0003/generations/shard-000017.parquet"
    r0 = store.write_shard(3, "generations", 0, gen_table(3))
    r1 = store.write_shard(3, "generations", 1, gen_table(2, start=3))
    committed = store.committed_shards(3, "generations")
    assert committed == {0: r0, 1: r1}
    assert store.committed_shards(3, "pairs") == {}
    assert store.exists("iter=0003/_commits/generations-000001.json")
    assert store.manifest_iterations() == [] and not store.has_manifest(3)

    store.write_manifest(make_manifest(3, {"generations": list(committed.values())}))
    assert store.manifest_iterations() == [3] and store.has_manifest(3)
    m = store.read_manifest(3)
    assert m.shards["generations"] == [r0, r1] and m.extra == {"n": 1}
    t = store.read_table(m, "generations", GENERATION_SCHEMA)
    assert t.num_rows == 5
    assert t.column("prompt_id").to_pylist() == [f"p{i}" for i in range(5)]
    assert t.schema.equals(GENERATION_SCHEMA, check_metadata=True)
    empty = store.read_table(m, "pairs", PAIR_SCHEMA)
    assert empty.num_rows == 0 and empty.schema.equals(PAIR_SCHEMA)


def test_shard_rewrite_is_deterministic(store):
    a = store.write_shard(3, "generations", 7, gen_table(4))
    b = store.write_shard(3, "generations", 7, gen_table(4))
    assert a == b and a.sha256 == b.sha256 and a.rows == 4
    assert store.committed_shards(3, "generations") == {7: a}


def test_read_table_detects_corrupted_shard(store):
    rec = store.write_shard(3, "generations", 2, gen_table(3))
    m = make_manifest(3, {"generations": [rec]})
    store.write_manifest(m)
    path = f"{store._root}/{rec.path}"
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    store.fs.pipe_file(path, bytes(data))
    with pytest.raises(StorageError) as ei:
        store.read_table(store.read_manifest(3), "generations", GENERATION_SCHEMA)
    msg = str(ei.value)
    assert "iter=0003/generations/shard-000002.parquet" in msg and "sha256" in msg
    assert "\n" not in msg


def test_read_table_unreadable_parquet_and_missing_shard(store):
    garbage = b"not parquet at all"
    import hashlib

    from safecb.schemas import ShardRecord

    rel = store.shard_path(3, "generations", 0)
    store.write_text(rel, garbage.decode())
    rec = ShardRecord(kind="generations", index=0, path=rel, rows=1, bytes=len(garbage),
                      sha256=hashlib.sha256(garbage).hexdigest())
    with pytest.raises(StorageError, match="shard-000000.parquet.*Parquet"):
        store.read_table(make_manifest(3, {"generations": [rec]}), "generations")
    gone = rec.model_copy(update={"index": 9, "path": store.shard_path(3, "generations", 9)})
    with pytest.raises(StorageError, match="shard-000009.parquet.*missing"):
        store.read_table(make_manifest(3, {"generations": [gone]}), "generations")


def test_missing_or_corrupt_manifest_is_one_line_error(store):
    with pytest.raises(StorageError, match="iter=0005/MANIFEST.json.*missing") as ei:
        store.read_manifest(5)
    assert "\n" not in str(ei.value)
    store.write_text("iter=0005/MANIFEST.json", '{"run_id": "r1"}')
    with pytest.raises(StorageError, match="iter=0005/MANIFEST.json.*valid manifest") as ei:
        store.read_manifest(5)
    assert "\n" not in str(ei.value)


def test_commit_without_shard_or_wrong_size_is_ignored(store):
    keep = store.write_shard(3, "generations", 0, gen_table(2))
    lost = store.write_shard(3, "generations", 1, gen_table(2))
    resized = store.write_shard(3, "generations", 2, gen_table(2))
    store.fs.rm(f"{store._root}/{lost.path}")
    store.fs.pipe_file(f"{store._root}/{resized.path}", b"short")
    store.write_text("iter=0003/_commits/generations-000003.json", "{torn")
    assert store.committed_shards(3, "generations") == {0: keep}


def test_remove_iteration(store):
    store.write_shard(2, "generations", 0, gen_table(1))
    store.write_manifest(make_manifest(2, {}))
    store.write_shard(3, "generations", 0, gen_table(1))
    store.remove_iteration(3)
    store.remove_iteration(9)  # absent: no error
    assert store.committed_shards(3, "generations") == {}
    assert store.manifest_iterations() == [2]
    assert set(store.committed_shards(2, "generations")) == {0}


def test_codebook_round_trip_and_tamper_detection(store):
    cb = torch.randn(8, 4)
    emb = torch.randn(5, 4)
    out = store.write_codebook({"codebook": cb, "generation_embeddings": emb}, artifact(4))
    assert len(out.sha256) == 64 and out.shape == [8, 4] and out.dtype == "float32"
    store.write_codebook({"codebook": cb * 2}, artifact(5))
    assert store.codebook_versions() == [4, 5]
    assert store.exists("codebooks/v0004.safetensors") and store.exists("codebooks/v0004.json")
    tensors, art = store.read_codebook(4)
    assert torch.equal(tensors["codebook"], cb) and torch.equal(tensors["generation_embeddings"], emb)
    assert art == out

    path = f"{store._root}/codebooks/v0005.safetensors"
    data = bytearray(store.fs.cat_file(path))
    data[-1] ^= 0x01
    store.fs.pipe_file(path, bytes(data))
    with pytest.raises(StorageError, match="v0005.safetensors.*sha256"):
        store.read_codebook(5)
    with pytest.raises(StorageError, match="v0009.json.*missing"):
        store.read_codebook(9)


def test_metrics_and_text(store):
    assert store.read_metrics() == []
    store.append_metrics({"iteration": 0, "asr": 0.5})
    store.append_metrics({"iteration": 1, "asr": 0.25, "stage_s": torch.tensor(1.5)})
    assert store.read_metrics() == [{"iteration": 0, "asr": 0.5}, {"iteration": 1, "asr": 0.25, "stage_s": 1.5}]
    store.write_text("config.yaml", "seed: 1\n")
    assert store.read_text("config.yaml") == "seed: 1\n"
    with pytest.raises(StorageError, match="nope.yaml"):
        store.read_text("nope.yaml")
    with pytest.raises(ValueError, match="relative path"):
        store.read_text("../escape")


def test_check_reachable_unreachable_endpoint_fails_fast_without_secrets():
    store = RunStore("s3://some-bucket/run", {"key": "AKIAFAKEKEY", "secret": SECRET,
                                              "client_kwargs": {"endpoint_url": "http://admin:HUNTER2pw@127.0.0.1:9"}})
    t0 = time.monotonic()
    with pytest.raises(StorageError) as ei:
        store.check_reachable()
    elapsed = time.monotonic() - t0
    msg = str(ei.value)
    assert elapsed < 12, f"check_reachable took {elapsed:.1f} s"
    assert msg.startswith("s3://some-bucket/run") and "\n" not in msg
    assert SECRET not in msg and "AKIAFAKEKEY" not in msg and "HUNTER2pw" not in msg
    assert SECRET not in repr(store) and SECRET not in store.url


def test_check_reachable_missing_bucket(s3_server):
    store = RunStore("s3://no-such-bucket-xyz/run", {"key": "testing", "secret": SECRET,
                                                       "client_kwargs": {"endpoint_url": s3_server["endpoint_url"]}})
    with pytest.raises(StorageError, match="bucket does not exist") as ei:
        store.check_reachable()
    assert "\n" not in str(ei.value) and SECRET not in str(ei.value)
    assert not store.fs.exists("no-such-bucket-xyz")  # check did not create it


def test_strip_credentials():
    assert strip_credentials("s3://AKIA:hunter2@bucket/p") == "s3://bucket/p"
    assert strip_credentials("https://h/x?secret=abc&region=eu&key=k") == "https://h/x?region=eu"
    assert strip_credentials("/tmp/run") == "/tmp/run"
