"""Quality per byte: ``compresskv bench --frontier``.

Which (method, ratio) row scores best when the cache may hold at most a given share of
``DynamicCache``'s bytes, and the Pareto front of score against measured bytes. Everything here is
a pure function of :func:`~compresskv.eval.aggregate`'s entries (dicts with ``method``, ``ratio``,
``avg``, ``ppl``, ``bytes_vs_full``, ``decode_vs_full``, ``peak_decode_vs_full``), except
:func:`write_frontier`, which writes the results.

The *score* is the needle-task average ``avg`` (0-100, higher is better); ties go to the lower
perplexity. Bytes are *measured* (``bytes_vs_full``: the mean per-prompt ratio to the full cache),
not the ratio asked: compositions (``snapkv+int4``) and quantizers (``int4``) save what they save.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from .methods import BASELINES, ratio_label

#: Target shares of ``DynamicCache``'s bytes: a quarter, an eighth, a sixteenth.
TARGETS = (1 / 4, 1 / 8, 1 / 16)
#: A row qualifies for a target when its measured bytes are at most ``target * SLACK`` (measured
#: bytes carry a little overhead: window tokens, scales, rounding of per-head budgets).
SLACK = 1.05
#: ``--frontier`` without ``--methods``: single methods, compositions, quantizers, transformers' baseline.
FRONTIER_METHODS = [
    "snapkv", "pyramidkv", "streamingllm", "knorm", "svd", "xkv",
    "snapkv+int4", "pyramidkv+int4", "snapkv+int8", "snapkv+pca+int4",
    "int4", "int8", "quantizedcache_int4",
]
#: ``--frontier`` without ``--ratios``: 4x, 8x and 16x fewer tokens (or channels) kept.
FRONTIER_RATIOS = [0.75, 0.875, 0.9375]
#: Quantizers, which are not counted as *single* (token or channel) methods.
QUANTIZERS = ("int4", "int8")
_FULL = "full"  # compresskv.eval.bench.FULL (not imported: bench imports this module)
_FIELDS = ("method", "ratio", "bytes_vs_full", "avg", "ppl", "decode_vs_full", "peak_decode_vs_full")


def is_single(method: str) -> bool:
    """Whether ``method`` is one compression method alone: not a ``+`` composition, not a quantizer
    (``int4``, ``int8``), not a bench baseline (``quantizedcache_*``) and not the full cache."""
    return "+" not in method and method not in QUANTIZERS and method not in BASELINES and method != _FULL


def _scored(entry: dict[str, Any]) -> bool:
    return entry.get("avg") is not None and entry.get("bytes_vs_full") is not None


def qualifies(entry: dict[str, Any], target: float, slack: float = SLACK) -> bool:
    """Whether ``entry`` has a score and its measured bytes are at most ``target * slack`` of the
    full cache's (the full cache itself never qualifies)."""
    return entry["method"] != _FULL and _scored(entry) and entry["bytes_vs_full"] <= target * slack


def _rank(entry: dict[str, Any]) -> tuple[Any, ...]:
    """Sort key, best first: higher score, then lower perplexity (none counts as worst), then fewer
    bytes, then the name and ratio (so that the pick does not depend on the table's order)."""
    ppl = entry.get("ppl")
    return (-entry["avg"], math.inf if ppl is None else ppl, entry["bytes_vs_full"], entry["method"], entry["ratio"])


def best_at(table: Sequence[dict[str, Any]], target: float, slack: float = SLACK,
            single: bool = False) -> dict[str, Any] | None:
    """The best entry (highest ``avg``, ties by lower ``ppl``) among those that
    :func:`qualifies` for ``target``; with ``single``, among :func:`is_single` methods only.
    ``None`` when nothing qualifies."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"best_at: target must be a share of the full cache's bytes in (0, 1], got {target!r}")
    rows = [e for e in table if qualifies(e, target, slack) and (not single or is_single(e["method"]))]
    return min(rows, key=_rank) if rows else None


def pareto_front(table: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries no other one beats with as few bytes: sorted by measured bytes, each scores
    strictly more than every entry with fewer bytes (at equal bytes, the best by :func:`_rank`
    stands for them). Entries without a score or bytes are left out; the full cache is included."""
    front: list[dict[str, Any]] = []
    for e in sorted((e for e in table if _scored(e)), key=lambda e: (e["bytes_vs_full"], _rank(e))):
        if not front or e["avg"] > front[-1]["avg"]:
            front.append(e)
    return front


def summary(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """The fields of ``entry`` the frontier reports (``None`` stays ``None``)."""
    return None if entry is None else {k: entry.get(k) for k in _FIELDS}


def fraction_label(target: float) -> str:
    """``0.125`` → ``"1/8"`` (a unit fraction below 1), else ``f"{target:g}"``."""
    inverse = 1.0 / target
    return f"1/{round(inverse)}" if round(inverse) > 1 and abs(inverse - round(inverse)) < 1e-9 else f"{target:g}"


def frontier_picks(table: Sequence[dict[str, Any]], targets: Sequence[float] = TARGETS,
                   slack: float = SLACK) -> list[dict[str, Any]]:
    """Per target: ``{"target", "label", "slack", "best", "best_single"}``, the last two
    :func:`summary` of :func:`best_at` over every row and over single methods only (or ``None``)."""
    return [{"target": t, "label": fraction_label(t), "slack": slack,
             "best": summary(best_at(table, t, slack)), "best_single": summary(best_at(table, t, slack, single=True))}
            for t in targets]


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _row_name(entry: dict[str, Any]) -> str:
    return f"`{entry['method']}` at {ratio_label(entry['ratio'])}"


def frontier_markdown(picks: Sequence[dict[str, Any]]) -> str:
    """The "Quality per byte" section of the bench page: a line per target with the best row and
    the best single method (:func:`frontier_picks`)."""
    slack = picks[0]["slack"] if picks else SLACK
    lines = [
        "## Quality per byte",
        "",
        "The best row at each share of the full cache's bytes: a row qualifies when its measured *bytes vs full* "
        f"is at most the target × {slack:g}; best means the highest needle-task average (`avg`), ties broken by the "
        "lower perplexity. For comparison, the best *single* method (one method alone: no `+` composition, no "
        "quantizer, no `quantizedcache` baseline) at the same target. A composition or quantizer runs at the ratio "
        "asked and saves what it measurably saves.",
        "",
        "| bytes target | best row | bytes vs full | avg | ppl | decode vs full "
        "| best single method | its bytes vs full | its avg | its ppl |",
        "|:---|:---|---:|---:|---:|---:|:---|---:|---:|---:|",
    ]
    for p in picks:
        cells = [f"≤ {p['label']}"]
        for key in ("best", "best_single"):
            e = p[key]
            if e is None:
                cells += ["none qualifies", "–", "–", "–"] + (["–"] if key == "best" else [])
                continue
            cells += [_row_name(e), _fmt(e["bytes_vs_full"], ".3f"), _fmt(e["avg"], ".1f"), _fmt(e["ppl"], ".3f")]
            if key == "best":
                cells.append(_fmt(e["decode_vs_full"], ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    if not any(p["best"] for p in picks):
        lines += ["", "No row qualifies for any target (or no row has a needle-task score)."]
    return "\n".join(lines) + "\n"


def write_frontier(table: Sequence[dict[str, Any]], stem: Path, title: str = "",
                   log: Callable[[str], None] = print) -> tuple[str, list[Path | None]]:
    """Write ``<stem>_frontier.json`` (the picks per target and the Pareto front) and
    ``<stem>_frontier.png`` (:func:`compresskv.eval.plots.plot_frontier`; skipped with a note when
    matplotlib is missing). Returns the Markdown section (:func:`frontier_markdown`) and the two
    paths (``None`` for a figure not written)."""
    from .plots import plot_frontier

    picks = frontier_picks(table)
    base = Path(str(stem) + "_frontier")
    base.parent.mkdir(parents=True, exist_ok=True)
    json_path = base.with_name(base.name + ".json")
    tmp = base.with_name(base.name + ".json.partial")  # replaced atomically, as the other results
    tmp.write_text(json.dumps({"targets": picks, "front": [summary(e) for e in pareto_front(table)]}, indent=2) + "\n")
    os.replace(tmp, json_path)
    png_path: Path | None = base.with_name(base.name + ".png")
    try:
        plot_frontier(table, png_path, title=title)  # type: ignore[arg-type]
    except ImportError:
        log("note: no frontier plot written (matplotlib is missing: pip install 'compresskv[bench]')")
        png_path = None
    return frontier_markdown(picks), [json_path, png_path]
