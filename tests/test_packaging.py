"""Every code package ships: pyproject's explicit package list (the three top-level folders map
into one `fleetlog` namespace) names each folder with an __init__.py, or a wheel would lack it
while the editable install used by the tests still finds it."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"fleetlog": "fleetlog", "schemas": "fleetlog.schemas", "projections": "fleetlog.projections",
           "services": "fleetlog.services"}


def test_every_package_is_listed_for_the_wheel() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - found == set(), "these listed packages have no folder"
