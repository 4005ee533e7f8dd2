"""RunStore on a local folder and on loopback S3 (moto_server)."""

from __future__ import annotations

import inspect
import os
import time

import numpy as np
import pyarrow as pa
import pytest
import torch

import safecb.storage as storage_mod
from safecb.schemas import GENERATION_SCHEMA, PAIR_SCHEMA, CodebookArtifact, Manifest, ShardRecord, table_from_rows
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
    assert "iter=0003/generations/shard-000002.local.parquet" in msg and "sha256" in msg
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
    # Bad markers are deleted (so the shards get redone); the good one stays.
    assert store.exists("iter=0003/_commits/generations-000000.json")
    for i in (1, 2, 3):
        assert not store.exists(f"iter=0003/_commits/generations-00000{i}.json")


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


# --------------------------------------------------------------------------- attempts and commits


def flip_bit(store: RunStore, rel: str) -> None:
    path = f"{store._root}/{rel}"
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 3] ^= 0x01
    store.fs.pipe_file(path, bytes(data))


def commit_rel(kind: str, index: int, iteration: int = 3) -> str:
    return f"iter={iteration:04d}/_commits/{kind}-{index:06d}.json"


def test_two_attempts_first_commit_wins(store):
    a = store.write_attempt(3, "generations", 4, gen_table(3), "att-a", actor="actor-1", node="node-a",
                            stats={"unsafe": np.int64(2), "rate": np.float32(0.5)})
    b = store.write_attempt(3, "generations", 4, gen_table(3, start=10), "att_b")
    assert a.path == store.attempt_path(3, "generations", 4, "att-a") == "iter=0003/generations/shard-000004.att-a.parquet"
    assert b.path == "iter=0003/generations/shard-000004.att_b.parquet"
    assert (a.attempt, a.actor, a.node, a.rows) == ("att-a", "actor-1", "node-a", 3)
    assert a.stats == {"unsafe": 2, "rate": 0.5} and type(a.stats["unsafe"]) is int
    assert a.sha256 != b.sha256 and store.exists(a.path) and store.exists(b.path)
    # Actors write objects only; nothing is committed until the driver commits.
    assert store.committed_shards(3, "generations") == {} and not store.exists(commit_rel("generations", 4))

    assert store.commit_shard(3, a) == a
    assert store.commit_shard(3, b) == a  # the late attempt does not replace the committed one
    assert ShardRecord.from_json(store.read_text(commit_rel("generations", 4))) == a
    assert store.committed_shards(3, "generations") == {4: a}
    assert store.read_shard(a, GENERATION_SCHEMA).column("prompt_id").to_pylist() == ["p0", "p1", "p2"]
    assert store.exists(b.path)  # the loser's object is left alone (nothing points at it)


def test_attempt_and_commit_arguments_are_checked(store):
    for bad in ["", "a.b", "../x", "a/b", "x" * 65, "sp ace"]:
        with pytest.raises(ValueError, match="attempt id"):
            store.attempt_path(3, "generations", 0, bad)
    a = store.write_attempt(3, "generations", 1, gen_table(1), "a1")
    for wrong in [a.model_copy(update={"index": 2}), a.model_copy(update={"attempt": "a2"}),
                  a.model_copy(update={"path": store.shard_path(3, "generations", 1)})]:
        with pytest.raises(ValueError, match="not an attempt path"):
            store.commit_shard(3, wrong)
    with pytest.raises(ValueError, match="not an attempt path"):
        store.commit_shard(4, a)  # record of another iteration
    assert not store.exists(commit_rel("generations", 1))


@pytest.mark.parametrize("damage", ["rewritten_same_size", "bit_flip"])
def test_damaged_committed_object_is_uncommitted_and_redone(store, damage):
    keep = store.write_attempt(3, "pairs", 0, gen_table(2), "k")
    stale = store.write_attempt(3, "pairs", 4, gen_table(2), "old4")
    stale5 = store.write_attempt(3, "pairs", 5, gen_table(2), "old5")
    for rec in (keep, stale, stale5):
        store.commit_shard(3, rec)
    for rec in (stale, stale5):
        if damage == "bit_flip":
            flip_bit(store, rec.path)
        else:
            other = bytes(reversed(store.fs.cat_file(f"{store._root}/{rec.path}")))
            assert len(other) == rec.bytes
            store.fs.pipe_file(f"{store._root}/{rec.path}", other)

    # An invalid commit does not block the driver: commit_shard overwrites it.
    new5 = store.write_attempt(3, "pairs", 5, gen_table(2), "new5")
    assert store.commit_shard(3, new5) == new5

    assert store.committed_shards(3, "pairs") == {0: keep, 5: new5}
    assert not store.exists(commit_rel("pairs", 4))  # deleted, so resume redoes shard 4
    assert store.exists(commit_rel("pairs", 0))
    new4 = store.write_attempt(3, "pairs", 4, gen_table(2), "new4")
    assert store.commit_shard(3, new4) == new4
    assert store.committed_shards(3, "pairs") == {0: keep, 4: new4, 5: new5}


def test_commit_pointing_outside_its_shard_is_deleted(store):
    good = store.write_attempt(3, "generations", 0, gen_table(2), "g")
    # Object exists with the right sha256, but at a path that is not shard 1's attempt path.
    elsewhere = good.model_copy(update={"index": 1})
    store.write_text(commit_rel("generations", 1), elsewhere.to_json())
    # Commit file name says shard 2, record says shard 0.
    store.write_text(commit_rel("generations", 2), good.to_json())
    assert store.committed_shards(3, "generations") == {}
    assert not store.exists(commit_rel("generations", 1)) and not store.exists(commit_rel("generations", 2))


def test_write_shard_is_write_attempt_local_plus_commit(store):
    a = store.write_shard(3, "generations", 7, gen_table(4))
    assert a.attempt == "local" and a.path == store.attempt_path(3, "generations", 7, "local")
    # Rewriting other data replaces the "local" object, so the new data is what gets committed.
    b = store.write_shard(3, "generations", 7, gen_table(4, start=100))
    assert b != a and store.committed_shards(3, "generations") == {7: b}
    assert store.read_shard(b).column("prompt_id").to_pylist()[0] == "p100"


# --------------------------------------------------------------------------- manifests


def test_torn_or_invalid_manifest_is_not_a_finished_iteration(store):
    for i in range(4):
        store.write_manifest(make_manifest(i, {}))
    assert store.manifest_iterations() == [0, 1, 2, 3]
    assert [m.iteration for m in store.valid_manifests()] == [0, 1, 2, 3]
    path = f"{store._root}/iter=0001/MANIFEST.json"
    whole = store.fs.cat_file(path)
    store.fs.pipe_file(path, whole[: len(whole) // 2])  # torn
    store.write_text("iter=0003/MANIFEST.json", make_manifest(2, {}).to_json())  # names another iteration
    assert store.manifest_iterations() == [0, 2]
    assert not store.has_manifest(1) and store.has_manifest(2) and not store.has_manifest(3)
    assert [m.iteration for m in store.valid_manifests()] == [0]  # stops at the torn iteration 1
    store.write_manifest(make_manifest(1, {}))
    store.remove_iteration(2)
    store.write_manifest(make_manifest(3, {}))
    assert store.manifest_iterations() == [0, 1, 3]
    assert [m.iteration for m in store.valid_manifests()] == [0, 1]  # stops at the gap


# --------------------------------------------------------------------------- reading shards


def test_iter_shard_tables_streams_and_verifies(store):
    records = [store.write_shard(3, "generations", i, gen_table(2, start=10 * i)) for i in range(3)]
    gen = store.iter_shard_tables(records, GENERATION_SCHEMA)
    assert inspect.isgenerator(gen)
    first = next(gen)
    assert first.schema.equals(GENERATION_SCHEMA, check_metadata=True)
    assert first.column("prompt_id").to_pylist() == ["p0", "p1"]
    flip_bit(store, records[1].path)  # read lazily: damage after the first shard is still caught
    with pytest.raises(StorageError) as ei:
        next(gen)
    msg = str(ei.value)
    assert records[1].path in msg and "sha256" in msg and "\n" not in msg

    cols = list(store.iter_shard_tables([records[0], records[2]], GENERATION_SCHEMA, columns=["seed", "prompt_id"]))
    assert [t.schema.names for t in cols] == [["seed", "prompt_id"]] * 2
    assert cols[1].column("prompt_id").to_pylist() == ["p20", "p21"]
    assert cols[0].schema.field("seed").type == pa.int64()

    with pytest.raises(StorageError, match=r"shard-000000\.local\.parquet.*expected 5 rows, got 2"):
        store.read_shard(records[0].model_copy(update={"rows": 5}))
    gone = records[0].model_copy(update={"path": store.attempt_path(3, "generations", 0, "gone")})
    with pytest.raises(StorageError, match=r"shard-000000\.gone\.parquet.*missing"):
        next(store.iter_shard_tables([gone]))


def test_read_table_columns(store):
    rec = store.write_shard(3, "generations", 0, gen_table(3))
    t = store.read_table(make_manifest(3, {"generations": [rec]}), "generations", GENERATION_SCHEMA, columns=["prompt_id"])
    assert t.schema.names == ["prompt_id"] and t.num_rows == 3
    empty = store.read_table(make_manifest(3, {}), "generations", GENERATION_SCHEMA, columns=["seed"])
    assert empty.schema.names == ["seed"] and empty.num_rows == 0


# --------------------------------------------------------------------------- small files


@pytest.mark.parametrize("content", ["", "  \n\n\t \n"])
def test_empty_metrics_file_reads_as_no_rows(store, content):
    store.write_text("metrics.jsonl", content)
    assert store.read_metrics() == []
    store.append_metrics({"iteration": 0})
    assert store.read_metrics() == [{"iteration": 0}]
    assert store.read_text("metrics.jsonl") == '{"iteration": 0}\n'


def test_put_file_uploads_a_local_file(store, tmp_path):
    src = tmp_path / "prompts.jsonl"
    payload = os.urandom(3 << 20)
    src.write_bytes(payload)
    store.put_file(src, "snapshots/prompts.jsonl")
    assert store.fs.cat_file(f"{store._root}/snapshots/prompts.jsonl") == payload
    with pytest.raises(StorageError, match=r"snapshots/x\.jsonl.*local file .*nope\.jsonl") as ei:
        store.put_file(tmp_path / "nope.jsonl", "snapshots/x.jsonl")
    assert "\n" not in str(ei.value)
    with pytest.raises(ValueError, match="relative path"):
        store.put_file(src, "../escape")


def _all_files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names)


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path, monkeypatch):
    store = RunStore(str(tmp_path / "run"))
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy_replace(src, dst):
        # At rename time the full content is already in the temp file, next to its destination.
        assert os.path.dirname(src) == os.path.dirname(dst) and os.path.getsize(src) > 0
        renames.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(storage_mod.os, "replace", spy_replace)
    store.write_text("config.yaml", "seed: 1\n")
    rec = store.write_shard(0, "generations", 0, gen_table(2))
    store.write_manifest(make_manifest(0, {"generations": [rec]}))
    store.append_metrics({"iteration": 0})
    store.write_codebook({"codebook": torch.zeros(2, 2)}, artifact(0))
    snap = tmp_path / "snap.bin"
    snap.write_bytes(b"x" * 10_000)
    store.put_file(snap, "snapshots/snap.bin")
    written = {os.path.relpath(dst, tmp_path / "run") for _, dst in renames}
    assert {"config.yaml", rec.path, "iter=0000/_commits/generations-000000.json", "iter=0000/MANIFEST.json",
            "metrics.jsonl", "codebooks/v0000.safetensors", "codebooks/v0000.json", "snapshots/snap.bin"} <= written
    before = _all_files(tmp_path / "run")
    assert not [f for f in before if f.endswith(".tmp") or os.path.basename(f).startswith(".")]

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage_mod.os, "replace", failing_replace)
    with pytest.raises(StorageError, match=r"run/config\.yaml: could not write .*disk full") as ei:
        store.write_text("config.yaml", "seed: 2\n")
    assert "\n" not in str(ei.value)
    with pytest.raises(StorageError, match=r"snapshots/snap\.bin: could not upload"):
        store.put_file(snap, "snapshots/snap.bin")
    assert store.read_text("config.yaml") == "seed: 1\n"  # old content intact
    assert _all_files(tmp_path / "run") == before  # no temp file left behind
