"""Bounded decoding for the eviction caches: a layer never holds more than ``decode_budget`` tokens.

Eviction after the prompt leaves decoding to append forever, so a long generation (a reasoning
model's thousands of tokens) grows the cache without bound. With ``decode_budget=B`` a layer
holds at most ``B`` tokens from its first decode step on: when the next forward's ``n`` tokens
would not fit, it evicts down to ``B - max(decode_interval, n)`` with its method's own scores
before writing them, so it evicts once every ``decode_interval`` steps. SnapKV and PyramidKV score
with the queries of the last ``window_size`` tokens (kept in a small ring, counted in the bytes)
and keep those tokens; Expected Attention summarises its last ``stat_queries`` queries; K-norm
needs none; StreamingLLM's scores keep its sinks and the most recent tokens (the baseline).

Costs: the keys and values live in one room of ``B`` slots, allocated once and written in place,
so a step allocates nothing and reads no tensor back (the step count is Python's); an eviction
(every ``decode_interval`` steps) gathers the kept tokens and, under padding, reads the rows' real
counts back once.

Batched rows evict as they would alone: a row evicts when its own real tokens would overflow
(``B`` counts the row's real tokens, not the slots padding takes); rows with room left only drop
the filler slots in that eviction. Before scoring, a row's filler slots are moved in front of its
real tokens, so every scorer sees the layout of a left-padded prompt, whose masks it handles.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.ops import take_tokens


class BoundedDecode:
    """Mixin of :class:`~compresskv.eviction.base.EvictionLayer`: the decode-time budget."""

    cache: Any
    decode_limit: int | None  # tokens the layer may hold while decoding (None: unbounded), set by the layer
    keys: torch.Tensor
    values: torch.Tensor
    seen: int
    decoding: bool
    #: the last queries, a ring ``[batch, q_heads, memory, head_dim]`` (None when not bounded or
    #: when the scorer needs none); per row, so batch operations follow it
    recent_queries: torch.Tensor | None
    #: left padding per row of the prompt, ``[batch]`` (None: none), for the rows' positions
    row_pad: torch.Tensor | None

    def init_bounded(self) -> None:
        self.recent_queries = self.row_pad = None
        self._recorded = 0  # queries written to the ring so far
        self._scaling = 1.0

    def room_size(self, used: int, n: int) -> int:
        limit = self.decode_limit
        return super().room_size(used, n) if limit is None else max(limit, used + n)  # type: ignore[misc]

    def remember(self, call: Any) -> None:
        """After attention: keep the newest queries (and, for a prompt, each row's padding)."""
        if not self.decoding and call.pad2d is not None:
            self.row_pad = (~call.pad2d[:, -self.seen :].to(self.keys.device, torch.bool)).sum(-1)
        memory = self.cache.query_memory
        if not memory:
            return
        query = call.query
        m = min(memory, query.shape[2])
        ring = self.recent_queries
        if ring is None or ring.shape[0] != query.shape[0]:
            ring = self.recent_queries = query.new_zeros(query.shape[0], query.shape[1], memory, query.shape[3])
        at = self._recorded % memory
        first = min(m, memory - at)  # slices, not an index tensor: a step allocates nothing
        ring[:, :, at : at + first].copy_(query[:, :, query.shape[2] - m : query.shape[2] - m + first])
        if m > first:
            ring[:, :, : m - first].copy_(query[:, :, query.shape[2] - m + first :])
        self._recorded += m
        self._scaling = call.scaling

    def _recent(self) -> torch.Tensor | None:
        """The remembered queries, oldest first."""
        ring = self.recent_queries
        if ring is None:
            return None
        memory = ring.shape[2]
        if self._recorded <= memory:
            return ring[:, :, : self._recorded]
        at = self._recorded % memory
        return torch.cat([ring[:, :, at:], ring[:, :, :at]], dim=2)

    def make_room(self, n: int) -> None:
        """Before ``n`` new tokens are written while decoding: evict so that they fit the limit."""
        limit = self.decode_limit
        if limit is None or not (self.decoding or n == 1):
            return
        slots = self.keys.shape[-2]
        if slots + n <= limit:
            return
        keep = limit - max(self.cache.decode_interval, n)
        window = self.cache.window_size
        if keep <= window:
            raise ValueError(
                f"compresskv: a forward of {n} tokens does not fit {type(self.cache).__name__}'s decode_budget="
                f"{self.cache.decode_budget} (layer limit {limit}) with window_size={window}: feed fewer tokens per "
                "forward, or raise decode_budget."
            )
        valid = self.valid  # type: ignore[attr-defined]
        bsz, device = self.keys.shape[0], self.keys.device
        if valid is None:  # every slot real: every row evicts
            rows, counts = list(range(bsz)), [slots] * bsz
        else:
            counts = valid.sum(-1).amax(-1).tolist()  # one read-back per eviction, not per step
            rows = [r for r, c in enumerate(counts) if c + n > limit]
        chosen = valid.clone() if valid is not None else None
        if rows:
            sel = slice(None) if len(rows) == bsz else torch.tensor(rows, device=device)
            picked = self._pick(sel, keep, window, valid)
            if chosen is None:
                chosen = picked
            else:
                chosen[sel] = picked
        after = max([keep] * bool(rows) + [c for r, c in enumerate(counts) if r not in rows])
        self.keep_chosen(chosen, after, filler=valid is not None, capacity=limit)  # type: ignore[attr-defined]

    def _pick(self, sel: Any, keep: int, window: int, valid: torch.Tensor | None) -> torch.Tensor:
        """Which slots the rows ``sel`` keep (``keep`` per KV head: the method's best-scored and
        the last ``window`` real tokens), ``[rows, kv_heads, slots]``."""
        keys = self.keys[sel]
        slots = keys.shape[-2]
        order = None
        if valid is not None:  # filler in front, real tokens after in order: a left-padded layout
            valid = valid[sel]
            order = torch.sort(valid.to(torch.int8), dim=-1, stable=True).indices
            keys = take_tokens(keys, order)
            valid = valid.gather(-1, order)
        queries = self._recent()
        seen = torch.full((keys.shape[0],), self.seen, device=keys.device)
        if self.row_pad is not None:
            seen = seen - self.row_pad[sel]
        scores = self.cache.scores(
            queries[sel] if queries is not None else None, keys, valid, window, self._scaling, seen=seen
        )
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : keep - window]
        picked = torch.zeros(keys.shape[:3], dtype=torch.bool, device=keys.device).scatter_(-1, top, True)
        picked[..., slots - window :] = True
        if order is None:
            return picked
        return torch.zeros_like(picked).scatter_(-1, order, picked & valid)
