"""Text that ships with compresskv, so that every example and the calibrated methods run offline.

``persuasion.txt`` is Jane Austen's *Persuasion* (1818; public domain), one line per printed
line, without Project Gutenberg's header and footer (from Debian's r-cran-janeaustenr). About
467 KB, ~110k tokens with SmolLM2's tokenizer: enough for the calibration, training and rank
allocation that ``compresskv bench`` and ``compresskv demo`` run (~26k tokens).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

SAMPLE_TEXT_NAME = "persuasion.txt"


def sample_text_path() -> Path:
    """Path of the bundled novel (a real file inside the installed package)."""
    return Path(str(files(__name__) / SAMPLE_TEXT_NAME))


def sample_text(chars: int | None = None) -> str:
    """The bundled novel's text, or its first ``chars`` characters (cut at a paragraph break
    where there is one in the last tenth)."""
    text = (files(__name__) / SAMPLE_TEXT_NAME).read_text(encoding="utf-8")
    if chars is None or chars >= len(text):
        return text
    if chars < 1:
        raise ValueError(f"chars must be >= 1 (or None for the whole text), got {chars!r}")
    cut = text.rfind("\n\n", int(chars * 0.9), chars)
    return text[: cut if cut > 0 else chars]
