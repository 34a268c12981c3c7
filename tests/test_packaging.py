"""Package metadata fit for PyPI (#18): an SPDX license with its file, classifiers, and every
folder of the package shipped (a folder without ``__init__.py`` is silently left out of the wheel);
the wheel and the sdist as ``python -m build`` makes them (metadata, long description, contents),
and the sdist's tests running from the unpacked sdist."""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
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


# Set for the tests run from an unpacked sdist, so that the copy of this module there does not
# build (and unpack, and test) an sdist again.
_INSIDE_SDIST_RUN = "COMPRESSKV_SDIST_SELFTEST"
_NOT_COPIED = {".git", ".ci-work", ".venv", "build", "dist", "site", ".pytest_cache", ".benchmarks", "compresskv-results"}


def _build(source: Path, out: Path) -> None:
    """``python -m build --no-isolation`` (sdist, then the wheel from the unpacked sdist, as a
    release would) and offline; where ``build`` is not installed (the test extra does not carry
    it), the same two steps through setuptools' PEP 517 hooks."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    # cwd=out: a ``build/`` folder in the current directory would shadow the ``build`` package
    if subprocess.run([sys.executable, "-m", "build", "--version"], cwd=out, capture_output=True).returncode == 0:
        cmd = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)]
        proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return
    hook = "import setuptools.build_meta as b, sys; getattr(b, sys.argv[1])(sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", hook, "build_sdist", str(out)], cwd=source,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    unpacked = _unpack(sdist, out / "unpacked")
    proc = subprocess.run([sys.executable, "-c", hook, "build_wheel", str(out)], cwd=unpacked,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _unpack(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(into, filter="data")
    (folder,) = into.iterdir()
    return folder


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel, built once per session from a copy of the checkout (building
    writes ``*.egg-info`` next to the sources, and concurrent test runs must not share it)."""
    if os.environ.get(_INSIDE_SDIST_RUN):
        pytest.skip("run from an unpacked sdist by test_the_sdist_tests_run_from_the_unpacked_sdist")
    source = tmp_path_factory.mktemp("source") / "compresskv"

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder) == ROOT
        return {n for n in names if n == "__pycache__" or n.endswith((".egg-info", ".pyc")) or (top and n in _NOT_COPIED)}

    shutil.copytree(ROOT, source, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    _build(source, out)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_the_wheel_metadata_is_fit_for_pypi(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        (name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(whl.read(name).decode())
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Author"]
    urls = meta.get_all("Project-URL")
    assert urls and all(re.fullmatch(r"[^,]+, https://\S+", u) for u in urls), urls
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert meta["Description-Content-Type"] == "text/markdown"
    description = meta.get_payload()
    first_text = next(line for line in description.splitlines() if line.strip() and not line.startswith("#"))
    assert first_text.startswith("compresskv "), first_text
    assert "pip install compresskv" in description and "pip install -e" not in description


def test_the_pypi_description_has_no_relative_link():
    """PyPI resolves no relative link (``docs/...``, ``benchmarks/...``): every link is absolute."""
    text = (ROOT / "docs" / "pypi.md").read_text()
    links = re.findall(r"\]\(([^)]*)\)", text) + re.findall(r"(?:src|href)=\"([^\"]*)\"", text)
    assert links and all(re.match(r"https://", link) for link in links), links
    assert len(text.splitlines()) <= 80


def test_the_pypi_description_shows_the_readme_example_every_method_and_extra():
    """Its example is the README's, which tests/test_embedded.py runs as written; it names every
    registered method, every extra of pyproject and every paper of ``[project.urls]``."""
    import compresskv

    text = (ROOT / "docs" / "pypi.md").read_text()
    block = re.compile(r"```python\n(.*?)```", re.S)
    assert block.search(text).group(1) == block.search((ROOT / "README.md").read_text()).group(1)
    missing = [m for m in compresskv.available_methods() if f'"{m}"' not in text]
    missing += [f"compresskv[{e}]" for e in _project()["optional-dependencies"] if f"compresskv[{e}]" not in text]
    missing += [url for url in _project()["urls"].values() if url not in text]
    assert not missing, missing


def test_the_wheel_ships_the_package_data(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = set(whl.namelist())
    assert {"compresskv/data/persuasion.txt", "compresskv/py.typed"} <= names
    assert not any("__pycache__" in n or n.startswith(("tests/", "docs/")) for n in names)


def test_the_sdist_holds_the_tests_docs_and_benchmarks(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {"tests/conftest.py", "tests/tiny_tokenizer.py", "docs/index.md", "docs/hooks.py", "docs/pypi.md",
              "mkdocs.yml", "LICENSE", "README.md", "MANIFEST.in", "benchmarks/results/bench.jsonl"}
    assert wanted <= names, wanted - names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


@pytest.mark.slow  # ~15 s: a second pytest process importing torch and transformers
def test_the_sdist_tests_run_from_the_unpacked_sdist(dists, tmp_path):
    """A subset that needs the files setuptools leaves out by default: test_calibration_input
    imports ``conftest`` and ``tiny_tokenizer``, test_layout reads docs/architecture.md; compresskv
    is imported from the unpacked ``src`` (PYTHONPATH), not from this checkout."""
    folder = _unpack(dists["sdist"], tmp_path)
    env = {**os.environ, "PYTHONPATH": str(folder / "src"), _INSIDE_SDIST_RUN: "1", "PYTHONDONTWRITEBYTECODE": "1"}
    where = subprocess.run([sys.executable, "-c", "import compresskv; print(compresskv.__file__)"],
                           cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert Path(where.stdout.strip()).is_relative_to(folder / "src"), where.stdout + where.stderr
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow",
           "tests/test_layout.py", "tests/test_calibration_input.py", "tests/test_packaging.py"]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\d+ passed", proc.stdout), proc.stdout[-3000:]
