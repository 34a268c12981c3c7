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
from .knorm import KnormCache
from .projected import MatryoshkaKVCache, PCAKVCache, ProjectedLayer, ProjectedStats
from .latent import EliteKVCache, EliteKVLayer
from .xkv import LowRankStats, MiniCache, SVDCache, XKVCache

__all__ = [
    "CacheStats",
    "CompressedCache",
    "EliteKVCache",
    "EliteKVLayer",
    "EvictionCache",
    "EvictionLayer",
    "KVLayer",
    "KnormCache",
    "MatryoshkaKVCache",
    "PCAKVCache",
    "ProjectedLayer",
    "ProjectedStats",
    "LowRankStats",
    "MiniCache",
    "PyramidKVCache",
    "SnapKVCache",
    "StreamingLLMCache",
    "SVDCache",
    "XKVCache",
    "pyramid_budgets",
    "tensor_bytes",
]
