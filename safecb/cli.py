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
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --run-dir after its last manifest."),
    until: Optional[int] = typer.Option(None, "--until", min=0, help="Stop after this iteration (resumable later)."),
) -> None:
    """Run the Safe-CB loop: collect → pair → harmful space → project → fine-tune → evaluate, until the
    unsafe rate stops falling. Writes iter=NNNN/MANIFEST.json, codebooks/vNNNN.safetensors and
    metrics.jsonl under the run folder."""
    try:
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


@app.command()
def report(
    run_dir: str = typer.Argument(..., help="The run folder or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics rows as JSON lines instead of a table."),
) -> None:
    """Show a run's iterations (metrics.jsonl, one row per iteration) and its final decision."""
    try:
        from safecb.storage import RunStore

        store = RunStore(run_dir)
        store.check_reachable()
        rows = store.read_metrics()
        if not rows:
            raise _expected_errors()[-1](f"{store.url}: no metrics.jsonl rows (is this a safecb run folder?)")
        if as_json:
            for row in rows:
                typer.echo(json.dumps(row))
            return
        from safecb.controller import print_metrics_table

        print_metrics_table(rows, store.url, Console())
        if store.exists("final.json"):
            final = json.loads(store.read_text("final.json"))
            Console().print(f"final: codebook v{final['chosen_version']:04d} ({final['by']}={final['value']}); "
                            f"{final['stop_reason']}")
    except _expected_errors() as err:
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
