"""The package builds as a wheel without deprecation warnings from its own metadata, and the wheel holds
everything a run needs (the configs, the world model, the CUDA source) — checked from an install of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_FILES = ["safecb/configs/tiny.yaml", "safecb/configs/janus-pro-1b.yaml", "safecb/models/fp8_decode_attention.cu",
                 "safecb/world/MODEL_CARD.md", "safecb/world/weights/model/model.safetensors",
                 "safecb/world/weights/model/tokenizer.json", "safecb/world/weights/judge/judge.safetensors"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(wheel, build log) from a copy of the source (the build writes egg-info next to it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "configs", source / "configs")
    shutil.copytree(ROOT / "safecb", source / "safecb", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp / "dist"
    done = subprocess.run([sys.executable, "-W", "always", "-c",
                           f"import setuptools.build_meta as b; print(b.build_wheel({str(out)!r}))"],
                          cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / done.stdout.strip().splitlines()[-1], done.stdout + done.stderr


def test_the_metadata_builds_without_deprecation_warnings(built):
    _, log = built
    assert "Deprecat" not in log and "deprecat" not in log, log[-3000:]


def test_the_wheel_ships_what_a_run_needs(built, tmp_path):
    wheel, _ = built
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(RUNTIME_FILES) <= names, set(RUNTIME_FILES) - names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    check = ("import safecb, safecb.world as w, pathlib;"
             "from safecb.config import load_config;"
             "root = pathlib.Path(safecb.__file__).parent;"
             "assert root.is_relative_to(pathlib.Path(__import__('sys').argv[1])), root;"
             "cfg = load_config(root / 'configs' / 'tiny.yaml');"
             "assert (pathlib.Path(w.WORLD_MODEL_DIR) / 'model.safetensors').is_file();"
             "print(cfg.run_id)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", check, str(target)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "tiny-world", done.stderr[-2000:]
