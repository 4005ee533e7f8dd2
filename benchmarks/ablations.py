"""The ablation preset on the world model: what each part of Safe-CB contributes (issue 12).

Runs `safecb sweep --preset ablations` (full, projection only, fine-tuning only, the paper's
quality-only fine-tuning, one pass) with N seeds on the embedded default config, then writes
benchmarks/results/ablations-world.{json,md}: per variant the mean and 95% t-interval over seeds of
the test unsafe rate (overall, separable, entangled; the world's external judge) and fidelity, for
the codebook each run chose by its self-judge on validation.

    python benchmarks/ablations.py --seeds 3 --max-concurrent 2                 # CPU (slow: ~15 runs)
    python benchmarks/ablations.py --device cuda --max-concurrent 15 --gpu-fraction 0.03
    python benchmarks/ablations.py --from-sweep runs/ablations                 # tables from a finished sweep
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safecb.cluster.sweep import ABLATIONS, aggregate, make_trials, run_sweep, trial_summary  # noqa: E402
from safecb.config import load_config  # noqa: E402
from safecb.storage import RunStore  # noqa: E402

KEYS = {"unsafe_rate_external": "test unsafe (ext)", "unsafe_rate_external_separable": "separable",
        "unsafe_rate_external_entangled": "entangled", "fidelity": "fidelity",
        "val_unsafe_rate_self": "val unsafe (self)", "iterations": "iterations"}


def rows_from_sweep(folder: Path) -> list[dict]:
    """Every finished trial of a sweep folder (an unfinished one is listed as missing)."""
    plan = json.loads((folder / "sweep.json").read_text())
    rows = []
    for trial in plan["trials"]:
        store = RunStore(str(folder / "trials" / trial["name"]))
        if store.exists("final.json"):
            rows.append({"trial": trial["name"], "variant": trial["variant"], "seed": trial["seed"], **trial_summary(store)})
        else:
            print(f"missing: {trial['name']} did not finish", file=sys.stderr)
    return rows


def write_tables(rows: list[dict], out: Path, meta: dict) -> None:
    variants = aggregate(rows)
    start = aggregate([{**r, "variant": "start (v0)", **{k: r.get(f"start_{k}") for k in KEYS}} for r in rows])[0]
    data = {"meta": meta, "start": start, "variants": variants,
            "trials": [{k: r.get(k) for k in ("trial", "variant", "seed", "chosen_version", "iterations", *KEYS,
                                               "unsafe_rate_external_ci95")} for r in rows]}
    (out.with_suffix(".json")).write_text(json.dumps(data, indent=2) + "\n")
    lines = [f"# Ablations on the world model ({meta['seeds']} seeds, {meta['device']})", "",
             "Mean and 95% t-interval over seeds of the codebook each run chose by its self-judge on validation;",
             "test rates by the world's external judge (reported, never used to decide).", "",
             "| variant | seeds | " + " | ".join(KEYS.values()) + " |", "|---|---|" + "---|" * len(KEYS)]
    for entry in [start, *variants]:
        cells = []
        for key in KEYS:
            e = entry.get(key)
            cells.append("—" if not e else f"{e['mean']:.3f}" + (f" [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]" if e.get("ci95") else ""))
        lines.append(f"| {entry['variant']} | {entry['seeds']} | " + " | ".join(cells) + " |")
    (out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-concurrent", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu-fraction", type=float, default=0.03, help="GPU per collector and per trainer worker")
    parser.add_argument("--out", default="runs/ablations", help="the sweep folder")
    parser.add_argument("--from-sweep", default=None, help="only build the tables from this finished sweep folder")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "ablations-world"))
    args = parser.parse_args()
    meta = {"seeds": args.seeds, "device": args.device, "config": Path(args.config).name, "variants": ABLATIONS}
    if args.from_sweep is None:
        overrides = {"resources.threads": 1, "model.device": args.device}
        if args.device.startswith("cuda"):
            overrides |= {"resources.gpus_per_worker": args.gpu_fraction, "trainer.gpus_per_worker": args.gpu_fraction}
        base = load_config(args.config, overrides)
        started = time.perf_counter()
        try:
            run_sweep(base, make_trials(ABLATIONS, args.seeds), args.out, args.max_concurrent)
        finally:
            meta["sweep_seconds"] = round(time.perf_counter() - started, 1)
    rows = rows_from_sweep(Path(args.from_sweep or args.out))
    meta["trials_finished"] = len(rows)
    write_tables(rows, Path(args.results), meta)


if __name__ == "__main__":
    main()
