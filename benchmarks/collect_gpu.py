"""The actor pool against the same model in a plain loop, on one GPU, Janus-Pro-1B shapes.

Random weights (throughput does not depend on the values), built in code and saved as a Hugging
Face folder (safetensors). Two processes, one after the other, on the same work:
- plain: one process, the adapter with the fast engine, the loop's stage functions called in order;
- pool:  `safecb run` (local Ray, one Collector actor holding the GPU), one iteration.
Work: E eval prompts (iteration 0: generate + VQ decode + self-judge; iteration 1: decode + judge of
the stored tokens) and P train prompts collected with `judge.threshold: 0`, so every image is judged
unsafe and every prompt is rewritten, regenerated and judged again (the worst case for collection).

    PYTHONPATH=. python benchmarks/collect_gpu.py [--prompts 1024] [--eval 512] [--json] [--save PATH]

Keys: gpu_collect_prompts_per_s (pool, unsafe fraction `gpu_unsafe_fraction`), gpu_judge_img_per_s
(pool: iteration 1's eval stage, decode + self-judge + the benign images decoded again with v0 for
the drift), gpu_pool_efficiency (pool ÷ plain images/s for generate + decode + judge), and the plain
loop's figures beside them (`gpu_judge_img_per_s_plain`: decode + self-judge alone;
`..._plain_with_drift`: with the drift's work, like the pool's). The plain loop also times each step of the
collection (`gpu_collect_stage_s_plain`: generate, decode, judge, rewrite, the rest) and two adapter
options against their defaults on the same work: the judge on a side stream beside the next
generation batch (`..._plain_judge_beside_generation`), and the VQ decoder in the layout that is not
the default (`gpu_judge_img_per_s_plain_contiguous` since the fused decoder made channels-last the default).
The pool's record also holds where each stage's time went on the actor (`gpu_pool_seconds.actor_steps_s`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CATEGORIES = ["sexual", "violence", "self-harm", "shocking", "hate", "harassment", "illegal"]
NOUNS = ["cat", "dog", "street", "city", "forest", "car", "crowd", "room", "river", "house", "field", "knife",
         "fight", "fire", "blood", "gun", "party", "beach", "market", "bridge"]
ADJECTIVES = ["red", "dark", "old", "bright", "quiet", "busy", "empty", "wet", "small", "large"]


def prompt_lines(count: int, salt: int) -> list[str]:
    out = []
    for i in range(count):
        j = i * 7 + salt
        out.append(f"a {ADJECTIVES[j % 10]} {NOUNS[(j // 10) % 20]} near a {NOUNS[(j // 3) % 20]} "
                   f"with {CATEGORIES[j % 7]} number {i}")
    return out


def build_folder(folder: Path, tiny: bool = False) -> None:
    """A Janus-Pro-1B-shaped model with random weights and a word-level tokenizer (no download);
    `tiny`: the toy shapes of generation.py, on the CPU (a smoke run of this script)."""
    import torch
    from transformers import JanusForConditionalGeneration

    from generation import janus_config
    from safecb.models.tiny import build_processor, build_word_tokenizer, save_model_folder

    words = [*CATEGORIES, *NOUNS, *ADJECTIVES, "a", "near", "with", "number", *map(str, range(10)),
             "photo", "of", "the", "clean", "peaceful"]
    tokenizer = build_word_tokenizer(words)
    config = janus_config("tiny" if tiny else "1b")
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image_placeholder>")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, key, getattr(tokenizer, key))
    torch.manual_seed(0)
    with torch.device("cpu" if tiny else "cuda"):
        model = JanusForConditionalGeneration(config).to(torch.float32 if tiny else torch.bfloat16).eval()
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id, gen.eos_token_id = tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id
    gen.generation_kwargs = {"boi_token_id": tokenizer.convert_tokens_to_ids("<begin_of_image>")}
    tokens = config.vision_config.num_image_tokens
    gen.num_image_tokens = tokens
    processor = build_processor(tokenizer, image_size=config.vision_config.image_size)
    processor.num_image_tokens = tokens  # build_processor assumes 4-pixel patches (MACHINE-NOTES)
    save_model_folder(model.cpu(), processor, folder)
    del model
    if not tiny:  # the measured runs are child processes: leave them the whole GPU (an H100 has 80 GB)
        torch.cuda.empty_cache()


def engine_batch(kv_dtype: str, max_batch: int | None = None) -> int:
    """The engine's batch (its KV cache): 256 sequences of a bf16 cache take 66 GB, 512 of fp8 as much."""
    return max_batch or (256 if kv_dtype == "bf16" else 512)


def write_config(work: Path, folder: Path, prompts: int, evals: int, tiny: bool = False, kv_dtype: str = "bf16",
                 max_batch: int | None = None) -> Path:
    import yaml

    from safecb.config import PromptsConfig

    batch = engine_batch(kv_dtype, max_batch)
    splits = [("train", prompts, 0), ("eval_unsafe", evals // 2, 1), ("eval_benign", evals - evals // 2, 2)]
    if "val_unsafe" in PromptsConfig.model_fields:  # a validation split: small, it only has to exist here
        splits += [("val_unsafe", 8, 3), ("val_benign", 8, 4)]
    for name, count, salt in splits:
        (work / f"{name}.txt").write_text("\n".join(prompt_lines(count, salt)) + "\n")
    config = {
        "run_id": "collect-gpu", "categories": CATEGORIES,
        "model": {"backend": "janus", "path": str(folder), "dtype": "float32" if tiny else "bfloat16",
                  "device": "cpu" if tiny else "cuda",
                  "engine": {"enabled": "off" if tiny else "on", "kv_dtype": kv_dtype, "max_batch": batch}},
        "prompts": {name: {"path": str(work / f"{name}.txt")} for name, _, _ in splits},
        "generation": {"samples_per_prompt": 1, "guidance": 5.0, "batch_size": batch,
                       "prompts_per_shard": 512},
        "judge": {"threshold": 0.0, "batch_size": 64},  # every image unsafe: the worst case for collection
        "pairing": {"rewrite": "model_then_lexicon", "lexicon": {c: "peaceful" for c in CATEGORIES}},
        "eval": {"external_judge": False},
        "finetune": {"steps": 5, "batch_size": 4},
        "stop": {"max_iters": 1},
        "resources": {"num_workers": 1, "gpus_per_worker": 0 if tiny else 1, "cpus_per_worker": 1 if tiny else 4},
        "storage": {"run_dir": str(work / "run")},
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def stage_timers(model, names=("_generate_on_device", "counterpart_tokens", "decode", "judge", "rewrite")):
    """Seconds spent in each of the adapter's steps, the GPU synchronised around each call."""
    import torch

    seconds = {name: 0.0 for name in names if hasattr(model, name)}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(name, fn):
        def call(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                seconds[name] += time.perf_counter() - start
        return call

    for name in seconds:
        setattr(model, name, timed(name, getattr(model, name)))
    try:
        yield seconds
    finally:
        for name in seconds:
            delattr(model, name)  # back to the class's method


def plain_loop(config_path: Path) -> dict:
    """The same work with no Ray and no storage: stage functions called in order on one adapter."""
    import torch

    from safecb.config import load_config
    from safecb.models.registry import load_model
    from safecb.prompts import load_prompts
    from safecb.stages import collect_shard, eval_jobs, evaluate_tokens, generate_eval_tokens

    config = load_config(config_path)
    model = load_model(config.model, config.categories, config.seed, batch_size=config.generation.batch_size)
    train = load_prompts(config.prompts.train, "prompts.train")
    # Each eval prompt with its split, as the pool's snapshot gives it (the drift is the benign ones').
    evals = [dataclasses.replace(p, split="unsafe") for p in load_prompts(config.prompts.eval_unsafe, "u")]
    evals += [dataclasses.replace(p, split="benign") for p in load_prompts(config.prompts.eval_benign, "b")]
    jobs = eval_jobs(evals, config)
    per = config.generation.prompts_per_shard
    generate_eval_tokens(model, jobs[:per], config)  # warm-up: engine graphs, kernels
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out = {}
    start = time.perf_counter()
    tokens = torch.cat([generate_eval_tokens(model, jobs[i:i + per], config) for i in range(0, len(jobs), per)])
    for i in range(0, len(jobs), per):
        evaluate_tokens(model, jobs[i:i + per], tokens[i:i + per], config, 0)
    out["e2e_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, len(jobs), per):
        evaluate_tokens(model, jobs[i:i + per], tokens[i:i + per], config, 1)
    out["judge_s"] = time.perf_counter() - start
    # The pool's figure is iteration 1's eval stage, where an edited codebook is served and the benign
    # images are decoded again with v0 for the drift: the same work here, for a like-for-like figure.
    v0 = model.get_codebook()
    model.set_codebook(v0 + 0.01 * torch.randn(v0.shape, generator=torch.Generator().manual_seed(0)), 1)
    start = time.perf_counter()
    for i in range(0, len(jobs), per):
        evaluate_tokens(model, jobs[i:i + per], tokens[i:i + per], config, 1, codebook_v0=v0)
    out["judge_s_with_drift"] = time.perf_counter() - start
    model.set_codebook(v0, 0)
    if hasattr(model, "decoder_channels_last"):  # A/B: the VQ decoder's convolutions in channels-last layout
        default = model.decoder_channels_last
        model.decoder_channels_last = not default
        evaluate_tokens(model, jobs[:per], tokens[:per], config, 1)  # warm-up of the other layout
        start = time.perf_counter()
        for i in range(0, len(jobs), per):
            evaluate_tokens(model, jobs[i:i + per], tokens[i:i + per], config, 1)
        out["judge_s_channels_last" if not default else "judge_s_contiguous"] = time.perf_counter() - start
        model.decoder_channels_last = default

    def collect() -> tuple[float, float]:
        start = time.perf_counter()
        unsafe = images = 0
        for i in range(0, len(train), per):
            result = collect_shard(model, train[i:i + per], config, 1, dict(config.pairing.lexicon))
            collected = [r for r in result.generations if r["role"] == "collect"]
            unsafe += sum(r["unsafe"] for r in collected)
            images += len(collected)
        return time.perf_counter() - start, unsafe / max(1, images)

    out["collect_s"], fraction = collect()
    if hasattr(model, "overlap_judge"):  # each step timed on its own (a sync around it): where the time goes;
        default = model.overlap_judge    # then the A/B of the judge beside generation on a side stream
        model.overlap_judge = False
        with stage_timers(model) as seconds:
            out["collect_s_timed"], _ = collect()
        out["collect_stage_s"] = {**{k: round(v, 2) for k, v in seconds.items()},
                                  "other": round(out["collect_s_timed"] - sum(seconds.values()), 2)}
        model.overlap_judge = True
        out["collect_s_overlapped"], _ = collect()
        model.overlap_judge = default
    out.update(images=len(jobs), prompts=len(train), unsafe_fraction=fraction)
    return out


def pool_run(config_path: Path) -> dict:
    from safecb.config import load_config
    from safecb.controller import run

    config = load_config(config_path)
    metrics = run(config)
    stages = [m["stage_seconds"] for m in metrics]
    return {"e2e_s": stages[0]["eval"], "judge_s": stages[1]["eval"], "collect_s": stages[1]["collect + pair"],
            "update_s": stages[1].get("update codebook"), "broadcast_s": stages[1].get("broadcast"),
            "start_actors_s": stages[0].get("start actors"), "unsafe_fraction": metrics[1]["collect_unsafe_rate"],
            # Where the eval and collect stages' time goes on the actor (read, decode + judge + drift, write, ...)
            "actor_steps_s": metrics[1].get("actor_seconds"),
            "iteration_s": [m["seconds"] for m in metrics]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="toy shapes on the CPU: a smoke run of this script")
    parser.add_argument("--kv-dtype", choices=["bf16", "fp8"], default="bf16", help="the engine's KV cache")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="the engine's batch (default 256 with a bf16 cache, 512 with fp8: sized for an H200; "
                             "192 / 384 leave an H100 room for the decoder)")
    parser.add_argument("--pool-only", action="store_true", help="skip the plain loop (no efficiency figures)")
    parser.add_argument("--plain-only", action="store_true",
                        help="the plain loop alone: its figures and the collection's seconds by step, nothing saved")
    parser.add_argument("--save", default=None, help="merge the gpu_* keys into this JSON file")
    parser.add_argument("--part", choices=["plain", "pool"], help=argparse.SUPPRESS)  # one child process
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        result = plain_loop(Path(args.config)) if args.part == "plain" else pool_run(Path(args.config))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    work = Path(tempfile.mkdtemp(prefix="safecb-collect-gpu-"))
    start = time.perf_counter()
    build_folder(work / "model", args.tiny)
    print(f"built the 1B-shaped folder in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    config_path = write_config(work, work / "model", args.prompts, args.eval, args.tiny, args.kv_dtype, args.max_batch)
    parts = {}
    for part in ("pool",) if args.pool_only else ("plain",) if args.plain_only else ("plain", "pool"):  # separate processes: each has the GPU to itself
        proc = subprocess.run([sys.executable, __file__, "--part", part, "--config", str(config_path)],
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"{part} run failed (exit {proc.returncode})")
        parts[part] = json.loads(lines[-1].removeprefix("RESULT "))
        print(f"{part}: {json.dumps(parts[part])}", file=sys.stderr, flush=True)  # kept if a later part fails
    if args.plain_only:
        plain = parts["plain"]
        print(f"plain, {args.kv_dtype} KV cache: collect + pair {args.prompts / plain['collect_s']:.2f} prompts/s, "
              f"decode + self-judge {args.eval / plain['judge_s']:.1f} img/s")
        if "collect_stage_s" in plain:
            print("seconds by step: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in plain["collect_stage_s"].items()))
        print(json.dumps(plain))
        return 0
    pool = parts["pool"]
    plain = parts.get("plain") or {"e2e_s": float("nan"), "judge_s": float("nan"), "collect_s": float("nan")}
    images, prompts = args.eval, args.prompts
    result = {
        "gpu_collect_prompts_per_s": round(prompts / pool["collect_s"], 2),
        "gpu_collect_prompts_per_s_plain": round(prompts / plain["collect_s"], 2),
        "gpu_unsafe_fraction": pool["unsafe_fraction"],
        "gpu_judge_img_per_s": round(images / pool["judge_s"], 1),
        "gpu_judge_img_per_s_plain": round(images / plain["judge_s"], 1),
        "gpu_judge_img_per_s_plain_with_drift": (
            round(images / plain["judge_s_with_drift"], 1) if "judge_s_with_drift" in plain else None),
        "gpu_e2e_img_per_s": round(images / pool["e2e_s"], 2),
        "gpu_e2e_img_per_s_plain": round(images / plain["e2e_s"], 2),
        "gpu_pool_efficiency": round(plain["e2e_s"] / pool["e2e_s"], 3),
        "gpu_collect_efficiency": round(plain["collect_s"] / pool["collect_s"], 3),
        "gpu_pool_seconds": pool, "gpu_plain_seconds": plain,
        # The plain loop's A/B of two options of the Janus adapter, same process, same work:
        "gpu_collect_prompts_per_s_plain_judge_beside_generation": (
            round(prompts / plain["collect_s_overlapped"], 2) if "collect_s_overlapped" in plain else None),
        "gpu_collect_stage_s_plain": plain.get("collect_stage_s"),
        # The VQ decoder in the layout that is not the default (channels-last is, since the fused decoder)
        **{f"gpu_judge_img_per_s_plain_{layout}": round(images / plain[f"judge_s_{layout}"], 1)
           for layout in ("channels_last", "contiguous") if f"judge_s_{layout}" in plain},
        "gpu_settings": {"prompts": prompts, "eval_images": images, "shapes": "Janus-Pro-1B, random weights",
                         "engine": f"{args.kv_dtype} KV cache, batch-invariant", "categories": len(CATEGORIES),
                         "engine_batch": engine_batch(args.kv_dtype, args.max_batch)},
    }
    if args.pool_only:  # no plain loop ran: leave its figures out rather than write NaN
        result = {k: v for k, v in result.items() if not (k.endswith("_plain") or k.endswith("_efficiency")
                                                          or k == "gpu_plain_seconds")}
    if args.kv_dtype != "bf16":  # a second configuration: its keys carry the cache's name
        result = {k.replace("gpu_", f"gpu_{args.kv_dtype}_", 1): v for k, v in result.items()}
    rows = [("collect + pair, prompts/s", prompts / pool["collect_s"], prompts / plain["collect_s"]),
            ("decode + self-judge, img/s", images / pool["judge_s"], images / plain["judge_s"]),
            ("generate + decode + judge, img/s", images / pool["e2e_s"], images / plain["e2e_s"])]
    print(f"{args.kv_dtype + ' KV cache':36} {'pool':>10} {'plain':>10}")
    for name, a, b in rows:
        print(f"{name:36} {a:>10.2f} {b:>10.2f}")
    for key, label, count in (("judge_s_with_drift", "plain, decode + self-judge + drift (as the pool), img/s", images),
                              ("collect_s_overlapped", "plain, judge beside generation, prompts/s", prompts),
                              ("judge_s_channels_last", "plain, decoder channels-last, img/s", images),
                              ("judge_s_contiguous", "plain, decoder contiguous, img/s", images)):
        if key in plain:
            print(f"{label:47} {count / plain[key]:>10.2f}")
    if "collect_stage_s" in plain:  # the sequential collection, step by step
        print("plain collection, seconds by step: "
              + ", ".join(f"{k} {v:.1f}" for k, v in plain["collect_stage_s"].items()))
    print(f"pool efficiency (generate + decode + judge): {plain['e2e_s'] / pool['e2e_s']:.3f}; "
          f"collection: {plain['collect_s'] / pool['collect_s']:.3f}; unsafe fraction {pool['unsafe_fraction']}")
    if args.save:
        path = Path(args.save)
        saved = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**saved, **result}, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
