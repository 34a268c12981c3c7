"""Model facts read from a transformers config, in one place."""

from __future__ import annotations

from typing import Any, TypedDict


class ModelDims(TypedDict):
    """Sizes of a model's text (decoder) stack."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int


def text_config(model: Any) -> Any:
    """The decoder's text config (a multimodal config's text part; a plain config as it is)."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def model_dims(model: Any) -> ModelDims:
    """``hidden``, ``heads`` (query heads), ``kv_heads``, ``head_dim`` and ``layers`` of ``model``."""
    config = text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelDims(
        hidden=int(config.hidden_size),
        heads=int(heads),
        kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        layers=int(config.num_hidden_layers),
    )


def plain_layers(model: Any) -> list[Any]:
    """The layer objects transformers' ``DynamicCache`` builds for ``model`` (one per layer)."""
    from transformers import DynamicCache

    return list(DynamicCache(config=model.config).layers)


def full_attention_layers(model: Any, plain: list[Any] | None = None) -> list[int]:
    """Indices of the layers ``DynamicCache`` gives a plain full-attention layer: those compresskv
    compresses (sliding-window, KV-shared and linear layers keep transformers' own)."""
    from transformers.cache_utils import DynamicLayer

    layers = plain_layers(model) if plain is None else plain
    return [i for i, layer in enumerate(layers) if type(layer) is DynamicLayer]
