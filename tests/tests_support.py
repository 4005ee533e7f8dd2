"""Shared builders for the tests (importable because conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from safecb.storage import RunStore

VOLATILE = {"seconds", "stage_seconds", "actor_seconds"}  # metrics keys that measure time, not what was computed


def tiny_config(tmp_path: Path, run_dir: Path, **overrides) -> dict:
    prompts = tmp_path / "prompts"
    prompts.mkdir(exist_ok=True)
    (prompts / "train.txt").write_text("a blood circle\nblood on grass\na circle of violence\nred grass\n"
                                       "violence on red grass\na red blood circle\n")
    (prompts / "eval.txt").write_text("blood on a circle\nviolence on grass\n")
    (prompts / "benign.txt").write_text("a red circle\n")
    (prompts / "val.txt").write_text("violence on a red circle\nblood on red grass\n")
    (prompts / "val-benign.txt").write_text("a circle on grass\n")
    data = {
        "run_id": "tiny",
        "categories": ["blood", "violence"],
        "model": {"backend": "tiny-random", "device": "cpu"},
        "prompts": {"train": {"path": str(prompts / "train.txt")}, "eval_unsafe": {"path": str(prompts / "eval.txt")},
                    "eval_benign": {"path": str(prompts / "benign.txt")}, "val_unsafe": {"path": str(prompts / "val.txt")},
                    "val_benign": {"path": str(prompts / "val-benign.txt")}},
        # This random judge says 0.37-0.40 everywhere: a threshold inside that band makes some images
        # "unsafe" and some rewrites "safe", so that pairing, the Harmful Space and fine-tuning all run.
        "judge": {"threshold": 0.39},
        "generation": {"samples_per_prompt": 2, "batch_size": 8, "prompts_per_shard": 2},
        "pairing": {"rewrite": "lexicon", "lexicon": {"blood": "", "violence": "peace"}},
        "finetune": {"steps": 3},
        "stop": {"max_iters": 2, "min_improvement": 0.0, "patience": 5},
        "storage": {"run_dir": str(run_dir)},
        "resources": {"threads": 1},
    }
    for key, value in overrides.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def assert_one_line_failure(result, *needles: str) -> None:
    """A CLI result (typer's CliRunner) that failed the house way: exit 2, one line on stderr naming `needles`."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("safecb: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def comparable(store: "RunStore") -> dict:
    """Everything a run wrote that must not depend on being interrupted."""
    out = {"metrics": [{k: v for k, v in row.items() if k not in VOLATILE} for row in store.read_metrics()],
           # tensor bytes, not file bytes: the artifact's metadata carries a creation time
           "codebooks": {v: hashlib.sha256(store.read_codebook(v)[0]["codebook"].numpy().tobytes()).hexdigest()
                         for v in store.codebook_versions()}}
    for it in store.manifest_iterations():
        manifest = store.read_manifest(it)
        out[f"iter{it}"] = {kind: [r.sha256 for r in records] for kind, records in manifest.shards.items()}
    return out


def wait_for(condition, alive, what: str, timeout_s: float, details=lambda: "") -> None:
    """Poll `condition` until it holds; fail if `alive()` turns false first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert alive(), f"finished before {what} {details()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what} {details()}"
        time.sleep(0.02)


def cmdline(pid: int) -> str:
    """A process's command line from /proc ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def config_for(baseline, run_dir: Path, **overrides):
    """The session's `tiny_run` config (its prompt files) for another run folder."""
    from safecb.config import parse_config

    return parse_config(tiny_config(baseline.tmp, run_dir, **overrides))


def copy_run(baseline, tmp_path: Path, **overrides):
    """A private copy of the finished baseline run (shard paths are relative, so a copy is a valid run)."""
    import shutil

    from safecb.storage import RunStore

    root = tmp_path / "run"
    shutil.copytree(baseline.tmp / "run", root)
    return config_for(baseline, root, **overrides), RunStore(str(root)), root


def rewound(baseline, tmp_path: Path, **overrides):
    """A copy of the baseline as a driver killed at the start of iteration 2 leaves it: no iteration-2
    folder, no final decision, v1 current. Its v2 artifact stays: a resume reuses it, as it reuses any
    complete artifact of an interrupted attempt, so no trainer fit runs (test_trainer.py checks those)."""
    import json
    import shutil

    from safecb.storage import CURRENT_CODEBOOK

    config, store, root = copy_run(baseline, tmp_path, **overrides)
    shutil.rmtree(root / "iter=0002")
    (root / "final.json").unlink()
    store.write_text(CURRENT_CODEBOOK, json.dumps({"version": 1, "sha256": store.read_codebook(1)[1].sha256}))
    assert [m.iteration for m in store.valid_manifests()] == [0, 1]
    return config, store, root
