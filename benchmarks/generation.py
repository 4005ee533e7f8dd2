"""Janus image generation on one GPU: HF `generate` against `safecb.models.engine.JanusEngine`, side by side.

One run measures, on the same device:
  * the two ceilings: device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate;
  * the engine's decode-attention kernel alone on the Janus-Pro-1B shape (bandwidth, chosen tile);
  * images/s of HF `generate` and of the engine (bf16 and fp8 KV cache) at several batch sizes, with peak
    GPU memory, KV-cache bytes read per image and the fraction of the bandwidth ceiling / of the floor;
  * Janus-Pro-7B shapes with the engine;
  * VQ decode, the judge forward (vision encoder + LM over image + question), and
    generate + decode + judge together per image;
  * token agreement: engine vs HF (greedy, same inputs) and fp8 vs bf16 cache (free-running and
    teacher-forced, i.e. the same token history fed to both so that one flip does not cascade).

Weights are random with the real shapes (throughput does not depend on the values).
    python benchmarks/generation.py                 # GPU, writes benchmarks/results/generation-h200.json
    python benchmarks/generation.py --tiny          # CPU smoke run at a toy size (seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safecb.models.base import SamplingParams  # noqa: E402
from safecb.models.engine import (  # noqa: E402
    DEFAULT_ATTN_CONFIG,
    JanusEngine,
    decode_attention,
    engine_available,
    quantize_fp8,
)

BOS, PAD, EOS, BOI = 1, 0, 2, 100016
PROMPT_LEN = 40
GUIDANCE = 5.0

SHAPES = {
    # Janus-Pro-1B / 7B language models; vision = SigLIP-L/16 at 384 px; VQ 16384 codes, 24x24 tokens.
    "1b": dict(hidden=2048, layers=24, heads=16, inter=5632, vocab=102400),
    "7b": dict(hidden=4096, layers=30, heads=32, inter=11008, vocab=102400),
    "tiny": dict(hidden=64, layers=2, heads=4, inter=128, vocab=256),
}


def janus_config(kind: str):
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    s = SHAPES[kind]
    h = s["hidden"]
    text = LlamaConfig(vocab_size=s["vocab"], hidden_size=h, intermediate_size=s["inter"],
                       num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                       num_key_value_heads=s["heads"], max_position_embeddings=16384, rms_norm_eps=1e-6,
                       bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    if kind == "tiny":
        vision = JanusVisionConfig(hidden_size=32, mlp_ratio=2, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=32, patch_size=4, projection_dim=h, num_image_tokens=64)
        vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=128, base_channels=32, latent_channels=32,
                              channel_multiplier=[1, 1, 2], num_res_blocks=1, projection_dim=h,
                              image_token_embed_dim=h, num_patches=8)
        image_token_id = 200
    else:
        vision = JanusVisionConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=384,
                                   patch_size=16, mlp_ratio=4, projection_dim=h, num_image_tokens=576)
        vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=16384, base_channels=128, latent_channels=256,
                              channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2, projection_dim=h,
                              image_token_embed_dim=h, num_patches=24)
        image_token_id = 100581
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=image_token_id)


def build_model(kind: str, device: torch.device, dtype: torch.dtype):
    from transformers import JanusForConditionalGeneration

    config = janus_config(kind)
    torch.manual_seed(0)
    with torch.device(device):
        model = JanusForConditionalGeneration(config)
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id, gen.eos_token_id = BOS, PAD, EOS
    boi = BOI if kind != "tiny" else 3
    gen.generation_kwargs = {"boi_token_id": boi}
    return model, boi


def prompts(batch: int, vocab: int, boi: int, device, seed: int = 0, length: int = PROMPT_LEN):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, min(vocab, 100000), (batch, length), generator=g)
    ids[:, 0] = BOS
    ids[:, -1] = boi
    return ids.to(device), torch.ones_like(ids).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device):
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def log(*args):
    print(*args, flush=True)


# ---- ceilings ---------------------------------------------------------------------------------
def measure_ceilings(device) -> dict:
    if device.type != "cuda":
        return {"copy_tb_s": 0.0, "matmul_tflop_s": 0.0}
    n = 1 << 30  # 2 GiB of bf16 each way
    a = torch.randn(n, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    copy = 2 * n * 2 / sorted(times)[len(times) // 2]
    del a, b
    m = 8192
    x = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    y = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        x @ y
    times = []
    for _ in range(10):
        start.record()
        x @ y
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    flops = 2 * m ** 3 / sorted(times)[len(times) // 2]
    del x, y
    free_memory(device)
    return {"copy_tb_s": copy / 1e12, "matmul_tflop_s": flops / 1e12}


def flops_per_image(cfg, num_tokens: int) -> float:
    """Matmul FLOPs of the decode steps for one image (cond + uncond rows), attention excluded."""
    t = cfg.text_config
    h, i, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    kv = t.num_key_value_heads * (h // t.num_attention_heads)
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i
    head = h * h + h * cfg.vq_config.num_embeddings
    aligner = cfg.vq_config.embed_dim * h + h * h
    return 2.0 * 2 * (num_tokens - 1) * (layers * per_layer + head) + 2.0 * (num_tokens - 1) * aligner


# ---- attention kernel alone -------------------------------------------------------------------
def sweep_attention(device, configs: dict[str, list[tuple]], rows=512, heads=16, dim=128, prompt=PROMPT_LEN,
                    n=576) -> dict:
    """Decode attention over one layer's cache at the mean decode context, for every (block_n, warps,
    stages, variant) in configs[kv] of each cache dtype: time, cache bytes/s and error against a float
    reference. Keys of the result name the cache, the variant, the tile and the rows (= 2 x images)."""
    import triton

    max_len = prompt + n
    ctx = prompt + n // 2
    results: dict = {}
    for kv, tiles in configs.items():
        k = torch.randn(rows, heads, max_len, dim, device=device, dtype=torch.bfloat16)
        v = torch.randn(rows, heads, max_len, dim, device=device, dtype=torch.bfloat16)
        q = torch.randn(rows, heads, dim, device=device, dtype=torch.bfloat16)
        if kv == "fp8":
            kc, ks = quantize_fp8(k)
            vc, vs = quantize_fp8(v)
            kd, vd = kc[:8, :, :ctx].float() * ks[:8, :, :ctx, None], vc[:8, :, :ctx].float() * vs[:8, :, :ctx, None]
        else:
            kc, vc, ks, vs = k, v, None, None
            kd, vd = k[:8, :, :ctx].float(), v[:8, :, :ctx].float()
        del k, v
        ref = (torch.softmax((q[:8, :, None].float() @ kd.transpose(-1, -2)) * dim ** -0.5, -1) @ vd).reshape(8, -1)
        start = torch.zeros(rows, device=device, dtype=torch.int32)
        slot = torch.tensor(ctx - 1, device=device, dtype=torch.int32)
        nbytes = rows * heads * ctx * dim * kc.element_size() * 2 + (rows * heads * ctx * 8 if kv == "fp8" else 0)
        for config in tiles:
            block_n, warps, stages, variant = config
            call = lambda: decode_attention(q, kc, vc, ks, vs, start, slot, dim ** -0.5, 1, block_n, warps,  # noqa: E731
                                            stages, variant)
            name = f"{kv} {variant} {block_n}x{warps}x{stages} rows {rows}"
            try:
                out = call().float()
                err = ((out[:8] - ref).norm() / ref.norm()).item()
                ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
            except Exception as e:  # noqa: BLE001 - a tile that does not compile is a result, not a stop
                log(f"  {name:38s} failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
                continue
            tbs = nbytes / (ms / 1e3) / 1e12
            results[name] = {"kv": kv, "config": list(config), "rows": rows, "us_per_layer": ms * 1e3, "tb_s": tbs,
                             "step_ms_24_layers": 24 * ms, "rel_err": err, "finite": bool(out.isfinite().all())}
            log(f"  {name:38s} {ms * 1e3:7.1f} us/layer {tbs:5.2f} TB/s  err {err:.1e}")
        del kc, vc, ks, vs
        free_memory(device)
    return results


def bench_attention(device, rows=512, layers=24) -> dict:
    """A few tiles per cache dtype (`sweep_attention`) and the engine's default tile, which the engines
    run: `benchmarks/decode_step.py` chose it at 512 and 1280 rows, and the fastest here at 512 rows is
    not always the fastest where the engine runs (1000+ rows)."""
    configs = {"bf16": [(64, 4, 3, "dot"), (64, 4, 4, "dot"), (128, 8, 3, "dot"), (32, 4, 4, "dot")],
               "fp8": [(128, 4, 1, "sum"), (16, 1, 1, "sum2p"), (32, 4, 1, "cuda"), (16, 2, 3, "cuda"),
                       (32, 2, 3, "cuda"), (32, 2, 4, "cuda")]}
    for kv, tiles in configs.items():
        if DEFAULT_ATTN_CONFIG[kv] not in tiles:
            tiles.append(DEFAULT_ATTN_CONFIG[kv])
    sweep = sweep_attention(device, configs, rows=rows)
    result = {}
    for kv in configs:
        timed = {tuple(r["config"]): r for r in sweep.values() if r["kv"] == kv}
        if not timed:
            continue
        fastest = min(timed.values(), key=lambda r: r["us_per_layer"])
        chosen = timed.get(DEFAULT_ATTN_CONFIG[kv], fastest)
        result[kv] = {"config": chosen["config"], "us_per_layer": chosen["us_per_layer"], "tb_s": chosen["tb_s"],
                      "step_ms_all_layers": chosen["us_per_layer"] / 1e3 * layers, "rel_err": chosen["rel_err"],
                      "fastest_here": fastest["config"], "fastest_here_tb_s": fastest["tb_s"]}
    return result


# ---- HF generate ------------------------------------------------------------------------------
def hf_generate(model, ids, mask, num_tokens: int | None, greedy: bool = True):
    vision_cfg = model.model.vision_model.config
    saved = vision_cfg.num_image_tokens
    if num_tokens is not None:
        vision_cfg.num_image_tokens = num_tokens
    try:
        return model.generate(inputs=ids, attention_mask=mask, generation_mode="image", do_sample=not greedy,
                              guidance_scale=GUIDANCE)
    finally:
        vision_cfg.num_image_tokens = saved


def bench_hf(model, boi, device, sizes, n_tokens, short_steps) -> dict:
    vocab = model.config.text_config.vocab_size
    out = {}
    for b in sizes:
        ids, mask = prompts(b, vocab, boi, device, seed=b)
        hf_generate(model, ids, mask, 2)  # warm-up
        peak_reset(device)
        steps = short_steps if b == 1 else None
        tokens, secs = timed(lambda: hf_generate(model, ids, mask, steps), device)
        extrapolated = steps is not None
        if extrapolated:
            secs = secs * n_tokens / steps
        out[b] = {"img_per_s": b / secs, "s_per_batch": secs, "peak_gb": peak_gb(device),
                  "extrapolated_from_steps": steps if extrapolated else None}
        if not extrapolated:
            out[b]["tokens"] = tokens.cpu()
        log(f"  HF b={b:4d}: {b / secs:7.2f} img/s  {secs:7.2f} s/batch  peak {peak_gb(device):6.1f} GB"
            + (f"  (timed {steps} steps, extrapolated to {n_tokens})" if extrapolated else ""))
        del tokens
        free_memory(device)
    return out


# ---- engine -----------------------------------------------------------------------------------
def bench_engine(engine, boi, device, sizes, params, label, floor_img_s, bw_ceiling_img_s, copy_tb_s) -> dict:
    vocab = engine.model.config.text_config.vocab_size
    kv_per_img = engine.kv_bytes_read_per_image(PROMPT_LEN)
    out = {}
    for b in sizes:
        ids, mask = prompts(b, vocab, boi, device, seed=b)
        seeds = torch.arange(b, device=device) + 1000
        engine.generate(ids, mask, seeds, params, BOS, boi, PAD, num_tokens=4)  # warm-up + graph capture
        peak_reset(device)
        tokens, secs = timed(lambda: engine.generate(ids, mask, seeds, params, BOS, boi, PAD), device)
        rate = b / secs
        bw = kv_per_img * rate / 1e12
        out[b] = {"img_per_s": rate, "s_per_batch": secs, "s_per_img": secs / b, "peak_gb": peak_gb(device),
                  "kv_gb_read_per_img": kv_per_img / 1e9, "kv_tb_s": bw,
                  "frac_bw_ceiling": rate / bw_ceiling_img_s if bw_ceiling_img_s else None,
                  "frac_floor": rate / floor_img_s if floor_img_s else None}
        log(f"  {label} b={b:4d}: {rate:7.2f} img/s  {secs:7.3f} s/batch  peak {peak_gb(device):6.1f} GB  "
            f"KV {kv_per_img / 1e9:5.1f} GB/img -> {bw:4.2f} TB/s"
            + (f" ({bw / copy_tb_s:4.0%} of copy bw, {rate / floor_img_s:4.0%} of floor)" if copy_tb_s else ""))
        del tokens
    return out


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.cpu(), b.cpu()
    same = a == b
    first = [int((~row).nonzero()[0]) if (~row).any() else a.shape[1] for row in same]
    return {"token_agreement": same.float().mean().item(), "rows_identical": same.all(1).float().mean().item(),
            "mean_first_mismatch_step": sum(first) / len(first)}


# ---- decode & judge ---------------------------------------------------------------------------
def decode_images(model, tokens, chunk: int):
    outs = []
    for lo in range(0, tokens.shape[0], chunk):
        outs.append(model.model.vqmodel.decode(tokens[lo:lo + chunk]))  # (b, 3, H, W) in ~[-1, 1]
    return torch.cat(outs)


def judge_forward(model, pixels, chunk: int):
    """The self-judge forward: vision encoder + aligner + LM over [BOS, image tokens, question] -> last logits."""
    n_img = model.config.vision_config.num_image_tokens
    question = torch.arange(10, 26, device=pixels.device)
    outs = []
    for lo in range(0, pixels.shape[0], chunk):
        pix = pixels[lo:lo + chunk]
        b = pix.shape[0]
        ids = torch.cat([torch.full((b, 1), BOS, device=pix.device),
                         torch.full((b, n_img), model.config.image_token_id, device=pix.device),
                         question.expand(b, -1)], dim=1)
        logits = model(input_ids=ids, pixel_values=pix.to(model.dtype), logits_to_keep=1, use_cache=False).logits
        outs.append(logits[:, -1].float().softmax(-1)[:, :2])
    return torch.cat(outs)


def bench_decode_judge(model, device, sizes, n_tokens) -> dict:
    k = model.config.vq_config.num_embeddings
    out = {}
    for b in sizes:
        tokens = torch.randint(0, k, (b, n_tokens), device=device)
        decode_images(model, tokens, b)  # warm-up
        peak_reset(device)
        pixels, t_dec = timed(lambda: decode_images(model, tokens, b), device)
        judge_forward(model, pixels, b)
        _, t_judge = timed(lambda: judge_forward(model, pixels, b), device)
        out[b] = {"decode_img_per_s": b / t_dec, "judge_img_per_s": b / t_judge, "peak_gb": peak_gb(device)}
        log(f"  b={b:4d}: VQ decode {b / t_dec:7.1f} img/s   judge forward {b / t_judge:7.1f} img/s  "
            f"peak {peak_gb(device):5.1f} GB")
        del tokens, pixels
        free_memory(device)
    return out


# ---- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="toy model on CPU (or GPU): a smoke run")
    ap.add_argument("--out", default=None, help="JSON results path (default: results/generation-h200.json on GPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--hf-sizes", default="1,16,64,256")
    ap.add_argument("--sizes", default="1,16,64,256,384", help="engine batch sizes, bf16 cache, 1B")
    ap.add_argument("--fp8-sizes", default="64,256,512,640,768")
    ap.add_argument("--sizes-7b", default="1,16,64,128,160")
    ap.add_argument("--hf-short-steps", type=int, default=48, help="HF batch 1: time this many steps, extrapolate")
    args = ap.parse_args(argv)

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    tiny = args.tiny
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    hf_sizes, sizes, fp8_sizes, sizes_7b = ints(args.hf_sizes), ints(args.sizes), ints(args.fp8_sizes), \
        ints(args.sizes_7b)
    if tiny:
        hf_sizes, sizes, fp8_sizes, sizes_7b = [1, 4], [1, 4], [4], []
        args.hf_short_steps = 8
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_path = Path(args.out) if args.out else (
        Path(__file__).parent / "results" / "generation-h200.json" if (device.type == "cuda" and not tiny)
        else Path(os.environ.get("TMPDIR", "/tmp")) / "generation-tiny.json")
    import transformers

    ok, reason = engine_available(device)
    res: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "engine_available": ok, "engine_reason": reason, "prompt_len": PROMPT_LEN, "guidance": GUIDANCE,
                 "shape": "tiny" if tiny else "janus-pro", "notes": []}
    errors = []

    def section(name, fn):
        log(f"\n== {name}")
        t = time.perf_counter()
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - report and go on with the other sections
            errors.append(f"{name}: {type(err).__name__}: {err}")
            traceback.print_exc()
        log(f"   ({time.perf_counter() - t:.1f} s)")
        write(res, errors, out_path)

    ceil: dict = {}
    section("ceilings", lambda: ceil.update(measure_ceilings(device)))
    res["ceilings"] = ceil
    log(f"  copy {ceil.get('copy_tb_s', 0):.2f} TB/s (read + write), bf16 matmul {ceil.get('matmul_tflop_s', 0):.0f} "
        "TFLOP/s")

    kind = "tiny" if tiny else "1b"
    state: dict = {}

    def build_1b():
        state["model"], state["boi"] = build_model(kind, device, dtype)
        n = state["model"].config.vision_config.num_image_tokens
        state["n"] = n
        log(f"  built {kind}: {sum(p.numel() for p in state['model'].parameters()) / 1e9:.2f} B params, {n} tokens")

    section(f"build {kind}", build_1b)
    model, boi, n_tok = state["model"], state["boi"], state["n"]
    cfg = model.config
    t = cfg.text_config
    per_token_bf16 = 2 * t.num_hidden_layers * t.num_key_value_heads * (t.hidden_size // t.num_attention_heads) * 2
    per_token_fp8 = per_token_bf16 // 2 + 2 * t.num_hidden_layers * t.num_key_value_heads * 4
    contexts = sum(PROMPT_LEN + s for s in range(1, n_tok))
    kv_img_bf16, kv_img_fp8 = 2 * contexts * per_token_bf16, 2 * contexts * per_token_fp8
    flops_img = flops_per_image(cfg, n_tok)
    bw_ceiling = ceil["copy_tb_s"] * 1e12 / kv_img_bf16 if ceil.get("copy_tb_s") else 0.0
    bw_ceiling_fp8 = ceil["copy_tb_s"] * 1e12 / kv_img_fp8 if ceil.get("copy_tb_s") else 0.0
    mm = ceil.get("matmul_tflop_s", 0) * 1e12
    floor = 1 / (kv_img_bf16 / (ceil["copy_tb_s"] * 1e12) + flops_img / mm) if mm else 0.0
    floor_fp8 = 1 / (kv_img_fp8 / (ceil["copy_tb_s"] * 1e12) + flops_img / mm) if mm else 0.0
    res["accounting_1b"] = {"kv_bytes_per_token_bf16": per_token_bf16, "kv_gb_read_per_img_bf16": kv_img_bf16 / 1e9,
                            "kv_gb_read_per_img_fp8": kv_img_fp8 / 1e9, "matmul_tflop_per_img": flops_img / 1e12,
                            "bw_ceiling_img_per_s_bf16": bw_ceiling, "bw_ceiling_img_per_s_fp8": bw_ceiling_fp8,
                            "floor_img_per_s_bf16": floor, "floor_img_per_s_fp8": floor_fp8}
    log(f"  1B accounting: KV read {kv_img_bf16 / 1e9:.1f} GB/img (bf16), {kv_img_fp8 / 1e9:.1f} (fp8); "
        f"matmuls {flops_img / 1e12:.2f} TFLOP/img; bandwidth ceiling {bw_ceiling:.1f} img/s (fp8 {bw_ceiling_fp8:.1f});"
        f" floor with matmuls {floor:.1f} img/s (fp8 {floor_fp8:.1f})")

    attn_cfg: dict = {}
    if device.type == "cuda" and ok and not tiny:
        def attn():
            attn_cfg.update(bench_attention(device))
        section("decode attention kernel alone (1B shape, 512 rows, mean context)", attn)
        res["attention_kernel"] = attn_cfg

    dj: dict = {}
    section("VQ decode and judge forward", lambda: dj.update(bench_decode_judge(model, device, hf_sizes, n_tok)))
    res["decode_judge_1b"] = {str(k): v for k, v in dj.items()}

    hf: dict = {}
    if not args.skip_hf:
        section("HF generate, 1B, greedy, CFG", lambda: hf.update(
            bench_hf(model, boi, device, hf_sizes, n_tok, args.hf_short_steps)))
    res["hf_1b"] = {str(k): {kk: vv for kk, vv in v.items() if kk != "tokens"} for k, v in hf.items()}
    if any(v.get("extrapolated_from_steps") for v in hf.values()):
        res["notes"].append(f"HF batch 1 timed over {args.hf_short_steps} steps and extrapolated to {n_tok} "
                            "(its step time is constant overhead)")

    sample = SamplingParams(guidance=GUIDANCE, temperature=1.0)
    greedy = SamplingParams(guidance=GUIDANCE, temperature=0.0)
    eng: dict = {}
    agree: dict = {}

    def build_engine(kv_dtype: str, batch_sizes: list[int]) -> JanusEngine:
        """The 1B engine for the largest of `batch_sizes`, with the attention tile of `bench_attention`."""
        tile = tuple(attn_cfg[kv_dtype]["config"]) if kv_dtype in attn_cfg else None
        return JanusEngine(model, max_batch=max(batch_sizes), max_prompt_len=PROMPT_LEN, num_image_tokens=n_tok,
                           kv_dtype=kv_dtype, attn_config=tile)

    def greedy_agreement(engine: JanusEngine, ids, mask, seeds, ref: torch.Tensor) -> dict:
        """Token agreement of the engine's greedy tokens with `ref`, free-running and teacher-forced."""
        mine = engine.generate(ids, mask, seeds, greedy, BOS, boi, PAD)
        forced = engine.generate(ids, mask, seeds, greedy, BOS, boi, PAD, forced_tokens=ref.to(device))
        return {"batch": ids.shape[0], **agreement(mine, ref),
                "teacher_forced_agreement": agreement(forced, ref)["token_agreement"]}

    def engine_bf16():
        engine = build_engine("bf16", sizes)
        state["engine"] = engine
        log(f"  cache {engine.cache_bytes() / 1e9:.1f} GB for max batch {max(sizes)}; backend {engine.backend}, "
            f"graphs {engine.use_cuda_graph}, attention tile {engine.attn_config}")
        eng.update(bench_engine(engine, boi, device, sizes, sample, "engine bf16", floor, bw_ceiling,
                                ceil.get("copy_tb_s", 0)))

    section("engine, 1B, bf16 cache, sampling (T=1), CFG", engine_bf16)
    res["engine_1b_bf16"] = {str(k): v for k, v in eng.items()}

    def agreement_hf():
        engine = state["engine"]
        b = min([s for s in hf if hf[s].get("tokens") is not None], default=None)
        if b is None:
            return
        ids, mask = prompts(b, cfg.text_config.vocab_size, boi, device, seed=b)
        seeds = torch.arange(b, device=device)
        agree["engine_vs_hf_greedy"] = greedy_agreement(engine, ids, mask, seeds, hf[b]["tokens"])
        log(f"  engine vs HF, greedy, batch {b}: {agree['engine_vs_hf_greedy']}")
        b2 = 64 if not tiny else 4
        ids, mask = prompts(b2, cfg.text_config.vocab_size, boi, device, seed=7)
        state["greedy_inputs"] = (ids, mask, torch.arange(b2, device=device))
        state["greedy_bf16"] = engine.generate(ids, mask, state["greedy_inputs"][2], greedy, BOS, boi, PAD)
        # batch composition: the same samples alone and inside a larger batch (sampling)
        s_ids, s_mask = prompts(8, cfg.text_config.vocab_size, boi, device, seed=11)
        s_seeds = torch.arange(8, device=device) + 77
        full = engine.generate(s_ids, s_mask, s_seeds, sample, BOS, boi, PAD)
        part = engine.generate(s_ids[:3], s_mask[:3], s_seeds[:3], sample, BOS, boi, PAD)
        agree["batch_composition_sampling"] = agreement(full[:3], part)
        log(f"  same seeds, batch 8 vs batch 3 (sampling): {agree['batch_composition_sampling']}")

    if hf:
        section("agreement: engine vs HF (greedy)", agreement_hf)

    e2e: dict = {}

    def end_to_end():
        engine = state["engine"]
        b = max(eng, key=lambda k: eng[k]["img_per_s"])
        b = min(b, 256)
        ids, mask = prompts(b, cfg.text_config.vocab_size, boi, device, seed=3)
        seeds = torch.arange(b, device=device)
        chunk = min(b, 64)

        def run():
            tokens = engine.generate(ids, mask, seeds, sample, BOS, boi, PAD)
            pixels = decode_images(model, tokens, chunk)
            return judge_forward(model, pixels, chunk)

        run()
        peak_reset(device)
        _, secs = timed(run, device)
        e2e.update({"batch": b, "img_per_s": b / secs, "s_per_batch": secs, "peak_gb": peak_gb(device),
                    "decode_judge_chunk": chunk})
        log(f"  generate + decode + judge, batch {b}: {b / secs:.2f} img/s ({secs:.2f} s)")

    section("end to end, 1B: generate + VQ decode + judge", end_to_end)
    res["end_to_end_1b"] = e2e
    state.pop("engine", None)
    free_memory(device)

    eng8: dict = {}

    def engine_fp8():
        nonlocal fp8_sizes
        if device.type == "cuda":  # the batches whose cache fits, leaving 30 GB for weights and activations
            t = cfg.text_config
            per_tok = 2 * t.num_hidden_layers * t.hidden_size * (1 + 4 / (t.hidden_size // t.num_attention_heads))
            fit = int((torch.cuda.mem_get_info(device)[0] - 30e9) // (2 * per_tok * (PROMPT_LEN + n_tok)))
            fp8_sizes = [b for b in fp8_sizes if b <= fit] or [fit]
        engine = build_engine("fp8", fp8_sizes)
        state["engine8"] = engine
        log(f"  cache {engine.cache_bytes() / 1e9:.1f} GB for max batch {max(fp8_sizes)}, tile {engine.attn_config}")
        eng8.update(bench_engine(engine, boi, device, fp8_sizes, sample, "engine fp8 ", floor_fp8, bw_ceiling_fp8,
                                 ceil.get("copy_tb_s", 0)))
        if "greedy_bf16" in state:
            ids, mask, seeds = state["greedy_inputs"]
            agree["fp8_vs_bf16_greedy"] = greedy_agreement(engine, ids, mask, seeds, state["greedy_bf16"])
            log(f"  fp8 vs bf16 cache, greedy, batch {ids.shape[0]}: {agree['fp8_vs_bf16_greedy']}")

    section("engine, 1B, fp8 cache", engine_fp8)
    res["engine_1b_fp8"] = {str(k): v for k, v in eng8.items()}
    res["agreement"] = agree
    state.pop("engine8", None)
    del model
    state.pop("model", None)
    free_memory(device)

    eng7: dict = {}
    if sizes_7b and not args.skip_7b:
        def engine_7b():
            m7, boi7 = build_model("7b", device, dtype)
            t7 = m7.config.text_config
            per_tok = 2 * t7.num_hidden_layers * t7.hidden_size * 2
            kv7 = 2 * contexts * per_tok
            flops7 = flops_per_image(m7.config, n_tok)
            floor7 = 1 / (kv7 / (ceil["copy_tb_s"] * 1e12) + flops7 / mm) if mm else 0.0
            res["accounting_7b"] = {"kv_gb_read_per_img_bf16": kv7 / 1e9, "matmul_tflop_per_img": flops7 / 1e12,
                                    "floor_img_per_s_bf16": floor7,
                                    "bw_ceiling_img_per_s_bf16": ceil["copy_tb_s"] * 1e12 / kv7}
            log(f"  7B accounting: KV {kv7 / 1e9:.0f} GB/img, matmuls {flops7 / 1e12:.1f} TFLOP/img, floor "
                f"{floor7:.1f} img/s")
            cfg_bf16 = tuple(attn_cfg["bf16"]["config"]) if "bf16" in attn_cfg else None
            todo = list(sizes_7b)
            if device.type == "cuda":  # the largest batch whose cache fits, leaving 12 GB for the rest
                free_b = torch.cuda.mem_get_info(device)[0] - 12e9
                row_bytes = 2 * per_tok * (PROMPT_LEN + n_tok)
                fit = int(free_b // row_bytes)
                todo = [b for b in sizes_7b if b <= fit] or [fit]
                log(f"  cache fits batch {fit}; running {todo}")
            engine = JanusEngine(m7, max_batch=max(todo), max_prompt_len=PROMPT_LEN, num_image_tokens=n_tok,
                                 kv_dtype="bf16", attn_config=cfg_bf16)
            eng7.update(bench_engine(engine, boi7, device, todo, sample, "engine 7B bf16", floor7,
                                     ceil["copy_tb_s"] * 1e12 / kv7, ceil.get("copy_tb_s", 0)))
            del engine, m7

        section("engine, 7B, bf16 cache", engine_7b)
        free_memory(device)
    res["engine_7b_bf16"] = {str(k): v for k, v in eng7.items()}

    best = lambda d: max((v["img_per_s"] for v in d.values()), default=None)  # noqa: E731
    res["summary"] = {
        "engine_1b_img_per_s": best(eng),
        "engine_1b_fp8kv_img_per_s": best(eng8),
        "hf_1b_img_per_s": best(hf),
        "engine_1b_batch1_s_per_img": eng[1]["s_per_img"] if 1 in eng else None,
        "hf_1b_batch1_s_per_img": 1 / hf[1]["img_per_s"] if 1 in hf else None,
        "engine_7b_img_per_s": best(eng7),
        "end_to_end_1b_img_per_s": e2e.get("img_per_s"),
        "ceiling_1b_img_per_s": floor,
        "ceiling_1b_fp8kv_img_per_s": floor_fp8,
        "bw_ceiling_1b_img_per_s": bw_ceiling,
        "engine_vs_hf_speedup": (best(eng) / best(hf)) if best(eng) and best(hf) else None,
        "fp8_vs_bf16_token_agreement": agree.get("fp8_vs_bf16_greedy", {}).get("token_agreement"),
        "fp8_vs_bf16_teacher_forced_agreement": agree.get("fp8_vs_bf16_greedy", {}).get("teacher_forced_agreement"),
    }
    res.update({k: v for k, v in res["summary"].items()})
    write(res, errors, out_path)
    print_table(res, hf, eng, eng8, eng7, dj)
    log(f"\nwrote {out_path}")
    if errors:
        log("ERRORS:\n  " + "\n  ".join(errors))
    return 1 if errors else 0


def print_table(res, hf, eng, eng8, eng7, dj):
    log("\n| what | batch | img/s | s/batch | peak GB | KV GB/img | KV TB/s | of floor |")
    log("|---|---|---|---|---|---|---|---|")
    for name, d in (("HF generate 1B", hf), ("engine 1B bf16", eng), ("engine 1B fp8", eng8), ("engine 7B bf16", eng7)):
        for b, v in sorted(d.items()):
            kv = v.get("kv_gb_read_per_img")
            kv_s = "" if kv is None else f"{kv:.1f}"
            bw_s = "" if kv is None else "%.2f" % v["kv_tb_s"]
            fl_s = "" if v.get("frac_floor") is None else "%.0f%%" % (100 * v["frac_floor"])
            note = " (extrapolated)" if v.get("extrapolated_from_steps") else ""
            log(f"| {name} | {b} | {v['img_per_s']:.2f} | {v['s_per_batch']:.3f} | {v['peak_gb']:.1f} | "
                f"{kv_s} | {bw_s} | {fl_s} |{note}")
    for b, v in sorted(dj.items()):
        log(f"| VQ decode / judge 1B | {b} | {v['decode_img_per_s']:.1f} / {v['judge_img_per_s']:.1f} | | "
            f"{v['peak_gb']:.1f} | | | |")
    log("\nsummary: " + json.dumps(res["summary"], indent=1))


def write(res, errors, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(res, errors=list(errors))
    path.write_text(json.dumps(data, indent=1, default=str))
    out_dir = os.environ.get("OUT")
    if out_dir:
        Path(out_dir, path.name).write_text(json.dumps(data, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
