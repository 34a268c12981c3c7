"""mkdocs hooks for the compresskv site (listed under ``hooks:`` in mkdocs.yml).

* ``on_config``: every ``docs/methods/*.md`` page not named in the nav is appended to the
  "Methods" section (titled by its first heading), so a new method's page appears without
  touching mkdocs.yml.
* ``on_files``: the plots and raw results in ``benchmarks/results/`` (``*.png``, ``*.jsonl``,
  ``*.json``) are published under ``results/`` in the site, so pages can show them and
  ``mkdocs build --strict`` can check the links.
* ``on_page_markdown``: two markers are expanded.
  ``<!-- compresskv:results -->`` becomes every ``benchmarks/results/*.md`` table (headings
  demoted) followed by its plot; ``<!-- compresskv:bench methods=a,b -->`` becomes the table of
  ``benchmarks/results/bench.jsonl`` restricted to those methods (plus the full cache), built by
  the same code as ``compresskv bench``'s own table. ``<!-- compresskv:api -->`` becomes the
  mkdocstrings blocks of the API reference: ``compresskv`` (every name in ``__all__``), each
  public submodule named in ``__all__`` (``compresskv.elitekv``, ...), and ``compresskv.eval``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = Path("benchmarks") / "results"
PUBLISHED = (".png", ".jsonl", ".json", ".svg")
_root: Path = Path.cwd()


def _title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def on_config(config: Any) -> Any:
    global _root
    _root = Path(config.config_file_path).resolve().parent
    docs = Path(config.docs_dir)
    nav = config.nav or []
    listed = set(re.findall(r"methods/[^'\"\s}]+\.md", repr(nav)))
    section = next((item for item in nav if isinstance(item, dict) and "Methods" in item), None)
    if section is None:
        section = {"Methods": []}
        nav.insert(1, section)
    for page in sorted((docs / "methods").glob("*.md")):
        uri = f"methods/{page.name}"
        if uri not in listed:
            section["Methods"].append({_title(page): uri})
    config.nav = nav
    return config


def on_files(files: Files, config: Any) -> Files:
    results = _root / RESULTS
    if results.is_dir():
        for path in sorted(results.iterdir()):
            if path.suffix in PUBLISHED and path.is_file():
                files.append(File.generated(config, f"results/{path.name}", abs_src_path=str(path)))
    return files


def _prefix(page: Any) -> str:
    depth = page.file.src_uri.count("/")
    return "../" * depth


def _demote(markdown: str, levels: int = 1) -> str:
    return re.sub(r"^(#{1,5}) ", lambda m: "#" * (len(m.group(1)) + levels) + " ", markdown, flags=re.M)


def _results_section(page: Any) -> str:
    results = _root / RESULTS
    tables = sorted(results.glob("*.md"), key=lambda p: (p.stem != "bench", p.stem)) if results.is_dir() else []
    if not tables:
        return "*No results yet: run `compresskv bench` (and the scripts under `benchmarks/`).*\n"
    parts = []
    for md in tables:
        body = md.read_text(encoding="utf-8")
        if not body.lstrip().startswith("#"):
            body = f"# {md.stem}\n\n{body}"
        parts.append(_demote(body, 1).rstrip() + "\n")
        png = md.with_suffix(".png")
        if png.exists():
            parts.append(f"![{md.stem}]({_prefix(page)}results/{png.name})\n")
        raw = [p for p in (md.with_suffix(".jsonl"), md.with_suffix(".json")) if p.exists()]
        if raw:
            parts.append("Raw results: " + ", ".join(f"[{p.name}]({_prefix(page)}results/{p.name})" for p in raw) + ".\n")
    return "\n".join(parts)


def _bench_table(methods: list[str]) -> str:
    jsonl = _root / RESULTS / "bench.jsonl"
    if not jsonl.exists():
        return "*Not measured yet: run `compresskv bench`.*\n"
    from compresskv.eval.bench import FULL, aggregate, read_rows, table_markdown

    rows = [r for r in read_rows(jsonl) if r.get("method") in {FULL, *methods}]
    if not any(r.get("method") in methods for r in rows):
        return "*Not measured yet: run `compresskv bench` (calibrated methods need `--calibration FILE`).*\n"
    out = []
    for model, length in dict.fromkeys((r["model"], r["length"]) for r in rows):
        group = [r for r in rows if (r["model"], r["length"]) == (model, length)]
        tasks = list(dict.fromkeys(r["task"] for r in group))
        ratios = sorted({r["ratio"] for r in group if r["method"] != FULL})
        table = aggregate(group, tasks, [FULL, *methods], ratios)
        out.append(f"`{model}`, ~{length}-token prompts (from `benchmarks/results/bench.jsonl`; "
                   "details and plot on the Benchmarks page):\n")
        out.append(table_markdown(table, tasks))
    return "\n".join(out)


def _api_blocks() -> str:
    import types

    import compresskv

    modules = [n for n in compresskv.__all__ if isinstance(getattr(compresskv, n, None), types.ModuleType)]
    blocks = ["::: compresskv\n    options:\n      show_submodules: false\n"]
    blocks += [f"::: compresskv.{name}\n    options:\n      show_submodules: false\n" for name in modules]
    blocks.append("::: compresskv.eval\n    options:\n      show_submodules: false\n")
    return "\n".join(blocks)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    markdown = markdown.replace("<!-- compresskv:results -->", _results_section(page))
    if "<!-- compresskv:api -->" in markdown:
        markdown = markdown.replace("<!-- compresskv:api -->", _api_blocks())

    def bench(match: re.Match[str]) -> str:
        methods = [m.strip() for m in match.group(1).split(",") if m.strip()]
        return _bench_table(methods)

    return re.sub(r"<!-- compresskv:bench methods=([\w,\- ]+) -->", bench, markdown)
