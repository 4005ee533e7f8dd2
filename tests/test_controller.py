"""The loop end to end on a tiny randomly initialised Janus (CPU), its resume, and its artifacts.

The tiny random model says nothing about safety (that is tests/world's job); these tests check the
machinery: layout, versions, manifests, and that a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from safecb.config import parse_config
from safecb.controller import RunError, run
from safecb.schemas import GENERATION_SCHEMA, PAIR_SCHEMA
from safecb.storage import RunStore
from tests_support import comparable, tiny_config

pytestmark = pytest.mark.usefixtures("ray_cluster")  # one local Ray for every run here


@pytest.fixture(scope="module")
def uninterrupted(tiny_run):
    """The session's tiny 2-iteration loop (conftest `tiny_run`): read here, never changed."""
    return tiny_run.tmp, tiny_run.config, tiny_run.metrics, tiny_run.store


def test_two_iterations_leave_the_design_layout(uninterrupted):
    _, config, metrics, store = uninterrupted
    assert store.manifest_iterations() == [0, 1, 2]
    assert store.codebook_versions() == [0, 1, 2]
    rows = store.read_metrics()
    assert [r["iteration"] for r in rows] == [0, 1, 2] == [m["iteration"] for m in metrics]
    for row in rows:
        assert {"iteration", "codebook_version", "pairs", "unsafe_rate_self"} <= row.keys()
        # where the actors' time went, step by step, beside the driver's stages
        steps = row["actor_seconds"]
        assert {"val", "eval"} <= steps.keys() and ("collect" in steps) == (row["iteration"] > 0)
        assert "decode + judge + drift" in steps["eval"] and all(v >= 0 for s in steps.values() for v in s.values())
        assert ("generate" in steps["eval"]) == (row["iteration"] == 0)  # eval tokens are drawn once, in iteration 0
    assert "stop" in rows[-1]["decision"]
    final = json.loads(store.read_text("final.json"))
    assert final["chosen_version"] in (0, 1, 2)
    # decided by the self-judge on validation; test numbers only copied beside it
    assert (final["by"], final["split"], final["judge"]) == ("val_unsafe_rate_self", "val", "self")
    chosen = rows[final["chosen_version"]]
    assert final["value"] == chosen["val_unsafe_rate_self"] == min(r["val_unsafe_rate_self"] for r in rows)
    for row in rows:  # every rate with its counts and 95% interval; validation and test apart
        for key, n in (("val_unsafe_rate_self", 2), ("unsafe_rate_self", 2), ("val_unsafe_rate_self_benign", 1)):
            entry = row["intervals"][key]
            assert entry["n"] == n and entry["rate"] == row[key] and entry["ci95"][0] <= row[key] <= entry["ci95"][1]
    assert "val_psnr_vs_v0" not in rows[0] and rows[1]["val_psnr_vs_v0"] > 0
    assert all(0.0 <= r["finetune_free_fraction"] <= 1.0 and r["space_rank"] >= 0 for r in rows[1:])
    # each codebook records its parent; every generated row records the codebook that drew it
    for version in (1, 2):
        assert store.read_codebook(version)[1].parent_version == version - 1
        manifest = store.read_manifest(version)
        generations = store.read_table(manifest, "generations", GENERATION_SCHEMA)
        assert set(generations.column("codebook_version").to_pylist()) == {version - 1}
        assert set(generations.column("iteration").to_pylist()) == {version}
        evals = store.read_table(manifest, "eval", GENERATION_SCHEMA)
        assert set(evals.column("codebook_version").to_pylist()) == {version}
        val = store.read_table(manifest, "val", GENERATION_SCHEMA)
        assert val.num_rows == 3 and not set(val.column("prompt_id").to_pylist()) & set(evals.column("prompt_id").to_pylist())
        pairs = store.read_table(manifest, "pairs", PAIR_SCHEMA)
        assert pairs.num_rows == rows[version]["pairs"]
    assert sum(r["aligned_pairs"] for r in rows[1:]) > 0, "the threshold should have produced aligned pairs"
    assert any(r["finetune_steps"] > 0 for r in rows[1:] if "finetune_steps" in r)
    codebooks = [store.read_codebook(v)[0]["codebook"] for v in (0, 1, 2)]
    assert not torch.equal(codebooks[0], codebooks[2]), "the loop should have edited the codebook"


def test_resume_after_iteration_1_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    full_tmp, config, _, full_store = uninterrupted
    data = tiny_config(full_tmp, tmp_path / "run")  # same prompt files → same config hash
    config = parse_config(data)
    run(config, until=1)
    store = RunStore(str(tmp_path / "run"))
    assert store.manifest_iterations() == [0, 1]
    run(config, resume=True)
    assert comparable(store) == comparable(full_store)

    # a crash inside iteration 2: its manifest and one shard's commit never landed
    (tmp_path / "run" / "iter=0002" / "MANIFEST.json").unlink()
    (tmp_path / "run" / "iter=0002" / "_commits" / "generations-000001.json").unlink()
    run(config, resume=True)
    assert comparable(store) == comparable(full_store)


def test_a_second_run_into_the_same_folder_is_refused(uninterrupted):
    _, config, _, store = uninterrupted
    before = comparable(store)
    with pytest.raises(RunError, match="already holds a run"):
        run(config)
    assert comparable(store) == before


def test_resume_with_another_config_is_refused(uninterrupted):
    tmp, _, _, store = uninterrupted
    changed = parse_config(tiny_config(tmp, tmp / "run", finetune={"steps": 4}))
    with pytest.raises(RunError, match="differs"):
        run(changed, resume=True)


def test_torch_backend_builds_the_codebook_deepspeed_builds(uninterrupted, tmp_path):
    """The trainer's plain-Adam backend equals its default, a real DeepSpeed engine (gloo, one rank, ZeRO 0).

    In its own process, as a user runs it: DeepSpeed keeps process-group state per process.
    """
    full_tmp, _, _, full_store = uninterrupted
    data = tiny_config(full_tmp, tmp_path / "run", finetune={"backend": "torch"})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "safecb.cli", "run", "--config", str(config_file), "--until", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    store = RunStore(str(tmp_path / "run"))
    mine, theirs = store.read_codebook(1)[0]["codebook"], full_store.read_codebook(1)[0]["codebook"]
    assert store.read_metrics()[1]["finetune_steps"] > 0
    assert (mine - theirs).abs().max() < 1e-6


def test_teacher_forced_counterparts_make_aligned_pairs(tmp_path):
    config = parse_config(tiny_config(tmp_path, tmp_path / "run", pairing={"alignment": "teacher_forced"},
                                      stop={"max_iters": 1}))
    run(config)
    store = RunStore(str(tmp_path / "run"))
    pairs = store.read_table(store.read_manifest(1), "pairs", PAIR_SCHEMA).to_pylist()
    aligned = [p for p in pairs if p["counterpart"] == "rewrite"]
    assert aligned, "expected same-seed counterparts judged safe"
    for pair in aligned:
        assert len(pair["safe_tokens"]) == len(pair["harmful_tokens"])
        assert pair["safe_tokens"] != pair["harmful_tokens"]
