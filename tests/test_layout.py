"""The package's layout rules (docs/architecture.md): small modules, core imports no family, a
family imports no other family, no import cycle, and the Architecture page's K-norm example is
the real file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import compresskv

SRC = Path(compresskv.__file__).resolve().parent
ROOT = SRC.parents[1]
FAMILIES = ("eviction", "projected", "crosslayer", "elitekv")
MAX_LINES = 520  # "about 500"


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(("compresskv", *parts))
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, top_only: bool = False) -> set[str]:
    """Modules of compresskv that ``name`` imports (absolute names; submodules resolved); with
    ``top_only``, only the imports run when the module is imported (its top level)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("compresskv"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("compresskv"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(name, path) if m in modules and m != name} for name, path in modules.items()}


def test_no_module_over_about_500_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_core_imports_no_family_and_families_import_no_other_family():
    for name, targets in _graph().items():
        parts = name.split(".")
        if len(parts) < 2:
            continue
        home = parts[1]
        for target in targets:
            there = target.split(".")[1] if "." in target else ""
            if home == "core":
                assert there not in FAMILIES, (name, target)
            if home in FAMILIES and there in FAMILIES:
                assert there == home, (name, target)
            if home in FAMILIES + ("core",):  # compositions sit above the families
                assert there != "compose", (name, target)


def test_no_import_cycle_at_module_level():
    modules = _modules()
    top = {name: {m for m in _imports(name, path, top_only=True) if m in modules and m != name}
           for name, path in modules.items()}

    # a package's __init__ re-exporting its submodules is not a cycle with them
    def edges(n: str) -> set[str]:
        return {m for m in top.get(n, ()) if not n.startswith(m + ".")}

    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in edges(n):
            if state.get(m) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(m):] + [m])}")
            if not state.get(m):
                visit(m, stack + [m])
        state[n] = 2

    for n in top:
        if not state.get(n):
            visit(n, [n])


def test_architecture_page_shows_the_real_knorm_file():
    page = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"```python\n(class KnormCache.*?)```", page, re.S).group(1)
    source = (SRC / "eviction" / "knorm.py").read_text()
    assert len(source.splitlines()) <= 60
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines and all(line in source.splitlines() for line in lines)
