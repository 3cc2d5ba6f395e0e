"""What `pip install avatar-stack` puts into site-packages, and the metadata it carries."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parent.parent
DESIGN_PACKAGES = {"common", "gateway", "stt_service", "avatar_service", "avatar_stack"}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_only_the_services_are_installed():
    find = pyproject()["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ()))
    top = {p.split(".")[0] for p in packages}
    assert top == DESIGN_PACKAGES, top  # never bench/, tests/ or examples/
    assert "bench" not in packages and not any(p.startswith(("tests", "examples")) for p in packages)


def test_metadata_and_license():
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text().splitlines()[0]
    for key in ("description", "readme", "requires-python", "authors", "keywords", "classifiers"):
        assert project.get(key), key
    # Every runtime dependency is pinned.
    for dep in project["dependencies"]:
        assert "==" in dep, dep
