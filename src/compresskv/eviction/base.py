"""Token eviction: PyramidKV (arXiv 2406.02069), SnapKV (arXiv 2404.14469) and StreamingLLM
(arXiv 2309.17453).

Eviction happens right after prefill attention (which ran on the full keys and values): each
full-attention layer keeps, per KV head, the tokens its policy scores highest plus a recent
window, and drops the rest for good. A prompt fed in chunks (``generate(prefill_chunk_size=...)``)
is evicted again after each chunk, to the budget of the prompt tokens seen so far, with scores
from that chunk's own queries. Decoding appends, without limit unless the cache has a
``decode_budget`` (:mod:`compresskv.eviction.bounded`). Scores come from the prompt's own query states,
handed over by compresskv's attention function, so no model-specific code is needed.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..core.attention import AttentionCall
from ..core.cache import CompressedCache, KVLayer
from ..core.facts import mla_dims, refuse_mla
from .bounded import BoundedDecode

Pooling = Literal["maxpool", "avgpool"]
POOLINGS = ("maxpool", "avgpool")


# -- budgets -------------------------------------------------------------------------------------
def pyramid_budgets(seq_len: int, budget: int, window: int, n_layers: int, beta: int = 20) -> list[int] | None:
    """Tokens kept per layer (window included) by PyramidKV for a prompt of ``seq_len`` tokens.

    ``budget`` is the average per layer. ``None`` means nothing is evicted (``seq_len <= budget``).
    When the prompt is shorter than twice the scored budget every layer keeps ``budget`` (SnapKV),
    as in the paper's code; otherwise the budget falls linearly with depth from ``max`` to
    ``min = (budget - window) // beta``. No layer keeps fewer than ``window + 1`` tokens.
    """
    if seq_len <= budget:
        return None
    scored = budget - window
    if seq_len < 2 * scored:
        return [budget] * n_layers
    lo = scored // beta
    hi = 2 * scored - lo
    if hi >= seq_len - window:
        hi = seq_len - window
        lo = 2 * scored - hi
    step = (hi - lo) // (n_layers - 1) if n_layers > 1 else 0
    return [min(max(hi - i * step, 1), seq_len - window) + window for i in range(n_layers)]


def ratio_budget(seq_len: int, compression_ratio: float) -> int:
    """Tokens kept when a fraction ``compression_ratio`` of ``seq_len`` is evicted (at least one)."""
    return max(1, int(round(seq_len * (1.0 - compression_ratio))))


# -- scores --------------------------------------------------------------------------------------
def _validity(valid: torch.Tensor | None, bsz: int, n_kv: int, seq_len: int) -> torch.Tensor | None:
    """``[batch, kv_heads, seq_len]`` booleans from a 2-D padding mask (its last ``seq_len``
    columns) or a per-KV-head validity tensor; ``None`` stays ``None`` (every token real)."""
    if valid is None:
        return None
    valid = valid.to(torch.bool)
    if valid.dim() == 2:
        return valid[:, None, -seq_len:].expand(bsz, n_kv, seq_len)
    return valid


def window_attention(
    query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, window: int, scaling: float
) -> torch.Tensor:
    """``softmax(q[-window:] kᵀ · scaling)`` in fp32, causal and masked to valid tokens.

    ``query``: ``[batch, q_heads, q_len, d]``, the queries of the last ``q_len`` of the ``T`` keys
    (``q_len == T`` for a whole prompt, fewer for a later chunk of one); ``keys``:
    ``[batch, kv_heads, T, d]``; ``valid``: a ``[batch, >= T]`` padding mask, a
    ``[batch, kv_heads, T]`` validity tensor, or ``None``. Returns ``[batch, q_heads, window, T]``
    (query heads in ``repeat_kv`` order).
    """
    bsz, n_q, _, dim = query.shape
    n_kv, seq_len = keys.shape[1], keys.shape[2]
    groups = n_q // n_kv
    q = query[:, :, -window:].float().reshape(bsz, n_kv, groups * window, dim)
    logits = (q @ keys.float().transpose(-1, -2)).mul_(scaling).view(bsz, n_q, window, seq_len)
    q_pos = torch.arange(seq_len - window, seq_len, device=query.device)
    allowed = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
    allowed = allowed[None, None]
    valid = _validity(valid, bsz, n_kv, seq_len)
    if valid is not None:
        allowed = allowed & valid.repeat_interleave(groups, dim=1)[:, :, None, :]
    logits.masked_fill_(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def _pool(scores: torch.Tensor, valid: torch.Tensor | None, kernel_size: int, pooling: Pooling) -> torch.Tensor:
    """Pool ``scores`` (``[batch, heads, n]``) along tokens over the valid tokens only, in order,
    as if the invalid slots (padding, filler) were not there: a row pools the same neighbours
    batched or alone, whatever slots padding and earlier eviction left between its tokens."""
    pool = F.max_pool1d if pooling == "maxpool" else F.avg_pool1d
    bsz, heads, n = scores.shape
    if valid is None or bool(valid.all()):
        flat = pool(scores.reshape(bsz * heads, 1, n), kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
        return flat.view(bsz, heads, n)
    # Valid slots first (stable: in order), invalid ones after them as zeros, which both poolings
    # treat as their own border padding (scores are >= 0; avg_pool counts padding as zeros).
    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    packed = scores.gather(-1, order).masked_fill(~valid.gather(-1, order), 0.0)
    flat = pool(packed.reshape(bsz * heads, 1, n), kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    return torch.empty_like(scores).scatter_(-1, order, flat.view(bsz, heads, n))


def snapkv_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor | None,
    window: int,
    scaling: float,
    kernel_size: int = 7,
    pooling: Pooling = "maxpool",
) -> torch.Tensor:
    """SnapKV scores of the ``T - window`` tokens before the window, ``[batch, kv_heads, T - window]``.

    Sum over the window queries of their attention weight, pooled along the valid tokens per query
    head, then averaged over each KV head's query group. Invalid tokens (padding, filler) score
    ``-inf``. ``valid`` is as in :func:`window_attention`.
    """
    bsz, n_q, _, _ = query.shape
    n_kv, seq_len = keys.shape[1], keys.shape[2]
    groups, prefix = n_q // n_kv, seq_len - window
    valid = _validity(valid, bsz, n_kv, seq_len)
    weights = window_attention(query, keys, valid, window, scaling)
    scores = weights[..., :prefix].sum(dim=-2)
    head_valid = valid[..., :prefix] if valid is not None else None
    if kernel_size > 1 and prefix > 0:
        q_valid = head_valid.repeat_interleave(groups, dim=1) if head_valid is not None else None
        scores = _pool(scores, q_valid, kernel_size, pooling)
    scores = scores.view(bsz, n_kv, groups, prefix).mean(dim=2)
    if head_valid is not None:
        scores = scores.masked_fill(~head_valid, float("-inf"))
    return scores


def streaming_scores(
    bsz: int, n_kv: int, seq_len: int, sink: int, valid: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """StreamingLLM as scores: each row's first ``sink`` valid tokens first, then recency.
    ``valid`` is as in :func:`window_attention`."""
    valid = _validity(valid, bsz, n_kv, seq_len)
    if valid is None:
        rank = torch.arange(seq_len, device=device, dtype=torch.float32).expand(bsz, n_kv, seq_len)
    else:
        rank = valid.cumsum(dim=-1).float() - 1.0  # rank among the row's valid tokens
    scores = torch.where(rank < sink, rank + 2.0 * seq_len, rank)
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    return scores


# -- layers and caches ---------------------------------------------------------------------------
class EvictionLayer(BoundedDecode, KVLayer):
    """A full-attention layer that evicts what its cache's scores say after the prompt: once
    after a whole prompt, or after each chunk of a chunked one; with a ``decode_budget``, again
    while decoding (:mod:`compresskv.eviction.bounded`)."""

    storage = ("keys", "values", "recent_queries", "row_pad")

    def __init__(self, cache: "EvictionCache", index: int, n_full: int) -> None:
        super().__init__()
        self.cache, self.index, self.n_full = cache, index, n_full
        #: tokens this layer may hold while decoding (``None``: unbounded), fixed with the cache
        self.decode_limit = cache.decode_limit(index, n_full)
        self.init_bounded()

    def after_attention(self, call: AttentionCall) -> None:
        super().after_attention(call)
        if self.cache.decode_budget is not None:
            self.remember(call)

    def reset(self) -> None:
        super().reset()
        self.init_bounded()

    def compress(self, call: AttentionCall) -> None:
        """Evict after the prompt's first (or only) forward."""
        self.evict(call)

    def compress_chunk(self, call: AttentionCall) -> None:
        """Evict again after a further chunk of the prompt, to the budget of every prompt token
        seen so far, so that memory stays bounded by the budget plus one chunk."""
        self.evict(call)

    def evict(self, call: AttentionCall) -> None:
        """Evict per row as if the row were alone: its budget (and PyramidKV's schedule) follows
        its own number of real prompt tokens seen so far, so a batched prompt keeps what it would
        keep unbatched. Scores come from the window of this forward's last queries (at most as
        many as it has) over every stored and new token; the window's tokens are kept. Rows that
        keep fewer tokens than the longest-kept row fill the extra slots with masked tokens (as
        padding is)."""
        bsz, n_kv, seq_len, _ = self.keys.shape
        device = self.keys.device
        q_len = call.query.shape[-2]
        seen = max(self.seen, seq_len)  # (a layer filled by hand has seen nothing)
        if call.pad2d is not None:
            lengths = call.pad2d[:, -seen:].to(device, torch.bool).sum(dim=-1).tolist()
        else:
            lengths = [seen] * bsz
        plans: dict[tuple[int, int] | None, list[int]] = {}
        for row, length in enumerate(lengths):
            plan = self.cache.plan(int(length), self.index, self.n_full)
            plans.setdefault(None if plan is None or plan[0] >= length else plan, []).append(row)
        if list(plans) == [None]:
            return
        # Which stored slots hold real tokens: padding and earlier filler are never chosen.
        valid = self.valid
        real = valid if valid is not None else torch.ones(bsz, n_kv, seq_len, dtype=torch.bool, device=device)
        chosen = torch.zeros(bsz, n_kv, seq_len, dtype=torch.bool, device=device)
        for plan, rows in plans.items():
            sel = slice(None) if len(rows) == bsz else torch.tensor(rows, device=device)
            if plan is None:  # nothing to evict: every real token stays
                chosen[sel] = real[sel]
                continue
            n_keep, window = plan
            window = min(window, q_len)  # a chunk shorter than the window scores with all its queries
            keys, key_valid = self.keys, valid
            if self.cache.mla is not None and self.cache.mla["latent"]:
                # MLA: score with each head's keys, expanded from the stored latent by the model; the
                # latent and shared RoPE key are one "KV head", so the heads' scores are averaged.
                keys = call.key
                key_valid = valid.expand(-1, keys.shape[1], -1) if valid is not None else None
            scores = self.cache.scores(
                call.query[sel], keys[sel], key_valid[sel] if key_valid is not None else None, window, call.scaling,
                seen=torch.tensor(lengths, device=device)[sel],
            )
            if scores.shape[1] != n_kv:
                scores = scores.mean(dim=1, keepdim=True)
            # A stable sort breaks ties (pooling makes plateaus) by position, on every device and
            # whatever padding precedes the row: topk would not.
            top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : n_keep - window]
            picked = torch.zeros(scores.shape[0], n_kv, seq_len, dtype=torch.bool, device=device)
            picked.scatter_(-1, top, True)
            picked[..., seq_len - window :] = True
            chosen[sel] = picked & real[sel]
        self.keep_chosen(chosen, int(chosen.sum(dim=-1).max()))

    def keep_chosen(self, chosen: torch.Tensor, slots: int, filler: bool = True, capacity: int | None = None) -> None:
        """Keep the ``chosen`` stored slots (``[batch, kv_heads, T]`` booleans) in ``slots`` slots a row:
        chosen tokens first, in order, then filler, masked (every head of a row has its valid slots in
        front, which flash attention's per-row mask needs). ``filler=False`` when every row and head
        chose exactly ``slots`` (nothing to mask); ``capacity`` as :meth:`KVLayer.keep`'s."""
        total = chosen.shape[-1]
        position = torch.arange(total, device=chosen.device)
        index = torch.sort(position + (~chosen) * total, dim=-1).indices[..., :slots]
        self.keep(index, chosen.gather(-1, index) if filler else None, capacity=capacity)


class EvictionCache(CompressedCache):
    """Base of the eviction caches: a budget (tokens per layer) or a compression ratio for the
    prompt, and optionally a ``decode_budget`` (tokens per layer while decoding, evicting every
    ``decode_interval`` steps: :mod:`compresskv.eviction.bounded`)."""

    method = "eviction"
    supports_mla = True

    def __init__(
        self,
        model: torch.nn.Module,
        budget: int | None = None,
        compression_ratio: float | None = None,
        window_size: int = 32,
        decode_tokens: int | None = None,
        decode_budget: int | None = None,
        decode_interval: int = 32,
    ) -> None:
        self.decode_tokens = decode_tokens  # checked by CompressedCache
        if not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"{type(self).__name__}: window_size must be an int >= 0, got {window_size!r}.")
        if (budget is None) == (compression_ratio is None):
            raise ValueError(
                f"{type(self).__name__}: give exactly one of budget= (tokens kept per layer) or "
                f"compression_ratio= (fraction of tokens evicted, in [0, 1)); got budget={budget!r}, "
                f"compression_ratio={compression_ratio!r}."
            )
        if budget is not None and (not isinstance(budget, int) or budget <= window_size):
            raise ValueError(
                f"{type(self).__name__}: budget must be an int > window_size={window_size} (the window "
                f"counts in the budget), got budget={budget!r}."
            )
        if compression_ratio is not None and not (
            isinstance(compression_ratio, (int, float)) and 0.0 <= compression_ratio < 1.0
        ):
            raise ValueError(
                f"{type(self).__name__}: compression_ratio is the fraction of tokens evicted and must "
                f"be in [0, 1), got {compression_ratio!r}."
            )
        who = type(self).__name__
        if isinstance(decode_interval, bool) or not isinstance(decode_interval, int) or decode_interval < 1:
            raise ValueError(f"{who}: decode_interval must be an int >= 1, got {decode_interval!r}.")
        if decode_budget is not None:
            least = window_size + decode_interval + 1
            if isinstance(decode_budget, bool) or not isinstance(decode_budget, int) or decode_budget < least:
                raise ValueError(
                    f"{who}: decode_budget (most tokens a layer holds while decoding) must be an int >= "
                    f"window_size + decode_interval + 1 = {least}, or None (unbounded), got {decode_budget!r}."
                )
            if decode_tokens is not None:
                raise ValueError(
                    f"{who}: decode_budget= (bounded decoding, which evicts every decode_interval steps) and "
                    "decode_tokens= (static buffers for torch.compile) cannot be combined; give one of them."
                )
            mla = mla_dims(model)
            if mla is not None and mla["latent"]:
                refuse_mla(model, f"{who}(decode_budget=...)", "bounded decoding scores with the keys each head "
                           "expands from the latent, which a decode step does not hand to the cache")
        self.decode_budget, self.decode_interval = decode_budget, decode_interval
        self.budget, self.compression_ratio, self.window_size = budget, compression_ratio, window_size
        super().__init__(model)

    def make_layer(self, index: int, n_full: int) -> KVLayer:
        return EvictionLayer(self, index, n_full)

    def decode_limit(self, index: int, n_full: int) -> int | None:
        """Most tokens the ``index``-th of ``n_full`` layers holds while decoding (``None``: no limit)."""
        return self.decode_budget

    @property
    def query_memory(self) -> int:
        """Last queries a bounded layer keeps to score with (its window's)."""
        return self.window_size

    def layer_budget(self, seq_len: int) -> tuple[int, int]:
        """(average tokens kept per layer, recent window kept) for a prompt of ``seq_len`` tokens."""
        if self.budget is not None:
            return self.budget, self.window_size
        kept = ratio_budget(seq_len, self.compression_ratio)
        # A ratio can leave fewer tokens than the window: then the window takes at most half.
        return kept, min(self.window_size, max(1, kept // 2))

    def plan(self, seq_len: int, index: int, n_full: int) -> tuple[int, int] | None:
        """(tokens kept, of which recent window) for the ``index``-th of ``n_full`` compressed
        layers and a row of ``seq_len`` real tokens, or ``None`` (keep everything)."""
        kept, window = self.layer_budget(seq_len)
        return None if seq_len <= kept else (kept, window)

    def scores(
        self, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, window: int, scaling: float,
        seen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores of the ``T - window`` tokens before the window, ``[batch, kv_heads, T - window]``;
        the highest are kept. ``query`` holds the last ``q_len <= T`` tokens' queries; ``valid``
        (``[batch, kv_heads, T]``, ``None`` when all are real) marks the stored and new tokens
        that are real; ``seen`` (``[batch]``) the real tokens each row has seen, the newest one's position
        plus one. Each policy overrides this."""
        raise NotImplementedError(f"{type(self).__name__} must define scores()")


class _SnapScoring(EvictionCache):
    def __init__(self, model: torch.nn.Module, *, kernel_size: int = 7, pooling: Pooling = "maxpool", **kwargs: Any) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"{type(self).__name__}: pooling must be one of {list(POOLINGS)}, got {pooling!r}.")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{type(self).__name__}: kernel_size must be an odd int >= 1, got {kernel_size!r}.")
        window_size = kwargs.get("window_size", 32)
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"{type(self).__name__}: window_size must be an int >= 1, got {window_size!r}.")
        self.kernel_size, self.pooling = kernel_size, pooling
        super().__init__(model, **kwargs)

    def scores(
        self, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, window: int, scaling: float,
        seen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return snapkv_scores(query, keys, valid, window, scaling, self.kernel_size, self.pooling)


class SnapKVCache(_SnapScoring):
    """SnapKV: every full-attention layer keeps ``budget`` tokens per KV head (window included),
    chosen by the attention of the last ``window_size`` prompt queries, pooled over
    ``kernel_size`` neighbours and averaged over the GQA group.

    Args:
        model: the transformers model the cache is for (its attention is switched to compresskv's).
        kernel_size: odd pooling width along tokens.
        pooling: ``"maxpool"`` or ``"avgpool"``.
        **kwargs: :class:`EvictionCache`'s ``budget`` (tokens kept per layer and KV head, window
            included; must exceed ``window_size``), ``compression_ratio`` (instead of ``budget``,
            the fraction of prompt tokens evicted, in [0, 1)), ``window_size`` (recent prompt
            tokens whose queries score the rest, always kept; default 32) and ``decode_tokens``
            (room for that many decoded tokens made right after compression, for static decoding:
            the cache is then compileable, for ``torch.compile`` / ``generate(compile_config=...)``;
            see :mod:`compresskv.core.decode`), ``decode_budget`` (most tokens a layer holds while
            decoding: every ``decode_interval`` steps, default 32, it evicts again with the queries
            of the last ``window_size`` tokens; ``None``, the default: decoding appends without
            limit; see :mod:`compresskv.eviction.bounded`).
    """

    method = "snapkv"


class PyramidKVCache(_SnapScoring):
    """PyramidKV: SnapKV scores with a budget that falls linearly with depth (arXiv 2406.02069).

    ``budget`` is the average per layer; layer ``l`` of ``L`` keeps ``max - l·step`` scored tokens
    plus the window, with ``min = (budget - window) // beta`` and ``max = 2(budget - window) - min``
    (see :func:`pyramid_budgets`). Same arguments as :class:`SnapKVCache`, plus ``beta``.
    """

    method = "pyramidkv"

    def __init__(self, model: torch.nn.Module, *, beta: int = 20, **kwargs: Any) -> None:
        if not isinstance(beta, int) or beta < 1:
            raise ValueError(f"PyramidKVCache: beta must be an int >= 1, got {beta!r}.")
        self.beta = beta
        super().__init__(model, **kwargs)

    def plan(self, seq_len: int, index: int, n_full: int) -> tuple[int, int] | None:
        kept, window = self.layer_budget(seq_len)
        budgets = pyramid_budgets(seq_len, kept, window, n_full, self.beta)
        return None if budgets is None else (budgets[index], window)

    def decode_limit(self, index: int, n_full: int) -> int | None:
        """The pyramid while decoding too: what a layer keeps after an eviction falls with depth
        around ``decode_budget - decode_interval`` on average."""
        if self.decode_budget is None:
            return None
        kept = pyramid_budgets(1 << 62, self.decode_budget - self.decode_interval, self.window_size, n_full, self.beta)
        return kept[index] + self.decode_interval


class StreamingLLMCache(EvictionCache):
    """StreamingLLM (arXiv 2309.17453): keep the first ``sink`` real tokens of each row and the
    most recent ones, evicting the middle after prefill.

    Args:
        model: the transformers model the cache is for.
        sink: attention-sink tokens kept at the start.
        window: recent tokens kept (total kept = ``sink + window``); or give ``budget`` (total
            kept, more than ``sink``) or ``compression_ratio`` (fraction evicted, in [0, 1))
            instead. A ratio that would leave fewer than ``sink + 1`` tokens of a prompt keeps
            ``sink + 1``: the sinks and the most recent token.
        decode_tokens: room for that many decoded tokens, for static, compileable decoding (as
            :class:`SnapKVCache`).
        decode_budget: most tokens a layer holds while decoding: every ``decode_interval`` steps
            the middle is evicted again, keeping the sinks and the most recent tokens (the rolling
            cache of the paper; see :mod:`compresskv.eviction.bounded`). ``None``: unbounded.
        decode_interval: decode steps between evictions (default 32).
    """

    method = "streamingllm"

    def __init__(
        self,
        model: torch.nn.Module,
        sink: int = 4,
        window: int | None = None,
        budget: int | None = None,
        compression_ratio: float | None = None,
        decode_tokens: int | None = None,
        decode_budget: int | None = None,
        decode_interval: int = 32,
    ) -> None:
        if not isinstance(sink, int) or sink < 0:
            raise ValueError(f"StreamingLLMCache: sink must be an int >= 0, got {sink!r}.")
        if sum(x is not None for x in (window, budget, compression_ratio)) != 1:
            raise ValueError(
                "StreamingLLMCache: give exactly one of window= (recent tokens kept), budget= (total "
                "tokens kept) or compression_ratio= (fraction evicted, in [0, 1))."
            )
        if window is not None:
            if not isinstance(window, int) or window < 1:
                raise ValueError(f"StreamingLLMCache: window must be an int >= 1, got {window!r}.")
            budget = sink + window
        if budget is not None and (not isinstance(budget, int) or budget <= sink):
            raise ValueError(f"StreamingLLMCache: budget must be an int > sink={sink}, got {budget!r}.")
        if (isinstance(decode_budget, int) and isinstance(decode_interval, int)
                and decode_budget - decode_interval <= sink):
            raise ValueError(
                f"StreamingLLMCache: decode_budget - decode_interval must exceed sink={sink} (recent tokens must "
                f"stay), got decode_budget={decode_budget}, decode_interval={decode_interval}."
            )
        self.sink = sink
        # Recency is part of the scores, so no window is forced (window_size=0).
        super().__init__(
            model, budget=budget, compression_ratio=compression_ratio, window_size=0, decode_tokens=decode_tokens,
            decode_budget=decode_budget, decode_interval=decode_interval,
        )

    query_memory = 0  # sinks and recency need no query

    def plan(self, seq_len: int, index: int, n_full: int) -> tuple[int, int] | None:
        if self.budget is not None:
            kept = self.budget
        else:
            # A ratio is relative to a prompt length not known when the cache is built, so it
            # cannot be checked against the sinks then: it keeps at least the sinks plus one
            # recent token (the least budget= accepts).
            kept = max(ratio_budget(seq_len, self.compression_ratio), self.sink + 1)
        return None if seq_len <= kept else (kept, 0)

    def scores(
        self, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, window: int, scaling: float,
        seen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bsz, n_kv, seq_len, _ = keys.shape
        return streaming_scores(bsz, n_kv, seq_len, self.sink, valid, keys.device)


__all__ = [
    "EvictionCache",
    "EvictionLayer",
    "PyramidKVCache",
    "SnapKVCache",
    "StreamingLLMCache",
    "pyramid_budgets",
    "ratio_budget",
    "snapkv_scores",
    "streaming_scores",
    "window_attention",
]
