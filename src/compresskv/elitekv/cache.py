"""The EliteKV cache (arXiv 2503.01586): per token and layer, the RoPE'd elite key dims and one
joint K/V latent, nothing else.

A model converted by :func:`compresskv.elitekv.convert` computes, per layer, ``k_rope``
(``[batch, kv_heads, T, 2·r]``: the ``r`` chosen RoPE pairs of every KV head, rotated) and the
latent (``[batch, 1, T, c]``: ``hidden @ W_downᵀ``, shared by the un-rotated key dims and the values
of all KV heads), and calls ``cache.update(k_rope, latent, layer_idx)``. An
:class:`EliteKVLayer` appends them, as ``keys`` and ``values``, and returns everything stored; the
converted attention attends from that (absorbing ``W_up`` into the query side for decoding, see
:mod:`compresskv.elitekv`). Nothing is evicted, so transformers' own causal/padding mask is exactly
right and no compresskv attention hook is installed.

Bytes held: ``batch · T · L · (c + 2·r·H_kv) · element_size``, exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache

from ..core.cache import CompressedCache, KVLayer
from ..core.facts import model_dims


def elitekv_spec(model: Any) -> dict[str, Any]:
    """The ``elitekv`` entry of a converted model's config (raises ``ValueError`` otherwise)."""
    config = getattr(model, "config", None)
    spec = getattr(config, "elitekv", None) if config is not None else None
    if not spec:
        raise ValueError(
            f"compresskv: {type(model).__name__} is not an EliteKV-converted model; convert it first with "
            "compresskv.elitekv.convert(model, ...) or compresskv.patch(model, 'elitekv', ...), or load a saved "
            "one with compresskv.elitekv.load_converted(path)."
        )
    return spec


class EliteKVLayer(KVLayer):
    """One layer of an :class:`EliteKVCache`: ``keys`` are the RoPE'd elite key dims
    ``[batch, kv_heads, T, 2·r]``, ``values`` the joint latent ``[batch, 1, T, c]``."""

    is_croppable = True

    def __init__(self, kv_heads: int, rope_dims: int, kv_dim: int) -> None:
        super().__init__()
        self.kv_heads, self.rope_dims, self.kv_dim = kv_heads, rope_dims, kv_dim

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b = key_states.shape[0]
        self.keys = key_states.new_empty(b, self.kv_heads, 0, self.rope_dims)
        self.values = value_states.new_empty(b, 1, 0, self.kv_dim)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k_rope`` (``key_states``) and the latent (``value_states``); return all stored."""
        want_k = (self.kv_heads, self.rope_dims)
        if key_states.dim() != 4 or tuple(key_states.shape[i] for i in (1, 3)) != want_k or value_states.dim() != 4 \
                or value_states.shape[1] != 1 or value_states.shape[-1] != self.kv_dim:
            raise ValueError(
                f"compresskv: this EliteKVCache layer holds k_rope [batch, {self.kv_heads}, T, {self.rope_dims}] and a "
                f"latent [batch, 1, T, {self.kv_dim}], but got {tuple(key_states.shape)} and "
                f"{tuple(value_states.shape)}; it was built for another model (create one cache per model; an "
                "EliteKVCache only works with the EliteKV-converted model it was built from)."
            )
        self.append(key_states, value_states)
        self.prefilled = True
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError("compresskv: crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        n = min(-tokens_to_remove, self.keys.shape[-2])
        self.keys = self.keys[..., : self.keys.shape[-2] - n, :]
        self.values = self.values[..., : self.values.shape[-2] - n, :]
        self.seen -= n


class EliteKVCache(CompressedCache):
    """The cache of an EliteKV-converted model (see :mod:`compresskv.elitekv`).

    A converted model builds one by itself in ``generate()`` and in a forward with
    ``use_cache=True``; pass one explicitly to reuse or inspect it:

    ```python
    cache = compresskv.EliteKVCache(model)
    model.generate(**inputs, cache=cache)  # past_key_values=cache on transformers < 5.24
    cache.nbytes()  # == batch · T · L · (kv_dim + 2·rope_pairs·H_kv) · element_size
    ```

    ``model`` is the converted model (a ``...ForCausalLM`` or its base model).
    """

    method = "elitekv"

    def __init__(self, model: torch.nn.Module) -> None:
        spec = elitekv_spec(model)
        dims = model_dims(model)
        self.num_kv_heads, self.head_dim = dims["kv_heads"], dims["head_dim"]
        self.rope_pairs, self.kv_dim = int(spec["rope_pairs"]), int(spec["kv_dim"])
        n_layers = dims["layers"]
        self.full_layers = list(range(n_layers))
        layers = [EliteKVLayer(self.num_kv_heads, 2 * self.rope_pairs, self.kv_dim) for _ in range(n_layers)]
        for layer in layers:
            layer.expected = (n_layers, self.num_kv_heads, self.head_dim)
        # No compresskv attention hook: nothing is evicted, transformers' mask is exact.
        Cache.__init__(self, layers=layers)

    def bytes_per_token(self, element_size: int = 4) -> int:
        """Bytes stored per token (all layers) at ``element_size`` bytes per element."""
        return len(self.layers) * (self.kv_dim + 2 * self.rope_pairs * self.num_kv_heads) * element_size
