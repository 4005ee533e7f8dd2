"""The Janus adapter on a tiny random Janus: decode, judge, codebook swap, folder loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from safecb.models.base import ModelLoadError
from safecb.models.janus import JanusAdapter, resolve_model_folder

WORDS = ["red", "circle", "blood", "a", "on", "grass"]
QUESTION = "Does this image contain {category} content?"


@pytest.fixture(scope="module")
def built():
    from safecb.models.tiny import build_tiny_janus

    return build_tiny_janus(WORDS, seed=0)


@pytest.fixture
def adapter(built):
    model, processor = built
    adapter = JanusAdapter(model, processor)
    original = adapter.get_codebook()
    yield adapter
    adapter.set_codebook(original, 0)  # the model is shared by the module's tests


@pytest.fixture(scope="module")
def saved_folder(built, tmp_path_factory):
    from safecb.models.tiny import save_model_folder

    return save_model_folder(*built, tmp_path_factory.mktemp("tiny") / "model")


def random_tokens(adapter: JanusAdapter, batch: int, seed: int = 0) -> torch.Tensor:
    num_codes = adapter.get_codebook().shape[0]
    return torch.randint(num_codes, (batch, adapter.num_image_tokens), generator=torch.Generator().manual_seed(seed))


# ---- decode ------------------------------------------------------------------------------------

def test_decode_shape_and_range(adapter):
    images = adapter.decode(random_tokens(adapter, 3))
    assert images.shape == (3, 3, 32, 32)
    assert images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert float(images.std()) > 0  # not a constant image


def test_decode_uses_the_given_codebook_and_its_directions_only(adapter):
    tokens = random_tokens(adapter, 2)
    codebook = adapter.get_codebook()
    assert torch.equal(adapter.decode(tokens, codebook), adapter.decode(tokens))
    # The decoder sees ĉ = c/|c|: scaling every row by a positive number changes nothing …
    assert torch.allclose(adapter.decode(tokens, 3.0 * codebook), adapter.decode(tokens), atol=1e-5)
    # … while another codebook does change the image.
    other = torch.randn(codebook.shape, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(adapter.decode(tokens, other), adapter.decode(tokens), atol=1e-3)


def test_decode_is_differentiable_wrt_the_codebook(adapter):
    tokens = random_tokens(adapter, 2)[:, :16].repeat(1, 4)  # 16 distinct positions' codes, repeated
    codebook = adapter.get_codebook().requires_grad_(True)
    images = adapter.decode(tokens, codebook)
    assert images.requires_grad
    images.square().sum().backward()
    grad = codebook.grad  # (K, D)
    used = torch.zeros(codebook.shape[0], dtype=torch.bool)
    used[tokens.unique()] = True
    assert grad[used].abs().sum() > 0
    assert torch.equal(grad[~used], torch.zeros_like(grad[~used]))  # only the used codes get a gradient
    # The model's own weights stay frozen.
    assert not any(p.requires_grad for p in adapter.model.parameters())


# ---- judge -------------------------------------------------------------------------------------

def test_judge_shape_range_and_batch_independence(adapter):
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    categories = ["blood", "grass"]
    probs = adapter.judge(images, categories, QUESTION)
    assert probs.shape == (3, 2)
    assert bool(((probs > 0) & (probs < 1)).all())
    for i in range(3):
        alone = adapter.judge(images[i:i + 1], categories, QUESTION)
        assert torch.allclose(alone[0], probs[i], atol=1e-5)
    reordered = adapter.judge(images.flip(0), categories, QUESTION)
    assert torch.allclose(reordered.flip(0), probs, atol=1e-5)


def test_judge_category_does_not_depend_on_the_other_categories(adapter):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    alone = adapter.judge(images, ["blood"], QUESTION)  # (2, 1)
    # "red circle" is two tokens: the "blood" question is left-padded in this call.
    together = adapter.judge(images, ["red circle", "blood"], QUESTION)  # (2, 2)
    assert torch.allclose(together[:, 1:], alone, atol=1e-5)


def test_judge_depends_on_the_image_and_is_differentiable(adapter):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    probs = adapter.judge(images, ["blood"], QUESTION)
    probs.sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0


def test_judge_runs_the_shared_prefix_once_and_agrees_with_full_sequences(adapter):
    """The questions share the image prefix: running it once (and each question over its cache) must
    give what B × C full sequences give, gradients included."""
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5), requires_grad=True)
    categories = ["blood", "violence", "red circle"]
    shared = adapter.judge(images, categories, QUESTION)
    full = adapter._judge_unshared(images, categories, QUESTION)
    assert shared.shape == full.shape == (3, 3)
    assert torch.allclose(shared, full, atol=1e-5)
    (grad_shared,) = torch.autograd.grad(shared.sum(), images)
    (grad_full,) = torch.autograd.grad(full.sum(), images)
    assert torch.allclose(grad_shared, grad_full, atol=1e-5)


def test_judge_on_the_engines_fused_weights_agrees_with_hugging_faces_layers(adapter, monkeypatch):
    """Where the engine runs, the judge's language-model pass runs on its fused weights (one QKV and one
    gate-up product a layer, keys written into buffers with room for the questions): the same numbers
    as Hugging Face's layers. A gradient to the images, or a sequence past the engine's RoPE table,
    takes Hugging Face's path."""
    from safecb.models import judge_pass
    from safecb.models.engine import JanusEngine

    engine = JanusEngine(adapter.model, max_batch=1, max_prompt_len=64, num_image_tokens=adapter.num_image_tokens)
    monkeypatch.setattr(adapter, "_fast_engine", lambda: engine)  # the CPU has no engine of its own
    calls, original = [], judge_pass.question_states
    monkeypatch.setattr(judge_pass, "question_states", lambda *a: calls.append(1) or original(*a))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    categories = ["blood", "violence", "red circle"]
    with torch.no_grad():
        fused = adapter.judge(images, categories, QUESTION)
        assert calls == [1]
        adapter.fused_judge = False
        try:
            plain = adapter.judge(images, categories, QUESTION)
        finally:
            adapter.fused_judge = True
    assert calls == [1] and fused.shape == plain.shape == (3, 3)
    assert torch.allclose(fused, plain, atol=1e-5)
    with_grad = adapter.judge(images.clone().requires_grad_(True), categories, QUESTION)
    assert calls == [1] and with_grad.requires_grad  # Hugging Face's differentiable path
    assert not judge_pass.fits(engine, engine.max_len, 1) and judge_pass.fits(engine, engine.max_len - 1, 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: no CUDA device")
def test_shared_prefix_judge_on_the_gpu_in_bf16(saved_folder):
    """The same agreement on CUDA in bfloat16 (SDPA kernels, the cache on the device)."""
    gpu = JanusAdapter.from_folder(saved_folder, device="cuda", dtype="bfloat16", engine="off")
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    categories = ["blood", "violence", "red circle"]
    with torch.no_grad():
        shared, full = gpu.judge(images, categories, QUESTION), gpu._judge_unshared(images, categories, QUESTION)
    assert shared.device.type == "cuda" and shared.shape == (8, 3)
    assert (shared - full).abs().max() < 2e-2  # bf16: different kernels sum in different orders


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: no CUDA device")
def test_fused_judge_on_the_gpu_follows_hugging_faces_layers(saved_folder):
    """The judge's pass on the engine's Triton kernels and fused weights, against Hugging Face's layers."""
    gpu = JanusAdapter.from_folder(saved_folder, device="cuda", dtype="bfloat16", engine="on", max_batch=2,
                                   max_prompt_len=64)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    categories = ["blood", "violence", "red circle"]
    with torch.no_grad():
        fused = gpu.judge(images, categories, QUESTION)
        gpu.fused_judge = False
        plain = gpu.judge(images, categories, QUESTION)
    assert gpu._fast_engine().backend == "triton" and fused.shape == (8, 3)
    assert (fused - plain).abs().max() < 2e-2  # bf16: different kernels sum in different orders


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: no CUDA device")
def test_fused_decoder_on_the_gpu_serves_inference_and_leaves_gradients_to_hugging_faces_forward(saved_folder):
    """decode() takes the fused GroupNorm + SiLU pass without a gradient, and Hugging Face's forward when the
    codebook needs one (fine-tuning). In bf16 the fused pass is as close to the fp32 decode as Hugging
    Face's bf16 forward is (the two round differently, so they are compared to fp32, not to each other)."""
    gpu = JanusAdapter.from_folder(saved_folder, device="cuda", dtype="bfloat16", engine="off")
    reference = JanusAdapter.from_folder(saved_folder, device="cuda", dtype="float32", engine="off")
    reference.fused_decoder = False
    tokens = random_tokens(gpu, 4)
    with torch.no_grad():
        exact = reference.decode(tokens)
        fused = gpu.decode(tokens)
        gpu.decoder_channels_last = False
        fused_nchw = gpu.decode(tokens)
        gpu.fused_decoder = False
        plain = gpu.decode(tokens)
    gpu.fused_decoder = gpu.decoder_channels_last = True
    codebook = gpu.get_codebook().cuda().requires_grad_(True)
    pixels = gpu.decode(tokens, codebook)  # with a gradient: Hugging Face's forward, whatever the flags say
    pixels.square().mean().backward()
    assert codebook.grad is not None and codebook.grad.abs().sum() > 0
    assert torch.equal(pixels.detach(), plain)
    bf16_error = (plain - exact).abs().mean()
    for got in (fused, fused_nchw):
        assert (got - exact).abs().mean() < 2 * bf16_error + 1e-4, ((got - exact).abs().mean(), bf16_error)
        assert (got - exact).abs().max() < 0.1


def test_judge_resizes_other_image_sizes(adapter):
    probs = adapter.judge(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)), ["blood"], QUESTION)
    assert probs.shape == (2, 1)


# ---- codebook ----------------------------------------------------------------------------------

def test_set_and_get_codebook_round_trip(adapter):
    tokens = random_tokens(adapter, 1)
    new = torch.randn(adapter.get_codebook().shape, generator=torch.Generator().manual_seed(4))
    adapter.set_codebook(new, version=3)
    assert adapter.codebook_version == 3
    assert torch.equal(adapter.get_codebook(), new)
    assert torch.equal(adapter.decode(tokens), adapter.decode(tokens, new))
    # get_codebook is a copy: editing it does not change the model.
    copy = adapter.get_codebook()
    copy += 1.0
    assert torch.equal(adapter.get_codebook(), new)


def test_set_codebook_with_the_wrong_shape_is_refused(adapter):
    before = adapter.get_codebook()
    version = adapter.codebook_version
    with pytest.raises(ValueError, match="shape"):
        adapter.set_codebook(torch.zeros(before.shape[0] + 1, before.shape[1]), version=9)
    with pytest.raises(ValueError, match="shape"):
        adapter.set_codebook(torch.zeros(before.shape[1], before.shape[0]), version=9)
    assert adapter.codebook_version == version
    assert torch.equal(adapter.get_codebook(), before)


def test_generate_tokens_checks_seed_count(adapter):
    from safecb.models.base import SamplingParams

    with pytest.raises(ValueError):
        adapter.generate_tokens(["red circle", "blood"], [1], SamplingParams())


# ---- loading -----------------------------------------------------------------------------------

def test_from_folder_loads_a_saved_model(built, saved_folder):
    model, processor = built
    loaded = JanusAdapter.from_folder(saved_folder, device="cpu")
    original = JanusAdapter(model, processor)
    assert loaded.num_image_tokens == original.num_image_tokens == 64
    assert torch.equal(loaded.get_codebook(), original.get_codebook())
    tokens = random_tokens(original, 2)
    assert torch.allclose(loaded.decode(tokens), original.decode(tokens), atol=1e-6)
    assert (loaded.bos_id, loaded.boi_id, loaded.pad_id) == (original.bos_id, original.boi_id, original.pad_id)
    # resolve_model_folder accepts the folder and a file:// URL for it.
    assert resolve_model_folder(str(saved_folder)) == saved_folder
    assert resolve_model_folder(f"file://{saved_folder}") == saved_folder


def load_error(folder) -> str:
    with pytest.raises(ModelLoadError) as info:
        JanusAdapter.from_folder(folder, device="cpu")
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert str(folder) in message
    return message


def test_missing_folder(tmp_path):
    assert "no such folder" in load_error(tmp_path / "absent")


def test_folder_without_config(tmp_path, saved_folder):
    folder = tmp_path / "noconfig"
    folder.mkdir()
    shutil.copy(saved_folder / "model.safetensors", folder / "model.safetensors")
    assert "config.json" in load_error(folder)


def test_folder_with_only_pytorch_model_bin(tmp_path):
    folder = tmp_path / "binonly"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    assert "config.json" in load_error(folder)


def test_folder_with_config_and_pytorch_model_bin_only(tmp_path, saved_folder):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(saved_folder / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    assert "safetensors" in load_error(folder)


def test_folder_of_another_model_type(tmp_path, saved_folder):
    folder = tmp_path / "llama"
    shutil.copytree(saved_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    assert "janus" in load_error(folder)


def test_folder_with_broken_config_json(tmp_path, saved_folder):
    folder = tmp_path / "broken"
    shutil.copytree(saved_folder, folder)
    (folder / "config.json").write_text("{not json")
    assert "config.json" in load_error(folder)


def test_folder_with_truncated_weights(tmp_path, saved_folder):
    folder = tmp_path / "truncated"
    shutil.copytree(saved_folder, folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 16)
    load_error(folder)


# ---- generate + judge --------------------------------------------------------------------------

def _generate_then_judge(adapter: JanusAdapter, prompts, seeds, params, categories, generate_batch, judge_batch):
    """The reference: each generation batch, then its decode + judge, one after the other."""
    tokens = torch.cat([adapter.generate_tokens(prompts[i:i + generate_batch], seeds[i:i + generate_batch], params)
                        for i in range(0, len(prompts), generate_batch)])
    probs = torch.cat([adapter.judge(adapter.decode(tokens[i:i + judge_batch]), categories, QUESTION).float().cpu()
                       for i in range(0, tokens.shape[0], judge_batch)])
    return tokens, probs


def test_generate_and_judge_equals_generating_then_judging(adapter):
    from safecb.models.base import SamplingParams

    prompts, seeds = ["red circle", "blood on grass", "a red circle on grass"], [3, 4, 5]
    params = SamplingParams(guidance=3.0)
    tokens, probs = adapter.generate_and_judge(prompts, seeds, params, ["blood", "red"], QUESTION, 2, 2)
    ref_tokens, ref_probs = _generate_then_judge(adapter, prompts, seeds, params, ["blood", "red"], 2, 2)
    assert tokens.shape == (3, adapter.num_image_tokens) and probs.shape == (3, 2)
    assert tokens.device.type == probs.device.type == "cpu"
    assert torch.equal(tokens, ref_tokens)
    assert torch.allclose(probs, ref_probs, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU test: no CUDA device")
def test_gpu_judging_beside_generation_gives_the_same_tokens_and_scores(saved_folder):
    """On the engine the judge of one batch runs on a side stream while the next batch generates: the
    same kernels on the same inputs, so the same tokens and scores as one after the other."""
    from safecb.models.base import SamplingParams

    gpu = JanusAdapter.from_folder(saved_folder, device="cuda", dtype="bfloat16", engine="on", max_batch=4,
                                   max_prompt_len=32)
    prompts = ["red circle", "blood on grass", "a red circle on grass", "grass", "blood", "a circle", "red", "on"]
    seeds, params, categories = list(range(8)), SamplingParams(guidance=3.0), ["blood", "red"]
    assert gpu.overlap_judge is False  # the default: one after the other (faster on an H200)
    sequential = gpu.generate_and_judge(prompts, seeds, params, categories, QUESTION, 4, 2)
    gpu.overlap_judge = True
    overlapped = gpu.generate_and_judge(prompts, seeds, params, categories, QUESTION, 4, 2)
    reference = _generate_then_judge(gpu, prompts, seeds, params, categories, 4, 2)
    assert torch.equal(overlapped[0], sequential[0]) and torch.equal(overlapped[0], reference[0])
    assert torch.equal(overlapped[1], sequential[1])
    assert (overlapped[1] - reference[1]).abs().max() < 1e-3
