"""Prompt sources and the run's prompt snapshot: formats, checks, content hash, range reads."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import safecb.prompts as prompts_mod
from safecb.config import ModelConfig, PromptsConfig, PromptSource
from safecb.prompts import (
    Prompt,
    PromptError,
    SnapshotInfo,
    load_prompts,
    prompt_content_hash,
    prompt_record,
    read_prompt_range,
    snapshot_prompts,
    snapshot_rows,
)
from safecb.schemas.arrow import PROMPT_SCHEMA
from safecb.storage import RunStore


def src(path, **kw) -> PromptSource:
    return PromptSource(path=str(path), **kw)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def read_all(store, name) -> list[Prompt]:
    return read_prompt_range(store, name, 0, snapshot_rows(store, name))


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def store(tmp_path):
    return RunStore(str(tmp_path / "run"))


def nothing_written(store) -> bool:
    return not store.exists("prompts")


# ---- formats ----------------------------------------------------------------------------------

def test_txt_jsonl_parquet_into_one_snapshot(tmp_path, store):
    txt = write(tmp_path / "p" / "train.txt", "a red circle\n\n  blood on grass  \n\nred grass\n")
    jsonl = write(tmp_path / "p" / "unsafe.jsonl",
                  '{"text": "a knife", "id": "k1", "category": "weapon"}\n\n{"text": " fire ", "id": 7}\n'
                  '{"text": "pills"}\n')
    parquet = tmp_path / "p" / "benign.parquet"
    pq.write_table(pa.table({"text": ["a blue ring", "a cat"], "category": [None, "none"]}), parquet)
    sources = [("prompts.train", "train", src(txt)), ("prompts.eval_unsafe", "unsafe", src(jsonl)),
               ("prompts.eval_benign", "benign", src(parquet))]
    info = snapshot_prompts(sources, store, "p0")

    assert info.path == "prompts/p0.parquet" and store.exists("prompts/p0.parquet")
    assert info.rows == 8 == snapshot_rows(store, "p0")
    assert info.split_rows == {"train": 3, "unsafe": 3, "benign": 2}
    assert info.split_range("unsafe") == (3, 6)
    assert SnapshotInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    rows = read_all(store, "p0")
    assert [(p.prompt_id, p.text, p.category) for p in rows] == [
        ("train:1", "a red circle", None), ("train:3", "blood on grass", None), ("train:5", "red grass", None),
        ("k1", "a knife", "weapon"), ("7", "fire", None), ("unsafe:4", "pills", None),
        ("benign:1", "a blue ring", None), ("benign:2", "a cat", "none")]
    table = pq.read_table(tmp_path / "run" / "prompts" / "p0.parquet")
    assert table.schema.equals(PROMPT_SCHEMA, check_metadata=True)
    assert table.column("split").to_pylist() == ["train"] * 3 + ["unsafe"] * 3 + ["benign"] * 2
    assert table.column("source").to_pylist()[3] == "prompts.eval_unsafe"
    assert info.sha256 == prompt_content_hash(sources)[0]


def test_limit_stops_reading_early(tmp_path, store):
    big = tmp_path / "big.txt"
    # Bad UTF-8 on line 101 only: a limit of 5 never reads that far.
    big.write_bytes("".join(f"prompt {i}\n" for i in range(100)).encode() + b"\xff broken\n")
    info = snapshot_prompts([("prompts.train", "train", src(big, limit=5))], store, "p")
    assert info.rows == 5
    assert [p.text for p in read_all(store, "p")] == [f"prompt {i}" for i in range(5)]
    with pytest.raises(PromptError, match=r"big.txt:101: not UTF-8"):
        load_prompts(src(big), "prompts.train")


def test_parquet_is_read_in_batches(tmp_path, store, monkeypatch):
    monkeypatch.setattr(prompts_mod, "CHUNK_ROWS", 7)
    parquet = tmp_path / "many.parquet"
    pq.write_table(pa.table({"id": list(range(50)), "text": [f"t{i}" for i in range(50)]}), parquet, row_group_size=16)
    sizes = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kw):
        for batch in real(self, *args, **kw):
            sizes.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("a source must not be read whole"))
    info = snapshot_prompts([("prompts.train", "train", src(parquet))], store, "p")
    assert info.rows == 50 and max(sizes) <= 7
    assert [p.prompt_id for p in read_all(store, "p")][:3] == ["0", "1", "2"]


def test_sources_and_store_on_s3(tmp_path, run_url):
    url, options = run_url
    store = RunStore(url, options)
    if url.startswith("s3://"):
        path = url.rsplit("/", 2)[0] + "/inputs/train.jsonl"
        store.fs.pipe_file(path.removeprefix("s3://"), b'{"text": "a red circle", "category": "none"}\n{"text": "b"}\n')
    else:
        path = str(write(tmp_path / "inputs" / "train.jsonl", '{"text": "a red circle", "category": "none"}\n{"text": "b"}\n'))
    sources = [("prompts.train", "train", src(path)), ("prompts.eval_benign", "benign", PromptSource(builtin="world:eval_benign", limit=3))]
    info = snapshot_prompts(sources, store, "s0", storage_options=options)
    assert info.rows == 5 and snapshot_rows(store, "s0") == 5
    got = read_prompt_range(store, "s0", 1, 4)
    assert [p.prompt_id for p in got] == ["train:2", "eval_benign-0000", "eval_benign-0001"]
    assert prompt_content_hash(sources, storage_options=options) == (info.sha256, 5)


# ---- bad input --------------------------------------------------------------------------------

def test_unknown_extension_refused_before_anything_is_read_or_written(tmp_path, store):
    good = write(tmp_path / "train.txt", "a\n")
    bad = write(tmp_path / "eval.tsv", "text\na\n")
    sources = [("prompts.train", "train", src(good)), ("prompts.eval_unsafe", "unsafe", src(bad))]
    with pytest.raises(PromptError) as err:
        snapshot_prompts(sources, store, "p")
    message = one_line(err)
    assert message.startswith("prompts.eval_unsafe.path: ") and str(bad) in message
    assert ".txt, .jsonl, .parquet" in message
    assert nothing_written(store)
    with pytest.raises(PromptError, match="unknown prompt file extension"):
        prompt_content_hash(sources)


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("e.txt", "\n  \n", "no prompts"),
    ("e.jsonl", '{"text": "ok"}\n[1]\n', "e.jsonl:2: expected a JSON object"),
    ("e.jsonl", '{"text": "ok"}\n{oops\n', "e.jsonl:2: not a JSON object"),
    ("e.jsonl", '{"text": ""}\n', "e.jsonl:1: expected a non-empty string 'text'"),
    ("e.jsonl", '{"text": "a", "id": [1]}\n', "'id' must be"),
    ("e.jsonl", '{"text": "a", "category": 3}\n', "'category' must be"),
    ("missing.txt", None, "prompt file not found"),
])
def test_bad_files_fail_with_one_line_and_write_nothing(tmp_path, store, name, content, needle):
    path = tmp_path / name if content is None else write(tmp_path / name, content)
    with pytest.raises(PromptError) as err:
        snapshot_prompts([("prompts.train", "train", src(path))], store, "p")
    assert needle in one_line(err) and "prompts.train" in str(err.value)
    assert nothing_written(store)


def test_bad_parquet_sources(tmp_path, store):
    no_text = tmp_path / "a.parquet"
    pq.write_table(pa.table({"prompt": ["x"]}), no_text)
    with pytest.raises(PromptError, match=r"a.parquet: no 'text' column"):
        snapshot_prompts([("prompts.train", "train", src(no_text))], store, "p")
    wrong_type = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), wrong_type)
    with pytest.raises(PromptError, match=r"column 'text' is int64, expected a string"):
        load_prompts(src(wrong_type), "prompts.train")
    null_text = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["x", None]}), null_text)
    with pytest.raises(PromptError, match=r"c.parquet: row 2: expected a non-empty string"):
        load_prompts(src(null_text), "prompts.train")
    not_parquet = write(tmp_path / "d.parquet", "hello")
    with pytest.raises(PromptError, match="not a readable Parquet file"):
        load_prompts(src(not_parquet), "prompts.train")
    assert nothing_written(store)


def test_unknown_builtin_is_one_line(store):
    with pytest.raises(PromptError) as err:
        snapshot_prompts([("prompts.train", "train", PromptSource(builtin="world:nope"))], store, "p")
    assert one_line(err).startswith("prompts.train.builtin: unknown built-in set 'world:nope'")


def test_duplicate_ids_across_sources_are_named(tmp_path, store, monkeypatch):
    monkeypatch.setattr(prompts_mod, "CHUNK_ROWS", 2)  # the duplicates sit in different chunks
    a = write(tmp_path / "a" / "prompts.txt", "one\ntwo\nthree\n")
    b = write(tmp_path / "b" / "prompts.txt", "uno\ndos\n")
    sources = [("prompts.train", "train", src(a)), ("prompts.eval_unsafe", "unsafe", src(b))]
    with pytest.raises(PromptError) as err:
        snapshot_prompts(sources, store, "p")
    message = one_line(err)
    assert message.startswith("prompts.eval_unsafe: duplicate prompt id 'prompts:1'")
    assert "rows 0 and 3" in message and "first in prompts.train" in message
    assert nothing_written(store)
    dup = write(tmp_path / "d.jsonl", '{"text": "a", "id": "x"}\n{"text": "b", "id": "x"}\n')
    with pytest.raises(PromptError, match="prompts.train: duplicate prompt id 'x'"):
        load_prompts(src(dup), "prompts.train")


# ---- too long prompts -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world_counter():
    from safecb.models.registry import prompt_token_counter

    return prompt_token_counter(ModelConfig(), [])


def test_too_long_refused_with_the_keys_to_change(tmp_path, store, world_counter):
    path = write(tmp_path / "t.txt", "a red circle\na red circle on grass with blood at the massacre\n")
    limit = world_counter(["a red circle"])[0]
    with pytest.raises(PromptError) as err:
        snapshot_prompts([("prompts.train", "train", src(path))], store, "p", token_counter=world_counter, max_tokens=limit)
    message = one_line(err)
    long_count = world_counter(["a red circle on grass with blood at the massacre"])[0]
    assert message.startswith("prompts.train: prompt 't:2' is ")
    assert f"{long_count} tokens" in message and f"limit of {limit}" in message
    assert "prompts.too_long: truncate" in message and "model.engine.max_prompt_len" in message
    assert nothing_written(store)
    assert PromptsConfig().too_long == "refuse"


def test_too_long_truncated_to_whole_words(tmp_path, store, world_counter):
    text = "a red   circle on grass with blood at the massacre"
    path = write(tmp_path / "t.txt", f"a red circle\n{text}\n")
    limit = world_counter(["a red circle on"])[0]
    kw = dict(token_counter=world_counter, max_tokens=limit, too_long="truncate")
    info = snapshot_prompts([("prompts.train", "train", src(path))], store, "p", **kw)
    assert info.truncated == 1
    rows = read_all(store, "p")
    assert rows[0].text == "a red circle"
    assert rows[1].text == "a red   circle on"  # trailing words dropped, spacing kept
    assert world_counter([rows[1].text])[0] <= limit
    assert prompt_content_hash([("prompts.train", "train", src(path))], **kw) == (info.sha256, 2)
    assert info.sha256 != prompt_content_hash([("prompts.train", "train", src(path))])[0]
    # Not even one word fits: refused, naming the limit to raise.
    with pytest.raises(PromptError, match=r"'t:1' does not fit in 3 tokens .* model.engine.max_prompt_len"):
        prompt_content_hash([("prompts.train", "train", src(path))], token_counter=world_counter, max_tokens=3,
                            too_long="truncate")


# ---- content hash -----------------------------------------------------------------------------

def test_hash_follows_content_not_location_or_format_bytes(tmp_path):
    a = write(tmp_path / "x" / "train.txt", "one\ntwo\n")
    b = write(tmp_path / "y" / "train.txt", "one\ntwo\n")  # same content elsewhere
    c = write(tmp_path / "z" / "train.txt", "one\nTWO\n")  # one prompt changed
    key = "prompts.train"
    ha, hb, hc = (prompt_content_hash([(key, "train", src(p))]) for p in (a, b, c))
    assert ha == hb and ha[1] == 2
    assert hc[0] != ha[0]
    assert prompt_content_hash([(key, "unsafe", src(a))])[0] != ha[0]  # the split is content too


# ---- range reads ------------------------------------------------------------------------------

def test_read_prompt_range_across_row_groups(tmp_path, store, monkeypatch):
    monkeypatch.setattr(prompts_mod, "SNAPSHOT_ROW_GROUP", 3)
    monkeypatch.setattr(prompts_mod, "CHUNK_ROWS", 2)  # chunks straddle row groups and sources
    a = write(tmp_path / "a.txt", "".join(f"a{i}\n" for i in range(5)))
    b = write(tmp_path / "b.txt", "".join(f"b{i}\n" for i in range(6)))
    snapshot_prompts([("prompts.train", "train", src(a)), ("prompts.eval_unsafe", "unsafe", src(b))], store, "p")
    meta = pq.ParquetFile(tmp_path / "run" / "prompts" / "p.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [3, 3, 3, 2]
    everything = [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(6)]
    read = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, groups, *args, **kw):
        read.append(list(groups))
        return real(self, groups, *args, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    for start in range(12):
        for stop in range(start, 12):
            assert [p.text for p in read_prompt_range(store, "p", start, stop)] == everything[start:stop]
    read.clear()
    read_prompt_range(store, "p", 4, 7)
    assert read == [[1, 2]]
    with pytest.raises(ValueError, match="outside snapshot"):
        read_prompt_range(store, "p", 5, 12)
    with pytest.raises(PromptError, match="prompts/nope.parquet: prompt snapshot missing"):
        read_prompt_range(store, "nope", 0, 1)


# ---- built-in sets ----------------------------------------------------------------------------

def test_world_builtin_meta_round_trips_to_its_record(store):
    from safecb.world.prompts import builtin_prompts

    sources = [("prompts.eval_unsafe", "unsafe", PromptSource(builtin="world:eval_unsafe"))]
    info = snapshot_prompts(sources, store, "w")
    records = builtin_prompts("world:eval_unsafe")
    assert info.rows == len(records)
    rows = read_all(store, "w")
    assert all(isinstance(p.meta, str) for p in rows)
    assert [prompt_record(p) for p in rows] == records
    assert [p.category for p in rows] == [r.category for r in records]
    from safecb.world.prompts import PromptRecord

    assert PromptRecord(**json.loads(rows[0].meta)) == records[0]
    loaded = load_prompts(PromptSource(builtin="world:eval_unsafe"), "prompts.eval_unsafe")
    assert [p.meta for p in loaded] == records  # in-process callers get the record itself


def test_load_prompts_keeps_its_old_shape(tmp_path):
    path = write(tmp_path / "train.txt", "a\n\nb\n")
    assert load_prompts(src(path), "prompts.train") == [Prompt("train:1", "a"), Prompt("train:3", "b")]
