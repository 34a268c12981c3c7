"""Composed caches (tokens × channels × bits) and KIVI quantization: :mod:`.cache`, :mod:`.quant`.

Above the method families: a composition uses an eviction cache for its token stage and the
projected family's per-head projections for its channel stage."""

from .cache import BIT_STAGES, CHANNEL_STAGES, TOKEN_STAGES, ComposedLayer, Composition, QuantizedKVCache, composed, parse
from .quant import QuantSpec, dequantize, quantize

__all__ = [
    "BIT_STAGES",
    "CHANNEL_STAGES",
    "TOKEN_STAGES",
    "ComposedLayer",
    "Composition",
    "QuantSpec",
    "QuantizedKVCache",
    "composed",
    "dequantize",
    "parse",
    "quantize",
]
