"""Which models EliteKV can convert, and where their attention modules are."""

from __future__ import annotations

from typing import Any

import torch

from ..core.facts import model_dims, text_config

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
"""Model types whose attention is the standard RoPE attention EliteKV converts: separate q/k/v/o
linear projections, RoPE on every dim (rotate_half layout), no query/key normalisation, every layer
full attention."""


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers (``model.model.layers``)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(
            f"compresskv.elitekv: cannot find the decoder layers of {type(model).__name__} "
            f"(expected `model.model.layers`); supported families: {', '.join(SUPPORTED_FAMILIES)}."
        )
    return list(layers)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Each decoder layer's ``self_attn``."""
    return [layer.self_attn for layer in decoder_layers(model)]


def is_converted(model: torch.nn.Module) -> bool:
    """Whether ``model`` is EliteKV-converted (its config has an ``elitekv`` entry)."""
    return bool(getattr(getattr(model, "config", None), "elitekv", None))


def check_supported(model: torch.nn.Module, converting: bool = True) -> None:
    """Raise a ``ValueError`` naming the model family when its attention is not the standard RoPE
    attention EliteKV converts (or when it is already converted)."""
    if is_converted(model):
        raise ValueError(
            "compresskv.elitekv: this model is already EliteKV-converted; ranking and conversion need the "
            "original attention (reload the original model, or compresskv.elitekv.revert(model) if it was "
            "converted with keep_original=True)."
        )
    config = text_config(model)
    family = getattr(config, "model_type", type(model).__name__)
    modules = attention_modules(model)
    attn_name = type(modules[0]).__name__ if modules else "?"
    supported = ", ".join(SUPPORTED_FAMILIES)

    def refuse(reason: str) -> None:
        raise ValueError(
            f"compresskv.elitekv: {family!r} models ({attn_name}) do not have the standard RoPE attention "
            f"EliteKV converts: {reason}. Supported families: {supported}."
        )

    if family not in SUPPORTED_FAMILIES:
        if any(hasattr(m, "q_norm") or hasattr(m, "k_norm") for m in modules):
            refuse("queries and keys are RMS-normalised per head (q_norm/k_norm) before RoPE, so the keys are "
                   "not a linear function of the hidden state and cannot share a low-rank latent with the values")
        refuse("its attention is not one EliteKV knows how to convert (it has only been verified on the "
               "standard q/k/v/o RoPE attention)")
    for m in modules:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(m, name, None), torch.nn.Linear):
                refuse(f"its attention has no linear `{name}`")
        if hasattr(m, "q_norm") or hasattr(m, "k_norm"):
            refuse("queries/keys are normalised before RoPE (q_norm/k_norm)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    partial = (rope.get("partial_rotary_factor") if isinstance(rope, dict) else None) or getattr(
        config, "partial_rotary_factor", 1.0
    )
    if partial not in (None, 1, 1.0):
        refuse(f"RoPE covers only part of each head (partial_rotary_factor={partial})")
    dims = model_dims(model)
    if dims["head_dim"] % 2:
        refuse(f"head_dim={dims['head_dim']} is odd")
    layer_types = getattr(config, "layer_types", None)
    if getattr(config, "sliding_window", None) is not None and family == "mistral":
        refuse(f"it uses sliding-window attention (sliding_window={config.sliding_window}); load it with "
               "sliding_window=None")
    if layer_types and any(t != "full_attention" for t in layer_types):
        refuse(f"some layers are not full attention ({sorted(set(layer_types))})")
