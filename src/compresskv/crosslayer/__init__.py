"""Cross-layer compression of the prompt: xKV (a shared SVD latent per group of adjacent layers),
its single-layer SVD baseline and MiniCache (adjacent layers merged).

Modules: :mod:`.factors` (option checks, the truncated SVD, groups, ranks for a ratio),
:mod:`.positions` (RoPE and prefill positions), :mod:`.group` (what the grouped caches share, and
read accounting), :mod:`.xkv` (xKV), :mod:`.svd` (single-layer SVD), :mod:`.minicache` (MiniCache).
"""

from .group import LowRankStats, ReadCost
from .minicache import MiniCache, MiniCacheLayer
from .svd import SVDCache
from .xkv import XKVCache, XKVLayer

__all__ = ["LowRankStats", "MiniCache", "MiniCacheLayer", "ReadCost", "SVDCache", "XKVCache", "XKVLayer"]
