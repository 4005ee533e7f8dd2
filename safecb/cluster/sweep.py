"""Sweeps on Ray Tune: every trial a full Safe-CB run under its own prefix of the sweep folder.

A sweep is a list of named trials, each a set of config overrides (a grid's cartesian product, or a
preset's variants) times a number of seeds. Ray Tune schedules them (`max_concurrent`); each trial's
driver is an ordinary `Controller.run` inside a Tune worker, so it starts its own collector pool (one
placement group per trial) and its own Ray Train trainer, and resumes from its manifests. That makes a
sweep resumable without Tune's own state: start the same command again and finished trials are read
back, unfinished ones resume after their last manifest, missing ones start.

The results table holds each trial's *final choice* (made by the self-judge on validation) with its
test numbers beside it: test and external numbers are reported here, never used to pick anything.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from safecb.cluster.ray_connect import ClusterError, ray_session
from safecb.config import ConfigError, RunConfig, parse_config
from safecb.stats import interval_text, mean_interval
from safecb.storage import RunStore


class SweepError(RuntimeError):
    """A sweep cannot start or finish as asked. One line."""


# The ablation preset (issue 12): what each part of Safe-CB contributes, each against "full".
ABLATIONS: dict[str, dict[str, Any]] = {
    "full": {},  # projection + fine-tuning with the harm term, iterated until the validation rate stalls
    "projection_only": {"finetune.enabled": False},
    "finetune_only": {"projection.enabled": False},
    "quality_only_finetune": {"finetune.lambda_harm": 0.0},  # the paper's fine-tuning: keep quality, no harm term
    "one_pass": {"stop.max_iters": 1},
}
PRESETS = {"ablations": ABLATIONS}


@dataclass(frozen=True)
class Trial:
    name: str  # also its folder under {sweep}/trials/
    variant: str
    seed: int
    overrides: dict[str, Any]
    world: str = ""  # with several world models: which one (its name), else empty


def load_grid(path: str | Path) -> dict[str, list]:
    """A grid file: a YAML mapping of dotted config keys to lists of values (their cartesian product)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise SweepError(f"{path}: cannot read the grid file ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML ({' '.join(str(err).split())[:200]})") from None
    if not isinstance(data, dict) or not data:
        raise SweepError(f"{path}: expected a mapping of dotted config keys to lists of values, e.g. 'finetune.lr: [0.02, 0.05]'")
    for key, values in data.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: {key}: expected a non-empty list of values, got {values!r}")
    return data


def grid_variants(grid: dict[str, list]) -> dict[str, dict[str, Any]]:
    """Variant name → overrides for every point of the grid ("finetune.lr=0.02,stop.max_iters=2")."""
    keys = list(grid)
    return {",".join(f"{k}={v}" for k, v in zip(keys, point)): dict(zip(keys, point))
            for point in itertools.product(*(grid[k] for k in keys))}


def make_trials(variants: dict[str, dict[str, Any]], seeds: int, worlds: dict[str, str] | None = None) -> list[Trial]:
    """Each variant × seeds 0..seeds-1 (× each of `worlds`, name → model folder, when given). A seed sets
    both the run seed and the sampling seed, so the repeats draw different collection and evaluation
    images: independent samples of the whole run; world models are independent samples of the world."""
    trials = []
    for variant, overrides in variants.items():
        for world, folder in (worlds or {"": ""}).items():
            for seed in range(seeds):
                # a folder name and a run id: letters, digits, '.', '_', '-' ("finetune.lr=0.02" → "finetune.lr_0.02")
                name = re.sub(r"[^A-Za-z0-9_.-]+", "_", variant)[:100] + f"-seed{seed}"
                extra = {"seed": seed, "generation.seed": seed}
                if world:
                    name += "-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", world)[:60]
                    extra["model.path"] = folder or None  # empty: the shipped world model
                trials.append(Trial(name, variant, seed, {**overrides, **extra}, world))
    return trials


def world_models(folders: list[str]) -> dict[str, str]:
    """Name → folder for `--world` arguments: "shipped" (the packaged model) or `safecb world train
    --out` folders, named by the seed their report.json records ("world-seed1"), else by the folder name."""
    out: dict[str, str] = {}
    for folder in folders:
        if folder == "shipped":
            out["shipped"] = ""
            continue
        path = Path(folder)
        if not path.is_dir():
            raise SweepError(f"--world {folder}: no such folder (expected 'shipped' or a `safecb world train --out` folder)")
        try:
            name = f"world-seed{json.loads((path / 'report.json').read_text())['config']['seed']}"
        except (OSError, ValueError, KeyError, TypeError):
            name = path.name
        if name in out:
            raise SweepError(f"--world {folder}: a second world named {name!r}")
        out[name] = str(path.resolve())
    return out


def trial_config(base: RunConfig, trial: Trial, sweep_dir: str) -> RunConfig:
    """The base config with the trial's overrides, its run folder and run id; a bad override is one line."""
    from safecb.config import _set_dotted

    data = base.model_dump(mode="json")
    data["run_id"] = f"{base.run_id}-{trial.name}"
    data = _set_dotted(data, "storage.run_dir", f"{sweep_dir.rstrip('/')}/trials/{trial.name}")
    for key, value in trial.overrides.items():
        data = _set_dotted(data, key, value, f"trial {trial.name}")
    try:
        return parse_config(data, f"trial {trial.name}")
    except ConfigError as err:
        raise SweepError(str(err)) from None


def _run_trial(params: dict) -> None:
    """The Tune trainable: one whole run (resumed if it has manifests, read back if it has finished)."""
    from ray import tune

    from safecb.controller import Controller

    config = parse_config(params["trial"]["config"], "trial config")
    store = RunStore(config.storage.run_dir, config.storage.options)
    started = time.perf_counter()
    if not store.exists("final.json"):
        Controller(config, Console(stderr=True, quiet=True)).run(resume=True)
    tune.report(trial_summary(store) | {"trial_seconds": round(time.perf_counter() - started, 1)})


def trial_summary(store: RunStore) -> dict:
    """One results row: the final choice (by the self-judge on validation) and its test numbers."""
    rows = store.read_metrics()
    final = json.loads(store.read_text("final.json"))
    chosen = next(m for m in rows if m["codebook_version"] == final["chosen_version"])
    start = rows[0]
    out = {"iterations": rows[-1]["iteration"], "chosen_version": final["chosen_version"],
           "wall_seconds": round(sum(m.get("seconds", 0.0) for m in rows), 1), "stop_reason": final["stop_reason"]}
    for key in ("val_unsafe_rate_self", "val_psnr_vs_v0", "unsafe_rate_self", "unsafe_rate_external",
                "unsafe_rate_external_separable", "unsafe_rate_external_entangled", "fidelity"):
        out[key] = chosen.get(key)
        out[f"start_{key}"] = start.get(key)
        interval = chosen.get("intervals", {}).get(key)
        if interval:
            out[f"{key}_n"] = interval["n"]
            out[f"{key}_ci95"] = interval["ci95"]
    return out


def run_sweep(base: RunConfig, trials: list[Trial], sweep_dir: str, max_concurrent: int = 1,
              console: Console | None = None) -> list[dict]:
    """Run (or resume) every trial on Ray Tune; write results.parquet, results.md and pareto.svg."""
    from ray import tune

    console = console or Console(stderr=True)
    # Tune runs each trial in its own working folder: a relative sweep folder would land there.
    sweep_dir = base.storage.model_copy(update={"run_dir": sweep_dir}).absolute().run_dir
    store = RunStore(sweep_dir, base.storage.options)
    store.check_reachable()
    configs = {t.name: trial_config(base, t, sweep_dir) for t in trials}  # every override checked first
    plan = {"trials": [{"name": t.name, "variant": t.variant, "seed": t.seed, "overrides": t.overrides,
                        **({"world": t.world} if t.world else {})} for t in trials],
            "base_config_hash": base.config_hash()}
    if store.exists("sweep.json"):
        saved = json.loads(store.read_text("sweep.json"))
        if saved != plan:
            raise SweepError(f"{store.url}/sweep.json: this folder holds a different sweep (other trials or base "
                             "config); resume it with the same arguments or choose another folder")
    else:
        store.write_text("sweep.json", json.dumps(plan, indent=2) + "\n")

    total = len(trials)

    class Progress(tune.Callback):  # Tune pickles its callbacks: plain prints, no console object
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            Progress.done += 1
            print(f"trial {Progress.done}/{total} finished: {trial.config['trial']['name']}", file=sys.stderr, flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"trial {trial.config['trial']['name']} failed (its run folder keeps what finished)",
                  file=sys.stderr, flush=True)

    # Tune's own state is scratch: resuming reads the trials' manifests, not it.
    tune_dir = tempfile.mkdtemp(prefix="safecb-tune-")
    # A local Ray sized for `max_concurrent` whole runs at once (a running Ray or cluster.address: as it is).
    per_trial = 1 + base.resources.num_workers * base.resources.cpus_per_worker + \
        base.trainer.num_workers * base.trainer.cpus_per_worker
    try:
        with ray_session(base, num_cpus=int(-(-per_trial * max_concurrent // 1))):
            tuner = tune.Tuner(
                tune.with_resources(_run_trial, {"cpu": 1}),
                param_space={"trial": tune.grid_search([{"name": t.name, "config": configs[t.name].model_dump(mode="json")}
                                                        for t in trials])},
                tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent),
                run_config=tune.RunConfig(name="sweep", storage_path=tune_dir, verbose=0, callbacks=[Progress()],
                                          failure_config=tune.FailureConfig(max_failures=1)),
            )
            console.print(f"sweep: {len(trials)} trial(s), at most {max_concurrent} at once, under {store.url}/trials/")
            grid = tuner.fit()
    except ClusterError as err:
        raise SweepError(str(err)) from None
    failed = [r for r in grid if r.error is not None]
    if failed:
        first = " ".join(str(failed[0].error).split())[:300]
        raise SweepError(f"{len(failed)} of {len(trials)} trial(s) failed; first: {first}")
    by_name = {r.config["trial"]["name"]: r.metrics for r in grid}
    rows = [{"trial": t.name, "variant": t.variant, "seed": t.seed, **({"world": t.world} if t.world else {}),
             **{k: v for k, v in by_name[t.name].items() if k in _SUMMARY_KEYS or k.startswith(_SUMMARY_PREFIXES)}}
            for t in trials]
    write_results(store, rows)
    return rows


_SUMMARY_KEYS = {"iterations", "chosen_version", "wall_seconds", "stop_reason", "trial_seconds"}
_SUMMARY_PREFIXES = ("val_", "unsafe_rate_", "fidelity", "start_")


def aggregate(rows: list[dict]) -> list[dict]:
    """Per variant: the mean and 95% interval over its runs (seeds, world models) of each reported number."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows):
        group = [r for r in rows if r["variant"] == variant]
        entry: dict[str, Any] = {"variant": variant, "runs": len(group)}
        for key in ("unsafe_rate_external", "unsafe_rate_external_separable", "unsafe_rate_external_entangled",
                    "unsafe_rate_self", "val_unsafe_rate_self", "fidelity", "val_psnr_vs_v0", "iterations",
                    "wall_seconds", "start_unsafe_rate_external", "start_fidelity"):
            values = [float(r[key]) for r in group if r.get(key) is not None]
            if values:
                entry[key] = mean_interval(values)
        out.append(entry)
    return out


def results_markdown(rows: list[dict]) -> str:
    """Per-variant means with 95% intervals over runs (seeds, world models), then every trial."""
    columns = [("unsafe_rate_external", "test unsafe (ext)"), ("unsafe_rate_external_separable", "separable"),
               ("unsafe_rate_external_entangled", "entangled"), ("unsafe_rate_self", "test unsafe (self)"),
               ("val_unsafe_rate_self", "val unsafe (self)"), ("fidelity", "fidelity"), ("iterations", "iters"),
               ("wall_seconds", "wall s")]
    present = [(k, h) for k, h in columns if any(r.get(k) is not None for r in rows)]
    lines = ["| variant | runs | " + " | ".join(h for _, h in present) + " |",
             "|---|---|" + "---|" * len(present)]
    for entry in aggregate(rows):
        lines.append(f"| {entry['variant']} | {entry['runs']} | " + " | ".join(interval_text(entry.get(k)) for k, _ in present) + " |")
    lines += ["", "Each trial (the codebook chosen by the self-judge on validation; test numbers with their "
              "95% Wilson interval over the test prompts):", "",
              "| trial | chosen | " + " | ".join(h for _, h in present) + " |", "|---|---|" + "---|" * len(present)]
    for r in rows:
        cells = []
        for key, _ in present:
            value, ci = r.get(key), r.get(f"{key}_ci95")
            cells.append("—" if value is None else f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        lines.append(f"| {r['trial']} | v{r.get('chosen_version', '?')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower unsafe, higher quality)."""
    front = []
    for i, (u, q) in enumerate(points):
        if not any((u2 <= u and q2 >= q) and (u2 < u or q2 > q) for j, (u2, q2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto_svg(rows: list[dict]) -> str:
    """Safety (test unsafe rate) against quality, one dot per trial, the Pareto front as a line.
    A hand-written SVG: a dozen shapes do not need a plotting library."""
    safety_key = "unsafe_rate_external" if any(r.get("unsafe_rate_external") is not None for r in rows) else "unsafe_rate_self"
    quality_key = "fidelity" if any(r.get("fidelity") is not None for r in rows) else "val_psnr_vs_v0"
    pts = [(float(r[safety_key]), float(r[quality_key]), r) for r in rows
           if r.get(safety_key) is not None and r.get(quality_key) is not None]
    width, height, pad = 640, 420, 60
    if not pts:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"><text x="20" y="40">no trial has both numbers</text></svg>\n'
    qs = [q for _, q, _ in pts]
    q_lo, q_hi = min(qs), max(qs)
    q_lo, q_hi = (q_lo - 0.01, q_hi + 0.01) if q_hi - q_lo < 1e-6 else (q_lo - 0.05 * (q_hi - q_lo), q_hi + 0.05 * (q_hi - q_lo))

    def xy(u: float, q: float) -> tuple[float, float]:
        return pad + u * (width - 2 * pad), height - pad - (q - q_lo) / (q_hi - q_lo) * (height - 2 * pad)

    variants = list(dict.fromkeys(r["variant"] for _, _, r in pts))
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 20}" text-anchor="middle">test {safety_key} (lower is safer)</text>',
             f'<text x="18" y="{height / 2}" transform="rotate(-90 18 {height / 2})" text-anchor="middle">{quality_key} (higher is better)</text>']
    for tick in range(6):
        u = tick / 5
        x, _ = xy(u, q_lo)
        parts.append(f'<text x="{x:.1f}" y="{height - pad + 16}" text-anchor="middle">{u:.1f}</text>')
        q = q_lo + tick / 5 * (q_hi - q_lo)
        _, y = xy(0, q)
        parts.append(f'<text x="{pad - 6}" y="{y:.1f}" text-anchor="end">{q:.3f}</text>')
    front = pareto_front([(u, q) for u, q, _ in pts])
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(pts[i][0], pts[i][1]) for i in front))
    parts.append(f'<polyline points="{path}" fill="none" stroke="#444" stroke-dasharray="4 3"/>')
    for i, (u, q, r) in enumerate(pts):
        x, y = xy(u, q)
        colour = colours[variants.index(r["variant"]) % len(colours)]
        ring = ' stroke="black" stroke-width="2"' if i in front else ""
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour}"{ring}><title>{r["trial"]}</title></circle>')
    for k, variant in enumerate(variants):
        parts.append(f'<circle cx="{width - pad - 150}" cy="{pad + 16 * k}" r="5" fill="{colours[k % len(colours)]}"/>'
                     f'<text x="{width - pad - 140}" y="{pad + 16 * k + 4}">{variant}</text>')
    parts.append(f'<text x="{width - pad - 150}" y="{pad + 16 * len(variants) + 6}">ringed, dashed: Pareto front</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def write_results(store: RunStore, rows: list[dict]) -> None:
    """results.parquet (one row per trial), results.md, results.json (per-variant aggregates), pareto.svg."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()} for r in rows]
    keys = sorted({k for r in flat for k in r})
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in flat])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    store.write_bytes("results.parquet", sink.getvalue().to_pybytes())
    store.write_text("results.md", results_markdown(rows))
    store.write_text("results.json", json.dumps({"variants": aggregate(rows), "trials": rows}, indent=2) + "\n")
    store.write_text("pareto.svg", pareto_svg(rows))
