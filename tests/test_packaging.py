"""Packaging: every Python package in the source folders is listed in pyproject (wheels would miss
it), and `make venv` installs pinned versions."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = {pkg: ROOT / folder for pkg, folder in config["package-dir"].items()}
    found = set()
    for pkg, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            found.add(".".join([pkg, *rel.parts]) if rel.parts else pkg)
    assert found <= listed, f"packages missing from pyproject: {sorted(found - listed)}"


def _name(requirement: str) -> str:
    """The normalised project name of a requirement string ("ray[default]>=2.50" -> "ray")."""
    return re.split(r"[\[<>=!~; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_make_venv_installs_the_pinned_versions_of_every_dependency():
    """`make venv` (and so CI and `make demo`) installs with constraints.txt, which pins every
    dependency pyproject names, so a fresh machine gets the versions the suite passed with."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = {_name(r) for r in project["dependencies"]}
    named |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    named.discard("capfilt")
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[_name(name)] = version
    assert named <= pins.keys(), f"not pinned in constraints.txt: {sorted(named - pins.keys())}"
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "$(BIN)/python -m pip install" in line]
    assert installs and all("-c $(CONSTRAINTS)" in line for line in installs if "--upgrade pip" not in line)
    assert "CONSTRAINTS ?= constraints.txt" in makefile
