"""The figure of ``compresskv bench``, drawn from :func:`~compresskv.eval.aggregate`'s entries.

Two kinds of panel, side by side:

- by the *asked* compression ratio: one panel per task, the average, perplexity. Many methods
  land on the same score at the same ratio (100, or 0), so each method has its own hollow marker
  shape and its markers are spread sideways around the ratio (:data:`DODGE`): none hides another.
- by the *measured* cache bytes saved against ``DynamicCache`` (``1 - bytes_vs_full``): the
  headline score and the decode speed. There a method without a ratio (``minicache``, run at its
  default settings) sits where it belongs, and the x values are measurements, so they are not
  moved.

A method run at its default settings appears on every panel at the fraction it removed, and is
labelled there, since no asked ratio explains its position. Needs matplotlib (imported on use).

``compresskv bench --frontier`` adds a figure of its own (:func:`plot_frontier`): the needle-task
average against the measured bytes on a log axis, every (method, ratio) row a labelled point, the
Pareto front (:func:`compresskv.eval.frontier.pareto_front`) a step line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .methods import DEFAULT_SETTINGS, ratio_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p", "d", "H")
#: The share of the narrowest gap between two asked ratios over which the markers of one ratio are
#: spread (at most; fewer than seven methods use less), so that equal scores stay visible side
#: by side and still read as that ratio.
DODGE = 0.75
FULL_LABEL = "full cache (DynamicCache)"


def plot_ratio(entry: dict[str, Any]) -> float | None:
    """Where an entry sits on the ratio axis: its asked ratio, or for a method run at its default
    settings the fraction of the cache it measurably removed."""
    if entry["ratio"] == DEFAULT_SETTINGS:
        return bytes_saved(entry)
    return entry["ratio"]


def bytes_saved(entry: dict[str, Any]) -> float | None:
    """The measured fraction of ``DynamicCache``'s bytes an entry saves (``1 - bytes_vs_full``)."""
    return None if entry.get("bytes_vs_full") is None else 1.0 - entry["bytes_vs_full"]


@dataclass(frozen=True)
class Panel:
    """One panel: its title, the value drawn, the y label, ``x`` (``"ratio"`` asked or ``"bytes"``
    saved as measured) and ``kind`` (``"score"``, ``"ppl"`` or ``"speed"``: the y scale)."""

    title: str
    get: Callable[[dict[str, Any]], float | None]
    ylabel: str
    x: str
    kind: str


def panels(tasks: Sequence[str]) -> list[Panel]:
    """The panels for ``tasks``: per task, the average and perplexity by asked ratio; then the
    headline (the average, the single task, or perplexity) and decode speed by bytes saved."""
    from .bench import PERPLEXITY

    score_tasks = [t for t in tasks if t != PERPLEXITY]
    score = "score (0-100)"
    out = [Panel(t, (lambda e, t=t: e["scores"].get(t)), score, "ratio", "score") for t in score_tasks]
    if len(score_tasks) > 1:
        out.append(Panel("average", lambda e: e["avg"], score, "ratio", "score"))
    ppl = Panel("perplexity (lower is better)", lambda e: e.get("ppl"), "perplexity", "ratio", "ppl")
    if PERPLEXITY in tasks:
        out.append(ppl)
    if len(score_tasks) > 1:
        out.append(Panel("average score by bytes saved", lambda e: e["avg"], score, "bytes", "score"))
    elif score_tasks:
        head = score_tasks[0]
        out.append(Panel(f"{head} by bytes saved", lambda e: e["scores"].get(head), score, "bytes", "score"))
    else:
        out.append(Panel("perplexity by bytes saved", ppl.get, "perplexity", "bytes", "ppl"))
    out.append(Panel("decode speed (higher is faster)", lambda e: e.get("decode_vs_full"),
                     "decode tokens/s ÷ DynamicCache's", "bytes", "speed"))
    return out


def _offsets(table: Sequence[dict[str, Any]], methods: Sequence[str]) -> dict[str, float]:
    """Each method's sideways shift on the ratio panels, centred on the asked ratio."""
    ratios = sorted({e["ratio"] for e in table if e["method"] in methods and e["ratio"] != DEFAULT_SETTINGS})
    gaps = [b - a for a, b in zip(ratios, ratios[1:])]
    spread = DODGE * (min(gaps) if gaps else 0.1)
    spaced = [m for m in methods if any(e["method"] == m and e["ratio"] != DEFAULT_SETTINGS for e in table)]
    step = spread / max(6, len(spaced) - 1)  # a few methods stay close together, not pushed to the ends
    return {m: (i - (len(spaced) - 1) / 2) * step for i, m in enumerate(spaced)}


#: Where a default-settings label may go, in points from its point: tried in turn, the first
#: that covers no plotted point and stays inside the panel wins.
_LABEL_SPOTS = ((8, 12), (8, -12), (-8, 12), (-8, -12), (0, 16), (0, -16), (8, 36), (8, -36), (-8, 36), (-8, -36))


def _trace(line: Any) -> list[Any]:
    """Display points along a drawn line, its segments sampled finely, for overlap tests."""
    import numpy as np

    xy = line.get_transform().transform(line.get_xydata())
    if len(xy) < 2:
        return list(xy)
    steps = np.linspace(0.0, 1.0, 25)[:, None]
    return [p for a, b in zip(xy, xy[1:]) for p in a + steps * (b - a)]


def _label_default(ax: Axes, method: str, x: float, y: float, color: str, taken: list[Any]) -> None:
    """Name a default-settings point: its x is a measured saving, not a ratio anyone asked for.
    The label takes the first spot of :data:`_LABEL_SPOTS` that hides no data and no other label
    (``taken``: the boxes of the labels already placed on this panel)."""
    renderer = ax.figure.canvas.get_renderer()
    ax.get_xlim(), ax.get_ylim()  # settle the autoscaled limits before measuring anything
    points = [p for line in ax.get_lines() for p in _trace(line)]
    frame = ax.get_window_extent(renderer)
    best = None
    for dx, dy in _LABEL_SPOTS:
        note = ax.annotate(f"{method}\n(default settings,\nsaves {x:.0%})", xy=(x, y),
                           xytext=(dx, dy), textcoords="offset points", fontsize=7.5, color=color,
                           ha="left" if dx > 0 else "right" if dx < 0 else "center",
                           va="bottom" if dy > 0 else "top",
                           arrowprops=dict(arrowstyle="-", color=color, linewidth=0.8))
        box = note.get_window_extent(renderer).expanded(1.05, 1.15)
        hidden = sum(box.contains(px, py) for px, py in points) + sum(box.overlaps(b) for b in taken)
        inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
        cost = hidden + (0 if inside else 1000)
        if best is None or cost < best[0]:
            if best is not None:
                best[1].remove()
            best = (cost, note, box)
        else:
            note.remove()
        if cost == 0:
            break
    taken.append(best[2])


def _draw(ax: Axes, panel: Panel, table: Sequence[dict[str, Any]], methods: Sequence[str],
          full: dict[str, Any] | None, shift: dict[str, float]) -> list[tuple[str, float, float, str]]:
    """Draw one panel; return its default-settings points, labelled once the layout is final."""
    from .bench import FULL

    by_ratio = panel.x == "ratio"
    defaults = []
    for i, method in enumerate(methods):
        pts = []
        for e in table:
            y = panel.get(e) if e["method"] == method else None
            x = plot_ratio(e) if by_ratio else bytes_saved(e)
            if y is None or x is None:
                continue
            if e["ratio"] == DEFAULT_SETTINGS:
                defaults.append((method, x, y, f"C{i % 10}"))
            elif by_ratio:
                x += shift.get(method, 0.0)
            pts.append((x, y))
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], color=f"C{i % 10}", label=method,
                    linewidth=1.1, markersize=7, markerfacecolor="none", markeredgewidth=1.4, alpha=0.9)
    ref = panel.get(full) if full is not None else None
    if ref is not None:
        ax.axhline(ref, color="black", linestyle="--", linewidth=1, label=FULL)
        if not by_ratio:  # the full cache saves nothing: its own point on a bytes axis
            ax.plot([0.0], [ref], marker="o", color="black", markersize=5, linestyle="none")
    ax.set_title(panel.title)
    ax.set_ylabel(panel.ylabel)
    asked = sorted({e["ratio"] for e in table if e["method"] != FULL and e["ratio"] != DEFAULT_SETTINGS})
    if by_ratio:
        ax.set_xlabel("compression ratio asked (fraction removed)")
        ticks = asked
    else:
        ax.set_xlabel("cache bytes saved vs DynamicCache (measured)")
        ticks = [0.0, *asked]
    if ticks:
        ax.set_xticks(ticks, [f"{r:g}" for r in ticks])
    if panel.kind == "score":
        ax.set_ylim(-5, 105)
    elif panel.kind == "ppl":  # perplexities span orders of magnitude across methods
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return defaults


def figure(table: Sequence[dict[str, Any]], tasks: Sequence[str], title: str = "") -> Figure:
    """The figure (see the module's docstring) of :func:`~compresskv.eval.aggregate`'s entries;
    the legend names every method. :func:`plot` saves it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from .bench import FULL

    chosen = panels(tasks)
    n = len(chosen)
    cols = min(n, 3)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.9 * rows_n + 0.6), squeeze=False)
    full = next((e for e in table if e["method"] == FULL), None)
    methods = list(dict.fromkeys(e["method"] for e in table if e["method"] != FULL))
    shift = _offsets(table, methods)
    defaults = [_draw(ax, panel, table, methods, full, shift) for ax, panel in zip(axes.flat, chosen)]
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    # The legend is built from the methods, not from one panel, so that a method missing from
    # the first panel (no score there) is still named.
    handles = [Line2D([], [], marker=MARKERS[i % len(MARKERS)], color=f"C{i % 10}", markerfacecolor="none",
                      markeredgewidth=1.4, markersize=7, label=m) for i, m in enumerate(methods)]
    if full is not None:
        handles.append(Line2D([], [], color="black", linestyle="--", marker="o", markersize=4, label=FULL_LABEL))
    inch = 1 / fig.get_figheight()  # the legend and the note keep their room whatever the rows
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False,
               bbox_to_anchor=(0.5, 0.2 * inch))
    fig.text(0.5, 0.04 * inch, "By asked ratio: each method's markers are spread a little sideways around the ratio, "
             "so that equal scores do not hide each other. By bytes saved: measured positions, not moved.",
             ha="center", va="bottom", fontsize=8, color="0.3")
    if title:
        fig.suptitle(title)
    legend_rows = math.ceil(len(handles) / 6)
    fig.tight_layout(rect=(0, (0.35 + 0.3 * legend_rows) * inch, 1, 1))
    for ax, points in zip(axes.flat, defaults):
        taken: list[Any] = []
        for method, x, y, color in points:  # x is its measured saving on both kinds of axis
            _label_default(ax, method, x, y, color, taken)
    return fig


def plot(table: Sequence[dict[str, Any]], tasks: Sequence[str], path: Path, title: str = "") -> Path:
    """Draw the bench figure of :func:`aggregate`'s entries as a PNG at ``path`` (returned): score
    by asked compression ratio per task, the average and perplexity; then the headline score and
    decode speed by the cache bytes measurably saved against ``DynamicCache``. Methods at one ratio
    are spread a little sideways, and a method run at its default settings is labelled. Needs
    matplotlib (``pip install 'compresskv[bench]'``)."""
    return _save(figure(table, tasks, title), path)


def _save(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folders made) and free it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_frontier(table: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Draw the quality-per-byte figure of :func:`~compresskv.eval.aggregate`'s entries as a PNG at
    ``path`` (returned): the needle-task average against the cache bytes measured against
    ``DynamicCache`` (log scale), one labelled marker per (method, ratio) row, the Pareto front as a
    step line and the byte targets of :data:`compresskv.eval.frontier.TARGETS` as dotted lines.
    Needs matplotlib (``pip install 'compresskv[bench]'``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    from .bench import FULL
    from .frontier import TARGETS, fraction_label, pareto_front

    rows = [e for e in table if e.get("avg") is not None and e.get("bytes_vs_full")]
    methods = list(dict.fromkeys(e["method"] for e in rows if e["method"] != FULL))
    fig, ax = plt.subplots(figsize=(9.0, 5.6))
    for i, method in enumerate(methods):
        pts = sorted((e["bytes_vs_full"], e["avg"], e["ratio"]) for e in rows if e["method"] == method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle="none", marker=MARKERS[i % len(MARKERS)],
                color=f"C{i % 10}", markerfacecolor="none", markeredgewidth=1.4, markersize=7, label=method)
        for x, y, ratio in pts:
            ax.annotate(f"{method} {ratio_label(ratio)}", (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=6, color=f"C{i % 10}")
    full = next((e for e in rows if e["method"] == FULL), None)
    if full is not None:
        ax.plot([full["bytes_vs_full"]], [full["avg"]], marker="o", color="black", linestyle="none", label=FULL_LABEL)
    front = pareto_front(rows)
    if front:  # the best score reachable with at most x bytes: flat until the next front point
        ax.step([e["bytes_vs_full"] for e in front], [e["avg"] for e in front], where="post", color="0.25",
                linewidth=1.2, alpha=0.8, label="Pareto front", zorder=1)
    for target in TARGETS:
        ax.axvline(target, color="0.6", linestyle=":", linewidth=0.9, zorder=0)
    ax.set_xscale("log")
    ticks = sorted({*TARGETS, 0.5, 1.0})
    ax.set_xticks(ticks, [fraction_label(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())  # only the fractions named above
    ax.set_xlabel("cache bytes vs DynamicCache (measured, log scale)")
    ax.set_ylabel("needle-task average (0-100)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(title or "quality per byte", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_allocation(allocations: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Draw EliteKV's dimension allocation (``compresskv elitekv-allocate``) as a PNG at ``path``
    (returned): perplexity against the rotated RoPE pairs ``r`` per KV head, one line per cache
    ratio (``allocations``: :meth:`compresskv.elitekv.Allocation.to_dict` of each), the chosen ``r``
    a filled star, the fixed rule's ``r`` a hollow square, the original model's perplexity a dotted
    line. Log-scaled perplexity. Needs matplotlib (``pip install 'compresskv[bench]'``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    reference = None
    for i, a in enumerate(allocations):
        color = f"C{i % 10}"
        rows = sorted(a["table"], key=lambda row: row["rope_pairs"])
        xs, ys = [row["rope_pairs"] for row in rows], [row["ppl"] for row in rows]
        ax.plot(xs, ys, marker="o", markersize=3.5, color=color, label=f"cache ratio {a['cache_ratio']:g}")
        best = next(row for row in rows if row["rope_pairs"] == a["rope_pairs"])
        ax.plot([best["rope_pairs"]], [best["ppl"]], marker="*", markersize=15, color=color, linestyle="none")
        ax.annotate(f"r={best['rope_pairs']}, kv_dim={best['kv_dim']}", (best["rope_pairs"], best["ppl"]),
                    textcoords="offset points", xytext=(6, -12), fontsize=8, color=color)
        rule = next((row for row in rows if row["rope_pairs"] == a.get("rule_rope_pairs")), None)
        if rule is not None:
            ax.plot([rule["rope_pairs"]], [rule["ppl"]], marker="s", markersize=9, markerfacecolor="none",
                    markeredgewidth=1.4, color=color, linestyle="none")
        reference = a.get("reference_ppl") if reference is None else reference
    if reference is not None:
        ax.axhline(reference, color="black", linestyle=":", linewidth=1, label="original model")
    ax.plot([], [], marker="*", markersize=11, color="0.3", linestyle="none", label="chosen (lowest ppl)")
    ax.plot([], [], marker="s", markersize=8, markerfacecolor="none", color="0.3", linestyle="none",
            label="fixed rule (≈3/8 of the budget)")
    ax.set_yscale("log")
    ax.set_xlabel("rope_pairs r (RoPE pairs kept per KV head)")
    ax.set_ylabel("held-out perplexity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "EliteKV: perplexity vs rotated pairs, training-free", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
