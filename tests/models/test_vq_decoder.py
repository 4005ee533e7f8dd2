"""The fused GroupNorm + SiLU VQ decoder against PyTorch's ops and Hugging Face's forward.

The Triton kernels run in Triton's interpreter on the CPU (one subprocess, TRITON_INTERPRET=1 is read
when the kernels are defined); on a GPU (`-m gpu`) in bf16, in both memory layouts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

INTERPRETED = textwrap.dedent("""
    import json, torch
    import torch.nn.functional as F
    from transformers import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAEDecoder
    from safecb.models.vq_decoder import add_bias, decode_latents, group_norm_silu, subpixel_upsample

    out = {}
    torch.manual_seed(0)
    # Channels per group 3 (not a power of two), 35 pixels (not a multiple of a tile), a large offset
    # (the centred sums must not cancel), both layouts, with and without SiLU.
    for name, shape, offset in (("odd", (2, 96, 5, 7), 0.0), ("offset", (2, 64, 9, 9), 50.0)):
        norm = torch.nn.GroupNorm(32, shape[1], eps=1e-6)
        torch.nn.init.normal_(norm.weight); torch.nn.init.normal_(norm.bias)
        x = torch.randn(shape) * 3 + offset
        for layout in (torch.contiguous_format, torch.channels_last):
            xl = x.contiguous(memory_format=layout)
            for silu in (True, False):
                ref = F.group_norm(x, 32, norm.weight, norm.bias, norm.eps)
                ref = ref * torch.sigmoid(ref) if silu else ref
                got = group_norm_silu(xl, norm, silu)
                key = f"{name}/{'nhwc' if layout is torch.channels_last else 'nchw'}/{'silu' if silu else 'plain'}"
                out[key] = {"err": (got - ref).abs().max().item(),
                            "layout_kept": got.is_contiguous(memory_format=layout),
                            "alone_equals_batched": torch.equal(group_norm_silu(xl[:1], norm, silu), got[:1])}
    # A convolution's bias folded into the GroupNorm's passes, and into the residual add.
    x, shift, residual = torch.randn(2, 64, 6, 5), torch.randn(64), torch.randn(2, 64, 6, 5)
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl, rl = x.contiguous(memory_format=layout), residual.contiguous(memory_format=layout)
        ref = F.group_norm(x + shift.view(1, -1, 1, 1), 32, norm.weight, norm.bias, norm.eps)
        name = 'nhwc' if layout is torch.channels_last else 'nchw'
        out[f"shifted/{name}"] = {"err": (group_norm_silu(xl, norm, True, shift) - ref * torch.sigmoid(ref)).abs().max().item(),
                                  "layout_kept": True, "alone_equals_batched": True}
        biased = add_bias(xl, shift)
        out[f"bias/{name}"] = {"err": (biased - (x + shift.view(1, -1, 1, 1))).abs().max().item(),
                               "layout_kept": biased.is_contiguous(memory_format=layout), "alone_equals_batched": True}
        out[f"bias+residual/{name}"] = {"err": (add_bias(xl, shift, rl) - (residual + x + shift.view(1, -1, 1, 1))).abs().max().item(),
                                        "layout_kept": True, "alone_equals_batched": True}
    # Nearest x2 + 3x3 convolution as a 2x2 convolution over the input and a pass that places the phases:
    # channels not a power of two, a non-square input, both layouts.
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, 3, 5)
    with torch.no_grad():
        ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        for layout in (torch.contiguous_format, torch.channels_last):
            got = subpixel_upsample(conv, x.contiguous(memory_format=layout))
            out[f"upsample/{'nhwc' if layout is torch.channels_last else 'nchw'}"] = {
                "err": (got - ref).abs().max().item(), "layout_kept": got.is_contiguous(memory_format=layout)}
    config = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, base_channels=32, latent_channels=32,
                              channel_multiplier=[1, 2], num_res_blocks=1, num_patches=4)
    decoder = JanusVQVAEDecoder(config).eval()
    latents = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        ref = decoder(latents)
        got = decode_latents(decoder, latents)
        subpixel = decode_latents(decoder, latents, subpixel=True)
    out["decoder"] = {"err": (got - ref).abs().max().item(), "scale": ref.abs().max().item(),
                      "subpixel_err": (subpixel - ref).abs().max().item(), "shape": list(got.shape) == list(ref.shape)}
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "RESULT" in run.stdout, run.stderr[-3000:]
    return json.loads(run.stdout.split("RESULT", 1)[1])


@needs_triton
def test_fused_group_norm_silu_in_interpreter_follows_pytorch(interpreted):
    cases = {k: v for k, v in interpreted.items() if k != "decoder" and not k.startswith("upsample/")}
    assert len(cases) == 8 + 6
    for key, case in cases.items():
        assert case["err"] < 1e-4, (key, case)
        assert case["layout_kept"], key
        assert case["alone_equals_batched"], key  # an image's statistics never depend on its batch


@needs_triton
def test_subpixel_upsample_in_interpreter_is_upsample_then_convolution(interpreted):
    """The phase-placing kernel: channels not a power of two, a non-square input, both layouts."""
    cases = {k: v for k, v in interpreted.items() if k.startswith("upsample/")}
    assert sorted(cases) == ["upsample/nchw", "upsample/nhwc"]
    for key, case in cases.items():
        assert case["err"] < 1e-5, (key, case)
        assert case["layout_kept"], key


@needs_triton
def test_fused_decoder_in_interpreter_follows_hugging_faces_forward(interpreted):
    case = interpreted["decoder"]
    assert case["shape"]
    assert case["err"] < 1e-4 * max(1.0, case["scale"]), case
    assert case["subpixel_err"] < 1e-4 * max(1.0, case["scale"]), case  # with the upsampling as 2x2 kernels


def test_subpixel_upsample_on_the_cpu_is_upsample_then_convolution():
    """The phase algebra alone (PyTorch's ops, float64): 2x2 kernels over the input equal nearest x2 then
    the 3x3 kernel, borders included."""
    import torch.nn.functional as F

    from safecb.models.vq_decoder import subpixel_upsample, subpixel_weight

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        ref = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        assert torch.allclose(subpixel_upsample(conv, x), ref, atol=1e-6)  # the weights pass through fp32
    assert subpixel_weight(conv.weight).shape == (16, 3, 2, 2)


def test_group_norm_silu_on_the_cpu_is_pytorchs():
    from safecb.models.vq_decoder import group_norm_silu

    norm = torch.nn.GroupNorm(4, 8)
    x = torch.randn(2, 8, 3, 3)
    ref = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    assert torch.equal(group_norm_silu(x, norm), ref * torch.sigmoid(ref))


def test_a_decoder_whose_convolutions_have_no_bias_decodes_as_hugging_faces():
    """Janus's convolutions all carry a bias; a kin model's made with bias=False has none to fold."""
    from transformers import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAEDecoder

    from safecb.models.vq_decoder import decode_latents

    torch.manual_seed(0)
    config = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, base_channels=32, latent_channels=32,
                              channel_multiplier=[1, 2], num_res_blocks=1, num_patches=4)
    decoder = JanusVQVAEDecoder(config).eval()
    for module in decoder.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.bias = None
    latents = torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        assert torch.allclose(decode_latents(decoder, latents), decoder(latents), atol=1e-5)
        assert torch.allclose(decode_latents(decoder, latents, subpixel=True), decoder(latents), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fused_decoder_on_the_gpu_is_as_close_to_fp32_as_hugging_faces_bf16_forward():
    """Janus-Pro's decoder shapes in bf16, both layouts: no farther from the fp32 decode than Hugging Face's
    own bf16 forward (the two round differently, so each is compared to fp32, not to the other)."""
    import copy

    from transformers import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAEDecoder

    from safecb.models.vq_decoder import decode_latents

    torch.manual_seed(0)
    config = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, base_channels=128, latent_channels=256,
                              channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2, num_patches=24)
    exact_decoder = JanusVQVAEDecoder(config).cuda().eval()
    decoder = copy.deepcopy(exact_decoder).to(torch.bfloat16)
    latents = torch.randn(3, 256, 24, 24, device="cuda")
    with torch.no_grad():
        exact = exact_decoder(latents)
        plain = decoder(latents.bfloat16()).float()
        fused = decode_latents(decoder, latents.bfloat16()).float()
        decoder.to(memory_format=torch.channels_last)
        nhwc = decode_latents(decoder, latents.bfloat16().contiguous(memory_format=torch.channels_last))
        subpixel = decode_latents(decoder, latents.bfloat16().contiguous(memory_format=torch.channels_last), True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert subpixel.is_contiguous(memory_format=torch.channels_last)
    bf16_error = (plain - exact).abs().mean()
    for got in (fused, nhwc.float(), subpixel.float()):
        assert (got - exact).abs().mean() < 1.5 * bf16_error, ((got - exact).abs().mean(), bf16_error)
