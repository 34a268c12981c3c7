"""Cross-layer low-rank compression of the prompt: xKV (a shared SVD latent per group of adjacent
layers), its single-layer SVD baseline and MiniCache (adjacent layers merged)."""

from .xkv import LowRankStats, MiniCache, SVDCache, XKVCache

__all__ = ["LowRankStats", "MiniCache", "SVDCache", "XKVCache"]
