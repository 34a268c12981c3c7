"""What every method family shares: model facts and RoPE helpers (the cache/layer base and the
attention hook are to join them here, see docs/contracts.md)."""

from .facts import ModelDims, full_attention_layers, model_dims, plain_layers, text_config
from .rope import rotate_half

__all__ = ["ModelDims", "full_attention_layers", "model_dims", "plain_layers", "rotate_half", "text_config"]
