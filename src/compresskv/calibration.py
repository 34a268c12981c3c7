"""Calibration inputs and calibration artifacts, shared by every method that calibrates.

Inputs: a list of strings with ``tokenizer=``, token ids (a tensor ``[n, T]`` / ``[T]`` or a list
of lists), or a text file as a :class:`pathlib.Path`; long texts are cut into windows of
``seq_len`` tokens.

Artifacts (projections, frequency rankings, ...): a directory with ``tensors.safetensors`` and
``meta.json`` recording the kind, the model's name, a hash of its config and the options, so an
artifact refuses to load onto a model of another shape or config.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

Texts = str | Sequence[str] | torch.Tensor | Sequence[Sequence[int]] | os.PathLike

# Config fields that define what a calibration artifact was measured on.
_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "max_position_embeddings",
)


def config_hash(model_or_config: Any) -> str:
    """A short, stable hash of the config fields that shape a model's keys and values."""
    config = getattr(model_or_config, "config", model_or_config)
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    fields = {k: getattr(config, k, None) for k in _CONFIG_KEYS}
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_name(model: Any) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "unknown"))


_ACCEPTED = (
    "a string or a list of strings (with tokenizer=), token ids (a tensor [n, T] or [T], or a list of "
    "token-id lists), or a text file as a pathlib.Path"
)


def _no_text(texts: Any, why: str) -> ValueError:
    detail = f"texts={_show(texts)}" + (f" {why}" if why else "")
    return ValueError(f"no calibration text was given ({detail}); pass {_ACCEPTED}")


def _show(texts: Any) -> str:
    if isinstance(texts, torch.Tensor):
        return f"tensor of shape {tuple(texts.shape)}"
    text = repr(texts)
    return text if len(text) <= 40 else text[:37] + "..."


def _names_a_file(text: str) -> bool:
    if "\n" in text or len(text) > 4096:
        return False
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):
        return False


def _read_file(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"calibration texts: no text file {str(path)!r}" + (" (a directory)" if path.is_dir() else ""))
    return path.read_text(encoding="utf-8", errors="replace")


def calibration_windows(
    texts: Texts,
    tokenizer: Any = None,
    seq_len: int = 512,
    min_windows: int = 1,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Token windows ``[n, seq_len]`` cut from ``texts`` (strings need ``tokenizer``).

    ``texts``: a string or a list of strings (with ``tokenizer``), token ids (a tensor ``[n, T]``
    or ``[T]``, a list of token-id lists, or one list of token ids), or a text file given as a :class:`pathlib.Path` (read
    as UTF-8; a plain ``str`` is always the text itself). Each text is tokenized on its own and cut
    into consecutive, non-overlapping windows of ``seq_len`` tokens (a remainder shorter than
    ``seq_len`` is dropped). Raises ``ValueError`` when no text is given (``[]``, ``""``, an empty
    tensor, ``None``), and when fewer than ``min_windows`` windows come out, saying how many
    tokens were needed.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if isinstance(texts, os.PathLike):
        texts = _read_file(Path(texts))
    elif isinstance(texts, Sequence) and not isinstance(texts, str) and texts and all(isinstance(t, os.PathLike) for t in texts):
        texts = [_read_file(Path(t)) for t in texts]
    sequences: list[list[int]]
    if texts is None:
        raise _no_text(texts, "")
    if isinstance(texts, torch.Tensor):
        if texts.numel() == 0:
            raise _no_text(texts, "holds no token ids")
        if texts.dim() not in (1, 2):
            raise ValueError(f"calibration token ids must be a tensor [n, T] or [T], got shape {tuple(texts.shape)}")
        ids = texts.long()
        sequences = [ids.tolist()] if ids.dim() == 1 else [row.tolist() for row in ids]
    elif isinstance(texts, str) or (isinstance(texts, Sequence) and texts and isinstance(texts[0], str)):
        items = [texts] if isinstance(texts, str) else list(texts)
        wrong = [f"texts[{i}] is {type(t).__name__}" for i, t in enumerate(items) if not isinstance(t, str)]
        if wrong:
            raise ValueError(f"calibration texts: a list of strings must hold only strings; {', '.join(wrong[:3])}")
        if not any(t.strip() for t in items):
            raise _no_text(texts, "is blank" if isinstance(texts, str) else "holds only blank strings")
        if tokenizer is None:
            raise ValueError("calibration texts are strings: pass tokenizer= (or give token ids instead)")
        sequences = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in items]
    elif isinstance(texts, Sequence) and not texts:
        raise _no_text(texts, f"is an empty {type(texts).__name__}")
    elif isinstance(texts, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in texts):
        sequences = [list(texts)]  # one text's token ids, like a tensor [T]
    elif isinstance(texts, Sequence) and isinstance(texts[0], Sequence):
        sequences = [list(map(int, s)) for s in texts]
        if not any(sequences):
            raise _no_text(texts, "holds only empty token-id lists")
    else:
        raise ValueError(f"calibration texts must be {_ACCEPTED}; got {type(texts).__name__}")
    windows = [seq[i : i + seq_len] for seq in sequences for i in range(0, len(seq) - seq_len + 1, seq_len)]
    if max_windows is not None:
        windows = windows[:max_windows]
    if len(windows) < min_windows:
        have = sum(len(s) for s in sequences)
        longest = max(len(s) for s in sequences)
        hint = f"need at least {min_windows} (≥ {min_windows * seq_len} tokens in texts of ≥ {seq_len} tokens)"
        if len(sequences) > 1 and have >= min_windows * seq_len:
            hint += (f"; each text is cut on its own and the longest has {longest} tokens: join the texts into one "
                     "string, or lower seq_len")
        else:
            hint += "; give more text, or lower seq_len"
        if isinstance(texts, str) and _names_a_file(texts):
            hint += f"; {texts!r} names a file, but a str is the text itself: pass pathlib.Path({texts!r}) to read it"
        raise ValueError(f"calibration text too short: {have} tokens give {len(windows)} windows of seq_len={seq_len}, {hint}")
    return torch.tensor(windows, dtype=torch.long)


A = TypeVar("A", bound="Artifact")


class Artifact:
    """Base of saved calibration results: tensors + metadata tied to one model config.

    Subclasses set ``kind`` and keep their tensors in ``self.tensors`` (a flat ``dict`` of name →
    tensor) and JSON-able options in ``self.options``.
    """

    kind = "artifact"

    def __init__(
        self, tensors: dict[str, torch.Tensor], options: dict[str, Any], model_name: str, config_hash: str
    ) -> None:
        self.tensors = tensors
        self.options = options
        self.model_name = model_name
        self.config_hash = config_hash

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``tensors.safetensors`` and ``meta.json`` under ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, str(path / "tensors.safetensors"))
        meta = {"kind": self.kind, "model_name": self.model_name, "config_hash": self.config_hash, "options": self.options}
        (path / "meta.json").write_text(json.dumps(meta, indent=2, default=str))

    @classmethod
    def from_pretrained(cls: type[A], path: str | Path, model: Any = None) -> A:
        """Load an artifact; with ``model``, refuse one measured on another model config."""
        from safetensors.torch import load_file

        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("kind") != cls.kind:
            raise ValueError(f"{path} holds a {meta.get('kind')!r} artifact, not {cls.kind!r}")
        artifact = cls(load_file(str(path / "tensors.safetensors")), meta["options"], meta["model_name"], meta["config_hash"])
        if model is not None:
            artifact.check_model(model)
        return artifact

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` when ``model``'s config differs from the one this was measured on."""
        have = config_hash(model)
        if have != self.config_hash:
            raise ValueError(
                f"this {self.kind} was computed on {self.model_name!r} (config hash {self.config_hash}); "
                f"the model given is {model_name(model)!r} (config hash {have}). Recompute it for this model."
            )
