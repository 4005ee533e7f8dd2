"""Sweeps on Ray Tune: a real 2-trial sweep of the world model on CPU, its resume, its refusals.

Each trial is a whole (small) run of the bundled world model, so the results table is built from
real final choices; the numbers are not asserted as evidence of Safe-CB (too few prompts), only
that every trial ran, chose by validation and reported test beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from safecb.cli import app
from safecb.cluster.sweep import (SweepError, grid_variants, load_grid, make_trials, pareto_front, results_markdown,
                                  run_sweep)
from safecb.config import load_config
from tests_support import assert_one_line_failure

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
SMALL = {"prompts.train": {"builtin": "world:train", "limit": 24},
         "prompts.val_unsafe": {"builtin": "world:val_unsafe", "limit": 12},
         "prompts.val_benign": {"builtin": "world:val_benign", "limit": 6},
         "prompts.eval_unsafe": {"builtin": "world:eval_unsafe", "limit": 12},
         "prompts.eval_benign": {"builtin": "world:eval_benign", "limit": 6},
         "stop.max_iters": 1, "finetune.steps": 4, "resources.threads": 1, "generation.prompts_per_shard": 32}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_cluster):
    base = load_config(CONFIG, SMALL)
    out = str(tmp_path_factory.mktemp("sweep") / "s")
    trials = make_trials(grid_variants({"finetune.lr": [0.02, 0.05]}), seeds=1)
    rows = run_sweep(base, trials, out, max_concurrent=1)
    return base, trials, out, rows


def test_every_trial_is_a_full_run_chosen_on_validation(sweep):
    _, trials, out, rows = sweep
    assert [r["trial"] for r in rows] == [t.name for t in trials] == ["finetune.lr_0.02-seed0", "finetune.lr_0.05-seed0"]
    for trial in trials:
        folder = Path(out) / "trials" / trial.name
        final = json.loads((folder / "final.json").read_text())
        assert final["by"] == "val_unsafe_rate_self" and final["split"] == "val"
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        assert saved["finetune"]["lr"] == trial.overrides["finetune.lr"]
    for row in rows:
        assert row["iterations"] == 1 and row["val_unsafe_rate_self"] is not None
        assert row["unsafe_rate_external"] is not None and len(row["unsafe_rate_external_ci95"]) == 2


def test_results_table_plot_and_parquet(sweep):
    _, _, out, rows = sweep
    table = pq.read_table(Path(out) / "results.parquet")
    assert table.num_rows == 2 and "unsafe_rate_external" in table.column_names
    md = (Path(out) / "results.md").read_text()
    assert "finetune.lr=0.02" in md and "test unsafe (ext)" in md
    svg = (Path(out) / "pareto.svg").read_text()
    assert svg.count("<circle") >= 2 and "Pareto front" in svg
    assert json.loads((Path(out) / "results.json").read_text())["variants"][0]["runs"] == 1


def test_a_second_start_reads_finished_trials_back(sweep):
    base, trials, out, rows = sweep
    manifests = sorted(p.stat().st_mtime_ns for p in Path(out).glob("trials/*/iter=*/MANIFEST.json"))
    again = run_sweep(base, trials, out, max_concurrent=1)
    assert [r["val_unsafe_rate_self"] for r in again] == [r["val_unsafe_rate_self"] for r in rows]
    assert sorted(p.stat().st_mtime_ns for p in Path(out).glob("trials/*/iter=*/MANIFEST.json")) == manifests


def test_a_different_sweep_in_the_same_folder_is_refused(sweep):
    base, _, out, _ = sweep
    with pytest.raises(SweepError, match="different sweep"):
        run_sweep(base, make_trials(grid_variants({"finetune.lr": [0.1]}), seeds=1), out)


def test_grid_file_errors_are_one_line(tmp_path):
    bad = tmp_path / "grid.yaml"
    bad.write_text("finetune.lr: 0.02\n")
    with pytest.raises(SweepError, match="non-empty list"):
        load_grid(bad)
    result = CliRunner().invoke(app, ["sweep", "--config", str(CONFIG), "--grid", str(bad)])
    assert_one_line_failure(result, "grid.yaml", "finetune.lr")
    typo = tmp_path / "typo.yaml"
    typo.write_text("finetune.lrr: [0.1]\n")
    result = CliRunner().invoke(app, ["sweep", "--config", str(CONFIG), "--grid", str(typo), "--out", str(tmp_path / "s")])
    assert_one_line_failure(result, "lrr")
    assert not (tmp_path / "s").exists(), "nothing written before the sweep is known to be valid"
    result = CliRunner().invoke(app, ["sweep", "--config", str(CONFIG), "--preset", "nope"])
    assert_one_line_failure(result, "--preset", "ablations")


def test_pareto_front_and_markdown_on_known_points():
    assert pareto_front([(0.1, 0.9), (0.2, 0.95), (0.3, 0.8), (0.1, 0.85)]) == [0, 1]
    rows = [{"trial": f"v-seed{s}", "variant": "v", "seed": s, "unsafe_rate_self": u, "iterations": 2}
            for s, u in enumerate([0.2, 0.3, 0.4])]
    md = results_markdown(rows)
    assert "| v | 3 | " in md and "0.300 [" in md  # the mean over seeds with its t-interval


def test_trials_over_world_models_name_their_world(tmp_path):
    from safecb.cluster.sweep import trial_config, world_models

    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"config": {"seed": 7}}))  # as `safecb world train` writes it
    worlds = world_models(["shipped", str(folder)])
    assert worlds == {"shipped": "", "world-seed7": str(folder.resolve())}
    trials = make_trials({"full": {}, "one_pass": {"stop.max_iters": 1}}, 1, worlds)
    assert [t.name for t in trials] == ["full-seed0-shipped", "full-seed0-world-seed7",
                                        "one_pass-seed0-shipped", "one_pass-seed0-world-seed7"]
    assert trials[0].overrides["model.path"] is None and trials[1].overrides["model.path"] == str(folder.resolve())
    assert [t.world for t in trials] == ["shipped", "world-seed7"] * 2
    assert trial_config(load_config(CONFIG), trials[1], str(tmp_path / "s")).model.path == str(folder.resolve())
    assert [t.world for t in make_trials({"full": {}}, 2)] == ["", ""]  # no worlds: as before
    with pytest.raises(SweepError, match="no such folder"):
        world_models([str(tmp_path / "missing")])
    with pytest.raises(SweepError, match="a second world"):
        world_models([str(folder), str(folder)])
