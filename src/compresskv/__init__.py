"""compresskv: compressed KV caches for Hugging Face transformers, as a drop-in.

Either patch a model so that ``generate()`` uses a compressed cache:

```python
import compresskv
compresskv.patch(model, "pyramidkv", budget=256)
model.generate(**inputs)
```

or pass a cache yourself:

```python
model.generate(**inputs, cache=compresskv.SnapKVCache(model, compression_ratio=0.5))
```

(``past_key_values=`` instead of ``cache=`` on transformers < 5.24.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

# Names are imported on first use (PEP 562), so ``import compresskv`` and ``compresskv --version``
# do not load torch and transformers; ``compresskv.X`` and ``from compresskv import X`` work as usual.
_EXPORTS = {
    "CacheStats": "core", "CompressedCache": "core", "KVLayer": "core",
    "MiniCache": "crosslayer", "SVDCache": "crosslayer", "XKVCache": "crosslayer",
    "EliteKVCache": "elitekv",
    "ExpectedAttentionCache": "eviction", "KnormCache": "eviction", "PyramidKVCache": "eviction", "SnapKVCache": "eviction",
    "StreamingLLMCache": "eviction", "pyramid_budgets": "eviction",
    "MatryoshkaKVCache": "projected", "PCAKVCache": "projected", "Projections": "projected",
    "allocate_ranks": "projected", "calibrate": "projected", "train_projections": "projected",
    "DEFAULT_MODEL": "models", "load_model": "models", "sample_text": "data",
    "available_methods": "patching", "make_cache": "patching", "method_options": "patching", "patch": "patching",
    "last_cache": "patching", "last_stats": "patching",
    "patched": "patching", "register_method": "patching", "unpatch": "patching",
    "prefill": "reuse", "ask": "reuse",
    "QuantizedKVCache": "compose", "composed": "compose",
}

if TYPE_CHECKING:  # what static tools see
    from . import elitekv
    from .core import CacheStats, CompressedCache, KVLayer
    from .crosslayer import MiniCache, SVDCache, XKVCache
    from .elitekv import EliteKVCache
    from .eviction import ExpectedAttentionCache, KnormCache, PyramidKVCache, SnapKVCache, StreamingLLMCache, pyramid_budgets
    from .data import sample_text
    from .models import DEFAULT_MODEL, load_model
    from .patching import available_methods, make_cache, method_options, patch, patched, register_method, unpatch
    from .patching import last_cache, last_stats
    from .reuse import ask, prefill
    from .compose import QuantizedKVCache, composed
    from .projected import MatryoshkaKVCache, PCAKVCache, Projections, allocate_ranks, calibrate, train_projections


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "CacheStats",
    "CompressedCache",
    "EliteKVCache",
    "ExpectedAttentionCache",
    "KVLayer",
    "KnormCache",
    "MatryoshkaKVCache",
    "PCAKVCache",
    "QuantizedKVCache",
    "Projections",
    "MiniCache",
    "PyramidKVCache",
    "SnapKVCache",
    "SVDCache",
    "StreamingLLMCache",
    "XKVCache",
    "allocate_ranks",
    "ask",
    "available_methods",
    "calibrate",
    "composed",
    "elitekv",
    "last_cache",
    "last_stats",
    "load_model",
    "make_cache",
    "method_options",
    "patch",
    "patched",
    "prefill",
    "pyramid_budgets",
    "register_method",
    "sample_text",
    "train_projections",
    "unpatch",
]
