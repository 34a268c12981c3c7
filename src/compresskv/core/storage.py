"""The one tensor protocol of compresskv's layers and shared state.

An object names the attributes that hold its per-row tensors (batch first) in ``storage``; each
attribute holds a tensor, ``None`` or a list of tensors. Bytes held, reset, batch operations
(beam reorder, repeat, select) and offload/prefetch all follow from that list, so a method that
stores something new only names it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by the given tensors (``None`` counts as nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Storage:
    """Mixin: per-row tensors named by :attr:`storage`."""

    #: attributes holding per-row tensors (batch first): a tensor, ``None`` or a list of tensors.
    storage: tuple[str, ...] = ()

    def tensors(self) -> list[torch.Tensor]:
        """Every stored tensor, in :attr:`storage` order (lists flattened, ``None`` left out)."""
        out: list[torch.Tensor] = []
        for name in self.storage:
            value = getattr(self, name, None)
            if isinstance(value, list):
                out.extend(value)
            elif value is not None:
                out.append(value)
        return out

    def map_storage(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every stored tensor ``t`` by ``fn(t)`` (a row selection, a device move)."""
        for name in self.storage:
            value = getattr(self, name, None)
            if isinstance(value, list):
                setattr(self, name, [fn(t) for t in value])
            elif value is not None:
                setattr(self, name, fn(value))

    def clear_storage(self) -> None:
        """Drop every stored tensor (lists become empty lists)."""
        for name in self.storage:
            setattr(self, name, [] if isinstance(getattr(self, name, None), list) else None)

    def storage_nbytes(self) -> int:
        return tensor_bytes(*self.tensors())


def batch_fn(op: str, arg: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The row operation transformers asks of a cache, as a function of one tensor: ``"reorder"``
    (beam indices), ``"repeat"`` (repeats per row) or ``"select"`` (row indices)."""
    if op == "reorder":
        return lambda t: t.index_select(0, arg.to(t.device))
    if op == "repeat":
        return lambda t: t.repeat_interleave(arg, dim=0)
    return lambda t: t[arg.to(t.device) if isinstance(arg, torch.Tensor) else arg]
