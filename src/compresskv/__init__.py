"""compresskv: compressed KV caches for Hugging Face transformers, as a drop-in.

Either patch a model so that ``generate()`` uses a compressed cache::

    import compresskv
    compresskv.patch(model, "pyramidkv", budget=256)
    model.generate(**inputs)

or pass a cache yourself::

    model.generate(**inputs, cache=compresskv.SnapKVCache(model, compression_ratio=0.5))

(``past_key_values=`` instead of ``cache=`` on transformers < 5.24.)
"""

from __future__ import annotations

from . import elitekv
from .core import CacheStats, CompressedCache, KVLayer
from .crosslayer import MiniCache, SVDCache, XKVCache
from .elitekv import EliteKVCache
from .eviction import KnormCache, PyramidKVCache, SnapKVCache, StreamingLLMCache, pyramid_budgets
from .projected import MatryoshkaKVCache, PCAKVCache, Projections, allocate_ranks, calibrate, train_projections
from .models import DEFAULT_MODEL, load_model
from .patching import available_methods, make_cache, method_options, patch, patched, register_method, unpatch

for _name, _factory in {
    "pyramidkv": PyramidKVCache,
    "snapkv": SnapKVCache,
    "knorm": KnormCache,
    "streamingllm": StreamingLLMCache,
    "matryoshka": MatryoshkaKVCache,
    "pca": PCAKVCache,
    "xkv": XKVCache,
    "svd": SVDCache,
    "minicache": MiniCache,
    "elitekv": elitekv.make_cache,
}.items():
    register_method(_name, _factory)
del _name, _factory

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "CacheStats",
    "CompressedCache",
    "EliteKVCache",
    "KVLayer",
    "KnormCache",
    "MatryoshkaKVCache",
    "PCAKVCache",
    "Projections",
    "MiniCache",
    "PyramidKVCache",
    "SnapKVCache",
    "SVDCache",
    "StreamingLLMCache",
    "XKVCache",
    "allocate_ranks",
    "available_methods",
    "calibrate",
    "elitekv",
    "load_model",
    "make_cache",
    "method_options",
    "patch",
    "patched",
    "pyramid_budgets",
    "register_method",
    "train_projections",
    "unpatch",
]
