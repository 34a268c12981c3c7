"""What every method family shares: the cache and layer base (:mod:`.cache`), the attention hook
(:mod:`.attention`), model facts (:mod:`.facts`), RoPE helpers (:mod:`.rope`), the fused
attention with log-sum-exp that merges two softmax parts exactly (:mod:`.lse`) and the one
vocabulary of ``read_mode=`` values (:mod:`.readmode`)."""

from .cache import CacheStats, CompressedCache, KVLayer, tensor_bytes
from .facts import ModelDims, full_attention_layers, model_dims, plain_layers, refuse_mla, text_config
from .readmode import READ_MODES, check_read_mode
from .rope import rotate_half

__all__ = [
    "CacheStats",
    "CompressedCache",
    "KVLayer",
    "ModelDims",
    "READ_MODES",
    "full_attention_layers",
    "check_read_mode",
    "model_dims",
    "plain_layers",
    "refuse_mla",
    "rotate_half",
    "tensor_bytes",
    "text_config",
]
