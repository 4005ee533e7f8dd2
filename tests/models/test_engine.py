"""The fast engine yields the tokens of the plain loop and of HF `generate`.

CPU tests run the engine's torch backend (the same engine, no Triton, no graph) on a tiny random Janus.
GPU tests (marked `gpu`) run the Triton kernels and the CUDA graph; they skip with a reason off CUDA.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from safecb.models.base import SamplingParams
from safecb.models.engine import FALLBACK_ATTN_CONFIG, JanusEngine, engine_available, quantize_fp8
from safecb.models.generation import generate_image_tokens
from safecb.models.tiny import build_tiny_janus

WORDS = ["a", "red", "blue", "cat", "dog", "big", "small", "house"]
GREEDY = SamplingParams(guidance=3.0, temperature=0.0)
SAMPLE = SamplingParams(guidance=2.0, temperature=1.0, top_k=50)
TEXTS = ["a red cat", "a big blue dog dog house", "cat", "small house", "a dog"]


def _cuda_ok() -> tuple[bool, str]:
    return engine_available("cuda")


gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not _cuda_ok()[0], reason=f"GPU test: {_cuda_ok()[1]}")


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_janus(WORDS, seed=0, image_size=16, hidden=64, layers=2)  # 16 image tokens
    tok = processor.tokenizer
    ids = dict(bos=tok.bos_token_id, boi=tok.convert_tokens_to_ids("<begin_of_image>"), pad=tok.pad_token_id)
    model.model.vision_model.config.num_image_tokens = 16
    return model, tok, ids


def _encode(tok, texts, device="cpu"):
    enc = tok([t + " <begin_of_image>" for t in texts], padding=True, return_tensors="pt")
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def _plain(model, ids, mask, seeds, params, special, n=16):
    return generate_image_tokens(model, ids, mask, seeds, params, n, special["bos"], special["boi"], special["pad"])


def _engine(engine, ids, mask, seeds, params, special, **kw):
    return engine.generate(ids, mask, seeds, params, special["bos"], special["boi"], special["pad"], **kw)


# ---- CPU: the torch backend ---------------------------------------------------------------------
def test_engine_available_says_why_not_on_cpu():
    ok, reason = engine_available("cpu")
    assert not ok and "CUDA" in reason


def test_greedy_matches_plain_loop_with_left_padding(tiny):
    model, tok, special = tiny
    ids, mask = _encode(tok, TEXTS[:3])
    assert (mask == 0).any()  # the batch really is padded
    seeds = torch.tensor([1, 2, 3])
    engine = JanusEngine(model, max_batch=4, max_prompt_len=12, num_image_tokens=16)
    assert engine.backend == "torch" and not engine.use_cuda_graph
    assert torch.equal(_engine(engine, ids, mask, seeds, GREEDY, special), _plain(model, ids, mask, seeds, GREEDY,
                                                                                   special))


def test_greedy_matches_hf_generate(tiny):
    model, tok, special = tiny
    ids, mask = _encode(tok, ["a red cat", "big blue dog"])  # same length: no padding, as HF generate needs
    assert bool(mask.all())
    hf = model.generate(ids, attention_mask=mask, generation_mode="image", do_sample=False, guidance_scale=3.0)
    engine = JanusEngine(model, max_batch=2, max_prompt_len=8, num_image_tokens=16)
    assert torch.equal(_engine(engine, ids, mask, torch.tensor([5, 6]), GREEDY, special), hf)


def test_prefill_runs_each_distinct_unconditional_prompt_once(tiny):
    """More prompts than tokens: the unconditional rows (BOS, pads, BOI) differ only by their length, so the
    prefill runs B + min(B, T) rows, and the tokens stay those of the plain loop and of HF generate."""
    model, tok, special = tiny
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 4)) for i in range(12)]
    ids, mask = _encode(tok, texts)
    from safecb.models.generation import cfg_batch

    ids2, mask2 = cfg_batch(ids, mask, special["bos"], special["boi"], special["pad"])
    run, row_map = JanusEngine._distinct_uncond_rows(ids2, mask2)
    assert len(run) == 12 + min(12, ids.shape[1]) < 24
    assert torch.equal(ids2[run][row_map], ids2) and torch.equal(mask2[run][row_map], mask2)
    seeds = torch.arange(12) + 40
    engine = JanusEngine(model, max_batch=12, max_prompt_len=12, num_image_tokens=16)
    for params in (GREEDY, SAMPLE):
        assert torch.equal(_engine(engine, ids, mask, seeds, params, special),
                           _plain(model, ids, mask, seeds, params, special))
    # Each row's prompt slots equal those of the row the CUDA kernel reads them from.
    rows, length = 24, ids.shape[1]
    prompt_row = engine._prompt_row[:rows].long()
    assert int(engine._prompt_end) == length and len(set(prompt_row[12:].tolist())) < 12
    assert torch.equal(prompt_row[:12], torch.arange(12))
    for cache in (engine.k_cache, engine.v_cache):
        assert torch.equal(cache[:, prompt_row, :, :length], cache[:, :rows, :, :length])
    same, same_mask = _encode(tok, [f"{a} {b}" for a in WORDS[:3] for b in WORDS[3:6]])  # 9 of one length
    assert bool(same_mask.all())
    hf = model.generate(same, attention_mask=same_mask, generation_mode="image", do_sample=False, guidance_scale=3.0)
    assert torch.equal(_engine(engine, same, same_mask, torch.arange(9), GREEDY, special), hf)


def test_sampling_matches_plain_loop(tiny):
    model, tok, special = tiny
    ids, mask = _encode(tok, TEXTS[:3])
    seeds = torch.tensor([11, 12, 13])
    engine = JanusEngine(model, max_batch=3, max_prompt_len=12, num_image_tokens=16)
    assert torch.equal(_engine(engine, ids, mask, seeds, SAMPLE, special), _plain(model, ids, mask, seeds, SAMPLE,
                                                                                   special))


def test_seed_gives_same_tokens_whatever_the_batch(tiny):
    model, tok, special = tiny
    ids, mask = _encode(tok, TEXTS)
    seeds = torch.tensor([7, 8, 9, 10, 11])
    engine = JanusEngine(model, max_batch=5, max_prompt_len=12, num_image_tokens=16)
    full = _engine(engine, ids, mask, seeds, SAMPLE, special)
    for index in (0, 2, 4):  # alone: other padding, other neighbours, other batch size
        one_ids, one_mask = _encode(tok, [TEXTS[index]])
        alone = _engine(engine, one_ids, one_mask, seeds[index:index + 1], SAMPLE, special)
        assert torch.equal(alone[0], full[index])
    shuffled = [3, 1, 4, 0, 2]
    s_ids, s_mask = _encode(tok, [TEXTS[i] for i in shuffled])
    assert torch.equal(_engine(engine, s_ids, s_mask, seeds[shuffled], SAMPLE, special), full[shuffled])
    assert not torch.equal(full[0], _engine(engine, ids[:1], mask[:1], torch.tensor([99]), SAMPLE, special)[0])


def test_batch_invariant_mode_pads_to_one_shape_and_keeps_the_tokens(tiny):
    """Padding every call to (max_batch, max_prompt_len) must not change a sample: same tokens as the plain
    loop, for a full batch, a short one and a single prompt."""
    model, tok, special = tiny
    ids, mask = _encode(tok, TEXTS)
    seeds = torch.tensor([7, 8, 9, 10, 11])
    engine = JanusEngine(model, max_batch=6, max_prompt_len=14, num_image_tokens=16, batch_invariant=True)
    full = _engine(engine, ids, mask, seeds, SAMPLE, special)
    assert torch.equal(full, _plain(model, ids, mask, seeds, SAMPLE, special))
    one_ids, one_mask = _encode(tok, [TEXTS[2]])
    assert torch.equal(_engine(engine, one_ids, one_mask, seeds[2:3], SAMPLE, special)[0], full[2])
    forced = _engine(engine, ids[:2], mask[:2], seeds[:2], GREEDY, special, forced_tokens=full[:2])
    assert forced.shape == (2, 16)


def test_attention_variants_are_checked(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="needs kv_dtype='fp8'"):
        JanusEngine(model, max_batch=1, max_prompt_len=4, num_image_tokens=16, attn_config=(16, 4, 1, "cuda"))
    with pytest.raises(ValueError, match="attention variant"):
        JanusEngine(model, max_batch=1, max_prompt_len=4, num_image_tokens=16, attn_config=(16, 4, 1, "dot-x"))
    # on CPU the CUDA kernel is not used: the engine says so and takes the Triton fallback's tile
    engine = JanusEngine(model, max_batch=1, max_prompt_len=4, num_image_tokens=16, kv_dtype="fp8")
    assert engine.attn_config == FALLBACK_ATTN_CONFIG
    # a CUDA tile the .cu file does not instantiate is refused before anything is compiled
    from safecb.models.engine import decode_attention

    kq, ks = quantize_fp8(torch.randn(2, 1, 8, 128))
    q = torch.randn(2, 1, 128, dtype=torch.bfloat16)
    start, slot = torch.zeros(2, dtype=torch.int32), torch.tensor(7, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\(block_n = keys per warp iteration, num_stages\) in"):
        decode_attention(q, kq, kq, ks, ks, start, slot, 0.1, block_n=8, num_stages=3, variant="cuda")


ENGINE_CHECK = textwrap.dedent("""
    import torch
    from safecb.models.base import SamplingParams
    from safecb.models.engine import JanusEngine
    from safecb.models.tiny import build_tiny_janus
    model, processor = build_tiny_janus(%r, seed=0, image_size=16, hidden=64, layers=1)
    tok = processor.tokenizer
    enc = tok([t + " <begin_of_image>" for t in %r], padding=True, return_tensors="pt")
    special = (tok.bos_token_id, tok.convert_tokens_to_ids("<begin_of_image>"), tok.pad_token_id)
    greedy = SamplingParams(guidance=3.0, temperature=0.0)
    seeds = torch.arange(2)
    make = lambda **kw: JanusEngine(model, max_batch=2, max_prompt_len=12, num_image_tokens=16,
                                    kv_dtype="fp8", **kw)
    ref = make(backend="torch").generate(enc.input_ids, enc.attention_mask, seeds, greedy, *special, num_tokens=8)
    got = make(backend="triton", attn_config=(16, 1, 1, "sum2p")).generate(
        enc.input_ids, enc.attention_mask, seeds, greedy, *special, num_tokens=8, forced_tokens=ref)
    print("agreement", (got == ref).float().mean().item())
""" % (WORDS, TEXTS[:2]))

# Runs each named check in one process with the Triton interpreter on; prints {name: [ok, output]} as JSON.
INTERPRETER_RUNNER = textwrap.dedent("""
    import contextlib, io, json, sys, traceback
    results = {}
    for name, code in json.loads(sys.stdin.read()).items():
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, name, "exec"), {"__name__": name})
            results[name] = [True, out.getvalue()]
        except BaseException:
            results[name] = [False, out.getvalue() + traceback.format_exc()[-2000:]]
    print("RESULTS" + json.dumps(results))
""")


@pytest.fixture(scope="module")
def interpreted() -> dict[str, tuple[bool, str]]:
    """The Triton checks below, each on its own, in ONE process with TRITON_INTERPRET=1 (it is read when
    the kernels are defined, so not in this one): that process's start and imports (~6 s of CPU) are
    paid once instead of once a check. {name: (ran without an exception, what it printed)}."""
    checks = {"engine": ENGINE_CHECK, "kernels": KERNELS_CHECK, "cfg_sample": CFG_SAMPLE_CHECK % "cpu"}
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", INTERPRETER_RUNNER], input=json.dumps(checks), env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "RESULTS" in run.stdout, run.stderr[-2000:]
    return {name: tuple(result) for name, result in json.loads(run.stdout.split("RESULTS", 1)[1]).items()}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_engine_in_interpreter_follows_the_torch_backend(interpreted):
    """The whole Triton decode step (fused kernels, fp8 cache written by the RoPE kernel, 'sum2p'
    attention, fused CFG sampling) interpreted on CPU, teacher-forced against the torch backend's fp8 engine."""
    ok, output = interpreted["engine"]
    assert ok, output
    assert float(output.split("agreement")[1]) >= 0.9, output


def test_batches_larger_than_max_batch_are_chunked(tiny):
    model, tok, special = tiny
    ids, mask = _encode(tok, TEXTS)
    seeds = torch.arange(5)
    small = JanusEngine(model, max_batch=2, max_prompt_len=12, num_image_tokens=16)
    big = JanusEngine(model, max_batch=5, max_prompt_len=12, num_image_tokens=16)
    assert torch.equal(_engine(small, ids, mask, seeds, SAMPLE, special), _engine(big, ids, mask, seeds, SAMPLE,
                                                                                   special))


def test_num_tokens_and_forced_tokens(tiny):
    model, tok, special = tiny
    ids, mask = _encode(tok, TEXTS[:2])
    seeds = torch.tensor([1, 2])
    engine = JanusEngine(model, max_batch=2, max_prompt_len=12, num_image_tokens=16)
    full = _engine(engine, ids, mask, seeds, SAMPLE, special)
    assert torch.equal(_engine(engine, ids, mask, seeds, SAMPLE, special, num_tokens=5), full[:, :5])
    # teacher forcing with the engine's own tokens changes nothing
    assert torch.equal(_engine(engine, ids, mask, seeds, SAMPLE, special, forced_tokens=full), full)


def test_fp8_cache_stays_close_to_full_precision(tiny):
    model, tok, special = tiny
    ids, mask = _encode(tok, TEXTS)
    seeds = torch.arange(5)
    ref = JanusEngine(model, max_batch=5, max_prompt_len=12, num_image_tokens=16)
    fp8 = JanusEngine(model, max_batch=5, max_prompt_len=12, num_image_tokens=16, kv_dtype="fp8")
    assert fp8.k_cache.dtype == torch.float8_e4m3fn
    want = _engine(ref, ids, mask, seeds, GREEDY, special)
    forced = _engine(fp8, ids, mask, seeds, GREEDY, special, forced_tokens=want)
    assert (forced == want).float().mean() >= 0.9  # per-step agreement on the same history
    assert fp8.kv_bytes_per_token() < ref.kv_bytes_per_token() / 1.8


def test_quantize_fp8_roundtrip():
    x = torch.randn(3, 4, 128) * torch.logspace(-3, 2, 4)[None, :, None]
    q, scale = quantize_fp8(x)
    back = q.float() * scale[..., None]
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 4)
    assert ((back - x).norm(dim=-1) / x.norm(dim=-1)).max() < 0.05


def test_engine_follows_weight_changes(tiny):
    model, tok, special = tiny
    ids, mask = _encode(tok, TEXTS[:2])
    seeds = torch.tensor([1, 2])
    engine = JanusEngine(model, max_batch=2, max_prompt_len=12, num_image_tokens=16)
    before = _engine(engine, ids, mask, seeds, GREEDY, special)
    weight = model.model.language_model.layers[0].self_attn.q_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(3.0)
        after = _engine(engine, ids, mask, seeds, GREEDY, special)
        assert torch.equal(after, _plain(model, ids, mask, seeds, GREEDY, special))
        assert not torch.equal(after, before)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_bad_inputs_are_refused(tiny):
    model, tok, special = tiny
    engine = JanusEngine(model, max_batch=2, max_prompt_len=4, num_image_tokens=16)
    ids, mask = _encode(tok, ["a big red cat house"])
    with pytest.raises(ValueError, match="max_prompt_len"):
        _engine(engine, ids, mask, torch.tensor([1]), GREEDY, special)
    ids, mask = torch.tensor([[1, 3, 5, 0]]), torch.tensor([[1, 1, 1, 0]])  # right padding
    with pytest.raises(ValueError, match="left padding"):
        _engine(engine, ids, mask, torch.tensor([1]), GREEDY, special)
    with pytest.raises(ValueError, match="kv_dtype"):
        JanusEngine(model, max_batch=1, max_prompt_len=4, num_image_tokens=16, kv_dtype="int4")


KERNELS_CHECK = textwrap.dedent("""
    import torch
    from safecb.models.engine import decode_attention, quantize_fp8
    torch.manual_seed(0)
    R, H, KVH, L, D = 3, 4, 2, 40, 16
    cases = [(v, f, s) for v in ("dot", "sum", "sum2p") for f in (False, True) for s in (1, 4)]
    for variant, fp8, splits in cases:
        q = torch.randn(R, H, D); k = torch.randn(R, KVH, L, D); v = torch.randn(R, KVH, L, D)
        start = torch.tensor([0, 5, 17], dtype=torch.int32); slot = torch.tensor(30, dtype=torch.int32)
        if fp8:
            kq, ks = quantize_fp8(k); vq, vs = quantize_fp8(v)
            kd, vd = kq.float() * ks[..., None], vq.float() * vs[..., None]
        else:
            kq, vq, ks, vs, kd, vd = k, v, None, None, k, v
        out = decode_attention(q, kq, vq, ks, vs, start, slot, D ** -0.5, splits=splits, block_n=16,
                               variant=variant)
        ref = []
        for r in range(R):
            kk = kd[r, :, start[r]:31].repeat_interleave(H // KVH, 0)
            vv = vd[r, :, start[r]:31].repeat_interleave(H // KVH, 0)
            ref.append((torch.softmax(q[r][:, None] @ kk.transpose(1, 2) * D ** -0.5, -1) @ vv)[:, 0].reshape(-1))
        ref = torch.stack(ref)
        err = ((out - ref).norm() / ref.norm()).item()
        tol = 5e-3 if fp8 and variant == "dot" else 1e-5  # fp16 tiles
        assert err < tol, (variant, fp8, splits, err)
        # Rows 2 and 3 read their prompt slots [0, 12) from rows 0 and 1 (12: a tile straddles the end):
        # with the true copies in rows 0 and 1 and garbage in their own, the result is the same, bit for bit.
        prompt_row = torch.tensor([0, 1, 0, 1], dtype=torch.int32); prompt_end = torch.tensor(12, dtype=torch.int32)
        start4 = torch.tensor([0, 5, 0, 5], dtype=torch.int32)
        q4 = torch.randn(4, H, D)
        copies = [x[torch.tensor([0, 1, 2, 0])] for x in (kq, vq) + ((ks, vs) if fp8 else ())]
        for x in copies:
            x[2:, :, :12] = x[:2, :, :12]
        garbage = [x.clone() for x in copies]
        for x in garbage:
            x[2:, :, :12].fill_(3.0)
        own = decode_attention(q4, *copies[:2], *(copies[2:] or (None, None)), start4, slot, D ** -0.5,
                               splits=splits, block_n=16, variant=variant)
        shared = decode_attention(q4, *garbage[:2], *(garbage[2:] or (None, None)), start4, slot, D ** -0.5,
                                  splits=splits, block_n=16, variant=variant, prompt_row=prompt_row,
                                  prompt_end=prompt_end)
        assert torch.equal(own, shared), (variant, fp8, splits, (own - shared).abs().max().item())
        unshared = decode_attention(q4, *garbage[:2], *(garbage[2:] or (None, None)), start4, slot, D ** -0.5,
                                    splits=splits, block_n=16, variant=variant)
        assert not torch.equal(own, unshared)  # the garbage is read when nothing says the prompt is shared
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_in_interpreter(interpreted):
    """The Triton decode-attention kernel (splits, fp8, GQA, prompt slots read from a shared row) against a
    float reference, interpreted on CPU."""
    ok, output = interpreted["kernels"]
    assert ok and "ok" in output, output


CFG_SAMPLE_CHECK = textwrap.dedent("""
    import torch
    from safecb.models.engine import cfg_sample
    from safecb.models.sampling import cfg_logits, sample_tokens
    torch.manual_seed(0)
    device = "%s"
    for vocab, temperature in [(v, t) for v in (300, 5000) for t in (0.0, 1.0, 0.7)]:
        logits = (torch.randn(12, vocab, device=device) * 3).to(torch.bfloat16)
        seeds = torch.tensor([0, 1, 2 ** 40 + 5, 77, 123456789012, 3], device=device)
        step = torch.tensor(17, device=device)
        got = cfg_sample(logits, seeds, step, 3.7, temperature)
        want = sample_tokens(cfg_logits(logits.float()[:6], logits.float()[6:], 3.7), seeds, step, temperature)
        assert torch.equal(got, want), (vocab, temperature, got.tolist(), want.tolist())
    print("ok")
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_fused_cfg_sampling_kernel_in_interpreter_gives_the_same_tokens(interpreted):
    ok, output = interpreted["cfg_sample"]
    assert ok and "ok" in output, output


# ---- GPU: Triton kernels + CUDA graph -----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cuda(tiny):
    ok, reason = _cuda_ok()
    if not ok:
        pytest.skip(f"GPU test: {reason}")
    model, tok, special = tiny
    return copy.deepcopy(model).to("cuda"), tok, special


@pytest.fixture(scope="module")
def tiny_cuda_bf16(tiny_cuda):
    model, tok, special = tiny_cuda
    return copy.deepcopy(model).to(torch.bfloat16), tok, special


@gpu
@needs_cuda
def test_gpu_fp32_engine_matches_hf_and_plain_loop(tiny_cuda):
    model, tok, special = tiny_cuda
    engine = JanusEngine(model, max_batch=4, max_prompt_len=12, num_image_tokens=16, dtype=torch.float32)
    assert engine.backend == "triton" and engine.use_cuda_graph
    ids, mask = _encode(tok, ["a red cat", "big blue dog"], "cuda")
    hf = model.generate(ids, attention_mask=mask, generation_mode="image", do_sample=False, guidance_scale=3.0)
    assert torch.equal(_engine(engine, ids, mask, torch.tensor([1, 2]), GREEDY, special), hf)
    ids, mask = _encode(tok, TEXTS[:4], "cuda")
    seeds = torch.tensor([3, 4, 5, 6], device="cuda")
    for params in (GREEDY, SAMPLE):
        got = _engine(engine, ids, mask, seeds, params, special)
        assert torch.equal(got, _plain(model, ids, mask, seeds, params, special)), params


@gpu
@needs_cuda
def test_gpu_graph_replay_equals_eager(tiny_cuda):
    model, tok, special = tiny_cuda
    ids, mask = _encode(tok, TEXTS, "cuda")
    seeds = torch.arange(5, device="cuda")
    for kv in ("bf16", "fp8"):
        graphed = JanusEngine(model, max_batch=5, max_prompt_len=12, num_image_tokens=16, kv_dtype=kv)
        eager = JanusEngine(model, max_batch=5, max_prompt_len=12, num_image_tokens=16, kv_dtype=kv,
                            use_cuda_graph=False)
        a = _engine(graphed, ids, mask, seeds, SAMPLE, special)
        b = _engine(graphed, ids, mask, seeds, SAMPLE, special)  # second call replays the captured graph
        c = _engine(eager, ids, mask, seeds, SAMPLE, special)
        assert torch.equal(a, b) and torch.equal(a, c), kv


@gpu
@needs_cuda
def test_gpu_bf16_engine_close_to_plain_loop(tiny_cuda_bf16):
    model16, tok, special = tiny_cuda_bf16
    ids, mask = _encode(tok, TEXTS, "cuda")
    seeds = torch.arange(5, device="cuda")
    engine = JanusEngine(model16, max_batch=5, max_prompt_len=12, num_image_tokens=16)
    ref = _plain(model16, ids, mask, seeds, GREEDY, special)
    forced = _engine(engine, ids, mask, seeds, GREEDY, special, forced_tokens=ref)
    agree = (forced == ref).float().mean().item()
    print(f"bf16 engine vs bf16 plain loop, teacher-forced greedy agreement {agree:.3f}")
    assert agree >= 0.9


@gpu
@needs_cuda
def test_gpu_seed_reproducible_across_batches_and_splits(tiny_cuda):
    model, tok, special = tiny_cuda
    ids, mask = _encode(tok, TEXTS, "cuda")
    seeds = torch.arange(5, device="cuda") + 40
    engine = JanusEngine(model, max_batch=5, max_prompt_len=12, num_image_tokens=16, dtype=torch.float32)
    full = _engine(engine, ids, mask, seeds, SAMPLE, special)
    one_ids, one_mask = _encode(tok, [TEXTS[3]], "cuda")
    assert torch.equal(_engine(engine, one_ids, one_mask, seeds[3:4], SAMPLE, special)[0], full[3])
    engine.num_sms = 10_000  # forces 16 sequence splits in the attention (flash-decoding path)
    assert engine._splits(10) == 16
    split = _engine(engine, ids, mask, seeds, SAMPLE, special)
    assert (split == full).float().mean() >= 0.95


@gpu
@needs_cuda
def test_gpu_batch_invariant_engine_gives_a_seed_the_same_tokens_in_any_batch(tiny_cuda_bf16):
    model16, tok, special = tiny_cuda_bf16
    ids, mask = _encode(tok, TEXTS, "cuda")
    seeds = torch.arange(5, device="cuda") + 40
    for kv in ("bf16", "fp8"):
        engine = JanusEngine(model16, max_batch=5, max_prompt_len=12, num_image_tokens=16, kv_dtype=kv,
                             batch_invariant=True)
        full = _engine(engine, ids, mask, seeds, SAMPLE, special)
        order = [4, 2, 0, 3, 1]
        assert torch.equal(_engine(engine, ids[order], mask[order], seeds[order], SAMPLE, special), full[order]), kv
        for index in range(5):
            one_ids, one_mask = _encode(tok, [TEXTS[index]], "cuda")
            alone = _engine(engine, one_ids, one_mask, seeds[index:index + 1], SAMPLE, special)
            assert torch.equal(alone[0], full[index]), (kv, index)


@gpu
@needs_cuda
def test_gpu_fused_cfg_sampling_kernel_gives_the_same_tokens():
    run = subprocess.run([sys.executable, "-c", CFG_SAMPLE_CHECK % "cuda"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr[-2000:]


@gpu
@needs_cuda
def test_gpu_cuda_fp8_attention_kernel_matches_a_float_reference():
    """The CUDA C++ fp8 kernel (built on first use) over random caches, one and four sequence splits."""
    from safecb.models.cuda_kernels import CUDA_TILES, load_error
    from safecb.models.engine import decode_attention

    reason = load_error()
    if reason:
        pytest.skip(f"GPU test: {reason}")
    torch.manual_seed(0)
    rows, heads, length, dim = 6, 4, 300, 128
    q = torch.randn(rows, heads, dim, device="cuda", dtype=torch.bfloat16)
    kq, ks = quantize_fp8(torch.randn(rows, heads, length, dim, device="cuda"))
    vq, vs = quantize_fp8(torch.randn(rows, heads, length, dim, device="cuda"))
    start = torch.tensor([0, 3, 17, 40, 100, 250], device="cuda", dtype=torch.int32)
    slot = torch.tensor(270, device="cuda", dtype=torch.int32)
    kd, vd = kq.float() * ks[..., None], vq.float() * vs[..., None]
    ref = torch.stack([(torch.softmax(q[r].float()[:, None] @ kd[r, :, start[r]:271].transpose(1, 2) * dim ** -0.5, -1)
                        @ vd[r, :, start[r]:271])[:, 0].reshape(-1) for r in range(rows)])
    # Rows 2 and 3 read their first 60 slots from rows 0 and 1 (same start: the prefill's shared prompts);
    # give them the others' values there in the reference, and garbage in their own slots.
    prompt_row = torch.tensor([0, 1, 0, 1, 4, 5], device="cuda", dtype=torch.int32)
    prompt_end = torch.tensor(60, device="cuda", dtype=torch.int32)
    shared_start = start.clone()
    shared_start[2:4] = start[:2]
    kd2, vd2 = kd.clone(), vd.clone()
    kd2[2:4, :, :60], vd2[2:4, :, :60] = kd[:2, :, :60], vd[:2, :, :60]
    ref_shared = torch.stack([(torch.softmax(q[r].float()[:, None] @ kd2[r, :, shared_start[r]:271].transpose(1, 2)
                                             * dim ** -0.5, -1) @ vd2[r, :, shared_start[r]:271])[:, 0].reshape(-1)
                              for r in range(rows)])
    # Every instantiated (keys, stages) tile; 5 warps a block leaves a partly empty last block.
    for keys, stages in CUDA_TILES:
        for splits, warps in ((1, 4), (4, 5)):
            out = decode_attention(q, kq, vq, ks, vs, start, slot, dim ** -0.5, splits=splits, block_n=keys,
                                   num_warps=warps, num_stages=stages, variant="cuda").float()
            err = ((out - ref).norm() / ref.norm()).item()
            assert err < 5e-3, (keys, stages, splits, warps, err)
            out = decode_attention(q, kq, vq, ks, vs, shared_start, slot, dim ** -0.5, splits=splits, block_n=keys,
                                   num_warps=warps, num_stages=stages, variant="cuda", prompt_row=prompt_row,
                                   prompt_end=prompt_end).float()
            err = ((out - ref_shared).norm() / ref_shared.norm()).item()
            assert err < 5e-3, ("shared prompt", keys, stages, splits, warps, err)


@gpu
@needs_cuda
def test_gpu_triton_attention_reads_shared_prompt_slots_with_the_same_result():
    """The Triton kernels compiled (not interpreted) with prompt slots read from a shared row: bf16 on the
    engine's default tile and fp8 on the fallback's, one and four splits, bit for bit the result of every
    row reading its own copy; garbage in the copies shows the shared row is what is read."""
    from safecb.models.engine import DEFAULT_ATTN_CONFIG, decode_attention

    torch.manual_seed(0)
    rows, heads, length, dim, end = 6, 4, 300, 128, 60
    q = torch.randn(rows, heads, dim, device="cuda", dtype=torch.bfloat16)
    start = torch.tensor([0, 3, 0, 3, 100, 250], device="cuda", dtype=torch.int32)
    slot = torch.tensor(270, device="cuda", dtype=torch.int32)
    prompt_row = torch.tensor([0, 1, 0, 1, 4, 5], device="cuda", dtype=torch.int32)
    prompt_end = torch.tensor(end, device="cuda", dtype=torch.int32)
    k, v = torch.randn(2, rows, heads, length, dim, device="cuda")
    for kv, config in (("bf16", DEFAULT_ATTN_CONFIG["bf16"]), ("fp8", FALLBACK_ATTN_CONFIG)):
        caches = [k.bfloat16(), v.bfloat16()] if kv == "bf16" else [*quantize_fp8(k), *quantize_fp8(v)]
        caches = [caches[i] for i in (0, 2, 1, 3)] if kv == "fp8" else caches + [None, None]  # K, V, K scale, V scale
        for x in caches[:2 if kv == "bf16" else 4]:
            x[2:4, :, :end] = x[:2, :, :end]
        garbage = [x if x is None else x.clone() for x in caches]
        for x in garbage[:2 if kv == "bf16" else 4]:
            x[2:4, :, :end].fill_(3.0)
        block_n, warps, stages, variant = config
        for splits in (1, 4):
            kw = dict(splits=splits, block_n=block_n, num_warps=warps, num_stages=stages, variant=variant)
            own = decode_attention(q, *caches, start, slot, dim ** -0.5, **kw)
            shared = decode_attention(q, *garbage, start, slot, dim ** -0.5, prompt_row=prompt_row,
                                      prompt_end=prompt_end, **kw)
            assert torch.equal(own, shared), (kv, splits, (own.float() - shared.float()).abs().max().item())
            assert not torch.equal(own, decode_attention(q, *garbage, start, slot, dim ** -0.5, **kw))
