"""compresskv: compressed KV caches for Hugging Face transformers, as a drop-in.

Either patch a model so that ``generate()`` uses a compressed cache::

    import compresskv
    compresskv.patch(model, "pyramidkv", budget=256)
    model.generate(**inputs)

or pass a cache yourself::

    model.generate(**inputs, past_key_values=compresskv.SnapKVCache(model, compression_ratio=0.5))
"""

from __future__ import annotations

from .cache import (
    CacheStats,
    CompressedCache,
    KVLayer,
    PyramidKVCache,
    SnapKVCache,
    StreamingLLMCache,
    pyramid_budgets,
)
from .models import DEFAULT_MODEL, load_model
from .patching import available_methods, make_cache, method_options, patch, register_method, unpatch

register_method("pyramidkv", PyramidKVCache)
register_method("snapkv", SnapKVCache)
register_method("streamingllm", StreamingLLMCache)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "CacheStats",
    "CompressedCache",
    "KVLayer",
    "PyramidKVCache",
    "SnapKVCache",
    "StreamingLLMCache",
    "available_methods",
    "load_model",
    "make_cache",
    "method_options",
    "patch",
    "pyramid_budgets",
    "register_method",
    "unpatch",
]
