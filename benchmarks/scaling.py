"""The Safe-CB loop on Janus-Pro-1B shapes (random weights, built in code) across GPU counts.

For each GPU count G of `--gpus` that this machine has, and each A of `--actors-per-gpu`:
- collection through the actor pool with the fast engine: `safecb run` (local Ray) with G x A
  Collector actors, one iteration, every image judged unsafe (`judge.threshold: 0`, the worst case:
  every prompt is rewritten, regenerated and judged again), so `collect_img_per_s` counts 2 images
  generated + decoded + judged per prompt. A actors share one GPU: each gets 1/A of the per-GPU batch
  (the same KV-cache memory per GPU) and 0.5/A of the GPU, leaving 0.5 to the trainer as
  `configs/janus-pro-1b.yaml` does;
- the broadcast (the driver sends the codebook to every actor and waits for each acknowledgement)
  and the eval stage (decode + self-judge of the stored eval tokens) of that iteration;
- the trainer (once per G, A = 1): a Ray Train + DeepSpeed fit with G workers, one per GPU, on the
  iteration's images with the pairs forced (each prompt's first image as harmful, its rewritten
  counterpart as safe: with random weights the self-judge finds no safe image, and the update's cost
  does not depend on which image is which); `janus-pro-1b.yaml`'s fine-tuning settings;
- one iteration end to end for the fixed prompt count: collect + update + broadcast + eval.
GPU counts this machine lacks are recorded as null with the reason.

    PYTHONPATH=. python benchmarks/scaling.py [--gpus 1,2,4,8] [--actors-per-gpu 1,2] [--prompts 1024]
                                              [--eval 256] [--out benchmarks/results/scaling-h200.json]
    PYTHONPATH=. python benchmarks/scaling.py --tiny   # toy shapes on the CPU: a smoke run (nothing saved)
"""

from __future__ import annotations

import argparse
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

PER_GPU_BATCH = 256  # images a GPU generates at once (the bf16 KV cache of 256 x (128 + 576) tokens: ~71 GB)


def pool_config(work: Path, folder: Path, prompts: int, evals: int, gpus: int, actors_per_gpu: int, tiny: bool) -> Path:
    """collect_gpu.py's config, with G x A actors sharing the GPUs and a per-actor batch of 256 / A."""
    import yaml

    from collect_gpu import write_config

    path = write_config(work, folder, prompts, evals, tiny)
    config = yaml.safe_load(path.read_text())
    batch = max(1, PER_GPU_BATCH // actors_per_gpu)
    config["generation"].update(batch_size=batch, prompts_per_shard=2 * batch)  # two batches a shard
    config["model"]["engine"]["max_batch"] = batch
    config["resources"].update(num_workers=gpus * actors_per_gpu, gpus_per_worker=0 if tiny else 0.5 / actors_per_gpu,
                               cpus_per_worker=1 if tiny else 2)
    config["trainer"] = {"num_workers": gpus, "gpus_per_worker": 0 if tiny else 0.5}
    path.write_text(yaml.safe_dump(config))
    return path


def child(args: list[str], timeout: float) -> dict:
    """Run one part in its own process (each has the GPUs to itself); its RESULT line, or the error."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished within {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}"}
    return json.loads(lines[-1].removeprefix("RESULT "))


def train_forced_pairs(config_path: Path, gpus: int) -> dict:
    """The trainer's fit on the pool run's iteration-1 images, pairs forced (see the module docstring),
    written as iteration 99 of the same run folder; G workers, one GPU each (the collectors are gone)."""
    import ray

    from safecb.config import load_config
    from safecb.schemas import GENERATION_SCHEMA, PAIR_SCHEMA, CodebookArtifact, table_from_rows
    from safecb.stages import _pair
    from safecb.storage import RunStore
    from safecb.training.trainer import train_codebook

    shipped = load_config(ROOT / "configs" / "janus-pro-1b.yaml")
    config = load_config(config_path)
    config = config.model_copy(update={"finetune": shipped.finetune, "trainer": config.trainer.model_copy(
        update={"num_workers": gpus, "gpus_per_worker": 1.0 if config.model.device == "cuda" else 0.0})})
    store = RunStore(config.storage.run_dir)
    forced = 99
    generations, pairs = [], []
    for record in store.read_manifest(1).shards["generations"]:
        rows = store.read_shard(record, GENERATION_SCHEMA).to_pylist()
        harmful = {r["prompt_id"]: r for r in rows if r["role"] == "collect"}
        for r in rows:
            r["iteration"] = forced
            if r["role"] == "counterpart":  # the forced label: safe
                r.update(unsafe=False, max_unsafe_prob=0.0, unsafe_probs=[0.0] * len(r["unsafe_probs"]))
        pair_rows = [_pair(harmful[r["prompt_id"]], r, "rewrite") for r in rows if r["role"] == "counterpart"]
        table = table_from_rows(GENERATION_SCHEMA, rows)
        generations.append(store.write_shard(forced, "generations", record.index, table))
        pairs.append(store.write_shard(forced, "pairs", record.index, table_from_rows(PAIR_SCHEMA, pair_rows)))
    template = CodebookArtifact(version=forced, parent_version=0, iteration=forced, created_at="bench",
                                config_hash=config.config_hash())
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    started = time.perf_counter() - start
    start = time.perf_counter()
    train_codebook(config, store, forced, generations, pairs, template)
    seconds = time.perf_counter() - start
    ray.shutdown()
    report = store.read_codebook(forced)[1].params
    return {"train_s": round(seconds, 2), "ray_init_s": round(started, 2), "pairs": report.get("pairs"),
            "finetune_steps": report.get("finetune_steps"), "space_rank": report.get("space_rank"),
            "trainer_workers": report.get("trainer_workers")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,2,4,8", help="GPU counts to measure (those this machine lacks: null)")
    parser.add_argument("--actors-per-gpu", default="1,2")
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=420, help="seconds for one part")
    parser.add_argument("--tiny", action="store_true", help="toy shapes on the CPU: a smoke run of this script")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling-h200.json"))
    parser.add_argument("--part", choices=["train"], help=argparse.SUPPRESS)  # one child process
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part == "train":
        print("RESULT " + json.dumps(train_forced_pairs(Path(args.config), args.workers)), flush=True)
        return 0

    import torch

    from collect_gpu import build_folder

    have = 0 if args.tiny else torch.cuda.device_count()
    counts = [int(g) for g in args.gpus.split(",")]
    per_gpu = [int(a) for a in args.actors_per_gpu.split(",")]
    work = Path(tempfile.mkdtemp(prefix="safecb-scaling-"))
    start = time.perf_counter()
    build_folder(work / "model", args.tiny)
    print(f"built the 1B-shaped folder in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    device = "CPU (toy shapes)" if args.tiny else f"{have} x {torch.cuda.get_device_name(0)}"
    result = {"device": device, "date": time.strftime("%Y-%m-%d"),
              "settings": {"prompts": args.prompts, "eval_images": args.eval, "shapes": "Janus-Pro-1B, random weights",
                           "engine": "bf16 KV cache, batch-invariant", "per_gpu_batch": PER_GPU_BATCH,
                           "unsafe_fraction": "1 (judge.threshold 0)", "finetune": "configs/janus-pro-1b.yaml"},
              "runs": [], "collect_img_per_s": {}, "train_s": {}, "iteration_s": {}, "not_measured": {}}
    for gpus in counts:
        if gpus > max(have, 1 if args.tiny else 0):
            reason = f"this machine has {have} GPU(s); the lent kinds with {gpus} GPUs were withheld this session"
            result["not_measured"][str(gpus)] = reason
            for key in ("collect_img_per_s", "train_s", "iteration_s"):
                result[key][str(gpus)] = None
            continue
        for actors in per_gpu:
            run_work = work / f"g{gpus}-a{actors}"
            run_work.mkdir()
            config = pool_config(run_work, work / "model", args.prompts, args.eval, gpus, actors, args.tiny)
            pool = child([str(ROOT / "benchmarks" / "collect_gpu.py"), "--part", "pool", "--config", str(config)],
                         args.timeout)
            entry = {"gpus": gpus, "actors_per_gpu": actors, "actors": gpus * actors, "pool": pool}
            if "error" not in pool:
                entry.update(collect_img_per_s=round(2 * args.prompts / pool["collect_s"], 2),
                             collect_prompts_per_s=round(args.prompts / pool["collect_s"], 2),
                             eval_judge_img_per_s=round(args.eval / pool["judge_s"], 1),
                             eval_generate_judge_img_per_s=round(args.eval / pool["e2e_s"], 2),
                             broadcast_s=pool["broadcast_s"], unsafe_fraction=pool["unsafe_fraction"])
            if "error" not in pool and actors == per_gpu[0]:
                result["collect_img_per_s"][str(gpus)] = entry["collect_img_per_s"]
            result["runs"].append(entry)
            print(json.dumps(entry), flush=True)
            if not args.tiny:
                Path(args.out).write_text(json.dumps(result, indent=2) + "\n")  # a cut-short run keeps what it has
        # The trainer last (the pools' numbers are kept if it runs out of time), on the first pool's images.
        entry = next(r for r in result["runs"] if r["gpus"] == gpus and r["actors_per_gpu"] == per_gpu[0])
        pool = entry["pool"]
        config = work / f"g{gpus}-a{per_gpu[0]}" / "config.yaml"
        train = child([__file__, "--part", "train", "--config", str(config), "--workers", str(gpus)],
                      args.timeout) if "error" not in pool else {"error": "no pool run to train on"}
        entry["train"] = train
        result["train_s"][str(gpus)] = train.get("train_s")
        if "error" not in pool and "error" not in train:
            # One iteration for the fixed prompt count: its measured stages, with the update measured
            # on forced pairs (the run's own update had no pair to fit).
            entry["iteration_s"] = round(pool["collect_s"] + train["train_s"] + pool["broadcast_s"] + pool["judge_s"], 2)
            result["iteration_s"][str(gpus)] = entry["iteration_s"]
        print(json.dumps({"gpus": gpus, "train": train}), flush=True)
        if not args.tiny:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    def efficiency(table: dict, n: int, faster_is_larger: bool) -> float | None:
        one, many = table.get("1"), table.get(str(n))
        if one is None or many is None:
            return None
        return round(many / (n * one), 3) if faster_is_larger else round(one / many, 3)

    result["scaling_efficiency_4gpu"] = efficiency(result["collect_img_per_s"], 4, True)
    # Training: G workers read 1/G of the shards each but pay the same fit; efficiency = time with 1 / time with 4.
    result["scaling_efficiency_4gpu_train"] = efficiency(result["train_s"], 4, False)
    if result["scaling_efficiency_4gpu"] is None:
        result["scaling_efficiency_4gpu_note"] = "not measured: no 4-GPU machine was lent (see not_measured)"
    first = next((r for r in result["runs"] if r.get("iteration_s")), None)
    if first:
        # Extrapolated, not measured: collection grows with the prompts; eval (fixed prompts), the
        # broadcast and the update's fit do not (the update streams its shards: measured only here).
        collect_100k = 100_000 / args.prompts * first["pool"]["collect_s"]
        rest = first["train"]["train_s"] + first["broadcast_s"] + first["pool"]["judge_s"]
        result["non_collection_share_100k_extrapolated"] = round(rest / (collect_100k + rest), 4)
    if not args.tiny:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'GPUs':>4} {'actors/GPU':>10} {'collect img/s':>14} {'judge img/s':>12} {'broadcast s':>12} "
          f"{'train s':>8} {'iteration s':>12}")
    for r in result["runs"]:
        print(f"{r['gpus']:>4} {r['actors_per_gpu']:>10} {r.get('collect_img_per_s', float('nan')):>14.2f} "
              f"{r.get('eval_judge_img_per_s', float('nan')):>12.1f} {r.get('broadcast_s') or float('nan'):>12.3f} "
              f"{(r.get('train') or {}).get('train_s') or float('nan'):>8.1f} "
              f"{r.get('iteration_s') or float('nan'):>12.1f}")
    for gpus, reason in result["not_measured"].items():
        print(f"{gpus:>4} GPUs: not measured ({reason})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
