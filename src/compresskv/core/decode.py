"""Where a layer's decoded tokens go: room written in place, or static buffers for torch.compile.

Two ways (``KVLayer.append`` picks the layer's):

- **Room** (the default): after the prompt, new tokens are written into preallocated room behind
  the stored ones, grown by ``max(16 tokens, 1/32 of the stored)`` when full, so a step copies its
  own token instead of the whole layer (``torch.cat`` per step, as ``DynamicCache`` does, was a
  fifth of SnapKV's decode time at 4k tokens on a CPU). ``keys``/``values`` stay views of exactly
  the stored tokens, so attention reads only those.
- **Static** (a cache built with ``decode_tokens=N``): right after compression the layer moves its
  tokens into buffers with room for ``N`` more, and from then on the tensors it names in
  :meth:`DecodeStorage.static_keys` (``keys``/``values``, or the projected caches' latents) and
  ``valid`` are those whole buffers. A step writes at a position held in a tensor (``_fill``) and attends over
  every slot under a mask in which the unwritten ones are invalid: the shapes and the Python state
  are the same at every step, so ``torch.compile`` traces the step once without a graph break (and
  CUDA graphs can replay it), as transformers' ``StaticCache`` does. The attention reads the room
  too (``N`` slots more than the room way); that is the price of static shapes.

Either way the room is held memory: ``nbytes()`` counts it, :meth:`room_nbytes` says how much of it
holds no token yet.
"""

from __future__ import annotations

from typing import Any

import torch

from .storage import tensor_bytes


def _mark_static(*tensors: torch.Tensor) -> None:
    """Tell torch.compile these tensors keep their address (needed for CUDA graphs to write them)."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


class DecodeStorage:
    """Mixin of :class:`~compresskv.core.cache.KVLayer`: decode-time storage of ``keys``/``values``."""

    #: Room way: tokens of room added when it is full (or 1/32 of the stored, whichever is more).
    ROOM_TOKENS = 16
    #: Static way: decode tokens to make room for after compression (``None``: the room way).
    decode_tokens: int | None = None

    keys: Any
    values: Any
    _valid: torch.Tensor | None
    decoding: bool  # (KVLayer's) the prompt is closed: a multi-token forward is appended

    def init_decode_storage(self) -> None:
        # Room tensors by what they extend: an attribute's name ("keys"), (a list attribute's name,
        # index), or "valid" (the validity, as [..., tokens, 1]); see _stored_for.
        self._rooms: dict[Any, torch.Tensor] = {}
        self._fill: torch.Tensor | None = None  # static way: slots written (a 0-d long tensor)
        self._fill0 = 0  # slots written when the static way began
        self._seen = 0
        self._seen0 = 0  # tokens seen when the static way began

    # -- tokens seen -----------------------------------------------------------------------------
    @property
    def seen(self) -> int:
        """Tokens this layer has seen (stored or not). In the static way it follows from ``_fill``,
        which only tensor operations change (reading it is a host sync)."""
        if self._fill is None:
            return self._seen
        return self._seen0 + int(self._fill) - self._fill0

    @seen.setter
    def seen(self, value: int) -> None:
        self._seen = value

    # -- the room way ----------------------------------------------------------------------------
    def write_in_room(self, stored: torch.Tensor, new: torch.Tensor, key: Any) -> torch.Tensor:
        """``stored`` followed by ``new`` (tokens along dim -2), written into the room of ``key``
        (reallocated, with more room, when ``stored`` is not its prefix or it is full)."""
        room = self._rooms.get(key)
        used, n = stored.shape[-2], new.shape[-2]
        if not self._is_prefix(stored, room) or used + n > room.shape[-2]:
            room = stored.new_empty(*stored.shape[:-2], self.room_size(used, n), stored.shape[-1])
            room[..., :used, :] = stored
            self._rooms[key] = room
        room[..., used : used + n, :] = new
        return room[..., : used + n, :]

    def room_size(self, used: int, n: int) -> int:
        """Slots of a new room for ``used`` stored tokens and ``n`` new ones: ``max(16 tokens, 1/32
        of the stored)`` more (a layer with a fixed capacity, a bounded one, says its own)."""
        return used + n + max(self.ROOM_TOKENS, used // 32)

    def refill_room(self, kept: torch.Tensor, key: Any, capacity: int) -> torch.Tensor:
        """Write ``kept`` (tokens along dim -2) at the front of the room of ``key``, which holds
        ``capacity`` slots and is allocated only when it does not exist yet (or no longer fits);
        returns the view of the written tokens, which :meth:`write_in_room` extends in place."""
        room = self._rooms.get(key)
        if (room is None or room.shape[:-2] != kept.shape[:-2] or room.shape[-1] != kept.shape[-1]
                or room.shape[-2] < max(capacity, kept.shape[-2]) or room.dtype != kept.dtype):
            room = kept.new_empty(*kept.shape[:-2], max(capacity, kept.shape[-2]), kept.shape[-1])
            self._rooms[key] = room
        room[..., : kept.shape[-2], :] = kept
        return room[..., : kept.shape[-2], :]

    def append_valid(self, new: torch.Tensor) -> torch.Tensor:
        """The validity ``[batch, kv_heads, stored]`` followed by ``new`` columns, in the room way."""
        return self.write_in_room(self._valid[..., None], new[..., None], "valid")[..., 0]

    def static_keys(self) -> list[Any]:
        """The tensors holding tokens (along dim -2) that the static way turns into buffers, named as
        room keys are (see :meth:`_stored_for`): ``keys`` and ``values`` here; a layer storing other
        tensors (the projected caches' latents) names those."""
        return ["keys", "values"]

    def _put(self, key: Any, tensor: torch.Tensor) -> None:
        """Set what ``key`` names (see :meth:`_stored_for`)."""
        if isinstance(key, tuple):
            getattr(self, key[0])[key[1]] = tensor
        else:
            setattr(self, key, tensor)

    def _stored_for(self, key: Any) -> torch.Tensor | None:
        """What the room of ``key`` extends, as stored now (None when gone)."""
        if key == "valid":
            return None if self._valid is None else self._valid[..., None]
        if isinstance(key, tuple):
            name, index = key
            values = getattr(self, name, None) or []
            return values[index] if index < len(values) else None
        return getattr(self, key, None)

    @staticmethod
    def _is_prefix(stored: torch.Tensor, room: torch.Tensor | None) -> bool:
        """Whether ``stored`` is the first tokens of ``room`` (a view written by write_in_room)."""
        return (room is not None and stored.data_ptr() == room.data_ptr() and stored.stride() == room.stride()
                and stored.shape[:-2] == room.shape[:-2] and stored.shape[-1] == room.shape[-1])

    def free_room(self) -> None:
        """Drop the room when the stored tensors are replaced: it must not stay alive unaccounted."""
        self._rooms = {}

    def room_nbytes(self) -> int:
        """Bytes of preallocated room not (yet) holding tokens: held memory, counted by ``nbytes()``."""
        if self._fill is not None:
            slots = self._valid.shape[-1]
            per_slot = tensor_bytes(*[self._stored_for(k) for k in self.static_keys()], self._valid) / slots
            return int(per_slot * (slots - int(self._fill)))
        extra = 0
        for key, room in self._rooms.items():
            stored = self._stored_for(key)
            if stored is not None and self._is_prefix(stored, room):
                extra += tensor_bytes(room) - tensor_bytes(stored)
        return extra

    # -- the static way --------------------------------------------------------------------------
    @property
    def static(self) -> bool:
        """Whether the layer decodes the static way (see the module's docstring)."""
        return self._fill is not None

    @property
    def is_compileable(self) -> bool:  # transformers: a cache compiles when all its layers do
        return self.decode_tokens is not None

    def begin_static(self) -> None:
        """Move the stored tokens into buffers with ``decode_tokens`` slots more (after compression)."""
        valid = self._valid
        first = self._stored_for(self.static_keys()[0])
        b, n, device = first.shape[0], first.shape[-2], first.device
        h = self.expected[1] if self.expected is not None else first.shape[1]
        slots = n + self.decode_tokens
        self.free_room()
        for key in self.static_keys():
            stored = self._stored_for(key)
            buf = stored.new_zeros(*stored.shape[:-2], slots, stored.shape[-1])
            buf[..., :n, :] = stored
            self._put(key, buf)
        # One validity row per row of the batch when every head keeps the same slots valid (the
        # mask then broadcasts over heads), else one per KV head.
        if valid is not None and not bool((valid == valid[:, :1]).all()):
            buf = torch.zeros(b, h, slots, dtype=torch.bool, device=device)
        else:
            buf = torch.zeros(b, 1, slots, dtype=torch.bool, device=device)
        buf[..., :n] = True if valid is None else valid[:, : buf.shape[1]]
        seen = self._seen
        self._valid = buf
        self._heads_agree = buf.shape[1] == 1
        self._fill = torch.tensor(n, device=device)
        self._fill0, self._seen0 = n, seen
        self._mark_static_buffers()

    def _mark_static_buffers(self) -> None:
        _mark_static(*[self._stored_for(k) for k in self.static_keys()], self._valid, self._fill)

    def write_static(self, *new: torch.Tensor) -> None:
        """Write new tokens at ``_fill`` in place, one tensor per :meth:`static_keys` (no host sync
        and no new Python state when compiled; eagerly, a full buffer grows and a second piece of
        the prompt is refused)."""
        n = new[0].shape[-2]
        if not torch.compiler.is_compiling():
            filled = int(self._fill)
            if n > 1 and filled == self._fill0 and not self.decoding:
                raise ValueError(
                    f"compresskv: {type(self).__name__} with decode_tokens= (static decoding) compresses the prompt's "
                    "first forward only; a second multi-token forward before any decode step (chunked prefill, "
                    "generate(prefill_chunk_size=...)) is not supported. Send the prompt in one forward, or build "
                    "the cache without decode_tokens."
                )
            if filled + n > self._valid.shape[-1]:
                self._grow(filled + n + self.decode_tokens - self._valid.shape[-1])
        index = self._fill + torch.arange(n, device=self._fill.device)
        for key, tokens in zip(self.static_keys(), new):
            self._stored_for(key).index_copy_(-2, index, tokens)
        self._valid.index_fill_(2, index, True)  # decoded tokens are real
        self._fill.add_(n)

    def _grow(self, more: int) -> None:
        """Add ``more`` slots to the static buffers (eager only: under torch.compile this changes
        shapes, so the next step compiles again; decode_tokens should cover the generation)."""
        for key in self.static_keys():
            t = self._stored_for(key)
            self._put(key, torch.cat([t, t.new_zeros(*t.shape[:-2], more, t.shape[-1])], dim=-2))
        self._valid = torch.cat([self._valid, self._valid.new_zeros(*self._valid.shape[:-1], more)], dim=-1)
        self._mark_static_buffers()

    def static_mask(self, query: torch.Tensor, eager: bool) -> torch.Tensor:
        """The static way's mask, ``[batch, 1 or q_heads, q_len, slots]``: written valid slots, causal
        among the new tokens (bool, or 0 / dtype-min for eager attention)."""
        q_len, n_heads = query.shape[-2], query.shape[1]
        mask = self._valid[:, :, None, :]
        if q_len > 1:
            slots = torch.arange(mask.shape[-1], device=mask.device)
            at = self._fill - q_len + torch.arange(q_len, device=mask.device)
            mask = mask & (slots[None, :] <= at[:, None])
        if mask.shape[1] > 1:
            mask = mask.repeat_interleave(n_heads // mask.shape[1], dim=1)
        if eager:
            zero = torch.zeros((), dtype=query.dtype, device=query.device)
            mask = torch.where(mask, zero, torch.finfo(query.dtype).min)
        return mask

    def static_sdpa(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
        """One decoded token's attention over the static buffers, ``[batch, 1, q_heads, d]``: the query
        heads of each KV head are taken as that head's rows (no ``repeat_kv`` copy of the buffers,
        which transformers' sdpa path makes under torch.compile when there is a mask), and the mask,
        one row per batch row or KV head, broadcasts over them."""
        bsz, n_q, _, dim = query.shape
        n_kv = keys.shape[1]
        rows = query.reshape(bsz, n_kv, n_q // n_kv, dim)
        out = torch.nn.functional.scaled_dot_product_attention(
            rows, keys, values, attn_mask=self._valid[:, :, None, :], scale=scaling
        )
        return out.reshape(bsz, n_q, 1, values.shape[-1]).transpose(1, 2).contiguous()

    def static_moved(self) -> None:
        """After a row operation or a device move of the static buffers: the counter follows them,
        and the new tensors are marked static again."""
        if self._fill is not None:
            self._fill = self._fill.to(self._valid.device)
            self._mark_static_buffers()

    def end_static(self) -> None:
        """Leave the static way (reset)."""
        self._fill = None
        self._fill0 = self._seen0 = 0
