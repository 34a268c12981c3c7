"""Token eviction: keep a budget of the prompt's tokens per layer and KV head, scored once after
prefill. A method is an :class:`EvictionCache` subclass overriding ``scores`` (and ``plan`` for
per-layer budgets); see :mod:`compresskv.eviction.knorm` for the smallest one."""

from .base import EvictionCache, EvictionLayer, PyramidKVCache, SnapKVCache, StreamingLLMCache, pyramid_budgets
from .expected import ExpectedAttentionCache
from .knorm import KnormCache

__all__ = [
    "EvictionCache",
    "EvictionLayer",
    "ExpectedAttentionCache",
    "KnormCache",
    "PyramidKVCache",
    "SnapKVCache",
    "StreamingLLMCache",
    "pyramid_budgets",
]
