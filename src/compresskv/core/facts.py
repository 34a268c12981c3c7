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


#: Model types with multi-head latent attention (also recognised by ``kv_lora_rank`` in the config).
MLA_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")


class MLADims(TypedDict):
    """Sizes of a multi-head latent attention (MLA) model's cache."""

    kv_lora_rank: int  # the latent's dims (keys and values without RoPE, before the per-head expansion)
    rope_dim: int  # the RoPE key shared by every head
    nope_dim: int  # a head's key dims without RoPE
    v_dim: int  # a head's value dims
    latent: bool  # transformers caches the latent and the shared RoPE key (else each head's keys and values)


def mla_dims(model: Any) -> MLADims | None:
    """The MLA sizes of ``model`` (DeepSeek-V2/V3 and the like), or ``None`` for other attention.

    Recent transformers releases cache MLA's latent ``[batch, 1, T, kv_lora_rank]`` and shared RoPE
    key ``[batch, 1, T, rope_dim]`` and expand them per head after the cache (their attention has
    ``expand_kv``); older ones cache the expanded per-head keys and values."""
    config = text_config(model)
    rank = getattr(config, "kv_lora_rank", None)
    if not rank and getattr(config, "model_type", None) not in MLA_MODEL_TYPES:
        return None
    latent = any(callable(getattr(module, "expand_kv", None)) for module in model.modules())
    return MLADims(kv_lora_rank=int(rank), rope_dim=int(config.qk_rope_head_dim), nope_dim=int(config.qk_nope_head_dim),
                   v_dim=int(config.v_head_dim), latent=latent)


#: Methods that compress a multi-head latent attention (MLA) model's cache.
MLA_METHODS = ("snapkv", "pyramidkv", "streamingllm", "knorm", "xkv", "svd")


def refuse_mla(model: Any, owner: str, why: str = "") -> None:
    """Raise a ``ValueError`` for a model with multi-head latent attention (DeepSeek-V2/V3 and the
    like) when ``owner`` cannot compress its cache (``why`` says why, if more is to be said)."""
    if mla_dims(model) is None:
        return
    config = text_config(model)
    raise ValueError(
        f"{owner}: {type(model).__name__} (model_type={getattr(config, 'model_type', None)!r}) uses multi-head latent "
        f"attention (MLA, kv_lora_rank={getattr(config, 'kv_lora_rank', None)}, qk_rope_head_dim="
        f"{getattr(config, 'qk_rope_head_dim', None)}): per token "
        "it caches one latent and one RoPE key shared by every head, and expands each head's keys and values from "
        f"them after the cache; {why or 'this method compresses per-head keys and values, which MLA does not cache'}. "
        f"Methods that compress an MLA cache: {', '.join(MLA_METHODS)} (the last two where transformers caches the "
        "latent); or use transformers' DynamicCache (the MLA "
        "latent is already a compressed cache)."
    )
