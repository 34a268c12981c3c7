"""What every method family shares: model facts and RoPE helpers (the cache/layer base and the
attention hook are to join them here, see docs/contracts.md)."""

from .facts import ModelDims, model_dims, text_config
from .rope import rotate_half

__all__ = ["ModelDims", "model_dims", "rotate_half", "text_config"]
