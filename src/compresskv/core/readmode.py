"""One vocabulary for how a compressed layer is read at decode: the ``read_mode=`` option of every
method family that has a choice (MatryoshkaKV/PCA, EliteKV, xKV/SVD/MiniCache). Each family takes
the subset of :data:`READ_MODES` it implements; all give the same result up to rounding."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: every read mode, with what it means (a family takes a subset: its own ``READ_MODES``)
READ_MODES: dict[str, str] = {
    "auto": "choose per read by cost (multiply-adds, and the fused kernel where one applies)",
    "latent": "attend in the compressed space; through a fused kernel where one takes the shapes",
    "latent_explicit": "attend in the compressed space by explicit matmuls and softmax (the reference)",
    "rebuild": "rebuild the keys/values in blocks; compresskv computes the attention",
    "model": "rebuild the full keys/values, then run the model's own attention function",
    "fused": "a method-specific fused kernel (xKV's Triton decode kernel)",
}


def check_read_mode(owner: str, value: object, allowed: Iterable[str],
                    renamed_values: Mapping[str, str] | None = None) -> str:
    """Return ``value`` when ``owner`` (the class or function named in the message) takes it as
    ``read_mode``; else raise a ``ValueError`` naming ``read_mode`` and the allowed values, and
    for an old value (a key of ``renamed_values``) the new one."""
    allowed = list(allowed)
    if isinstance(value, str) and value in allowed:
        return value
    renamed = renamed_values or {}
    hint = ""
    if isinstance(value, str) and value in renamed:
        hint = f" ({value!r} was renamed: use read_mode={renamed[value]!r})"
    raise ValueError(f"{owner}: read_mode must be one of {allowed}, got {value!r}{hint}.")


def renamed_option(old: str, renamed_values: Mapping[str, str]) -> str:
    """The text naming ``read_mode`` as the replacement of the old option ``old`` (for a
    factory's ``renamed_options`` and for the ``TypeError`` its constructor raises)."""
    values = ", ".join(f"{a!r} -> {b!r}" for a, b in renamed_values.items())
    return f"read_mode= (the old {old}= values: {values})"


def refuse_renamed_option(owner: str, old: str, renamed_values: Mapping[str, str]) -> None:
    """Raise the ``TypeError`` for the old option name ``old`` (``mode=``, ``attention=``)."""
    raise TypeError(f"{owner}: {old}= was renamed {renamed_option(old, renamed_values)}.")
