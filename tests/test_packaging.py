"""Package metadata fit for PyPI (#18): an SPDX license with its file, classifiers, and every
folder of the package shipped (a folder without ``__init__.py`` is silently left out of the wheel)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_license_is_an_spdx_expression_with_its_file():
    project = _project()
    assert isinstance(project["license"], str) and project["license"] == "Apache-2.0"
    for name in project["license-files"]:
        text = (ROOT / name).read_text()
        assert "Apache License" in text and "Version 2.0" in text


def test_classifiers_agree_with_requires_python():
    project = _project()
    lowest = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", project["requires-python"]).groups())
    versions = [tuple(int(x) for x in c.rsplit(" ", 1)[-1].split("."))
                for c in project["classifiers"] if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert versions and min(versions) == lowest
    assert "Typing :: Typed" in project["classifiers"] and (ROOT / "src" / "compresskv" / "py.typed").exists()


def test_every_package_folder_is_a_package():
    src = ROOT / "src" / "compresskv"
    folders = [p for p in src.rglob("*") if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))]
    assert folders and all((p / "__init__.py").exists() for p in folders), folders
