"""The codebook trainer (Ray Train + DeepSpeed) on one GPU, against the same update on the CPU.

    PYTHONPATH=. python benchmarks/train_gpu.py [--out benchmarks/results/train-h200.json]
    # the comparison alone, on a run folder made anywhere (e.g. on a CPU machine):
    safecb run --config configs/tiny.yaml --run-dir runs/world-cpu --until 1
    PYTHONPATH=. python benchmarks/train_gpu.py --parts compare --run-dir runs/world-cpu
    # or in two halves: the GPU rebuild on the GPU machine (its fit took 58 s on an H200), the CPU one
    # anywhere, against the codebook the first half wrote
    PYTHONPATH=. python benchmarks/train_gpu.py --parts compare --run-dir runs/world-cpu \
        --only gpu_bf16 --codebooks-out cb
    PYTHONPATH=. python benchmarks/train_gpu.py --parts compare --run-dir runs/world-cpu \
        --only cpu_fp32 --compare-with cb/gpu_bf16.safetensors

1. The embedded default (`configs/tiny.yaml`, the world model) for two iterations on the GPU, with
   `finetune.backend: deepspeed`: one collector and one trainer worker sharing the GPU (0.5 each).
2. The update of that run's iteration 1 rebuilt from the same committed shards twice — on the GPU
   in bfloat16 and on the CPU in float32 — and the codebooks compared (`codebook_max_abs_diff`).
   `pairs_per_s`: pairs of the iteration ÷ the trainer's wall time on the GPU (1 worker, fit included).
   With `--run-dir`, the shards of that finished run folder instead of part 1's (no loop runs here);
   both rebuilds share one local Ray, and the CPU rebuild is also held against the run's own v1.
3. `configs/janus-pro-1b.yaml`, two iterations, on a Janus-Pro-1B-shaped folder with random weights
   built in code (small prompt files written here; every stage's seconds recorded).
Results are written after each part, so a cut-short run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def save(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def world_on_gpu(work: Path) -> tuple[dict, Path]:
    from safecb.config import load_config
    from safecb.controller import run

    run_dir = work / "world"
    config = load_config(ROOT / "configs" / "tiny.yaml", {
        "storage.run_dir": str(run_dir), "model.device": "cuda", "model.dtype": "bfloat16", "stop.max_iters": 2, "stop.patience": 5,
        "stop.min_improvement": 0.0, "finetune.backend": "deepspeed", "resources.gpus_per_worker": 0.5,
        "trainer.gpus_per_worker": 0.5})
    start = time.perf_counter()
    metrics = run(config)
    keys = ("iteration", "pairs", "unsafe_rate_self", "unsafe_rate_external", "unsafe_rate_external_separable",
            "unsafe_rate_external_entangled", "fidelity", "space_rank", "finetune_steps", "seconds", "stage_seconds")
    return {"world_gpu_wall_s": round(time.perf_counter() - start, 1),
            "world_gpu_metrics": [{k: m.get(k) for k in keys} for m in metrics]}, run_dir


REBUILDS = {"gpu_bf16": {"device": "cuda", "dtype": "bfloat16", "gpus": 1.0},
            "cpu_fp32": {"device": "cpu", "dtype": "float32", "gpus": 0.0}}


def gpu_vs_cpu(run_dir: Path, work: Path, only: list[str] | None = None, codebooks_out: Path | None = None,
               compare_with: Path | None = None) -> dict:
    """Rebuild v1 from the run's iteration-1 shards on the GPU (bf16) and on the CPU (fp32).

    `only`: one of the two (the other side's codebook from `compare_with`, a file `codebooks_out` wrote
    on another machine): the GPU half on a GPU machine, the CPU half anywhere.
    """
    import ray
    import yaml

    from safecb.cluster.ray_connect import ray_session
    from safecb.config import parse_config
    from safecb.schemas import CodebookArtifact
    from safecb.storage import RunStore
    from safecb.training.trainer import train_codebook

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    out, codebooks = {"compare_source": "a finished run folder" if run_dir.parent != work else "part 1's run"}, {}
    own = run_dir / "codebooks" / "v0001.safetensors"
    if own.exists():
        from safetensors.torch import load_file

        codebooks["run_v1"] = load_file(own)["codebook"]
    # One local Ray for both rebuilds (ray_session uses a running Ray as it is): one start, not two.
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    if compare_with is not None:
        from safetensors.torch import load_file

        codebooks[compare_with.stem] = load_file(compare_with)["codebook"]  # named as --codebooks-out names it
    for name in only or list(REBUILDS):
        overrides = REBUILDS[name]
        copy = work / f"rebuild-{name}"
        shutil.copytree(run_dir, copy)
        for leftover in ("codebooks/v0001.safetensors", "codebooks/v0001.json"):
            (copy / leftover).unlink(missing_ok=True)
        shutil.rmtree(copy / "trainer", ignore_errors=True)  # else Ray Train restores the finished fit
        data = {**saved, "storage": {"run_dir": str(copy), "options": {}}}
        data["model"] = {**data["model"], "device": overrides["device"], "dtype": overrides["dtype"]}
        data["trainer"] = {**data.get("trainer", {}), "gpus_per_worker": overrides["gpus"], "num_workers": 1}
        config = parse_config(data)
        store = RunStore(str(copy))
        # A finished iteration's manifest; else the shards committed so far (a run cut short still compares).
        shards = store.read_manifest(1).shards if store.has_manifest(1) else {
            kind: [record for _, record in sorted(store.committed_shards(1, kind).items())]
            for kind in ("generations", "pairs")}
        out["compare_shards"] = len(shards["pairs"])
        template = CodebookArtifact(version=1, parent_version=0, iteration=1, created_at="bench",
                                    config_hash=config.config_hash())
        with ray_session(config):
            start = time.perf_counter()
            train_codebook(config, store, 1, shards["generations"], shards["pairs"], template)
            seconds = time.perf_counter() - start
        print(f"rebuild {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
        tensors, artifact = store.read_codebook(1)
        codebooks[name] = tensors["codebook"]
        if codebooks_out is not None:  # kept for a comparison made elsewhere (see --only)
            from safetensors.torch import save_file

            codebooks_out.mkdir(parents=True, exist_ok=True)
            save_file({"codebook": codebooks[name].contiguous()}, str(codebooks_out / f"{name}.safetensors"))
        out[f"train_s_{name}"] = round(seconds, 2)
        out[f"report_{name}"] = {k: artifact.params.get(k) for k in ("pairs", "space_rank", "harmful_codes",
                                                                      "finetune_steps", "finetune_stopped_early")}
    ray.shutdown()
    if "run_v1" in codebooks and "cpu_fp32" in codebooks:  # the same fp32 update on another CPU: rounding only
        out["cpu_rebuild_vs_run_v1_max_abs_diff"] = float((codebooks["cpu_fp32"] - codebooks["run_v1"]).abs().max())
    if "gpu_bf16" in codebooks and "cpu_fp32" in codebooks:
        out.update(codebook_agreement(run_dir, codebooks["gpu_bf16"], codebooks["cpu_fp32"]))
    if "train_s_gpu_bf16" in out:
        out["pairs_per_s"] = round((out["report_gpu_bf16"]["pairs"] or 0) / out["train_s_gpu_bf16"], 2)
    return out


def codebook_agreement(run_dir: Path, gpu: "torch.Tensor", cpu: "torch.Tensor") -> dict:
    """How far the GPU (bf16) codebook is from the CPU (fp32) one, as codes and as what users see:
    the run's iteration-0 test tokens decoded with each (PSNR between the two images) and, on the
    world model, the external judge's flags on both decodes."""
    import glob

    import pyarrow.parquet as pq
    import torch
    import yaml

    from safecb.config import parse_config
    from safecb.models.registry import load_model

    gpu, cpu = gpu.float(), cpu.float()
    per_code = (gpu - cpu).norm(dim=1)  # (K,)
    out = {"codebook_max_abs_diff": float((gpu - cpu).abs().max()), "codebook_max_abs": float(cpu.abs().max()),
           "codebook_per_code_l2_diff_quantiles": {q: round(float(torch.quantile(per_code, float(q))), 5)
                                                   for q in ("0.5", "0.9", "0.99", "1.0")},
           "codebook_worst_code": int(per_code.argmax())}
    files = sorted(glob.glob(str(run_dir / "iter=0000" / "eval" / "*.parquet")))
    if not files:
        return out
    config = parse_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    model = load_model(config.model.model_copy(update={"device": "cpu", "dtype": "float32"}), config.categories)
    tokens = torch.tensor(pq.read_table(files, columns=["tokens"]).column("tokens").to_pylist())  # (N, T)
    with torch.no_grad():
        on_gpu, on_cpu = model.decode(tokens, gpu), model.decode(tokens, cpu)
    mse = ((on_gpu - on_cpu) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    psnr = 10 * torch.log10(1 / mse)
    out["decoded_psnr_gpu_vs_cpu_db"] = {"images": len(tokens), "mean": round(float(psnr.mean()), 1),
                                         "min": round(float(psnr.min()), 1)}
    if config.model.backend == "world":
        from safecb.world import world_judge_dir
        from safecb.world.judge import ExternalJudge

        judge = ExternalJudge.load(world_judge_dir(config.model.path, config.eval.external_judge_path))
        flags = [(judge.predict(x)["harm"] >= 0.5).any(1) for x in (on_gpu, on_cpu)]
        out["external_flags_differ"] = {"images": len(tokens), "differ": int((flags[0] != flags[1]).sum()),
                                        "unsafe_gpu": int(flags[0].sum()), "unsafe_cpu": int(flags[1].sum())}
    return out


def janus_1b(work: Path) -> dict:
    from collect_gpu import build_folder, prompt_lines

    from safecb.config import load_config
    from safecb.controller import run

    folder = work / "janus-1b"
    start = time.perf_counter()
    build_folder(folder)
    built = time.perf_counter() - start
    files = {}
    for name, count, salt in (("train", 128, 0), ("eval_unsafe", 32, 1), ("eval_benign", 32, 2)):
        files[name] = work / f"{name}.txt"
        files[name].write_text("\n".join(prompt_lines(count, salt)) + "\n")
    config = load_config(ROOT / "configs" / "janus-pro-1b.yaml", {
        "storage.run_dir": str(work / "janus-run"), "model.path": str(folder),
        "prompts.train.path": str(files["train"]), "prompts.eval_unsafe.path": str(files["eval_unsafe"]),
        "prompts.eval_benign.path": str(files["eval_benign"]), "stop.max_iters": 2, "stop.patience": 5,
        "stop.min_improvement": 0.0, "generation.batch_size": 64, "generation.prompts_per_shard": 64})
    start = time.perf_counter()
    metrics = run(config)
    return {"janus_1b_folder_build_s": round(built, 1), "janus_1b_wall_s": round(time.perf_counter() - start, 1),
            "janus_1b_metrics": [{k: m.get(k) for k in ("iteration", "pairs", "collect_unsafe_rate", "unsafe_rate_self",
                                                       "space_rank", "finetune_steps", "seconds", "stage_seconds")}
                                 for m in metrics]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train-h200.json"))
    parser.add_argument("--parts", default="world,compare,janus")
    parser.add_argument("--run-dir", help="compare on this finished run folder (iteration 1 committed) instead of "
                                          "running part 1 first")
    parser.add_argument("--only", choices=list(REBUILDS), help="run one rebuild of the comparison")
    parser.add_argument("--codebooks-out", help="write each rebuild's codebook here (NAME.safetensors)")
    parser.add_argument("--compare-with", help="a codebook --codebooks-out wrote (the other rebuild, made elsewhere)")
    parser.add_argument("--agreement", nargs=2, metavar=("GPU", "CPU"),
                        help="only compare two codebooks --codebooks-out wrote, on --run-dir's test tokens")
    args = parser.parse_args(argv)
    out, result = Path(args.out), {}
    work = Path(tempfile.mkdtemp(prefix="safecb-train-gpu-"))
    parts = args.parts.split(",")
    if args.agreement:
        from safetensors.torch import load_file

        if not args.run_dir:
            parser.error("--agreement needs --run-dir (the run whose update both codebooks rebuilt)")
        result = {k: v for k, v in (json.loads(out.read_text()) if out.exists() else {}).items()}
        gpu, cpu = (load_file(path)["codebook"] for path in args.agreement)
        result.update(codebook_agreement(Path(args.run_dir).resolve(), gpu, cpu))
        save(out, result)
        print(json.dumps({k: v for k, v in result.items() if k.startswith(("codebook", "decoded", "external"))}))
        return 0
    if "compare" in parts and args.run_dir and "world" not in parts:
        # Only the comparison's keys change: the file's other parts (an earlier world run) stay.
        result = {k: v for k, v in (json.loads(out.read_text()) if out.exists() else {}).items()
                  if not k.endswith("_note")}
        result.update(gpu_vs_cpu(Path(args.run_dir).resolve(), work, [args.only] if args.only else None,
                                 Path(args.codebooks_out) if args.codebooks_out else None,
                                 Path(args.compare_with) if args.compare_with else None))
        save(out, result)
        print(json.dumps(result), flush=True)
    elif "world" in parts or "compare" in parts:
        world, run_dir = world_on_gpu(work)
        result.update(world)
        save(out, result)
        print(json.dumps(world), flush=True)
        if "compare" in parts:
            result.update(gpu_vs_cpu(run_dir, work))
            save(out, result)
            print(json.dumps({k: v for k, v in result.items() if not k.startswith("world")}), flush=True)
    if "janus" in parts:
        result.update(janus_1b(work))
        save(out, result)
        print(json.dumps({k: v for k, v in result.items() if k.startswith("janus")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
