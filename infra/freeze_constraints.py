"""Print exact pins for safecb's run-time dependency closure, from the environment it is installed in.

    python infra/freeze_constraints.py > infra/constraints.txt.new   # then keep the header, review the diff

Walks pyproject.toml's [project] dependencies (no extras such as dev) through installed metadata, so the
pins are what the tests ran against. A CPU torch's local tag (+cpu) is dropped: the image installs
the same version from PyTorch's CUDA index.
"""

from __future__ import annotations

import importlib.metadata as metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def runtime_closure(pyproject: Path = Path(__file__).resolve().parents[1] / "pyproject.toml") -> dict[str, str]:
    """{canonical name: installed version} of every distribution the project needs at run time. The
    roots come from pyproject.toml itself (an editable install's metadata may predate an edit)."""
    extras_seen: dict[str, set[str]] = {}
    pending = [Requirement(r) for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    pending = [r for r in pending if r.marker is None or r.marker.evaluate({"extra": ""})]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a marker-excluded or optional dependency this environment lacks
        if name in extras_seen and set(requirement.extras) <= extras_seen[name]:
            continue
        extras_seen.setdefault(name, set()).update(requirement.extras)
        for line in dist.requires or []:
            child = Requirement(line)
            wanted = list(requirement.extras) or [""]
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in wanted):
                pending.append(child)
    return {name: metadata.version(name).split("+")[0] for name in sorted(extras_seen)}


if __name__ == "__main__":
    for name, version in runtime_closure().items():
        print(f"{name}=={version}")
