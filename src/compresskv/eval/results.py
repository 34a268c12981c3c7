"""What the benchmark scripts share: list options on the command line, and writing a result as
JSON (atomically) and Markdown side by side."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

#: where ``compresskv bench`` writes without ``--out``: the working directory, never the package's
#: own published results (those are written with ``--out benchmarks/results/bench``).
DEFAULT_OUT = Path("compresskv-results/bench")


def floats(text: str) -> list[float]:
    """``"0.5,0.75"`` → ``[0.5, 0.75]`` (an argparse ``type=``)."""
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    """``"1,2"`` → ``[1, 2]`` (an argparse ``type=``)."""
    return [int(x) for x in text.split(",") if x.strip()]


def write_result(stem: Path, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str],
                 echo: bool = False) -> str:
    """Write ``stem.json`` (replaced atomically, so an interrupted run leaves the last whole one)
    and ``stem.md`` (``markdown(result)``); return the Markdown, printed too with ``echo``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".json.partial")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, stem.with_suffix(".json"))
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    if echo:
        print(text)
    return text
