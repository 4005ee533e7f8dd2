"""Prompt sources and a run's prompt snapshot. Bad input fails with one line (`PromptError`).

A source (`PromptSource`) is a built-in set (`builtin: world:train` ...) or a file, a local path or any
fsspec URL (`s3://bucket/prompts.jsonl`), its format given by its extension:
  .txt      one prompt per line, blank lines skipped; id `<file stem>:<line number>`
  .jsonl    one object per line: "text" (required), "id" and "category" (optional)
  .parquet  a "text" column, optional "id" and "category" columns; default id `<file stem>:<row number>`
  .csv      a header row, then one prompt a row: "prompt" (or "text"), categories from "categories"
            (I2P: "sexual, shocking") or "category" (CoProV2), optional "id"; other columns (I2P's
            seeds and guidance) are ignored, since the loop draws its own seeds
Prompt texts are stripped of surrounding whitespace.

A run freezes its prompts once into ONE Parquet file, `prompts/{name}.parquet` in the run folder
(`snapshot_prompts`): every source in order, streamed in chunks of `CHUNK_ROWS`, so that a million
prompts never sit in the driver as Python objects. Workers read only the rows they need
(`read_prompt_range`), which touches only the row groups that overlap them. `prompt_content_hash` is
the snapshot's content hash without writing anything: a resumed run uses it to refuse prompts that
changed under it. Both run the same code (`_stream`), so they cannot disagree.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from safecb.config import PromptSource
from safecb.schemas.arrow import PROMPT_SCHEMA

if TYPE_CHECKING:
    from safecb.storage import RunStore
    from safecb.world.prompts import PromptRecord

CHUNK_ROWS = 4096  # prompts read, token-counted and hashed at a time
SNAPSHOT_ROW_GROUP = 4096  # rows per Parquet row group of a snapshot: the unit a range read fetches
FORMATS = (".txt", ".jsonl", ".parquet", ".csv")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_WORD_RE = re.compile(r"\S+")

Source = tuple[str, str, PromptSource]  # (config key such as "prompts.train", split name, source)
TokenCounter = Callable[[list[str]], list[int]]
TooLong = Literal["refuse", "truncate"]


class PromptError(ValueError):
    """An unreadable, malformed or empty prompt source. One line naming the key, file and what was expected."""


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str
    # Built-in world prompts: their PromptRecord (exact labels). `load_prompts` gives the record itself;
    # snapshot reads give its JSON (rows cross process boundaries); `prompt_record` accepts either.
    meta: Any = field(default=None, compare=False)
    category: str | None = None  # the harm the prompt asks for, when its source says
    split: str | None = None  # which part of a snapshot it came from (eval: "unsafe" | "benign")


class SnapshotInfo(BaseModel):
    """What `snapshot_prompts` wrote. `sha256` covers (id, text, category, split) of every row in order,
    not the Parquet bytes, so it is the same whichever pyarrow wrote the file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    path: str  # relative to the run folder
    rows: int
    sha256: str
    split_rows: dict[str, int]  # rows per split, in snapshot order
    truncated: int = 0  # prompts cut to fit the model's prompt length (prompts.too_long: truncate)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SnapshotInfo":
        return cls.model_validate(data)

    def split_range(self, split: str) -> tuple[int, int]:
        """Rows [start, stop) of `split` (a split's sources are adjacent, so its rows are contiguous)."""
        start = 0
        for name, rows in self.split_rows.items():
            if name == split:
                return start, start + rows
            start += rows
        raise KeyError(f"prompt snapshot {self.name!r} has no split {split!r} (has {list(self.split_rows)})")


# ---- public API -------------------------------------------------------------------------------


def snapshot_path(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"prompt snapshot name must match {_NAME_RE.pattern}, got {name!r}")
    return f"prompts/{name}.parquet"


def snapshot_prompts(sources: list[Source], store: "RunStore", name: str, *, token_counter: TokenCounter | None = None,
                     max_tokens: int | None = None, too_long: TooLong = "refuse",
                     storage_options: dict | None = None) -> SnapshotInfo:
    """Stream every source, in order, into `prompts/{name}.parquet` of `store`; one upload at the end.

    The file is built in a local temp file and uploaded whole only once every check passed, so bad
    input leaves nothing in the run folder. `token_counter(texts) -> counts` counts each prompt as the
    model sees it; a prompt over `max_tokens` is refused (`too_long="refuse"`) or cut at a word boundary
    (`"truncate"`; the stored text is the cut one, and `SnapshotInfo.truncated` counts them).
    `storage_options` go to fsspec for every source file.
    """
    rel = snapshot_path(name)
    _check_sources(sources)
    tally = _Tally()
    fd, tmp = tempfile.mkstemp(prefix="safecb-prompts-", suffix=".parquet")
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, PROMPT_SCHEMA, compression="zstd") as writer:
            # Every row group but the last holds exactly SNAPSHOT_ROW_GROUP rows, whatever the
            # sources' chunk sizes: buffer across chunks and write only whole groups.
            pending: list[pa.Table] = []
            pending_rows = 0
            for key, split, chunk in _stream(sources, tally, storage_options, token_counter, max_tokens, too_long):
                pending.append(_chunk_table(key, split, chunk))
                pending_rows += len(chunk)
                if pending_rows >= SNAPSHOT_ROW_GROUP:
                    table = pa.concat_tables(pending)
                    whole = pending_rows // SNAPSHOT_ROW_GROUP * SNAPSHOT_ROW_GROUP
                    writer.write_table(table.slice(0, whole), row_group_size=SNAPSHOT_ROW_GROUP)
                    rest = table.slice(whole)
                    pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=SNAPSHOT_ROW_GROUP)
        tally.finish(sources, storage_options)
        _upload(store, tmp, rel)
    finally:
        os.unlink(tmp)
    return SnapshotInfo(name=name, path=rel, rows=tally.rows, sha256=tally.sha.hexdigest(),
                        split_rows=dict(tally.split_rows), truncated=tally.truncated)


def prompt_content_hash(sources: list[Source], *, storage_options: dict | None = None,
                        token_counter: TokenCounter | None = None, max_tokens: int | None = None,
                        too_long: TooLong = "refuse") -> tuple[str, int]:
    """(sha256, rows) that `snapshot_prompts` would record for these sources, writing nothing."""
    _check_sources(sources)
    tally = _Tally()
    for _ in _stream(sources, tally, storage_options, token_counter, max_tokens, too_long):
        pass
    tally.finish(sources, storage_options)
    return tally.sha.hexdigest(), tally.rows


def snapshot_rows(store: "RunStore", name: str) -> int:
    """Rows of a snapshot, from its Parquet footer (reads no row data)."""
    with _open_snapshot(store, name) as file:
        return file.metadata.num_rows


def read_prompt_range(store: "RunStore", name: str, start: int, stop: int) -> list[Prompt]:
    """Rows [start, stop) of a snapshot, reading only the row groups that overlap them."""
    with _open_snapshot(store, name) as file:
        meta = file.metadata
        if not 0 <= start <= stop <= meta.num_rows:
            raise ValueError(f"prompt range [{start}, {stop}) is outside snapshot {name!r} of {meta.num_rows} rows")
        if start == stop:
            return []
        groups, first, offset = [], 0, 0
        for index in range(meta.num_row_groups):
            rows = meta.row_group(index).num_rows
            if offset < stop and offset + rows > start:
                if not groups:
                    first = offset
                groups.append(index)
            offset += rows
        table = file.read_row_groups(groups, columns=["prompt_id", "text", "category", "meta", "split"])
    table = table.slice(start - first, stop - start)
    columns = [table.column(c).to_pylist() for c in ("prompt_id", "text", "meta", "category", "split")]
    return [Prompt(*row) for row in zip(*columns)]


def load_prompts(source: PromptSource, key: str, storage_options: dict | None = None) -> list[Prompt]:
    """All prompts of one source, in memory; `key` is the config path for messages (e.g. "prompts.train").

    For small sets (the world CLI, tests). Runs the snapshot's reader and checks, so a source that
    loads here snapshots too. World records come back as `meta` PromptRecord objects.
    """
    sources = [(key, "", source)]
    _check_sources(sources)
    tally = _Tally()
    prompts = [p for _, _, chunk in _stream(sources, tally, storage_options, None, None, "refuse") for p in chunk]
    tally.finish(sources, storage_options)
    return [Prompt(p.prompt_id, p.text, prompt_record(p), p.category) if p.meta is not None else p for p in prompts]


def prompt_record(prompt: Prompt) -> "PromptRecord | None":
    """The world PromptRecord of a built-in prompt (from its record or its JSON `meta`); None otherwise."""
    from safecb.world.prompts import PromptRecord

    if prompt.meta is None or isinstance(prompt.meta, PromptRecord):
        return prompt.meta
    return PromptRecord(**json.loads(prompt.meta))


# ---- one pass over the sources ----------------------------------------------------------------


class _Tally:
    """What one pass accumulates: the content hash, counts, and a uint64 hash per id.

    Ids are checked for duplicates as sorted 64-bit hashes, not a Python set of strings: 8 bytes a
    prompt instead of ~100, so a million prompts cost the driver 8 MB. A collision between two
    different ids is ~3e-8 likely at a million; the error names the two ids, so one would be seen.
    """

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.rows = 0
        self.truncated = 0
        self.split_rows: dict[str, int] = {}
        self._id_hashes: list[np.ndarray] = []

    def add(self, split: str, chunk: list[Prompt]) -> None:
        for p in chunk:
            row = [p.prompt_id, p.text, p.category, split]
            self.sha.update(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n")
        self._id_hashes.append(np.fromiter((_id_hash(p.prompt_id) for p in chunk), dtype=np.uint64, count=len(chunk)))
        self.rows += len(chunk)
        self.split_rows[split] = self.split_rows.get(split, 0) + len(chunk)

    def finish(self, sources: list[Source], storage_options: dict | None) -> None:
        if self.rows == 0:
            raise PromptError(f"{', '.join(k for k, _, _ in sources) or 'prompts'}: no prompts (expected at least one)")
        hashes = np.concatenate(self._id_hashes)
        order = np.argsort(hashes, kind="stable")
        same = np.flatnonzero(hashes[order][1:] == hashes[order][:-1])
        if same.size:
            # Name the duplicate met first in reading order (the stable sort keeps each pair in row order).
            k = int(np.argmin(order[same + 1]))
            first, second = int(order[same[k]]), int(order[same[k] + 1])
            # Only the hashes were kept: read the sources again (this error only) to name the ids.
            (key_a, id_a), (key_b, id_b) = _ids_at(sources, storage_options, [first, second])
            also = "" if key_a == key_b else f", first in {key_a}"
            what = f"duplicate prompt id {id_b!r}" if id_a == id_b else f"prompt ids {id_a!r} and {id_b!r} hash alike"
            raise PromptError(f"{key_b}: {what} (rows {first} and {second} of the prompts{also}); prompt ids must be "
                              f"unique across all prompt sources (a file's default id is '<file stem>:<line>')")


def _id_hash(prompt_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(prompt_id.encode("utf-8"), digest_size=8).digest(), "little")


def _stream(sources: list[Source], tally: _Tally, storage_options: dict | None, token_counter: TokenCounter | None,
            max_tokens: int | None, too_long: TooLong) -> Iterator[tuple[str, str, list[Prompt]]]:
    """(key, split, chunk) for every source in order, each chunk fitted to `max_tokens` and tallied."""
    if too_long not in ("refuse", "truncate"):
        raise ValueError(f"too_long must be 'refuse' or 'truncate', got {too_long!r}")
    if max_tokens is not None and token_counter is None:
        raise ValueError("max_tokens needs a token_counter")
    for key, split, source in sources:
        for chunk in _read_source(source, key, storage_options):
            if max_tokens is not None:
                chunk = _fit(chunk, key, token_counter, max_tokens, too_long, tally)
            tally.add(split, chunk)
            yield key, split, chunk


def _fit(chunk: list[Prompt], key: str, token_counter: TokenCounter, max_tokens: int, too_long: TooLong,
         tally: _Tally) -> list[Prompt]:
    """`chunk` with every prompt within `max_tokens` as the model sees it (`token_counter` counts the
    formatted prompt): "refuse" fails on the first that is not; "truncate" drops its trailing words."""
    counts = token_counter([p.text for p in chunk])
    over = [i for i, n in enumerate(counts) if n > max_tokens]
    if not over:
        return chunk
    if too_long == "refuse":
        p, n = chunk[over[0]], counts[over[0]]
        raise PromptError(f"{key}: prompt {p.prompt_id!r} is {n} tokens as the model sees it, over the limit of "
                          f"{max_tokens} (model.engine.max_prompt_len); set prompts.too_long: truncate, or raise "
                          f"model.engine.max_prompt_len")
    cut = _truncate([chunk[i].text for i in over], token_counter, max_tokens)
    fitted = list(chunk)
    for i, text in zip(over, cut):
        p = chunk[i]
        if text is None:
            raise PromptError(f"{key}: prompt {p.prompt_id!r} does not fit in {max_tokens} tokens even cut to its "
                              f"first word; raise model.engine.max_prompt_len")
        fitted[i] = Prompt(p.prompt_id, text, p.meta, p.category)
    tally.truncated += len(over)
    return fitted


def _truncate(texts: list[str], token_counter: TokenCounter, max_tokens: int) -> list[str | None]:
    """The longest word prefix of each text that fits (None if not even one word does).

    A binary search on the number of words, all texts at once (one counter call a step): the same
    answer as dropping trailing words one by one, since a longer prefix never has fewer tokens, in
    log2(words) calls instead of one per word. The kept text keeps its original spacing.
    """
    ends = [[m.end() for m in _WORD_RE.finditer(t)] for t in texts]
    fits = [0] * len(texts)  # a prefix of this many words fits (0: none known to)
    too_long = [len(e) for e in ends]  # a prefix of this many words does not (the whole text)
    while True:
        active = [i for i in range(len(texts)) if too_long[i] - fits[i] > 1]
        if not active:
            break
        mids = [(fits[i] + too_long[i]) // 2 for i in active]
        counts = token_counter([texts[i][: ends[i][m - 1]] for i, m in zip(active, mids)])
        for i, m, n in zip(active, mids, counts):
            if n <= max_tokens:
                fits[i] = m
            else:
                too_long[i] = m
    return [texts[i][: ends[i][fits[i] - 1]] if fits[i] else None for i in range(len(texts))]


def _ids_at(sources: list[Source], storage_options: dict | None, rows: list[int]) -> list[tuple[str, str]]:
    """(key, prompt id) at each global row index, by reading the sources again (ids ignore truncation)."""
    found: dict[int, tuple[str, str]] = {}
    offset = 0
    for key, _, source in sources:
        for chunk in _read_source(source, key, storage_options):
            for row in rows:
                if offset <= row < offset + len(chunk):
                    found[row] = (key, chunk[row - offset].prompt_id)
            offset += len(chunk)
            if len(found) == len(rows):
                return [found[r] for r in rows]
    return [found.get(r, ("prompts", "?")) for r in rows]


def _chunk_table(key: str, split: str, chunk: list[Prompt]) -> pa.Table:
    n = len(chunk)
    return pa.Table.from_pydict({
        "prompt_id": [p.prompt_id for p in chunk],
        "text": [p.text for p in chunk],
        "split": [split] * n,
        "source": [key] * n,
        "category": [p.category for p in chunk],
        "meta": [p.meta for p in chunk],
    }, schema=PROMPT_SCHEMA)


# ---- reading one source -----------------------------------------------------------------------


def _check_sources(sources: list[Source]) -> None:
    """Refuse unknown formats and built-in names before anything is read, so a typo in the last source
    does not surface after streaming a million prompts of the first."""
    if not sources:
        raise PromptError("prompts: no prompt sources (expected at least one)")
    splits = [split for _, split, _ in sources]
    for i, split in enumerate(splits):
        # A split's rows must be contiguous so that SnapshotInfo.split_range can find them.
        if i and split != splits[i - 1] and split in splits[:i]:
            raise ValueError(f"{sources[i][0]}: split {split!r} comes again after other splits; list a split's sources together")
    for key, _, source in sources:
        if source.builtin is not None:
            _check_builtin(source.builtin, key)
        else:
            _file_format(source.path or "", key)


def _check_builtin(name: str, key: str) -> None:
    from safecb.world.prompts import BUILTIN_SETS

    if name not in BUILTIN_SETS:
        raise PromptError(f"{key}.builtin: unknown built-in set {name!r} (expected one of {', '.join(BUILTIN_SETS)})")


def _shown(path: str) -> str:
    from safecb.storage import strip_credentials

    return strip_credentials(path)


def _file_name(path: str) -> str:
    return path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def _file_format(path: str, key: str) -> str:
    ext = os.path.splitext(_file_name(path))[1].lower()
    if ext not in FORMATS:
        raise PromptError(f"{key}.path: {_shown(path)}: unknown prompt file extension {ext or '(none)'!r} "
                          f"(expected {', '.join(FORMATS)})")
    return ext


def _read_source(source: PromptSource, key: str, storage_options: dict | None) -> Iterator[list[Prompt]]:
    """Chunks of at most CHUNK_ROWS prompts of one source, `limit` applied; fails if it has none."""
    if source.builtin is not None:
        rows, where = _builtin_rows(source.builtin, key), source.builtin
    else:
        rows, where = _file_rows(source.path or "", key, storage_options), _shown(source.path or "")
    total = 0
    # Rows are parsed one at a time, so a limit stops reading (and checking) at the limit; closing
    # the generator closes the file now rather than at garbage collection.
    with contextlib.closing(rows):
        chunk: list[Prompt] = []
        for prompt in itertools.islice(rows, source.limit):
            chunk.append(prompt)
            if len(chunk) >= CHUNK_ROWS:
                total += len(chunk)
                yield chunk
                chunk = []
        if chunk:
            total += len(chunk)
            yield chunk
    if total == 0:
        raise PromptError(f"{key}: {where}: no prompts (expected at least one non-empty prompt)")


def _builtin_rows(name: str, key: str) -> Iterator[Prompt]:
    from safecb.world.prompts import builtin_prompts

    _check_builtin(name, key)
    for r in builtin_prompts(name):
        # The whole record as JSON, so another process rebuilds it: PromptRecord(**json.loads(meta)).
        yield Prompt(r.prompt_id, r.text, json.dumps(asdict(r), sort_keys=True), r.category)


def _file_rows(path: str, key: str, storage_options: dict | None) -> Iterator[Prompt]:
    import fsspec

    ext = _file_format(path, key)
    shown = _shown(path)
    name = _file_name(path)
    stem = name[: len(name) - len(ext)]
    try:
        file = fsspec.open(path, "rb", **(storage_options or {})).open()
    except FileNotFoundError:
        raise PromptError(f"{key}.path: {shown}: prompt file not found") from None
    except IsADirectoryError:
        raise PromptError(f"{key}.path: {shown}: is a folder (expected a {', '.join(FORMATS)} file)") from None
    except Exception as err:  # noqa: BLE001 - any backend failure becomes one line
        raise PromptError(f"{key}.path: {shown}: cannot open ({_reason(err)})") from None
    reader = {".txt": _txt_rows, ".jsonl": _jsonl_rows, ".parquet": _parquet_rows, ".csv": _csv_rows}[ext]
    where = f"{key}.path: {shown}"
    try:
        yield from reader(file, where, stem)
    except PromptError:
        raise
    except Exception as err:  # noqa: BLE001 - a read failing half-way (network, disk) is one line too
        raise PromptError(f"{where}: cannot read ({_reason(err)})") from None
    finally:
        file.close()


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__


def _lines(file, where: str) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of every non-blank line; bytes split on \\n only, decoded one by one."""
    for number, raw in enumerate(file, start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a leading BOM is not prompt text
        except UnicodeDecodeError as err:
            raise PromptError(f"{where}:{number}: not UTF-8 text (bad byte at column {err.start + 1})") from None
        line = line.strip()
        if line:
            yield number, line


def _txt_rows(file, where: str, stem: str) -> Iterator[Prompt]:
    for number, line in _lines(file, where):
        yield Prompt(f"{stem}:{number}", line)


def _jsonl_rows(file, where: str, stem: str) -> Iterator[Prompt]:
    for number, line in _lines(file, where):
        at = f"{where}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise PromptError(f"{at}: not a JSON object") from None
        if not isinstance(obj, dict):
            raise PromptError(f"{at}: expected a JSON object with a non-empty string 'text'")
        yield Prompt(_prompt_id(obj.get("id"), f"{stem}:{number}", at), _prompt_text(obj.get("text"), at),
                     category=_category(obj.get("category"), at))


def _parquet_rows(file, where: str, stem: str) -> Iterator[Prompt]:
    try:
        parquet = pq.ParquetFile(file)
    except Exception:  # noqa: BLE001 - pyarrow raises several kinds for a bad footer
        raise PromptError(f"{where}: not a readable Parquet file") from None
    schema = parquet.schema_arrow
    if "text" not in schema.names:
        raise PromptError(f"{where}: no 'text' column (found {schema.names}; expected 'text', optional 'id', 'category')")
    expected = {"text": "a string", "id": "a string or integer", "category": "a string"}
    for column in expected:
        if column in schema.names:
            kind = schema.field(column).type
            ok = pa.types.is_string(kind) or pa.types.is_large_string(kind) or (
                column == "id" and pa.types.is_integer(kind)) or (column == "category" and pa.types.is_null(kind))
            if not ok:
                raise PromptError(f"{where}: column {column!r} is {kind}, expected {expected[column]} column")
    columns = [c for c in expected if c in schema.names]
    number = 0
    # Batch by batch (never the whole file): one batch of Python values at a time.
    for batch in parquet.iter_batches(batch_size=CHUNK_ROWS, columns=columns):
        values = {c: batch.column(c).to_pylist() for c in columns}
        ids, categories = values.get("id"), values.get("category")
        for i, text in enumerate(values["text"]):
            number += 1
            at = f"{where}: row {number}"
            yield Prompt(_prompt_id(ids[i] if ids else None, f"{stem}:{number}", at), _prompt_text(text, at),
                         category=_category(categories[i] if categories else None, at))


def _csv_rows(file, where: str, stem: str) -> Iterator[Prompt]:
    """I2P / CoProV2 layouts: a header naming "prompt" (or "text") and "categories" or "category"."""
    import csv
    import io

    text = io.TextIOWrapper(file, encoding="utf-8-sig", newline="")  # a leading BOM is not a column name
    try:
        reader = csv.reader(text)
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip().lower() for h in header]
        text_col = next((names.index(c) for c in ("prompt", "text") if c in names), None)
        if text_col is None:
            raise PromptError(f"{where}: no 'prompt' column in the header (found {[h.strip() for h in header]}; "
                              "expected I2P's 'prompt', 'categories' or CoProV2's 'prompt', 'category')")
        cat_col = next((names.index(c) for c in ("categories", "category") if c in names), None)
        id_col = names.index("id") if "id" in names else None
        for number, row in enumerate(reader, start=2):  # line numbers as an editor shows them (quoted newlines aside)
            if not any(cell.strip() for cell in row):
                continue
            at = f"{where}: row {number}"
            if len(row) != len(names):
                raise PromptError(f"{at}: {len(row)} fields, the header has {len(names)}")
            categories = ", ".join(c.strip().lower() for c in row[cat_col].split(",") if c.strip()) if cat_col is not None else ""
            yield Prompt(_prompt_id(row[id_col] if id_col is not None and row[id_col].strip() else None,
                                    f"{stem}:{number}", at),
                         _prompt_text(row[text_col], at), category=categories or None)
    except UnicodeDecodeError as err:
        raise PromptError(f"{where}: not UTF-8 text (bad byte at offset {err.start})") from None
    except csv.Error as err:
        raise PromptError(f"{where}: malformed CSV ({err})") from None
    finally:
        text.detach()  # the caller closes the file


def _prompt_text(value: Any, at: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PromptError(f"{at}: expected a non-empty string 'text'")
    return value.strip()


def _prompt_id(value: Any, default: str, at: str) -> str:
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise PromptError(f"{at}: 'id' must be a non-empty string or an integer")


def _category(value: Any, at: str) -> str | None:
    if value is None or (isinstance(value, str) and value.strip()):
        return value.strip() if isinstance(value, str) else None
    raise PromptError(f"{at}: 'category' must be a non-empty string or absent")


# ---- run folder access ------------------------------------------------------------------------


def _store_path(store: "RunStore", rel: str) -> str:
    return store._abs(rel)  # noqa: SLF001 - RunStore has no public absolute-path accessor


def _upload(store: "RunStore", local: str, rel: str) -> None:
    """One whole-object upload of a local file into the run folder (streamed, not loaded into memory)."""
    store.put_file(local, rel)


@contextlib.contextmanager
def _open_snapshot(store: "RunStore", name: str) -> Iterator[pq.ParquetFile]:
    rel = snapshot_path(name)
    try:
        handle = store.fs.open(_store_path(store, rel), "rb")
    except FileNotFoundError:
        raise PromptError(f"{store.url}/{rel}: prompt snapshot missing (expected one written by snapshot_prompts)") from None
    except Exception as err:  # noqa: BLE001
        raise PromptError(f"{store.url}/{rel}: cannot open prompt snapshot ({type(err).__name__})") from None
    with handle:
        try:
            file = pq.ParquetFile(handle)
        except Exception:  # noqa: BLE001
            raise PromptError(f"{store.url}/{rel}: not a readable Parquet file") from None
        missing = [c for c in ("prompt_id", "text", "category", "meta") if c not in file.schema_arrow.names]
        if missing:
            raise PromptError(f"{store.url}/{rel}: not a prompt snapshot (no column(s) {missing})")
        yield file
