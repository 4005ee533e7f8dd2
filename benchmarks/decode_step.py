"""Where a decode step's time goes, on one GPU: the attention kernels alone, then a whole step.

  * every decode-attention kernel variant and tile over one layer of the Janus-Pro-1B cache (512 rows =
    256 images with CFG, the mean decode context): time, cache bytes/s, error against a float reference;
  * a whole engine step (CUDA-graph replay at the mean context) per cache type and batch, and one eager
    step under the profiler, its GPU time split into GEMMs, attention and the small fused kernels;
  * batch invariance: the same (prompt, seed) pairs alone, reordered and among other prompts of other
    lengths, with `batch_invariant` off and on (sampling, 1B shapes).

    python benchmarks/decode_step.py            # GPU; writes benchmarks/results/decode-step-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import BOS, PAD, PROMPT_LEN, build_model, free_memory, log  # noqa: E402

from safecb.models.base import SamplingParams  # noqa: E402
from safecb.models.engine import JanusEngine, decode_attention, quantize_fp8  # noqa: E402

SAMPLE = SamplingParams(guidance=5.0, temperature=1.0)
N_TOKENS = 576


def attention_configs(kv: str) -> list[tuple]:
    if kv == "bf16":
        return [(64, 4, 3, "dot"), (128, 8, 3, "dot")]
    return [(128, 4, 1, "sum"), (64, 4, 3, "dot"), (16, 1, 1, "sum2p"), (16, 2, 1, "sum2p"), (32, 2, 1, "sum2p"),
            (8, 4, 1, "cuda"), (16, 4, 1, "cuda"), (32, 4, 1, "cuda")]


def sweep_attention(device, rows=512, heads=16, dim=128, prompt=PROMPT_LEN, n=N_TOKENS) -> dict:
    import triton

    max_len = prompt + n
    ctx = prompt + n // 2
    results: dict = {}
    for kv in ("bf16", "fp8"):
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
        for config in attention_configs(kv):
            block_n, warps, stages, variant = config
            call = lambda: decode_attention(q, kc, vc, ks, vs, start, slot, dim ** -0.5, 1, block_n, warps,  # noqa: E731
                                            stages, variant)
            name = f"{kv} {variant} {block_n}x{warps}x{stages}"
            try:
                out = call().float()
                err = ((out[:8] - ref).norm() / ref.norm()).item()
                ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
            except Exception as e:  # noqa: BLE001 - a tile that does not compile is a result, not a stop
                log(f"  {name:28s} failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
                continue
            tbs = nbytes / (ms / 1e3) / 1e12
            results[name] = {"kv": kv, "config": list(config), "us_per_layer": ms * 1e3, "tb_s": tbs,
                             "step_ms_24_layers": 24 * ms, "rel_err": err, "finite": bool(out.isfinite().all())}
            log(f"  {name:28s} {ms * 1e3:7.1f} us/layer {tbs:5.2f} TB/s  err {err:.1e}")
        del kc, vc, ks, vs
        free_memory(device)
    return results


def best_attention(results: dict, kv: str) -> tuple:
    ok = [r for r in results.values() if r["kv"] == kv and r["finite"] and r["rel_err"] < 1e-2]
    return tuple(min(ok, key=lambda r: r["us_per_layer"])["config"])


KERNEL_GROUPS = [("attention", ("_decode_attn", "_combine", "fp8_decode_attention")), ("rope+cache", ("_rope_cache",)),
                 ("rmsnorm", ("_add_rmsnorm",)), ("silu", ("_silu_mul",)),
                 ("gemm", ("gemm", "nvjet", "cutlass", "sm90", "cublas", "xmma", "splitk"))]


def kernel_group(name: str) -> str:
    low = name.lower()
    for group, keys in KERNEL_GROUPS:
        if any(k.lower() in low for k in keys):
            return group
    return "other (embed, head, CFG, sampling)"


def profile_step(engine: JanusEngine, batch: int, boi: int, vocab: int, device) -> dict:
    """Replayed-graph step time at the mean context, and one eager step's GPU time by kernel group."""
    from generation import prompts

    ids, mask = prompts(batch, vocab, boi, device, seed=5)
    seeds = torch.arange(batch, device=device)
    engine.generate(ids, mask, seeds, SAMPLE, BOS, boi, PAD, num_tokens=4)  # prefill + graph capture
    key, graph = engine._graph_for(batch, SAMPLE)
    mean_step = N_TOKENS // 2

    def reset():
        engine._pos.fill_(PROMPT_LEN + mean_step)
        engine._step.fill_(mean_step)
        engine._slot.fill_(PROMPT_LEN + mean_step)
        engine._slot_host = PROMPT_LEN + mean_step

    reset()
    reps = 40
    for _ in range(5):
        graph.replay()
    reset()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        graph.replay()
    t1.record()
    torch.cuda.synchronize()
    step_ms = t0.elapsed_time(t1) / reps
    reset()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine._decode_step(batch, SAMPLE)
        torch.cuda.synchronize()
    groups: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us and event.key and not event.key.startswith("cuda"):
            g = kernel_group(event.key)
            groups[g] = groups.get(g, 0.0) + us / 3 / 1e3  # ms per step
    return {"batch": batch, "graph_step_ms": step_ms, "img_per_s_decode_only": batch / (step_ms * (N_TOKENS - 1) / 1e3),
            "eager_ms_by_group": dict(sorted(groups.items(), key=lambda kv: -kv[1]))}


def invariance(model, boi: int, vocab: int, device) -> dict:
    """Share of (prompt, seed) pairs whose tokens are identical alone / reordered / among others."""
    g = torch.Generator().manual_seed(9)
    lengths = [int(x) for x in torch.randint(12, PROMPT_LEN + 1, (12,), generator=g)]
    rows = []
    for length in lengths:
        ids = torch.randint(4, 100000, (length,), generator=g)
        ids[0], ids[-1] = BOS, boi
        rows.append(ids)

    def batch_of(index: list[int]):
        width = max(lengths[i] for i in index)
        ids = torch.full((len(index), width), PAD, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(index):
            ids[r, width - lengths[i]:] = rows[i]
            mask[r, width - lengths[i]:] = 1
        return ids.to(device), mask.to(device), torch.tensor([1000 + i for i in index], device=device)

    out = {}
    for inv in (False, True):
        engine = JanusEngine(model, max_batch=12, max_prompt_len=PROMPT_LEN, num_image_tokens=N_TOKENS,
                             batch_invariant=inv)
        run = lambda index: engine.generate(*batch_of(index), SAMPLE, BOS, boi, PAD)  # noqa: E731
        full = run(list(range(12)))
        same = {"reversed": run(list(range(11, -1, -1))).flip(0), "first3": run([0, 1, 2]),
                "last5": run([7, 8, 9, 10, 11]), "alone0": run([0])}
        ref = {"reversed": full, "first3": full[:3], "last5": full[7:], "alone0": full[:1]}
        out["invariant" if inv else "shape_follows_call"] = {
            k: {"rows_identical": float((v == ref[k]).all(1).float().mean()),
                "token_agreement": float((v == ref[k]).float().mean())} for k, v in same.items()}
        log(f"  batch_invariant={inv}: " + ", ".join(f"{k} {v['rows_identical']:.2f}" for k, v in
                                                      out["invariant" if inv else "shape_follows_call"].items()))
        del engine
        free_memory(device)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode-step-h200.json"))
    ap.add_argument("--batches", default="256,512")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-invariance", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        log("decode_step.py needs a CUDA GPU")
        return 2
    device = torch.device("cuda")
    res: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], Path(args.out).name).write_text(json.dumps(res, indent=1))

    if not args.skip_sweep:
        log("== decode attention, one layer, 512 rows, mean context")
        res["attention"] = sweep_attention(device)
        res["best"] = {kv: best_attention(res["attention"], kv) for kv in ("bf16", "fp8")}
        log(f"  best: {res['best']}")
        save()
    best = res.get("best", {})
    model, boi = build_model("1b", device, torch.bfloat16)
    vocab = model.config.text_config.vocab_size
    if not args.skip_invariance:
        log("== batch invariance (1B, sampling, 12 prompts of 12-40 tokens)")
        res["invariance"] = invariance(model, boi, vocab, device)
        save()
    res["steps"] = []
    batches = [int(b) for b in args.batches.split(",")]
    setups = [("bf16", best.get("bf16")), ("fp8", (16, 1, 1, "sum2p"))]
    if best.get("fp8") and tuple(best["fp8"]) != (16, 1, 1, "sum2p"):
        setups.append(("fp8", best["fp8"]))
    for kv, config in setups:
        for batch in batches:
            if kv == "bf16" and batch > 384:
                continue
            engine = JanusEngine(model, max_batch=batch, max_prompt_len=PROMPT_LEN, num_image_tokens=N_TOKENS,
                                 kv_dtype=kv, attn_config=config)
            r = {"kv": kv, "config": list(engine.attn_config), **profile_step(engine, batch, boi, vocab, device)}
            res["steps"].append(r)
            log(f"  {kv} {engine.attn_config} batch {batch}: graph step {r['graph_step_ms']:.2f} ms "
                f"({r['img_per_s_decode_only']:.1f} img/s decode only); eager by group (ms): "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["eager_ms_by_group"].items()))
            save()
            del engine
            free_memory(device)
    log("\n| cache | attention | batch | step ms (graph) | img/s (decode) | gemm | attention | small kernels | other |")
    log("|---|---|---|---|---|---|---|---|---|")
    for r in res["steps"]:
        g = r["eager_ms_by_group"]
        small = sum(g.get(k, 0) for k in ("rope+cache", "rmsnorm", "silu"))
        log(f"| {r['kv']} | {tuple(r['config'])} | {r['batch']} | {r['graph_step_ms']:.2f} | "
            f"{r['img_per_s_decode_only']:.1f} | {g.get('gemm', 0):.2f} | {g.get('attention', 0):.2f} | {small:.2f} | "
            f"{g.get('other (embed, head, CFG, sampling)', 0):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
