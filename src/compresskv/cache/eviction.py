"""Token eviction: PyramidKV (arXiv 2406.02069), SnapKV (arXiv 2404.14469) and StreamingLLM
(arXiv 2309.17453).

Eviction happens once, right after prefill attention (which ran on the full keys and values):
each full-attention layer keeps, per KV head, the tokens its policy scores highest plus a recent
window, and drops the rest for good. Decoding appends. Scores come from the prefill's own query
states, handed over by compresskv's attention function, so no model-specific code is needed.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..attention import AttentionCall
from .base import CompressedCache, KVLayer

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
def window_attention(
    query: torch.Tensor, keys: torch.Tensor, pad2d: torch.Tensor | None, window: int, scaling: float
) -> torch.Tensor:
    """``softmax(q[-window:] kᵀ · scaling)`` in fp32, causal and padding-masked.

    ``query``: ``[batch, q_heads, T, d]``; ``keys``: ``[batch, kv_heads, T, d]``. Returns
    ``[batch, q_heads, window, T]`` (query heads in ``repeat_kv`` order).
    """
    bsz, n_q, seq_len, dim = query.shape
    n_kv = keys.shape[1]
    groups = n_q // n_kv
    q = query[:, :, -window:].float().reshape(bsz, n_kv, groups * window, dim)
    logits = (q @ keys.float().transpose(-1, -2)).mul_(scaling).view(bsz, n_q, window, seq_len)
    q_pos = torch.arange(seq_len - window, seq_len, device=query.device)
    allowed = torch.arange(seq_len, device=query.device)[None, :] <= q_pos[:, None]
    allowed = allowed[None, None]
    if pad2d is not None:
        allowed = allowed & pad2d[:, None, None, -seq_len:].to(torch.bool)
    logits.masked_fill_(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def snapkv_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    pad2d: torch.Tensor | None,
    window: int,
    scaling: float,
    kernel_size: int = 7,
    pooling: Pooling = "maxpool",
) -> torch.Tensor:
    """SnapKV scores of the ``T - window`` prefix tokens, ``[batch, kv_heads, T - window]``.

    Sum over the window queries of their attention weight, pooled along tokens per query head,
    then averaged over each KV head's query group. Padding tokens score ``-inf``.
    """
    bsz, n_q, seq_len, _ = query.shape
    n_kv = keys.shape[1]
    weights = window_attention(query, keys, pad2d, window, scaling)
    scores = weights[..., : seq_len - window].sum(dim=-2)
    flat = scores.reshape(bsz * n_q, 1, seq_len - window)
    if kernel_size > 1:
        pool = F.max_pool1d if pooling == "maxpool" else F.avg_pool1d
        flat = pool(flat, kernel_size=kernel_size, padding=kernel_size // 2, stride=1)
    scores = flat.view(bsz, n_kv, n_q // n_kv, seq_len - window).mean(dim=2)
    if pad2d is not None:
        real = pad2d[:, -seq_len:][:, : seq_len - window].to(torch.bool)
        scores = scores.masked_fill(~real[:, None, :], float("-inf"))
    return scores


def streaming_scores(
    bsz: int, n_kv: int, seq_len: int, sink: int, pad2d: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """StreamingLLM as scores: each row's first ``sink`` real tokens first, then recency."""
    pos = torch.arange(seq_len, device=device, dtype=torch.float32).expand(bsz, seq_len)
    if pad2d is None:
        first = torch.zeros(bsz, 1, device=device)
        real = torch.ones(bsz, seq_len, dtype=torch.bool, device=device)
    else:
        real = pad2d[:, -seq_len:].to(torch.bool)
        first = (~real).sum(dim=-1, keepdim=True).float()
    is_sink = (pos >= first) & (pos < first + sink)
    scores = torch.where(is_sink, pos + 2.0 * seq_len, pos)
    scores = scores.masked_fill(~real, float("-inf"))
    return scores[:, None, :].expand(bsz, n_kv, seq_len)


# -- layers and caches ---------------------------------------------------------------------------
class EvictionLayer(KVLayer):
    """A full-attention layer that evicts once, after prefill, what its cache's policy says."""

    def __init__(self, policy: "EvictionCache", rank: int, n_full: int) -> None:
        super().__init__()
        self.policy, self.rank, self.n_full = policy, rank, n_full

    def compress(self, call: AttentionCall) -> None:
        """Evict per row as if the row were alone: its budget (and PyramidKV's schedule) follows
        its own number of real tokens, so a batched prompt keeps what it would keep unbatched.
        Rows that keep fewer tokens than the longest-kept row fill the extra slots with masked
        tokens (as padding is)."""
        bsz, n_kv, seq_len, _ = self.keys.shape
        real = call.pad2d[:, -seq_len:].to(self.keys.device, torch.bool) if call.pad2d is not None else None
        lengths = real.sum(dim=-1).tolist() if real is not None else [seq_len] * bsz
        plans: dict[tuple[int, int] | None, list[int]] = {}
        for row, length in enumerate(lengths):
            plan = self.policy.plan(int(length), self.rank, self.n_full)
            plans.setdefault(None if plan is None or plan[0] >= length else plan, []).append(row)
        if list(plans) == [None]:
            return
        chosen = torch.zeros(bsz, n_kv, seq_len, dtype=torch.bool, device=self.keys.device)
        for plan, rows in plans.items():
            sel = slice(None) if len(rows) == bsz else torch.tensor(rows, device=self.keys.device)
            if plan is None:  # nothing to evict: every real token stays
                chosen[sel] = real[sel][:, None, :] if real is not None else True
                continue
            n_keep, window = plan
            pad = call.pad2d[sel] if call.pad2d is not None else None
            scores = self.policy.scores(call.query[sel], self.keys[sel], pad, window, call.scaling)
            # A stable sort breaks ties (pooling makes plateaus) by position, on every device and
            # whatever padding precedes the row: topk would not.
            top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., : n_keep - window]
            picked = torch.zeros(scores.shape[0], n_kv, seq_len, dtype=torch.bool, device=chosen.device)
            picked.scatter_(-1, top, True)
            picked[..., seq_len - window :] = True
            chosen[sel] = picked
        slots = int(chosen.sum(dim=-1).max())
        # Chosen tokens first, in order, then filler (masked): every head of a row has the same
        # number of valid slots, in front, which flash attention's per-row mask needs.
        position = torch.arange(seq_len, device=chosen.device)
        index = torch.sort(position + (~chosen) * seq_len, dim=-1).indices[..., :slots]
        self.keep(index, chosen.gather(-1, index))


class EvictionCache(CompressedCache):
    """Base of the eviction caches: a budget (tokens per layer) or a compression ratio."""

    method = "eviction"

    def __init__(
        self,
        model: torch.nn.Module,
        budget: int | None = None,
        compression_ratio: float | None = None,
        window_size: int = 32,
    ) -> None:
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
        self.budget, self.compression_ratio, self.window_size = budget, compression_ratio, window_size
        super().__init__(model)

    def make_layer(self, rank: int, n_full: int) -> KVLayer:
        return EvictionLayer(self, rank, n_full)

    def layer_budget(self, seq_len: int) -> tuple[int, int]:
        """(average tokens kept per layer, recent window kept) for a prompt of ``seq_len`` tokens."""
        if self.budget is not None:
            return self.budget, self.window_size
        kept = ratio_budget(seq_len, self.compression_ratio)
        # A ratio can leave fewer tokens than the window: then the window takes at most half.
        return kept, min(self.window_size, max(1, kept // 2))

    def plan(self, seq_len: int, rank: int, n_full: int) -> tuple[int, int] | None:
        """(tokens kept, of which recent window) for the ``rank``-th compressed layer, or ``None``."""
        kept, window = self.layer_budget(seq_len)
        return None if seq_len <= kept else (kept, window)

    def scores(
        self, query: torch.Tensor, keys: torch.Tensor, pad2d: torch.Tensor | None, window: int, scaling: float
    ) -> torch.Tensor:
        """Scores of the ``T - window`` prefix tokens, ``[batch, kv_heads, T - window]``; the
        highest are kept. Each policy overrides this."""
        raise NotImplementedError(f"{type(self).__name__} must define scores()")


class _SnapScoring(EvictionCache):
    def __init__(
        self,
        model: torch.nn.Module,
        budget: int | None = None,
        compression_ratio: float | None = None,
        window_size: int = 32,
        kernel_size: int = 7,
        pooling: Pooling = "maxpool",
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"{type(self).__name__}: pooling must be one of {list(POOLINGS)}, got {pooling!r}.")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{type(self).__name__}: kernel_size must be an odd int >= 1, got {kernel_size!r}.")
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"{type(self).__name__}: window_size must be an int >= 1, got {window_size!r}.")
        self.kernel_size, self.pooling = kernel_size, pooling
        super().__init__(model, budget=budget, compression_ratio=compression_ratio, window_size=window_size)

    def scores(
        self, query: torch.Tensor, keys: torch.Tensor, pad2d: torch.Tensor | None, window: int, scaling: float
    ) -> torch.Tensor:
        return snapkv_scores(query, keys, pad2d, window, scaling, self.kernel_size, self.pooling)


class SnapKVCache(_SnapScoring):
    """SnapKV: every full-attention layer keeps ``budget`` tokens per KV head (window included),
    chosen by the attention of the last ``window_size`` prompt queries, pooled over
    ``kernel_size`` neighbours and averaged over the GQA group.

    Args:
        model: the transformers model the cache is for (its attention is switched to compresskv's).
        budget: tokens kept per layer and KV head, window included; must exceed ``window_size``.
        compression_ratio: instead of ``budget``, the fraction of prompt tokens evicted, in [0, 1).
        window_size: recent prompt tokens whose queries score the rest, always kept.
        kernel_size: odd pooling width along tokens.
        pooling: ``"maxpool"`` or ``"avgpool"``.
    """

    method = "snapkv"


class PyramidKVCache(_SnapScoring):
    """PyramidKV: SnapKV scores with a budget that falls linearly with depth (arXiv 2406.02069).

    ``budget`` is the average per layer; layer ``l`` of ``L`` keeps ``max - l·step`` scored tokens
    plus the window, with ``min = (budget - window) // beta`` and ``max = 2(budget - window) - min``
    (see :func:`pyramid_budgets`). Same arguments as :class:`SnapKVCache`, plus ``beta``.
    """

    method = "pyramidkv"

    def __init__(
        self,
        model: torch.nn.Module,
        budget: int | None = None,
        compression_ratio: float | None = None,
        window_size: int = 32,
        kernel_size: int = 7,
        pooling: Pooling = "maxpool",
        beta: int = 20,
    ) -> None:
        if not isinstance(beta, int) or beta < 1:
            raise ValueError(f"PyramidKVCache: beta must be an int >= 1, got {beta!r}.")
        self.beta = beta
        super().__init__(model, budget, compression_ratio, window_size, kernel_size, pooling)

    def plan(self, seq_len: int, rank: int, n_full: int) -> tuple[int, int] | None:
        kept, window = self.layer_budget(seq_len)
        budgets = pyramid_budgets(seq_len, kept, window, n_full, self.beta)
        return None if budgets is None else (budgets[rank], window)


class StreamingLLMCache(EvictionCache):
    """StreamingLLM (arXiv 2309.17453): keep the first ``sink`` real tokens of each row and the
    most recent ones, evicting the middle once after prefill.

    Args:
        model: the transformers model the cache is for.
        sink: attention-sink tokens kept at the start.
        window: recent tokens kept (total kept = ``sink + window``); or give ``budget`` (total
            kept, more than ``sink``) or ``compression_ratio`` (fraction evicted, in [0, 1))
            instead. A ratio that would leave fewer than ``sink + 1`` tokens of a prompt keeps
            ``sink + 1``: the sinks and the most recent token.
    """

    method = "streamingllm"

    def __init__(
        self,
        model: torch.nn.Module,
        sink: int = 4,
        window: int | None = None,
        budget: int | None = None,
        compression_ratio: float | None = None,
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
        self.sink = sink
        # Recency is part of the scores, so no window is forced (window_size=0).
        super().__init__(model, budget=budget, compression_ratio=compression_ratio, window_size=0)

    def plan(self, seq_len: int, rank: int, n_full: int) -> tuple[int, int] | None:
        if self.budget is not None:
            kept = self.budget
        else:
            # A ratio is relative to a prompt length not known when the cache is built, so it
            # cannot be checked against the sinks then: it keeps at least the sinks plus one
            # recent token (the least budget= accepts).
            kept = max(ratio_budget(seq_len, self.compression_ratio), self.sink + 1)
        return None if seq_len <= kept else (kept, 0)

    def scores(
        self, query: torch.Tensor, keys: torch.Tensor, pad2d: torch.Tensor | None, window: int, scaling: float
    ) -> torch.Tensor:
        bsz, n_kv, seq_len, _ = keys.shape
        return streaming_scores(bsz, n_kv, seq_len, self.sink, pad2d, keys.device)


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
