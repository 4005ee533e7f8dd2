"""Model backends by name: config.model.backend → a `UnifiedModel`, its tokenizer-only prompt counter,
and a fingerprint of its weights (so that a resumed run can tell that the model changed)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from safecb.config import ModelConfig
from safecb.models.base import ModelLoadError, UnifiedModel
from safecb.models.janus import JanusAdapter, pick_device, resolve_model_folder

FINGERPRINT_WHOLE_FILE_MAX = 64 * 1024 * 1024  # files up to this size are hashed whole
FINGERPRINT_EDGE = 1024 * 1024  # larger files: their size and the sha256 of their first and last MiB
# Object-store listing fields that identify an object's content, in order of preference.
_CHECKSUM_KEYS = ("ChecksumSHA256", "checksum", "ETag", "etag", "md5Hash", "crc32c", "md5")


def _tiny_words(categories: list[str]) -> list[str]:
    # The tiny model's vocabulary: load_model and prompt_token_counter must build the same tokenizer.
    return [*categories, "a", "on", "of", "with"]


def _model_location(config: ModelConfig) -> str:
    if config.backend == "world":
        from safecb.world import world_model_dir

        return world_model_dir(config.path)
    return config.path or ""


def load_model(config: ModelConfig, categories: list[str], seed: int = 0, batch_size: int | None = None) -> UnifiedModel:
    """The model of `config`. `batch_size`: the largest batch the caller generates (the GPU engine's shape)."""
    if config.backend == "load-generator":  # scale and fault tests only: never evidence that Safe-CB works
        from safecb.models.load_generator import LoadGenerator

        return LoadGenerator(seed=seed)
    if config.backend == "tiny-random":
        from safecb.models.tiny import build_tiny_janus

        model, processor = build_tiny_janus(words=_tiny_words(categories), seed=seed)
        return JanusAdapter(model.to(pick_device(config.device)), processor, config.prompt_format, "off")
    return JanusAdapter.from_folder(_model_location(config), device=config.device, dtype=config.dtype,
                                    prompt_format=config.prompt_format, engine=config.engine.enabled,
                                    kv_dtype=config.engine.kv_dtype,
                                    max_batch=min(config.engine.max_batch, batch_size or config.engine.max_batch),
                                    max_prompt_len=config.engine.max_prompt_len,
                                    batch_invariant=config.engine.batch_invariant)


def prompt_token_counter(config: ModelConfig, categories: list[str]) -> Callable[[list[str]], list[int]]:
    """Token count of each prompt as generation feeds it to the model (format + begin-of-image token).

    Loads only the tokenizer (no weights), so the driver can check prompt lengths before any worker
    starts. Counts as `JanusAdapter.generation_inputs` encodes, without the padding. load-generator:
    whitespace words + 2 (it has no tokenizer).
    """
    if config.backend == "load-generator":
        from safecb.models.load_generator import count_prompt_tokens

        return count_prompt_tokens
    if config.backend == "tiny-random":
        from safecb.models.tiny import build_processor, build_word_tokenizer

        processor = build_processor(build_word_tokenizer(_tiny_words(categories)))
        tokenizer, boi = processor.tokenizer, processor.image_start_token
    else:
        from transformers import AutoTokenizer

        folder = resolve_model_folder(_model_location(config))
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        except Exception as err:  # noqa: BLE001 - transformers raises many kinds; report one line
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise ModelLoadError(f"model.path: {folder}: cannot load the tokenizer: {first}") from None
        boi = getattr(tokenizer, "boi_token", None)  # what JanusProcessor uses as its image_start_token
        if not boi:
            raise ModelLoadError(f"model.path: {folder}: tokenizer has no boi_token (expected a Janus tokenizer)")
    template = config.prompt_format.generation

    def count(prompts: list[str]) -> list[int]:
        if not prompts:
            return []
        texts = [template.format(prompt=p) + boi for p in prompts]
        return [len(ids) for ids in tokenizer(texts, padding=False).input_ids]

    return count


def model_fingerprint(config: ModelConfig, categories: list[str] | None = None, seed: int = 0) -> str:
    """sha256 hex that changes when the model's weights (or tokenizer, config) change.

    Local folder: over the sorted (relative path, size, content sha256) of its files; a file over
    64 MiB contributes its size and the sha256 of its first and last MiB only, since reading the
    14 GB of a 7B checkpoint on every resume would take minutes (a rewritten shard changes its
    header, which sits in the first MiB). Object-store prefix: the listing's size and ETag/checksum
    of each object, nothing downloaded. tiny-random: its seed and categories (`categories`, `seed`:
    as given to `load_model`); load-generator: its settings (sizes, unsafe fraction, seed). Files and
    folders whose name starts with "." are bookkeeping (our cache's `.complete`, `.git`,
    `.cache/huggingface`), not the model, and are left out.
    """
    if config.backend == "tiny-random":
        tag = json.dumps({"backend": "tiny-random", "seed": seed, "words": _tiny_words(list(categories or []))})
        return hashlib.sha256(tag.encode()).hexdigest()
    if config.backend == "load-generator":
        from safecb.models.load_generator import LoadGenerator

        tag = json.dumps(LoadGenerator(seed=seed).settings(), sort_keys=True)
        return hashlib.sha256(tag.encode()).hexdigest()
    location = _model_location(config)
    if "://" in location and not location.startswith("file://"):
        entries = _remote_entries(location)
    else:
        entries = _local_entries(Path(location.removeprefix("file://")).expanduser())
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(json.dumps(entry).encode() + b"\n")
    return digest.hexdigest()


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _local_entries(folder: Path) -> list[list]:
    if not folder.is_dir():
        raise ModelLoadError(f"model.path: {folder}: no such folder (expected a Hugging Face Janus checkpoint folder)")
    entries = []
    try:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
    except OSError as err:
        raise ModelLoadError(f"model.path: {folder}: cannot list ({err.strerror})") from None
    for file in files:
        rel = file.relative_to(folder).as_posix()
        if _hidden(rel):
            continue
        try:
            entries.append([rel, *_file_digest(file)])
        except OSError as err:
            raise ModelLoadError(f"model.path: {file}: cannot read ({err.strerror})") from None
    if not entries:
        raise ModelLoadError(f"model.path: {folder}: empty folder (expected a Hugging Face Janus checkpoint folder)")
    return entries


def _file_digest(file: Path) -> tuple[int, str]:
    size = file.stat().st_size
    with file.open("rb") as handle:
        return size, _content_digest(handle, size)


def _content_digest(handle, size: int) -> str:
    sha = hashlib.sha256()
    if size <= FINGERPRINT_WHOLE_FILE_MAX:
        for block in iter(lambda: handle.read(FINGERPRINT_EDGE), b""):
            sha.update(block)
        return sha.hexdigest()
    sha.update(handle.read(FINGERPRINT_EDGE))
    handle.seek(size - FINGERPRINT_EDGE)
    sha.update(handle.read(FINGERPRINT_EDGE))
    return "edges:" + sha.hexdigest()


def _remote_entries(location: str) -> list[list]:
    import fsspec

    shown = location.split("?")[0]
    try:
        fs, root = fsspec.core.url_to_fs(location)
        fs.invalidate_cache()  # a listing cached earlier in this process would hide a changed object
        listing = fs.find(root.rstrip("/"), detail=True)
    except Exception as err:  # noqa: BLE001 - any backend failure becomes one line
        raise ModelLoadError(f"model.path: cannot list {shown}: {type(err).__name__}") from None
    prefix = root.rstrip("/") + "/"
    entries = []
    for path, info in sorted(listing.items()):
        rel = path[len(prefix):] if path.startswith(prefix) else path.rsplit("/", 1)[-1]
        if info.get("type") == "directory" or _hidden(rel):
            continue
        size = int(info.get("size") or 0)
        tag = next((str(info[k]) for k in _CHECKSUM_KEYS if info.get(k)), None)
        if tag is None:
            # A backend with no checksum in its listing: read it, by the same rule as a local file.
            try:
                with fs.open(path, "rb") as handle:
                    tag = _content_digest(handle, size)
            except Exception as err:  # noqa: BLE001
                raise ModelLoadError(f"model.path: {shown}/{rel}: cannot read ({type(err).__name__})") from None
        entries.append([rel, size, tag])
    if not entries:
        raise ModelLoadError(f"model.path: {shown}: no such folder or empty (expected a Hugging Face Janus checkpoint folder)")
    return entries
