"""`safecb world …`: train the world's weights, evaluate a world model.

Mounted by `safecb.cli` as `safecb world`; also runs alone as `python -m safecb.world.cli`.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from safecb.cli import fail  # defined before safecb.cli mounts this app, so no import cycle bites

app = typer.Typer(help="The synthetic safety world: train its model and external judge, evaluate a model.",
                  no_args_is_help=True, add_completion=False)


def _parse_overrides(items: list[str]):
    """`key=value` pairs for TrainConfig fields (`noise.flip=0.02` for SelfJudgeNoise fields)."""
    from safecb.world.train import SelfJudgeNoise, TrainConfig

    top = {f.name: f for f in fields(TrainConfig)}
    noise = {f.name: f for f in fields(SelfJudgeNoise)}
    plain, nested = {}, {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected key=value")
        target, name = (nested, key[6:]) if key.startswith("noise.") else (plain, key)
        known = noise if target is nested else top
        if name not in known or name == "noise":
            raise ValueError(f"--set {key!r}: unknown setting (known: {', '.join(sorted(set(top) - {'noise'}))}, noise.*)")
        try:
            target[name] = json.loads(raw)
        except json.JSONDecodeError:
            target[name] = raw
    return plain, nested


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Folder to write model/, judge/ and report.json into."),
    seed: int = typer.Option(0, help="Seed of everything: scenes, initial weights, batches."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    steps_scale: float = typer.Option(1.0, "--steps-scale", help="Multiply every step count (e.g. 0.01 for a smoke run)."),
    set_: list[str] = typer.Option([], "--set", help="Override a TrainConfig field, e.g. --set lm_steps=6000."),
    ship: bool = typer.Option(False, help="Also copy the result into the package (safecb/world/weights/)."),
    evaluate: bool = typer.Option(True, help="Run the quick evaluation at the end (report.json)."),
    init_from: Optional[Path] = typer.Option(None, "--init-from", help="Start from an earlier --out folder; only "
                                                                         "--stages train, the rest is copied."),
    stages: str = typer.Option("vq,judge,lm", help="With --init-from: which of judge,lm to (re)train."),
    threads: int = typer.Option(0, help="CPU threads while training (0: torch's default). CPU reductions "
                                        "split by thread count: rebuild with the count report.json records."),
) -> None:
    """Rebuild every weight of the world reproducibly from a seed (VQ-VAE, tiny Janus, external judge)."""
    from safecb.models.base import ModelLoadError
    from safecb.world.train import SelfJudgeNoise, TrainConfig, train_world

    if device not in ("auto", "cpu", "cuda"):
        fail(f"--device {device!r}: expected auto, cpu or cuda")
    if threads < 0:
        fail(f"--threads {threads}: expected 0 (torch's default) or a positive count")
    try:
        plain, nested = _parse_overrides(set_)
        base = TrainConfig(seed=seed, **plain)
        if nested:
            base.noise = SelfJudgeNoise(**{**base.noise.__dict__, **nested})
        cfg = base.scaled(steps_scale) if steps_scale != 1.0 else base
        report = train_world(out, cfg, device=device, evaluate=evaluate, init_from=init_from,
                             stages=tuple(x.strip() for x in stages.split(",") if x.strip()), threads=threads or None)
    except (ValueError, TypeError, FileNotFoundError, ModelLoadError) as err:
        fail(err)
    if ship:
        from safecb.world import WEIGHTS_DIR

        for part in ("model", "judge"):
            shutil.rmtree(WEIGHTS_DIR / part, ignore_errors=True)
            shutil.copytree(Path(out) / part, WEIGHTS_DIR / part)
        shutil.copy(Path(out) / "encoder.safetensors", WEIGHTS_DIR / "encoder.safetensors")
        shutil.copy(Path(out) / "report.json", WEIGHTS_DIR / "train_report.json")
    summary = {k: report["eval"][k] for k in ("unsafe_rate_explicit", "unsafe_rate_implicit", "unsafe_rate_benign",
                                               "fidelity", "kappa", "fid")} if "eval" in report else {}
    typer.echo(json.dumps({"out": str(out), "timings_s": report["timings_s"], **summary,
                           "weights_sha256": report["weights_sha256"]}))


@app.command("eval")
def eval_(
    model: list[Path] = typer.Option([], "--model", help="A model folder, or a `world train --out` folder (default: "
                                                          "the shipped world model). Repeat it for several world "
                                                          "models: each is evaluated, then the mean and 95% interval "
                                                          "over them."),
    judge: Optional[Path] = typer.Option(None, "--judge", help="External-judge folder (default: the shipped one, "
                                                                "or judge/ beside the model)."),
    samples: int = typer.Option(2, help="Images per eval prompt."),
    seed: int = typer.Option(0),
    device: str = typer.Option("cpu", help="auto | cpu | cuda"),
    dtype: str = typer.Option("float32", help="Weights: float32 | bfloat16 | float16."),
    engine: str = typer.Option("off", help="The fast GPU engine (safecb.models.engine): auto | on | off."),
    kv_dtype: str = typer.Option("bf16", "--kv-dtype", help="The engine's KV cache: bf16 | fp8."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    separation: bool = typer.Option(False, "--separation", help="Measure code separation per harm instead "
                                                                 "(no generation): which harms own codes."),
    renders: int = typer.Option(300, help="With --separation: strong renders per harm (twice as many benign)."),
) -> None:
    """Evaluate a world model: unsafe rates (external and self), fidelity, κ, FID, per category;
    with --separation, whether each harm owns codes (separable) or shares benign ones (entangled)."""
    models: list[Optional[Path]] = list(model) or [None]
    if separation:
        _separation(models, renders, as_json)
        return
    from rich.console import Console
    from rich.progress import Progress

    from safecb.models.base import ModelLoadError
    from safecb.models.engine import KV_DTYPES
    from safecb.models.janus import pick_device
    from safecb.world.evaluate import evaluate_world
    from safecb.world.prompts import builtin_prompts

    if dtype not in ("float32", "bfloat16", "float16"):
        fail(f"--dtype {dtype!r}: expected float32, bfloat16 or float16")
    if engine not in ("auto", "on", "off"):
        fail(f"--engine {engine!r}: expected auto, on or off")
    if kv_dtype not in KV_DTYPES:
        fail(f"--kv-dtype {kv_dtype!r}: expected one of {', '.join(KV_DTYPES)}")

    total = samples * (len(builtin_prompts("world:eval_unsafe")) + len(builtin_prompts("world:eval_benign")))
    console = Console(stderr=True)
    results = []
    try:
        pick_device(device, key="--device")
        with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
            for folder in models:
                task = progress.add_task(f"generate + judge {folder or 'shipped'}", total=total)
                results.append(evaluate_world(folder, judge, device=device, samples_per_prompt=samples, seed=seed,
                                              dtype=dtype, engine=engine, kv_dtype=kv_dtype,
                                              progress=lambda n, task=task: progress.advance(task, n)))
    except (ValueError, FileNotFoundError, ModelLoadError) as err:
        fail(err)
    if len(results) > 1:
        _show_across(results, as_json)
        return
    result = results[0]
    if as_json:
        typer.echo(json.dumps(result))
        return
    console = Console()
    console.print(f"[bold]world eval[/] of {result['model']} ({result['n_images']} images)")
    for key in ("unsafe_rate_explicit", "unsafe_rate_implicit", "unsafe_rate_benign", "unsafe_rate_self",
                "unsafe_rate_self_benign", "fidelity", "kappa", "fid"):
        value = result[key]
        console.print(f"  {key:26s} {value:.3f}" if value is not None else f"  {key:26s} n/a")
    for name, row in result["per_category"].items():
        shown = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        console.print(f"  {name:8s} {shown}")


def _show_across(results: list[dict], as_json: bool) -> None:
    """Several world models: each one's numbers and their mean [95% interval], as JSON or as text
    (the overall numbers, then per category)."""
    from rich.console import Console

    from safecb.stats import interval_text
    from safecb.world.evaluate import across_models

    across = across_models(results)
    if as_json:
        typer.echo(json.dumps({"models": results, "across": across}))
        return
    names = [r["model"] for r in results]
    console = Console(width=160)
    console.print(f"[bold]across {across['models']} world models[/] ({', '.join(names)}): mean [95% interval]")
    for key, entry in across.items():
        if key not in ("models", "per_category") and isinstance(entry, dict):
            console.print(f"  {key:26s} {interval_text(entry, missing='n/a')}")
    for name, row in across["per_category"].items():
        shown = ", ".join(f"{k}={interval_text(v, missing='n/a')}" if isinstance(v, dict) and "mean" in v else f"{k}={v}"
                          for k, v in row.items())
        console.print(f"  {name:8s} {shown}")


def _separation(models: list[Optional[Path]], renders: int, as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from safecb.models.base import ModelLoadError
    from safecb.world.evaluate import evaluate_separation

    try:
        results = [evaluate_separation(folder, n=renders) for folder in models]
    except (ValueError, FileNotFoundError, ModelLoadError) as err:
        fail(err)
    if len(results) > 1:
        _show_across(results, as_json)
        return
    result = results[0]
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"code separation of {result['model']} ({renders} renders a harm)")
    for column in ("harm", "declared", "measured", "rare share", "never share", "enriched codes", "enriched share",
                   "collateral", "probe hist acc/AUC", "probe mean acc/AUC"):
        table.add_column(column)
    for harm, row in result["per_category"].items():
        hist, mean = row["probe_histogram"], row["probe_mean_code"]
        table.add_row(harm, row["kind"], row["measured"], f"{row['rare_share']:.3f}", f"{row['never_share']:.3f}",
                      str(row["enriched_codes"]), f"{row['enriched_share']:.3f}", f"{row['collateral']:.4f}",
                      f"{hist['accuracy']:.2f}/{hist['auc']:.2f}", f"{mean['accuracy']:.2f}/{mean['auc']:.2f}")
    console = Console(width=160)  # ten columns: wider than a pipe's default 80
    console.print(table)
    console.print(f"rule: {result['rule']}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
