"""The registry's tokenizer-only prompt counter and the model fingerprint."""

from __future__ import annotations

import shutil

import pytest

import safecb.models.registry as registry
from safecb.config import ModelConfig, PromptFormat
from safecb.models.base import ModelLoadError
from safecb.models.registry import load_model, model_fingerprint, prompt_token_counter
from safecb.world import WORLD_MODEL_DIR

PROMPTS = ["a red circle on grass", "one square over sand , with blood", "zebra unknown words here", "a"]


# ---- token counter ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["world", "tiny-random"])
def test_token_counter_matches_the_adapter(backend):
    fmt = PromptFormat(generation="<|User|>: draw {prompt} please\n\n<|Assistant|>:")
    config = ModelConfig(backend=backend, device="cpu", prompt_format=fmt)
    categories = ["blood", "violence"]
    adapter = load_model(config, categories)
    counts = prompt_token_counter(config, categories)(PROMPTS)
    ids, mask = adapter.generation_inputs(PROMPTS)
    assert counts == mask.sum(-1).tolist()  # the adapter pads left; its mask counts the real tokens
    assert ids.shape[1] == max(counts)
    assert prompt_token_counter(config, categories)([]) == []


def test_token_counter_bad_folder_is_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder") as err:
        prompt_token_counter(ModelConfig(backend="janus", path=str(tmp_path / "none")), [])
    assert "\n" not in str(err.value)


# ---- fingerprint ------------------------------------------------------------------------------

@pytest.fixture
def model_dir(tmp_path):
    return shutil.copytree(WORLD_MODEL_DIR, tmp_path / "model")


def janus(path) -> ModelConfig:
    return ModelConfig(backend="janus", path=str(path))


def test_fingerprint_changes_with_any_file(model_dir):
    before = model_fingerprint(janus(model_dir))
    assert before == model_fingerprint(janus(model_dir)) == model_fingerprint(ModelConfig())  # same bytes, same print
    config = model_dir / "tokenizer_config.json"
    original = config.read_bytes()
    config.write_bytes(original.replace(b"left", b"right"))
    assert model_fingerprint(janus(model_dir)) != before
    config.write_bytes(original)
    assert model_fingerprint(janus(model_dir)) == before
    (model_dir / "extra.txt").write_text("x")
    assert model_fingerprint(janus(model_dir)) != before


def test_fingerprint_ignores_bookkeeping_files(model_dir):
    before = model_fingerprint(janus(model_dir))
    (model_dir / ".complete").write_text("ok")
    (model_dir / ".cache").mkdir()
    (model_dir / ".cache" / "x").write_text("y")
    assert model_fingerprint(janus(model_dir)) == before


def test_large_files_hash_their_size_and_edges(model_dir, monkeypatch):
    monkeypatch.setattr(registry, "FINGERPRINT_WHOLE_FILE_MAX", 4096)
    monkeypatch.setattr(registry, "FINGERPRINT_EDGE", 1024)
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    before = model_fingerprint(janus(model_dir))
    middle = len(data) // 2
    data[middle] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_fingerprint(janus(model_dir)) == before  # the documented trade-off: the middle is not read
    data[10] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert model_fingerprint(janus(model_dir)) != before
    data[10] ^= 0xFF
    weights.write_bytes(bytes(data) + b"\0")
    assert model_fingerprint(janus(model_dir)) != before  # size counts


def test_fingerprint_missing_folder_is_one_line(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        model_fingerprint(janus(tmp_path / "none"))
    assert str(err.value).startswith("model.path: ") and "no such folder" in str(err.value)
    assert "\n" not in str(err.value)


def test_fingerprint_tiny_random_follows_seed_and_categories():
    tiny = ModelConfig(backend="tiny-random")
    a = model_fingerprint(tiny, ["blood"], seed=0)
    assert a == model_fingerprint(tiny, ["blood"], seed=0)
    assert a != model_fingerprint(tiny, ["blood"], seed=1)
    assert a != model_fingerprint(tiny, ["fire"], seed=0)


def test_fingerprint_of_an_object_store_prefix_uses_the_listing(s3_server, s3_bucket, monkeypatch):
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint_url"])
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["endpoint_url"]}, skip_instance_cache=True)
    prefix = f"{s3_bucket}/models/world"
    for file in WORLD_MODEL_DIR.iterdir():
        fs.pipe_file(f"{prefix}/{file.name}", file.read_bytes())
    url = f"s3://{prefix}"
    opened = []
    monkeypatch.setattr(s3fs.S3FileSystem, "_open", lambda *a, **k: opened.append(a) or pytest.fail("no download"))
    before = model_fingerprint(janus(url))
    assert before == model_fingerprint(janus(url + "/"))
    fs.pipe_file(f"{prefix}/tokenizer_config.json", b"{}")
    assert model_fingerprint(janus(url)) != before
    with pytest.raises(ModelLoadError, match="no such folder or empty"):
        model_fingerprint(janus(f"s3://{s3_bucket}/models/none"))
