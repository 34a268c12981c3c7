"""Cache classes: the shared base and one module per method family."""

from .base import CacheStats, CompressedCache, KVLayer, tensor_bytes
from .eviction import (
    EvictionCache,
    EvictionLayer,
    PyramidKVCache,
    SnapKVCache,
    StreamingLLMCache,
    pyramid_budgets,
)

__all__ = [
    "CacheStats",
    "CompressedCache",
    "EvictionCache",
    "EvictionLayer",
    "KVLayer",
    "PyramidKVCache",
    "SnapKVCache",
    "StreamingLLMCache",
    "pyramid_budgets",
    "tensor_bytes",
]
