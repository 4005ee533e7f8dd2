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
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import (  # noqa: E402
    BOS,
    PAD,
    PROMPT_LEN,
    agreement,
    build_model,
    free_memory,
    log,
    sweep_attention,
)

from safecb.models.base import SamplingParams  # noqa: E402
from safecb.models.engine import JanusEngine, decode_attention  # noqa: E402

SAMPLE = SamplingParams(guidance=5.0, temperature=1.0)
N_TOKENS = 576


def attention_configs(kv: str) -> list[tuple]:
    """Every tile worth timing: Triton's, and each CUDA (keys, stages) tile at 2, 4 and 8 warps a block."""
    from safecb.models.cuda_kernels import CUDA_TILES

    if kv == "bf16":
        return [(64, 4, 3, "dot"), (128, 8, 3, "dot")]
    return [(128, 4, 1, "sum"), (64, 4, 3, "dot"), (16, 1, 1, "sum2p"), (32, 2, 1, "sum2p")] + [
        (keys, warps, stages, "cuda") for keys, stages in CUDA_TILES for warps in (2, 4, 8)]


def best_attention(results: dict, kv: str) -> tuple:
    """The fastest correct tile at the largest rows swept (the batch the engine runs at its best)."""
    rows = max(r.get("rows", 512) for r in results.values())
    ok = [r for r in results.values() if r["kv"] == kv and r["finite"] and r["rel_err"] < 1e-2
          and r.get("rows", 512) == rows]
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


def timeline(engine: JanusEngine, batch: int, boi: int, vocab: int, device) -> dict:
    """Where a whole `generate` call's time goes: calls that stop after n tokens, n = 1 (prefill and
    the first sample), a quarter, half, three quarters and all of the image; the differences are the
    decode steps of each quarter (they grow with the context)."""
    from generation import prompts

    ids, mask = prompts(batch, vocab, boi, device, seed=7)
    seeds = torch.arange(batch, device=device)
    engine.generate(ids, mask, seeds, SAMPLE, BOS, boi, PAD, num_tokens=4)  # prefill + graph capture
    marks = [1, N_TOKENS // 4, N_TOKENS // 2, 3 * N_TOKENS // 4, N_TOKENS]
    secs = {}
    for n in marks:
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.generate(ids, mask, seeds, SAMPLE, BOS, boi, PAD, num_tokens=n)
        torch.cuda.synchronize()
        secs[n] = time.perf_counter() - t
    from safecb.models.generation import cfg_batch

    ids2, mask2 = cfg_batch(ids, mask, BOS, boi, PAD)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        engine._prefill(ids2, mask2)
    torch.cuda.synchronize()
    prefill_only = time.perf_counter() - t
    quarters = [(secs[b] - secs[a]) / (b - a) * 1e3 for a, b in zip(marks, marks[1:])]
    return {"batch": batch, "s_by_tokens": secs, "prefill_s": secs[1], "prefill_only_s": prefill_only,
            "step_ms_by_quarter": quarters,
            "img_per_s": batch / secs[N_TOKENS]}


class PowerMonitor:
    """Board power and SM clock sampled by nvidia-smi every 200 ms while the block runs (None without it)."""

    def __enter__(self):
        import shutil
        import subprocess

        self.samples: list[tuple[float, float]] = []
        self.proc = None
        if shutil.which("nvidia-smi"):
            index = torch.cuda.current_device()
            self.proc = subprocess.Popen(["nvidia-smi", f"--id={index}", "--query-gpu=power.draw,clocks.sm",
                                          "--format=csv,noheader,nounits", "-lms", "200"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            for line in out.splitlines():
                try:
                    watts, mhz = (float(x) for x in line.split(","))
                except ValueError:
                    continue
                self.samples.append((watts, mhz))

    def summary(self) -> dict:
        busy = self.samples[len(self.samples) // 5:]  # the first fifth is the clock ramping up
        if not busy:
            return {"watts": None, "sm_mhz": None}
        return {"watts": sum(w for w, _ in busy) / len(busy), "sm_mhz": sum(c for _, c in busy) / len(busy)}


def sustained(engine: JanusEngine, batch: int, boi: int, vocab: int, device, seconds: float = 12.0) -> dict:
    """Under load for `seconds`: a whole decode step (graph, mean context), then the same step's
    attention alone and its GEMMs alone; each with its mean board power and SM clock. A short burst
    (the step profile above) runs at the top clock; minutes of generation run at the power limit."""
    from generation import prompts

    ids, mask = prompts(batch, vocab, boi, device, seed=5)
    engine.generate(ids, mask, torch.arange(batch, device=device), SAMPLE, BOS, boi, PAD, num_tokens=4)
    _, graph = engine._graph_for(batch, SAMPLE)
    mean_step = N_TOKENS // 2
    rows, hidden = 2 * batch, engine.hidden
    block_n, warps, stages, variant = engine.attn_config
    q = torch.randn(rows, engine.heads, engine.head_dim, device=device, dtype=engine.dtype)
    layer = engine.layers[0]
    x = torch.randn(rows, hidden, device=device, dtype=engine.dtype)
    a = torch.randn(rows, layer.wd.shape[1], device=device, dtype=engine.dtype)
    engine._slot.fill_(PROMPT_LEN + mean_step)

    def step():
        engine._slot.fill_(PROMPT_LEN + mean_step)
        engine._step.fill_(mean_step)
        graph.replay()

    def attention():
        for i in range(engine.num_layers):
            ks = engine.k_scale[i] if engine.k_scale is not None else None
            vs = engine.v_scale[i] if engine.v_scale is not None else None
            decode_attention(q, engine.k_cache[i], engine.v_cache[i], ks, vs, engine._start, engine._slot,
                             engine.scaling, 1, block_n, warps, stages, variant)

    def gemms():
        for lay in engine.layers:
            F.linear(x, lay.wqkv, lay.bqkv)
            F.linear(x, lay.wo, lay.bo)
            F.linear(x, lay.wgu, lay.bgu)
            F.linear(a, lay.wd, lay.bd)

    out = {}
    for name, fn in (("step", step), ("attention", attention), ("gemm", gemms)):
        fn()
        torch.cuda.synchronize()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with PowerMonitor() as power:
            start, reps = time.perf_counter(), 0
            t0.record()
            while time.perf_counter() - start < seconds:
                for _ in range(10):
                    fn()
                reps += 10
                torch.cuda.synchronize()
            t1.record()
            torch.cuda.synchronize()
        out[name] = {"ms": t0.elapsed_time(t1) / reps, **power.summary()}
        log(f"  sustained {name:9s} batch {batch}: {out[name]['ms']:.2f} ms, "
            f"{out[name]['watts'] or float('nan'):.0f} W, SM {out[name]['sm_mhz'] or float('nan'):.0f} MHz")
    return out


def prefill_profile(engine: JanusEngine, batch: int, boi: int, vocab: int, device) -> dict:
    """One prefill (2 x batch rows of PROMPT_LEN tokens) under the profiler: GPU ms by kernel."""
    from torch.profiler import ProfilerActivity, profile

    from generation import prompts
    from safecb.models.generation import cfg_batch

    ids, mask = prompts(batch, vocab, boi, device, seed=5)
    ids2, mask2 = cfg_batch(ids, mask, BOS, boi, PAD)
    with torch.no_grad():
        engine._prefill(ids2, mask2)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine._prefill(ids2, mask2)
            torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us and event.key and not event.key.startswith("cuda"):
            kernels[event.key[:90]] = us / 1e3
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])
    log(f"  prefill batch {batch}: {sum(kernels.values()):.1f} ms GPU; top: "
        + "; ".join(f"{k[:60]} {v:.1f}" for k, v in top.items()))
    return {"batch": batch, "gpu_ms": sum(kernels.values()), "top_kernels_ms": top}


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
        out["invariant" if inv else "shape_follows_call"] = {k: agreement(v, ref[k]) for k, v in same.items()}
        log(f"  batch_invariant={inv}: " + ", ".join(f"{k} {v['rows_identical']:.2f}" for k, v in
                                                      out["invariant" if inv else "shape_follows_call"].items()))
        del engine
        free_memory(device)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode-step-h200.json"))
    ap.add_argument("--batches", default="256,512")
    ap.add_argument("--sweep-rows", default="512,1280", help="attention rows to sweep (2 x images)")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--sustained", default="", help="fp8 batches to run under sustained load (power, clock)")
    ap.add_argument("--timeline", default="", help="batches to time whole generate calls for, e.g. 640,768,768:unshared (every row reads its own prompt)")
    ap.add_argument("--timeline-kv", default="fp8", choices=("bf16", "fp8"), help="the cache of the --timeline calls")
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
        res["attention"] = {}
        for rows in (int(r) for r in args.sweep_rows.split(",")):
            log(f"== decode attention, one layer, {rows} rows, mean context")
            res["attention"].update(sweep_attention(device, {kv: attention_configs(kv) for kv in ("bf16", "fp8")},
                                                      rows=rows))
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
    if args.timeline:
        res["timeline"] = []
        kv = args.timeline_kv
        config = tuple(best[kv]) if best.get(kv) else None
        for item in args.timeline.split(","):
            batch, _, mode = item.partition(":")
            batch = int(batch)
            engine = JanusEngine(model, max_batch=batch, max_prompt_len=PROMPT_LEN, num_image_tokens=N_TOKENS,
                                 kv_dtype=kv, attn_config=config)
            engine.shared_prompt_reads = mode != "unshared"
            r = {"kv": kv, "config": list(engine.attn_config), "shared_prompt_reads": engine.shared_prompt_reads,
                 **timeline(engine, batch, boi, vocab, device)}
            res["timeline"].append(r)
            log(f"  timeline {kv} {engine.attn_config} {'shared' if engine.shared_prompt_reads else 'own'} prompt reads batch {batch}: {r['img_per_s']:.1f} img/s; first token "
                f"{r['prefill_s'] * 1e3:.0f} ms (prefill alone {r['prefill_only_s'] * 1e3:.0f}); step ms by quarter "
                + " ".join(f"{x:.2f}" for x in r["step_ms_by_quarter"]))
            save()
            del engine
            free_memory(device)
    if args.sustained:
        res["sustained"], res["prefill"] = [], []
        for batch in (int(b) for b in args.sustained.split(",")):
            engine = JanusEngine(model, max_batch=batch, max_prompt_len=PROMPT_LEN, num_image_tokens=N_TOKENS,
                                 kv_dtype="fp8", attn_config=tuple(best["fp8"]) if best.get("fp8") else None)
            res["prefill"].append(prefill_profile(engine, batch, boi, vocab, device))
            res["sustained"].append({"batch": batch, "config": list(engine.attn_config),
                                     **sustained(engine, batch, boi, vocab, device)})
            save()
            del engine
            free_memory(device)
    res["steps"] = []
    batches = [int(b) for b in args.batches.split(",") if b]
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
