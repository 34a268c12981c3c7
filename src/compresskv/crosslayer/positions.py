"""Where the compressed prefill tokens sit: the prefill positions per batch row (the model's rotary
embedding, to un-rotate keys before the SVD and re-rotate them on read, is
:class:`compresskv.core.rope.RotaryTable`)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..core.storage import Storage


class PrefillPositions(Storage):
    """The RoPE positions of the compressed prefill tokens, per batch row (needed to re-rotate
    pre-RoPE keys). Stored as one offset per row (``[batch, 1]`` int64) when every real token sits
    at ``offset + index`` (what ``generate`` produces, left padding included), else as a
    ``[batch, T]`` int32 table. Padding tokens are masked and zero in the latent, so their
    positions do not matter."""

    storage = ("offsets", "table")

    def __init__(self) -> None:
        self.offsets: torch.Tensor | None = None
        self.table: torch.Tensor | None = None
        self.length = 0
        # Objects built from the positions (xKV's fused read keeps its PrefixRope per device here),
        # dropped whenever the positions change: set, reset, batch operations.
        self._derived: dict[Any, Any] = {}

    def derived(self, key: Any, make: Callable[[], Any]) -> Any:
        """``make()``, built once per ``key`` until the positions change (then built again)."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def forget(self, kind: str) -> None:
        """Drop the derived objects whose key is a tuple starting with ``kind`` (per-forward ones)."""
        for key in [k for k in self._derived if isinstance(k, tuple) and k and k[0] == kind]:
            del self._derived[key]

    def map_storage(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._derived.clear()
        super().map_storage(fn)

    @property
    def is_set(self) -> bool:
        return self.offsets is not None or self.table is not None

    def set(self, position_ids: torch.Tensor | None, real: torch.Tensor | None, batch: int, length: int, device: Any) -> None:
        index = torch.arange(length, device=device)
        if position_ids is None:
            pos = index.expand(batch, length)
        else:
            pos = position_ids[..., -length:].to(device).expand(batch, length)
        offset = pos - index
        if real is None:
            first = torch.zeros(batch, 1, dtype=torch.long, device=device)
            ok = bool((offset == offset[:, :1]).all())
        else:
            first = real.to(torch.long).argmax(dim=-1, keepdim=True)
            ok = bool(((offset == offset.gather(1, first)) | ~real).all())
        self.length = length
        self._derived.clear()
        if ok:
            self.offsets, self.table = offset.gather(1, first).to(torch.long).contiguous(), None
        else:
            self.offsets, self.table = None, pos.to(torch.int32).contiguous()

    def get(self, start: int = 0, end: int | None = None, device: Any = None) -> torch.Tensor:
        """Positions of prefill tokens ``start:end``, ``[batch, n]`` int64 (on ``device`` when given:
        the reading layer's, under a multi-device ``device_map``)."""
        end = self.length if end is None else end
        if self.table is not None:
            return self.table[:, start:end].to(device=device, dtype=torch.long)
        assert self.offsets is not None
        offsets = self.offsets.to(device) if device is not None else self.offsets
        return offsets + torch.arange(start, end, device=offsets.device)

    def reset(self) -> None:
        self._derived.clear()
        self.clear_storage()
        self.length = 0
