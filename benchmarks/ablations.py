"""The ablation preset on the world model: what each part of Safe-CB contributes (issue 12).

Runs `safecb sweep --preset ablations` (full, projection only, fine-tuning only, the paper's
quality-only fine-tuning, one pass) on the embedded default config, with N seeds on one world model or
one seed on each of several world models (`--world`), then writes
benchmarks/results/ablations-world.{json,md}: per variant the mean and 95% t-interval over the runs of
the test unsafe rate (overall, separable, entangled; the world's external judge) and fidelity, for
the codebook each run chose by its self-judge on validation, and with several worlds a table per world.

    python benchmarks/ablations.py --seeds 3 --max-concurrent 2                 # CPU (slow: ~15 runs)
    python benchmarks/ablations.py --device cuda --max-concurrent 15 --gpu-fraction 0.03
    # across world models (rebuild seeds 1 and 2 with `safecb world train --seed N --out worlds/seedN`)
    python benchmarks/ablations.py --device cuda --seeds 1 --world shipped --world worlds/seed1 --world worlds/seed2
    python benchmarks/ablations.py --from-sweep runs/ablations                 # tables from a finished sweep
    python benchmarks/ablations.py --merge a.json b.json                       # one table from two results files
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safecb.cluster.sweep import ABLATIONS, aggregate, make_trials, run_sweep, trial_summary, world_models  # noqa: E402
from safecb.config import load_config  # noqa: E402
from safecb.stats import interval_text  # noqa: E402
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
            rows.append({"trial": trial["name"], "variant": trial["variant"], "seed": trial["seed"],
                         **({"world": trial["world"]} if trial.get("world") else {}), **trial_summary(store)})
        else:
            print(f"missing: {trial['name']} did not finish", file=sys.stderr)
    return rows


ROW_KEYS = ("trial", "variant", "seed", "world", "chosen_version", "iterations", *KEYS, "unsafe_rate_external_ci95",
            *(f"start_{k}" for k in KEYS))


def write_tables(rows: list[dict], out: Path, meta: dict) -> None:
    variants = aggregate(rows)
    start = aggregate([{**r, "variant": "start (v0)", **{k: r.get(f"start_{k}") for k in KEYS}}
                       for r in rows if r["variant"] == rows[0]["variant"]])[0]  # v0 once per seed and world
    worlds = list(dict.fromkeys(r.get("world") for r in rows if r.get("world")))
    data = {"meta": meta, "start": start, "variants": variants,
            "trials": [{k: r.get(k) for k in ROW_KEYS if r.get(k) is not None} for r in rows]}
    (out.with_suffix(".json")).write_text(json.dumps(data, indent=2) + "\n")
    over = f"{len(worlds)} world models ({', '.join(worlds)})" if worlds else f"{meta['seeds']} seeds"
    lines = [f"# Ablations on the world model ({over}, {meta['device']})", "",
             f"Mean and 95% t-interval over the runs ({'one per world model' if worlds else 'one per seed'}) of the "
             "codebook each run chose by its self-judge on validation;",
             "test rates by the world's external judge (reported, never used to decide).", "",
             "| variant | runs | " + " | ".join(KEYS.values()) + " |", "|---|---|" + "---|" * len(KEYS)]
    for entry in [start, *variants]:
        lines.append(f"| {entry['variant']} | {entry['runs']} | " + " | ".join(interval_text(entry.get(k)) for k in KEYS) + " |")
    if worlds:  # the same table per world model: is an effect there in each, or only on average?
        shown = ("unsafe_rate_external", "unsafe_rate_external_separable", "unsafe_rate_external_entangled", "fidelity")
        lines += ["", "Per world model (start → the chosen codebook; test, external judge):", "",
                  "| variant | world | " + " | ".join(KEYS[k] for k in shown) + " |", "|---|---|" + "---|" * len(shown)]
        order = list(dict.fromkeys(r["variant"] for r in rows))
        for r in sorted(rows, key=lambda r: (order.index(r["variant"]), worlds.index(r["world"]))):
            cells = [("—" if r.get(k) is None else
                      (f"{r[f'start_{k}']:.3f} → " if r.get(f"start_{k}") is not None else "") + f"{r[k]:.3f}")
                     for k in shown]
            lines.append(f"| {r['variant']} | {r['world']} | " + " | ".join(cells) + " |")
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
    parser.add_argument("--world", action="append", default=[],
                        help="a world model to run every trial on: 'shipped' or a `safecb world train --out` folder "
                             "(repeat it; one seed per world with --seeds 1)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every trial, e.g. finetune.backend=torch (repeat it)")
    parser.add_argument("--merge", nargs="+", default=None, help="only merge these results files (.json) into one table")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "ablations-world"))
    args = parser.parse_args()
    meta = {"seeds": args.seeds, "device": args.device, "config": Path(args.config).name, "variants": ABLATIONS}
    if args.merge:  # e.g. worlds run in separate calls of a GPU machine
        parts = [json.loads(Path(path).read_text()) for path in args.merge]
        rows = [row for part in parts for row in part["trials"]]
        meta = {**parts[0]["meta"], "merged_from": [Path(path).name for path in args.merge],
                "worlds": [w for part in parts for w in part["meta"].get("worlds", [])],
                "sweep_seconds": [part["meta"].get("sweep_seconds") for part in parts], "trials_finished": len(rows)}
        write_tables(rows, Path(args.results), meta)
        return
    worlds = world_models(args.world) if args.world else None
    if worlds:  # names only: a folder is where it sits on one machine; `world-seedN` says how to rebuild it
        meta["worlds"] = list(worlds)
    if args.from_sweep is None:
        overrides = {"resources.threads": 1, "model.device": args.device}
        for item in args.sets:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--set {item!r}: expected KEY=VALUE")
            overrides[key] = yaml.safe_load(value)
        if args.sets:
            meta["overrides"] = args.sets
        if worlds:  # one ruler for every world model: the shipped external judge (a world's own would also do)
            from safecb.world import WORLD_JUDGE_DIR

            overrides["eval.external_judge_path"] = str(WORLD_JUDGE_DIR)
            meta["external_judge"] = "the shipped world judge, for every world model"
        if args.device.startswith("cuda"):
            overrides |= {"resources.gpus_per_worker": args.gpu_fraction, "trainer.gpus_per_worker": args.gpu_fraction}
        base = load_config(args.config, overrides)
        started = time.perf_counter()
        try:
            run_sweep(base, make_trials(ABLATIONS, args.seeds, worlds), args.out, args.max_concurrent)
        finally:
            meta["sweep_seconds"] = round(time.perf_counter() - started, 1)
    rows = rows_from_sweep(Path(args.from_sweep or args.out))
    meta["trials_finished"] = len(rows)
    write_tables(rows, Path(args.results), meta)


if __name__ == "__main__":
    main()
