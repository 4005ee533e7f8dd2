"""The `safecb` command (typer). Every failure a user can cause ends in one line on stderr and exit 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="safecb: make an autoregressive image generator safer by repairing its VQ codebook "
                       "(Safe-CB), with the model judging its own images — no human labels.")
console = Console(stderr=True)

def _expected_errors() -> tuple[type[BaseException], ...]:
    from safecb.config import ConfigError
    from safecb.controller import RunError
    from safecb.models.base import ModelLoadError
    from safecb.prompts import PromptError
    from safecb.storage import StorageError

    errors = [ConfigError, PromptError, ModelLoadError, StorageError, RunError]
    from safecb.images import ImagesError
    from safecb.judges import JudgeLoadError
    from safecb.report import ReportError

    errors += [ImagesError, JudgeLoadError, ReportError]
    try:  # the Ray side's one-line errors (ray may be missing in a bare install of the CLI)
        from safecb.actors.pool import PoolError
        from safecb.cluster.ray_connect import ClusterError
        from safecb.training.trainer import TrainerError

        errors += [PoolError, ClusterError, TrainerError]
    except ImportError:
        pass
    return tuple(errors)


def fail(err: BaseException | str) -> NoReturn:
    """How every expected error leaves the CLI (the world's commands too): one line on stderr, exit 2."""
    message = " ".join(str(err).split())  # one line, always
    typer.echo(f"safecb: error: {message}", err=True)
    raise typer.Exit(2)


def _load(config: Path, run_dir: Optional[str]):
    from safecb.config import load_config

    overrides = {"storage.run_dir": run_dir} if run_dir else None
    return load_config(config, overrides)


@app.command()
def run(
    config: Path = typer.Option(..., "--config", "-c", help="Run config (YAML); configs/tiny.yaml is the embedded default."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Where the run lives: a folder or any fsspec URL "
                                          "(s3://bucket/prefix). Overrides storage.run_dir."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir after its last manifest "
                                "(`--resume auto`, for jobs that may be retried: continue it if the folder holds "
                                "a run, else start it)."),
    until: Optional[int] = typer.Option(None, "--until", min=0, help="Stop after this iteration (resumable later)."),
    resume_mode: Optional[str] = typer.Argument(None, hidden=True, metavar="[auto]"),
) -> None:
    """Run the Safe-CB loop: collect → pair → harmful space → project → fine-tune → evaluate, until the
    unsafe rate stops falling. Writes iter=NNNN/MANIFEST.json, codebooks/vNNNN.safetensors and
    metrics.jsonl under the run folder."""
    try:
        # `--resume auto` is the flag plus this word (typer options take no optional values). Both
        # continue a run that exists and start one that does not: the controller rebuilds the state
        # from the last valid manifest, so a retried job neither restarts nor refuses.
        if resume_mode is not None and (resume_mode != "auto" or not resume):
            fail(f"unexpected argument {resume_mode!r} (the only one is 'auto', after --resume: --resume auto)")
        cfg = _load(config, run_dir)
        from safecb.controller import run as run_loop

        run_loop(cfg, resume=resume, until=until, console=console)
    except _expected_errors() as err:
        fail(err)


@app.command("eval")
def evaluate(
    config: Path = typer.Option(..., "--config", "-c", help="The run's config (YAML)."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="The run folder or URL (overrides storage.run_dir)."),
    version: Optional[int] = typer.Option(None, "--version", min=0, help="Codebook version (default: the run's final choice, else the latest)."),
) -> None:
    """Evaluate one codebook version of a run on the config's fixed eval prompts and print one JSON
    object (self-judged unsafe rate; with the world model also the external judge and fidelity)."""
    try:
        cfg = _load(config, run_dir)
        from safecb.controller import Controller

        controller = Controller(cfg, console)
        if version is None:
            store = controller.store
            if store.exists("final.json"):
                version = json.loads(store.read_text("final.json"))["chosen_version"]
            else:
                version = (store.codebook_versions() or [0])[-1]
        typer.echo(json.dumps(controller.evaluate_version(version)))
    except _expected_errors() as err:
        fail(err)


def _storage_options(text: Optional[str]) -> dict:
    """--storage-options: a JSON object for fsspec (endpoint_url, region ...); credentials are refused
    here as in the config (they come from the environment)."""
    if not text:
        return {}
    from pydantic import ValidationError

    from safecb.config import ConfigError, StorageConfig

    try:
        options = json.loads(text)
        return StorageConfig(options=options).options
    except (json.JSONDecodeError, ValidationError) as err:
        reason = "not a JSON object" if isinstance(err, json.JSONDecodeError) else err.errors()[0]["msg"]
        raise ConfigError(f"--storage-options: {reason.removeprefix('Value error, ')}") from None


STORAGE_OPTIONS_HELP = "fsspec options as JSON, e.g. '{\"client_kwargs\": {\"endpoint_url\": \"http://host:9000\"}}'."


@app.command()
def report(
    run_dir: str = typer.Argument(..., help="The run folder or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics rows as JSON lines instead of a table."),
    as_html: bool = typer.Option(False, "--html", help="Write report/index.html (plots, image grids, audit, codebook "
                                 "diagnostics) and its PNGs into the run folder, and print its location."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help=STORAGE_OPTIONS_HELP),
) -> None:
    """Show a run's iterations (metrics.jsonl, one row per iteration) and its final decision."""
    try:
        from safecb.report.html import ReportError, read_final
        from safecb.storage import RunStore

        store = RunStore(run_dir, _storage_options(storage_options))
        store.check_reachable()
        rows = store.read_metrics()
        if not rows:
            raise ReportError(f"{store.url}: no metrics.jsonl rows (is this a safecb run folder?)")
        if as_html:
            from safecb.report import build_report

            typer.echo(build_report(store))
            return
        if as_json:
            for row in rows:
                typer.echo(json.dumps(row))
            return
        from safecb.controller import print_metrics_table

        print_metrics_table(rows, store.url, Console())
        final = read_final(store)
        if final is not None:
            Console().print(f"final: codebook v{final['chosen_version']:04d} ({final.get('by')}={final.get('value')}); "
                            f"{final.get('stop_reason')}")
    except _expected_errors() as err:
        fail(err)


@app.command()
def images(
    run_dir: str = typer.Argument(..., help="The run folder or URL."),
    out: str = typer.Option(..., "--out", "-o", help="The grid PNG to write (a path or fsspec URL)."),
    version: Optional[list[int]] = typer.Option(None, "--version", min=0, help="Codebook version(s) to decode with, "
                                                "beside v0 (repeatable; default: the run's final choice, else its latest)."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Comma-separated eval prompt ids (default: "
                                          "--per-split unsafe prompts, one category after another, and as many benign)."),
    per_split: int = typer.Option(4, "--per-split", min=1, help="Prompts of each split when --prompts is not given."),
    storage_options: Optional[str] = typer.Option(None, "--storage-options", help=STORAGE_OPTIONS_HELP),
) -> None:
    """Decode a run's stored eval tokens with codebook versions and write a labelled grid: the same
    prompts and seeds in every column, unsafe and benign prompts side by side."""
    try:
        from safecb.images import make_grid, write_png
        from safecb.storage import RunStore

        options = _storage_options(storage_options)
        store = RunStore(run_dir, options)
        store.check_reachable()
        versions = sorted({0, *version}) if version else None
        ids = [p.strip() for p in prompts.split(",") if p.strip()] if prompts else None
        grid = make_grid(store, versions, ids, per_split)
        write_png(grid, out, options)
        typer.echo(out)
    except _expected_errors() as err:
        fail(err)


@app.command()
def sweep(
    config: Path = typer.Option(..., "--config", "-c", help="The base run config (YAML)."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="YAML mapping of dotted config keys to lists of values."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A built-in sweep instead of --grid: 'ablations'."),
    seeds: int = typer.Option(1, "--seeds", min=1, help="Repeats of every grid point (seeds 0..N-1)."),
    max_concurrent: int = typer.Option(1, "--max-concurrent", min=1, help="Trials running at once."),
    out: str = typer.Option("runs/sweep", "--out", help="The sweep folder or URL; trial t runs in OUT/trials/t."),
    world: list[str] = typer.Option([], "--world", help="With the world model: run every trial on each of these "
                                    "world models ('shipped' or a `safecb world train --out` folder; repeat it)."),
) -> None:
    """Run a sweep on Ray Tune: every trial a full run, resumable (run the same command again), then
    results.parquet, results.md, results.json and pareto.svg (safety against quality) in the sweep folder."""
    try:
        from safecb.cluster.sweep import (PRESETS, SweepError, grid_variants, load_grid, make_trials, results_markdown,
                                          run_sweep, world_models)

        if (grid is None) == (preset is None):
            raise SweepError("give exactly one of --grid FILE or --preset NAME")
        if preset is not None and preset not in PRESETS:
            raise SweepError(f"--preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        variants = PRESETS[preset] if preset else grid_variants(load_grid(grid))
        cfg = _load(config, None)
        if world and cfg.model.backend != "world":
            raise SweepError(f"--world: the config's model.backend is {cfg.model.backend!r}; world models need 'world'")
        rows = run_sweep(cfg, make_trials(variants, seeds, world_models(world) if world else None), out,
                         max_concurrent, console)
        typer.echo(results_markdown(rows))
    except (*_expected_errors(), SweepError) as err:
        fail(err)


# ---- a run as a job on any Ray cluster (safecb/cluster/submit.py) ------------------------------
_ADDRESS_HELP = "The cluster's Ray job server (its dashboard), e.g. http://HEAD:8265."
# One definition each, shared by the job commands (typer reads them as metadata, never mutates them).
_ADDRESS = typer.Option(..., "--address", envvar="RAY_API_SERVER_ADDRESS", help=_ADDRESS_HELP)
_JOB_ID = typer.Argument(..., help="The job id `safecb submit` printed.")


def _job_errors() -> tuple[type[BaseException], ...]:
    from safecb.cluster.submit import SubmitError

    return (*_expected_errors(), SubmitError)


@app.command()
def submit(
    config: Path = typer.Option(..., "--config", "-c", help="Run config (YAML): validated here, shipped with the job."),
    run_dir: Optional[str] = typer.Option(None, "--run-dir", help="Where the run lives, as the cluster sees it "
                                          "(s3://bucket/prefix on a multi-node cluster). Overrides storage.run_dir."),
    address: str = _ADDRESS,
    wait: bool = typer.Option(False, "--wait", help="Wait for the job to end; exit 2 with its error if it fails."),
) -> None:
    """Submit a run as a Ray job (`safecb run --resume auto` on the cluster) and print its job id. The id
    comes from the run, so submitting the same run again joins its job instead of starting a copy."""
    try:
        from safecb.cluster import submit as jobs

        done = jobs.submit(_load(config, run_dir), address)
        typer.echo(f"{done.action} job {done.job_id} ({done.status}); follow it with: "
                   f"safecb logs {done.job_id} --follow --address ...", err=True)
        typer.echo(done.job_id)
        if wait:
            jobs.wait(address, done.job_id, on_change=lambda state: typer.echo(f"job {done.job_id}: {state}", err=True))
    except _job_errors() as err:
        fail(err)


@app.command()
def status(
    job_id: str = _JOB_ID,
    address: str = _ADDRESS,
) -> None:
    """Print a job's status (PENDING, RUNNING, SUCCEEDED, STOPPED); a FAILED job is an error (exit 2)."""
    try:
        from safecb.cluster import submit as jobs

        client = jobs.connect(address)
        info = jobs.job_info(client, job_id, address)
        state = jobs.state_of(info)
        if state == "FAILED":
            fail(jobs.failure_line(client, job_id, state, info.message))
        typer.echo(f"{job_id} {state}")
    except _job_errors() as err:
        fail(err)


@app.command()
def logs(
    job_id: str = _JOB_ID,
    address: str = _ADDRESS,
    follow: bool = typer.Option(False, "--follow", "-f", help="Stream the logs until the job ends."),
) -> None:
    """Print a job's driver logs; exit 2 with the job's error if it failed."""
    try:
        from safecb.cluster import submit as jobs

        jobs.logs(address, job_id, follow, write=lambda text: typer.echo(text, nl=False))
    except _job_errors() as err:
        fail(err)


@app.command()
def stop(
    job_id: str = _JOB_ID,
    address: str = _ADDRESS,
) -> None:
    """Stop a job. The run folder keeps every finished shard: submit the run again to resume it."""
    try:
        from safecb.cluster import submit as jobs

        stopping = jobs.stop(address, job_id)
        typer.echo(f"{job_id} {'stopping' if stopping else 'had already ended'}")
    except _job_errors() as err:
        fail(err)


def _mount_world() -> None:
    try:
        from safecb.world.cli import app as world_app
    except ImportError:  # the world package is optional at import time of the CLI
        return
    app.add_typer(world_app, name="world", help="The synthetic safety world: train its model, evaluate it.")


_mount_world()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
