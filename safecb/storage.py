"""One run prefix on any fsspec URL (local folder or ``s3://bucket/prefix``).

Layout, relative to the run root::

    config.yaml
    iter=0003/generations/shard-000017.a1b2.parquet  # one PUT per attempt, named by the attempt
    iter=0003/pairs/shard-000017.a1b2.parquet
    iter=0003/_commits/generations-000017.json       # ShardRecord; the driver writes it after the shard
    iter=0003/MANIFEST.json                          # written last; readers trust only it
    codebooks/v0004.safetensors (+ v0004.json)
    metrics.jsonl

Exactly-once shards with many writers and one driver: actors (`write_attempt`) each write their
attempt's object under its own name, so a retried or zombie attempt never overwrites another
attempt's bytes; only the driver (`commit_shard`) writes commit markers, and the first valid
commit of a shard wins. A commit is valid when it parses, points at
``iter=NNNN/{kind}/shard-{index:06d}.{attempt}.parquet`` and that object has the committed sha256.
`committed_shards` deletes invalid commits (the driver is their sole writer), so resume redoes
exactly those shards. Objects of attempts that never got committed are left in place (harmless:
nothing points at them; `remove_iteration` clears them with the folder).

Crash safety comes from ordering: a shard is one whole-object write, its commit marker is written
after it, the manifest after all commits. Object stores cannot rename, so there each object is one
PUT (already all-or-nothing); on a local filesystem every write goes to a temporary name in the
same folder and is `os.replace`d into place, so no file is ever seen torn. Resume lists the commits
and redoes only missing shards; readers read only what the manifest lists and verify each
object's sha256.

Every error is a one-line `StorageError` naming the URL/path and what was expected. Storage
options (keys, secrets, tokens) never appear in messages or reprs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from safecb.schemas.codebook import CodebookArtifact, codebook_from_bytes, codebook_to_bytes
from safecb.schemas.manifest import Manifest, ShardRecord

if TYPE_CHECKING:
    import torch

# Low timeouts/retries so an unreachable endpoint fails in seconds, not minutes; user options win.
S3_CONFIG_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 3,
    "read_timeout": 10,
    "retries": {"max_attempts": 2},
}
CHECK_REACHABLE_DEADLINE_S = 10.0
CURRENT_CODEBOOK = "codebooks/CURRENT.json"  # {"version", "sha256"}: what every actor must serve (the driver writes it)
PARQUET_COMPRESSION = "zstd"

# Commit verification reads whole shard objects; this many at a time bounds driver memory.
VERIFY_BATCH = 16
COPY_CHUNK_BYTES = 1 << 20

_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ATTEMPT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_ITER_DIR_RE = re.compile(r"^iter=(\d+)$")
_CODEBOOK_SIDECAR_RE = re.compile(r"^v(\d+)\.json$")
_SECRET_KEY_RE = re.compile(r"key|secret|token|passw|credential|auth|session|signature|sig$", re.I)
_USERINFO_RE = re.compile(r"://[^/\s@\"']+@")
_LOCAL_PROTOCOLS = {"file", "local"}
_S3_PROTOCOLS = {"s3", "s3a"}


class StorageError(Exception):
    """One-line storage failure naming the URL/path and what was expected. Never holds secrets."""


# --------------------------------------------------------------------------- secret scrubbing


def strip_credentials(url: str) -> str:
    """Drop ``user:pass@`` and secret-looking query parameters (key=, secret=, token=...) from a URL."""
    parts = urlsplit(url)
    if not parts.scheme or len(parts.scheme) == 1:  # plain local path (or a Windows drive letter)
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _SECRET_KEY_RE.search(k)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secret_values(options: Any, key_is_secret: bool = False) -> set[str]:
    """String values in `options` stored under secret-looking keys (recursively)."""
    out: set[str] = set()
    if isinstance(options, dict):
        for k, v in options.items():
            out |= _secret_values(v, key_is_secret or bool(_SECRET_KEY_RE.search(str(k))))
    elif isinstance(options, (list, tuple)):
        for v in options:
            out |= _secret_values(v, key_is_secret)
    elif isinstance(options, str) and key_is_secret and options:
        out.add(options)
    return out


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- helpers


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _iter_dir(iteration: int) -> str:
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    return f"iter={iteration:04d}"


def _check_kind(kind: str) -> str:
    if not _KIND_RE.match(kind):
        raise ValueError(f"shard kind must match {_KIND_RE.pattern}, got {kind!r}")
    return kind


def _check_attempt(attempt: str) -> str:
    if not isinstance(attempt, str) or not _ATTEMPT_RE.match(attempt):
        raise ValueError(f"attempt id must match {_ATTEMPT_RE.pattern}, got {attempt!r}")
    return attempt


def _check_rel(rel_path: str) -> str:
    rel = rel_path.strip("/")
    if not rel or rel_path.startswith("/") or any(p in ("", ".", "..") for p in rel.split("/")):
        raise ValueError(f"expected a relative path inside the run root, got {rel_path!r}")
    return rel


def _parquet_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet bytes: same table + same pyarrow version -> same bytes (no timestamps)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=PARQUET_COMPRESSION)
    return buf.getvalue()


def _atomic_local_write(dest: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write `dest` via a temporary name in its folder + `os.replace`; no temp file survives a failure."""
    folder, name = os.path.split(dest)
    # Hidden and unique: concurrent writers never share a temp name, and no listing pattern matches it.
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            # Without fsync a crash after the rename can leave an empty file on some filesystems.
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and arrays in metric rows.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"metric value of type {type(obj).__name__} is not JSON serialisable")


class RunStore:
    """All artifacts of one run under one fsspec root URL.

    `storage_options` go to `fsspec.core.url_to_fs`. For S3, `S3_CONFIG_DEFAULTS` are merged
    under the user's ``config_kwargs`` and listings are not cached (other processes write too).
    """

    def __init__(self, url: str, storage_options: dict | None = None):
        self._raw_url = url
        self._url = strip_credentials(url).rstrip("/")
        options = dict(storage_options or {})
        self._secrets = _secret_values(options)
        protocol = urlsplit(url).scheme.lower() if "://" in url else "file"
        if protocol in _S3_PROTOCOLS:
            user_cfg = dict(options.get("config_kwargs") or {})
            cfg = {**S3_CONFIG_DEFAULTS, **user_cfg}
            if "retries" in user_cfg and isinstance(user_cfg["retries"], dict):
                cfg["retries"] = {**S3_CONFIG_DEFAULTS["retries"], **user_cfg["retries"]}
            options["config_kwargs"] = cfg
            options.setdefault("use_listings_cache", False)
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except Exception as e:  # bad URL / unknown protocol / missing backend
            raise StorageError(self._msg("", "could not open filesystem", e)) from None
        self._root = root.rstrip("/")
        protos = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self._is_local = bool(set(protos) & _LOCAL_PROTOCOLS)
        self._is_s3 = bool(set(protos) & _S3_PROTOCOLS)

    # ------------------------------------------------------------------ basics

    @property
    def is_local(self) -> bool:
        return self._is_local

    @property
    def root(self) -> str:
        """The root path as the filesystem (`self.fs`) names it (no protocol, no credentials)."""
        return self._root

    @property
    def url(self) -> str:
        """Root URL with any credentials stripped."""
        return self._url

    def __repr__(self) -> str:
        return f"RunStore({self._url!r})"

    def _abs(self, rel: str) -> str:
        return f"{self._root}/{rel}" if rel else self._root

    def _scrub(self, text: str) -> str:
        text = _USERINFO_RE.sub("://", _one_line(text))
        for s in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(s, "***")
        if self._raw_url != self._url:
            text = text.replace(self._raw_url, self._url)
        return text

    def _msg(self, rel: str, expected: str, exc: BaseException | None = None) -> str:
        where = f"{self._url}/{rel}" if rel else self._url
        line = f"{where}: {expected}"
        if exc is not None:
            line += f" ({type(exc).__name__}: {exc})"
        return self._scrub(line)

    def _error(self, rel: str, expected: str, exc: BaseException | None = None) -> StorageError:
        return StorageError(self._msg(rel, expected, exc))

    def _makedirs_for(self, rel: str) -> None:
        if self._is_local:
            parent = self._abs(rel).rsplit("/", 1)[0]
            self.fs.makedirs(parent, exist_ok=True)

    def _put(self, rel: str, data: bytes) -> None:
        """One whole-object write: a single PUT on object stores, temp file + rename locally."""
        try:
            self._makedirs_for(rel)
            if self._is_local:
                _atomic_local_write(self._abs(rel), lambda f: f.write(data))
            else:
                self.fs.pipe_file(self._abs(rel), data)
        except Exception as e:
            raise self._error(rel, f"could not write {len(data)} bytes", e) from None

    def put_file(self, local_path: str | os.PathLike, rel_path: str) -> None:
        """Upload a local file to `rel_path` without loading it into memory.

        S3: fsspec `put_file` (multipart for large files; the object appears only on completion).
        Local: streamed copy to a temporary name + rename, like every other local write.
        """
        rel = _check_rel(rel_path)
        src = os.fspath(local_path)
        try:
            size = os.path.getsize(src)
        except OSError as e:
            raise self._error(rel, f"expected local file {src} to upload", e) from None
        try:
            self._makedirs_for(rel)
            if self._is_local:
                def copy(f: IO[bytes]) -> None:
                    with open(src, "rb") as fi:
                        shutil.copyfileobj(fi, f, COPY_CHUNK_BYTES)

                _atomic_local_write(self._abs(rel), copy)
            else:
                self.fs.put_file(src, self._abs(rel))
        except Exception as e:
            raise self._error(rel, f"could not upload {size} bytes from local file {src}", e) from None
        if self._is_s3:
            self.fs.invalidate_cache(self._abs(rel))

    def _rm(self, rel: str, what: str) -> None:
        """Delete one object; already gone is fine."""
        try:
            self.fs.rm_file(self._abs(rel))
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._error(rel, f"could not delete {what}", e) from None
        if self._is_s3:
            self.fs.invalidate_cache(self._abs(rel))

    def _cat_many(self, rels: list[str], rel_for_error: str, what: str) -> dict[str, bytes | None]:
        """rel -> bytes (None if missing) for many objects in one concurrent request.

        Any failure other than "missing" raises: a transient read error must never be mistaken for
        a missing object (callers delete commits whose object is missing).
        """
        if not rels:
            return {}
        try:
            blobs = self.fs.cat([self._abs(r) for r in rels], on_error="return")
        except Exception as e:
            raise self._error(rel_for_error, f"could not read {what}", e) from None
        out: dict[str, bytes | None] = {}
        for r in rels:
            if self._abs(r) not in blobs:  # never guess "missing": that would delete commits
                raise self._error(r, f"could not read {what}: the filesystem returned no result for it")
            blob = blobs[self._abs(r)]
            if isinstance(blob, FileNotFoundError):
                out[r] = None
            elif isinstance(blob, bytes):
                out[r] = blob
            else:
                raise self._error(r, f"could not read {what}", blob if isinstance(blob, BaseException) else None)
        return out

    def _get(self, rel: str, what: str = "object") -> bytes:
        try:
            return self.fs.cat_file(self._abs(rel))
        except FileNotFoundError:
            raise self._error(rel, f"expected {what} to exist, but it is missing") from None
        except Exception as e:
            raise self._error(rel, f"could not read {what}", e) from None

    def _ls_names(self, rel: str) -> dict[str, int | None]:
        """basename -> size for the direct children of `rel` ({} if it does not exist)."""
        try:
            entries = self.fs.ls(self._abs(rel), detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:
            raise self._error(rel, "could not list folder", e) from None
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in entries}

    def check_reachable(self) -> None:
        """Raise StorageError within ~CHECK_REACHABLE_DEADLINE_S if the root can't be listed/created."""
        result: dict[str, BaseException | None] = {}

        def probe() -> None:
            try:
                if self._is_s3:
                    bucket = self._root.split("/", 1)[0]
                    # Never mkdir on S3: that would create a missing bucket.
                    self.fs.ls(bucket, refresh=True)
                elif self._is_local:
                    # Create nothing yet (bad input elsewhere must leave no trace): the nearest
                    # existing ancestor must be a folder we may write into.
                    probe_dir = Path(self._root)
                    while not probe_dir.exists() and probe_dir != probe_dir.parent:
                        probe_dir = probe_dir.parent
                    if not probe_dir.is_dir():
                        raise NotADirectoryError(str(probe_dir))
                    if not os.access(probe_dir, os.W_OK | os.X_OK):
                        raise PermissionError(str(probe_dir))
                else:
                    self.fs.ls(self._root)
                result["err"] = None
            except BaseException as e:  # noqa: BLE001 - reported below
                result["err"] = e

        t = threading.Thread(target=probe, name="safecb-check-reachable", daemon=True)
        t.start()
        t.join(CHECK_REACHABLE_DEADLINE_S)
        if t.is_alive():
            raise self._error("", f"storage root did not answer within {CHECK_REACHABLE_DEADLINE_S:.0f} s")
        err = result.get("err")
        if err is None:
            return
        if isinstance(err, FileNotFoundError):
            what = "bucket does not exist" if self._is_s3 else "root folder does not exist"
            raise self._error("", f"expected a reachable storage root, but {what}", err)
        if isinstance(err, PermissionError):
            raise self._error("", "expected a reachable storage root, but permission was denied", err)
        raise self._error("", "expected a reachable storage root, but it could not be listed", err)

    # ------------------------------------------------------------------ shards

    def shard_path(self, iteration: int, kind: str, index: int) -> str:
        """Legacy attempt-less shard path (kept for old runs' records; new shards use `attempt_path`)."""
        if index < 0:
            raise ValueError(f"shard index must be >= 0, got {index}")
        return f"{_iter_dir(iteration)}/{_check_kind(kind)}/shard-{index:06d}.parquet"

    def attempt_path(self, iteration: int, kind: str, index: int, attempt: str) -> str:
        """Relative path of one attempt's shard object: ``iter=NNNN/{kind}/shard-{index:06d}.{attempt}.parquet``."""
        if index < 0:
            raise ValueError(f"shard index must be >= 0, got {index}")
        return f"{_iter_dir(iteration)}/{_check_kind(kind)}/shard-{index:06d}.{_check_attempt(attempt)}.parquet"

    def _commit_path(self, iteration: int, kind: str, index: int) -> str:
        return f"{_iter_dir(iteration)}/_commits/{_check_kind(kind)}-{index:06d}.json"

    def write_attempt(self, iteration: int, kind: str, index: int, table: pa.Table, attempt: str,
                      actor: str | None = None, node: str | None = None,
                      stats: dict[str, Any] | None = None) -> ShardRecord:
        """Write one attempt's shard object (one PUT of deterministic zstd Parquet bytes); no commit.

        Actors call this and hand the record to the driver, which alone calls `commit_shard`.
        `attempt` must be unique per attempt (e.g. a uuid), so attempts never overwrite each other.
        """
        rel = self.attempt_path(iteration, kind, index, attempt)
        # Round-trip through JSON now so numpy/torch scalars fail (or convert) in the actor, not
        # later when the driver serialises the commit.
        stats = json.loads(json.dumps(stats or {}, default=_json_default))
        data = _parquet_bytes(table)
        record = ShardRecord(kind=kind, index=index, path=rel, rows=table.num_rows, bytes=len(data),
                             sha256=_sha256(data), attempt=attempt, actor=actor, node=node, stats=stats)
        self._put(rel, data)
        return record

    def _commit_points_home(self, iteration: int, kind: str, index: int, rec: ShardRecord) -> bool:
        """Does `rec` name an attempt object of exactly this (iteration, kind, index)?"""
        if rec.kind != kind or rec.index != index or not _ATTEMPT_RE.match(rec.attempt):
            return False
        return rec.path == self.attempt_path(iteration, kind, index, rec.attempt)

    def _parse_commit(self, iteration: int, kind: str, index: int, blob: bytes) -> ShardRecord | None:
        try:
            rec = ShardRecord.from_json(blob)
        except ValidationError:
            return None  # torn/garbled marker
        return rec if self._commit_points_home(iteration, kind, index, rec) else None

    def _object_matches(self, rec: ShardRecord, blob: bytes | None) -> bool:
        return blob is not None and len(blob) == rec.bytes and _sha256(blob) == rec.sha256

    def commit_shard(self, iteration: int, record: ShardRecord) -> ShardRecord:
        """The driver's commit of an attempt's shard; returns the record that is committed.

        If a valid commit for (kind, index) already exists it wins and is returned unchanged, so a
        late zombie attempt never replaces a committed shard. An invalid one (garbled, pointing
        elsewhere, object missing or of another sha256) is overwritten. Check-then-write is not
        atomic: this relies on the driver being the only process that commits.
        """
        kind, index = record.kind, record.index
        if not self._commit_points_home(iteration, kind, index, record):
            raise ValueError(f"record path {record.path!r} is not an attempt path of iteration {iteration} "
                             f"{kind!r} shard {index} (attempt {record.attempt!r})")
        rel = self._commit_path(iteration, kind, index)
        existing_blob = self._cat_many([rel], rel, "commit marker")[rel]
        if existing_blob is not None:
            existing = self._parse_commit(iteration, kind, index, existing_blob)
            if existing is not None:
                if existing == record:
                    return existing  # re-commit of the same attempt: no need to re-read the object
                obj = self._cat_many([existing.path], existing.path, "committed shard")[existing.path]
                if self._object_matches(existing, obj):
                    return existing
        self._put(rel, record.to_json().encode())
        return record

    def write_shard(self, iteration: int, kind: str, index: int, table: pa.Table) -> ShardRecord:
        """Single-process convenience: `write_attempt` (attempt "local") + `commit_shard`.

        Rewriting with other data overwrites the "local" object, which invalidates the old commit,
        so the new data gets committed; rewriting the same data returns the existing record.
        """
        record = self.write_attempt(iteration, kind, index, table, attempt="local")
        return self.commit_shard(iteration, record)

    def committed_shards(self, iteration: int, kind: str) -> dict[int, ShardRecord]:
        """index -> record for every valid commit of `kind` in `iteration`.

        Valid means: the marker parses, points at ``iter=NNNN/{kind}/shard-{index:06d}.{attempt}.parquet``
        and that object's bytes have the committed size and sha256 (the bytes are read, VERIFY_BATCH
        objects at a time). Every invalid marker is deleted: the driver is the sole writer of
        commits, so deleting lets the shard be redone and committed again by `commit_shard`.
        Transient read errors raise StorageError instead (they must not delete good commits).
        """
        _check_kind(kind)
        commits_rel = f"{_iter_dir(iteration)}/_commits"
        pattern = re.compile(rf"^{re.escape(kind)}-(\d+)\.json$")
        names = sorted(n for n in self._ls_names(commits_rel) if pattern.match(n))
        blobs = self._cat_many([f"{commits_rel}/{n}" for n in names], commits_rel, "commit markers")
        candidates: list[tuple[str, ShardRecord]] = []
        bad: list[str] = []
        for rel, blob in blobs.items():
            if blob is None:
                continue  # vanished since listing: not committed
            index = int(pattern.match(rel.rsplit("/", 1)[-1]).group(1))
            rec = self._parse_commit(iteration, kind, index, blob)
            if rec is None:
                bad.append(rel)
            else:
                candidates.append((rel, rec))
        out: dict[int, ShardRecord] = {}
        for start in range(0, len(candidates), VERIFY_BATCH):
            batch = candidates[start:start + VERIFY_BATCH]
            objs = self._cat_many([rec.path for _, rec in batch], f"{_iter_dir(iteration)}/{kind}", "committed shards")
            for rel, rec in batch:
                if self._object_matches(rec, objs[rec.path]):
                    out[rec.index] = rec
                else:
                    bad.append(rel)  # object missing, resized or overwritten
        for rel in bad:
            self._rm(rel, "invalid commit marker")
        return dict(sorted(out.items()))

    # ------------------------------------------------------------------ manifests

    def _manifest_path(self, iteration: int) -> str:
        return f"{_iter_dir(iteration)}/MANIFEST.json"

    def write_manifest(self, manifest: Manifest) -> None:
        """Write MANIFEST.json for `manifest.iteration` in one PUT (call after all shards)."""
        self._put(self._manifest_path(manifest.iteration), manifest.to_json().encode())

    def read_manifest(self, iteration: int) -> Manifest:
        rel = self._manifest_path(iteration)
        data = self._get(rel, "manifest")
        try:
            m = Manifest.from_json(data)
        except ValidationError as e:
            first = e.errors()[0] if e.errors() else {}
            loc = ".".join(str(p) for p in first.get("loc", ()))
            raise self._error(rel, f"expected a valid manifest, got {e.error_count()} error(s), first at {loc or '<root>'}: {first.get('msg', '')}") from None
        if m.iteration != iteration:
            raise self._error(rel, f"expected manifest of iteration {iteration}, got {m.iteration}")
        return m

    @staticmethod
    def _parse_manifest(iteration: int, blob: bytes | None) -> Manifest | None:
        if blob is None:
            return None
        try:
            m = Manifest.from_json(blob)
        except ValidationError:
            return None  # torn or garbled: not a finished iteration
        return m if m.iteration == iteration else None

    def _valid_manifest_map(self) -> dict[int, Manifest]:
        """iteration -> manifest for every MANIFEST.json that parses, validates and names its iteration."""
        iters = sorted(int(m.group(1)) for n in self._ls_names("") if (m := _ITER_DIR_RE.match(n)))
        rels = {i: self._manifest_path(i) for i in iters}
        blobs = self._cat_many(list(rels.values()), "", "manifests")
        parsed = {i: self._parse_manifest(i, blobs[rel]) for i, rel in rels.items()}
        return {i: m for i, m in parsed.items() if m is not None}

    def has_manifest(self, iteration: int) -> bool:
        """True if iteration's MANIFEST.json exists and is valid (a torn one does not count)."""
        rel = self._manifest_path(iteration)
        return self._parse_manifest(iteration, self._cat_many([rel], rel, "manifest")[rel]) is not None

    def manifest_iterations(self) -> list[int]:
        """Sorted iterations whose MANIFEST.json parses and validates (gaps possible; see `valid_manifests`)."""
        return sorted(self._valid_manifest_map())

    def valid_manifests(self) -> list[Manifest]:
        """Manifests of iterations 0..n in order, stopping at the first missing or invalid one."""
        found = self._valid_manifest_map()
        out: list[Manifest] = []
        while len(out) in found:
            out.append(found[len(out)])
        return out

    def _decode_shard(self, rec: ShardRecord, blob: bytes | None, schema: pa.Schema | None,
                      columns: list[str] | None, what: str) -> pa.Table:
        """Verify `blob` against `rec` (size, sha256, rows) and decode it; one-line StorageError otherwise."""
        if blob is None:
            raise self._error(rec.path, f"expected {what} (sha256 {rec.sha256[:12]}..), but it is missing")
        sha = _sha256(blob)
        if len(blob) != rec.bytes or sha != rec.sha256:
            raise self._error(rec.path, f"expected sha256 {rec.sha256[:12]}.. ({rec.bytes} bytes), got {sha[:12]}.. ({len(blob)} bytes): shard corrupted or overwritten")
        try:
            t = pq.read_table(io.BytesIO(blob), columns=columns)
        except Exception as e:
            raise self._error(rec.path, "expected a readable Parquet shard" + (f" with columns {columns}" if columns else ""), e) from None
        if t.num_rows != rec.rows:
            raise self._error(rec.path, f"expected {rec.rows} rows, got {t.num_rows}")
        # Parquet names list children "element" (Arrow: "item"); cast restores the exact schema.
        if schema is not None and not t.schema.equals(schema, check_metadata=True):
            try:
                t = t.select(schema.names).cast(schema)
            except Exception as e:
                raise self._error(rec.path, "shard does not match the expected schema", e) from None
        return t

    @staticmethod
    def _project(schema: pa.Schema | None, columns: list[str] | None) -> pa.Schema | None:
        if schema is None or columns is None:
            return schema
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise ValueError(f"columns {missing} are not in the schema (fields: {schema.names})")
        return pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)

    def read_shard(self, record: ShardRecord, schema: pa.Schema | None = None,
                   columns: list[str] | None = None) -> pa.Table:
        """Read one shard, verifying its size, sha256 and row count (optionally only `columns`)."""
        target = self._project(schema, columns)
        blob = self._cat_many([record.path], record.path, "shard")[record.path]
        return self._decode_shard(record, blob, target, columns, "shard")

    def iter_shard_tables(self, records: Iterable[ShardRecord], schema: pa.Schema | None = None,
                          columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Yield each record's verified table in order, one shard in memory at a time."""
        for record in records:
            yield self.read_shard(record, schema, columns)

    def read_table(self, manifest: Manifest, kind: str, schema: pa.Schema | None = None,
                   columns: list[str] | None = None) -> pa.Table:
        """Concatenate exactly the `kind` shards `manifest` lists, verifying each one's sha256.

        With no shards, returns an empty table of `schema` (required in that case). With `schema`,
        each shard is checked/cast to it. Reads all shards concurrently; use `iter_shard_tables`
        to stream instead.
        """
        target = self._project(schema, columns)
        records = manifest.shards.get(kind, [])
        if not records:
            if target is None:
                raise ValueError(f"manifest of iteration {manifest.iteration} lists no {kind!r} shards; pass schema= to get an empty table")
            return target.empty_table()
        blobs = self._cat_many([r.path for r in records], _iter_dir(manifest.iteration), f"{kind} shards")
        tables = [self._decode_shard(r, blobs[r.path], target, columns, "shard listed in manifest") for r in records]
        try:
            return pa.concat_tables(tables)
        except pa.ArrowInvalid as e:
            raise self._error(_iter_dir(manifest.iteration), f"{kind} shards have differing schemas", e) from None

    def remove_iteration(self, iteration: int) -> None:
        """Delete ``iter=NNNN/`` entirely (half-finished iterations beyond the last manifest)."""
        rel = _iter_dir(iteration)
        try:
            self.fs.rm(self._abs(rel), recursive=True)
        except FileNotFoundError:
            return
        except Exception as e:
            raise self._error(rel, "could not delete iteration folder", e) from None
        if self._is_s3:
            self.fs.invalidate_cache(self._abs(rel))

    # ------------------------------------------------------------------ codebooks

    @staticmethod
    def _codebook_rel(version: int, ext: str) -> str:
        if version < 0:
            raise ValueError(f"codebook version must be >= 0, got {version}")
        return f"codebooks/v{version:04d}.{ext}"

    def write_codebook(self, tensors: dict[str, "torch.Tensor"], artifact: CodebookArtifact) -> CodebookArtifact:
        """Write ``codebooks/vNNNN.safetensors`` then its ``vNNNN.json`` sidecar.

        Fills `shape`/`dtype` from ``tensors["codebook"]`` when empty (ValueError if they disagree)
        and `sha256` of the safetensors bytes. Returns the filled artifact.
        """
        cb = tensors.get("codebook")
        if cb is None:
            raise ValueError(f"expected key 'codebook' in tensors, got {sorted(tensors)}")
        shape, dtype = list(cb.shape), str(cb.dtype).removeprefix("torch.")
        if artifact.shape and artifact.shape != shape:
            raise ValueError(f"artifact.shape {artifact.shape} != codebook tensor shape {shape}")
        if artifact.dtype and artifact.dtype.removeprefix("torch.") != dtype:
            raise ValueError(f"artifact.dtype {artifact.dtype!r} != codebook tensor dtype {dtype!r}")
        artifact = artifact.model_copy(update={"shape": shape, "dtype": dtype, "sha256": ""})
        data = codebook_to_bytes(tensors, artifact)
        artifact = artifact.model_copy(update={"sha256": _sha256(data)})
        self._put(self._codebook_rel(artifact.version, "safetensors"), data)
        self._put(self._codebook_rel(artifact.version, "json"), artifact.to_json().encode())
        return artifact

    def read_codebook_bytes(self, version: int) -> tuple[bytes, CodebookArtifact]:
        """The safetensors bytes of a codebook version and its sidecar, verified (sha256, embedded version):
        what the driver broadcasts, so that every actor can check what it received."""
        side_rel = self._codebook_rel(version, "json")
        st_rel = self._codebook_rel(version, "safetensors")
        try:
            artifact = CodebookArtifact.from_json(self._get(side_rel, "codebook sidecar"))
        except ValidationError as e:
            raise self._error(side_rel, f"expected a valid codebook sidecar ({e.error_count()} validation error(s))") from None
        data = self._get(st_rel, "codebook")
        sha = _sha256(data)
        if sha != artifact.sha256:
            raise self._error(st_rel, f"expected sha256 {artifact.sha256[:12]}.. from sidecar, got {sha[:12]}..: codebook corrupted or tampered")
        self._decode_codebook(st_rel, data, artifact)
        return data, artifact

    def read_codebook(self, version: int) -> tuple[dict[str, "torch.Tensor"], CodebookArtifact]:
        """Load a codebook version, verifying the safetensors bytes against the sidecar's sha256."""
        data, artifact = self.read_codebook_bytes(version)
        return self._decode_codebook(self._codebook_rel(version, "safetensors"), data, artifact), artifact

    def _decode_codebook(self, rel: str, data: bytes, artifact: CodebookArtifact) -> dict[str, "torch.Tensor"]:
        try:
            tensors, meta = codebook_from_bytes(data)
        except Exception as e:
            raise self._error(rel, "expected readable safetensors", e) from None
        if meta.get("version") != artifact.version:
            raise self._error(rel, f"expected embedded version {artifact.version}, got {meta.get('version')}")
        return tensors

    def codebook_versions(self) -> list[int]:
        """Sorted versions that have a JSON sidecar (the sidecar is written last)."""
        return sorted(int(m.group(1)) for n in self._ls_names("codebooks") if (m := _CODEBOOK_SIDECAR_RE.match(n)))

    # ------------------------------------------------------------------ small files

    def write_text(self, rel_path: str, text: str) -> None:
        self._put(_check_rel(rel_path), text.encode("utf-8"))

    def write_bytes(self, rel_path: str, data: bytes) -> None:
        self._put(_check_rel(rel_path), data)

    def read_text(self, rel_path: str) -> str:
        rel = _check_rel(rel_path)
        data = self._get(rel, "file")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._error(rel, "expected UTF-8 text", e) from None

    def exists(self, rel_path: str) -> bool:
        rel = _check_rel(rel_path)
        try:
            return bool(self.fs.exists(self._abs(rel)))
        except Exception as e:
            raise self._error(rel, "could not check existence", e) from None

    def append_metrics(self, row: dict) -> None:
        """Append one JSON line to metrics.jsonl (read-modify-write: object stores can't append)."""
        line = json.dumps(row, default=_json_default, allow_nan=True)
        old = self.read_text("metrics.jsonl") if self.exists("metrics.jsonl") else ""
        if not old.strip():
            old = ""  # an empty or whitespace-only file holds no rows; don't carry the blanks along
        if old and not old.endswith("\n"):
            old += "\n"
        self.write_text("metrics.jsonl", old + line + "\n")

    def read_metrics(self) -> list[dict]:
        """Rows of metrics.jsonl; [] if it is missing, empty or whitespace-only (blank lines skipped)."""
        if not self.exists("metrics.jsonl"):
            return []
        rows = []
        for n, line in enumerate(self.read_text("metrics.jsonl").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise self._error("metrics.jsonl", f"expected one JSON object per line, line {n} is invalid", e) from None
        return rows
