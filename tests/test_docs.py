"""The documentation site builds with ``mkdocs build --strict`` and documents every public name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import compresskv
import compresskv.eval

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_mkdocs_build_strict_passes(site):
    for page in ("index.html", "api/index.html", "benchmarks/index.html", "contracts/index.html",
                 "methods/eviction/index.html"):
        assert (site / page).exists(), page


def test_every_public_name_has_a_docstring():
    import griffe

    pkg = griffe.load("compresskv", search_paths=[str(ROOT / "src")], resolve_aliases=True, resolve_external=False)
    missing = []
    for module, names in (("", compresskv.__all__), ("eval.", compresskv.eval.__all__)):
        for name in names:
            obj = pkg[module + name]
            doc = obj.docstring
            if doc is None or not doc.value.strip():
                missing.append(module + name)
    assert not missing, f"public names without a docstring: {missing}"


def test_the_api_page_renders_every_public_name(site):
    html = (site / "api" / "index.html").read_text()
    missing = [n for n in compresskv.__all__ if f'id="compresskv.{n}"' not in html]
    missing += [f"eval.{n}" for n in compresskv.eval.__all__ if f'id="compresskv.eval.{n}"' not in html]
    assert not missing, f"not rendered on the API page: {missing}"


def test_quickstart_shows_the_readme_commands():
    readme = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in readme if line.startswith("python -c")][:2]
    assert len(commands) == 2
    index = (ROOT / "docs" / "index.md").read_text()
    for line in commands:
        assert line in index


def test_every_method_has_a_page():
    pages = " ".join(p.read_text() for p in (ROOT / "docs" / "methods").glob("*.md"))
    missing = [m for m in compresskv.available_methods() if not re.search(rf"[`\"']{re.escape(m)}[`\"']", pages)]
    assert not missing, f"methods without a page under docs/methods/: {missing}"


def test_benchmarks_page_shows_the_results(site):
    results = ROOT / "benchmarks" / "results"
    html = (site / "benchmarks" / "index.html").read_text()
    pngs = sorted(results.glob("*.png")) if results.is_dir() else []
    for png in pngs:
        assert (site / "results" / png.name).exists()
        if png.with_suffix(".md").exists():
            assert f'src="../results/{png.name}"' in html
    for md in sorted(results.glob("*.md")) if results.is_dir() else []:
        first_row = next((line for line in md.read_text().splitlines() if line.startswith("| ")), None)
        if first_row:
            first_cell = first_row.strip("| ").split(" | ")[0]
            assert first_cell in html, md.name


def test_usage_examples_use_no_undefined_name():
    """Every ``python`` block of the README, the docs' front page and the PyPI description
    (docs/pypi.md) defines what it uses (a new user pastes them as they are)."""
    import ast
    import builtins
    import re

    for path in (ROOT / "README.md", ROOT / "docs" / "index.md", ROOT / "docs" / "pypi.md"):
        for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S):
            tree = ast.parse(block)
            bound = set(dir(builtins))
            for node in ast.walk(tree):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    bound.update((a.asname or a.name).split(".")[0] for a in node.names)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    bound.add(node.id)
                elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    bound.add(node.name)
                elif isinstance(node, ast.arg):
                    bound.add(node.arg)
            used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
            assert not used - bound, (path.name, sorted(used - bound))


def test_docstrings_use_markdown_code_blocks_not_rest_literals():
    """The API pages render docstrings as Markdown: a reST ``text::`` literal block would show as
    plain text with a stray colon, so examples are fenced code blocks."""
    import ast

    found = []
    for path in (ROOT / "src" / "compresskv").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False) or ""
                found += [f"{path.name}: {line.strip()}" for line in doc.splitlines() if line.rstrip().endswith("::")]
    assert not found, found
