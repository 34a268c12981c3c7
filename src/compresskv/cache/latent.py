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

The module also holds the two small helpers the latent-space attention of the projected caches
(EliteKV's absorbed decode, MatryoshkaKV's projected mode) uses to run in fused kernels:
:func:`fused_sdpa_ok` (does ``scaled_dot_product_attention`` have a fused kernel for these inputs)
and :func:`attention_with_lse` (fused attention that also returns the log-sum-exp, for merging two
softmax parts exactly).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from transformers import Cache

from ..core.facts import model_dims
from .base import CacheStats, CompressedCache, KVLayer, tensor_bytes

# -- fused latent-space attention helpers -------------------------------------------------------------
_FUSED: dict[tuple[Any, ...], tuple[bool, bool, bool]] = {}


def _sdpa_params(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 dropout: float) -> Any:
    params = torch.backends.cuda.SDPAParams
    try:
        return params(query, key, value, mask, dropout, False, False)  # torch >= 2.5 (enable_gqa)
    except TypeError:
        return params(query, key, value, mask, dropout, False)


def _cuda_backends(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   dropout: float) -> tuple[bool, bool, bool]:
    """``(flash, memory-efficient, cuDNN)``: which fused CUDA kernels accept these inputs.

    Asked of PyTorch itself (``torch.backends.cuda.can_use_*``), once per device, dtype, head dims
    and mask kind: those decide it (flash: q, k and v dims equal and at most 256, fp16/bf16, no
    mask; memory-efficient: q and k dims equal, v may differ, no upper bound, every dim a multiple
    of 8 in fp16/bf16 or of 4 in fp32 on sm80+; cuDNN: version- and hardware-dependent), not the
    sequence lengths. Our inputs are fresh tensors or views of the cache's, so the storage-offset
    alignment the memory-efficient check also asks holds for every call alike."""
    memo = (query.device, query.dtype, query.shape[-1], key.shape[-1], value.shape[-1], mask is None,
            None if mask is None else mask.dtype, query.requires_grad, dropout > 0)
    found = _FUSED.get(memo)
    if found is None:
        cuda = torch.backends.cuda
        flash = efficient = cudnn = False
        try:
            params = _sdpa_params(query, key, value, mask, dropout)
            flash = bool(cuda.can_use_flash_attention(params, False))
            efficient = bool(cuda.can_use_efficient_attention(params, False))
            cudnn = bool(cuda.can_use_cudnn_attention(params, False))
        except (AttributeError, RuntimeError, TypeError):  # an older torch without (some of) these checks
            pass
        found = _FUSED[memo] = (flash, efficient, cudnn)
    return found


def fused_sdpa_ok(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
                  dropout: float = 0.0) -> bool:
    """Whether ``scaled_dot_product_attention(query, key, value, mask)`` runs in a fused kernel.

    On CUDA, only when flash, memory-efficient or cuDNN attention accepts the inputs: otherwise
    SDPA falls back to its math kernel, which materialises the logits like the explicit path does
    and adds copies, so callers keep their explicit path instead. Elsewhere ``True``: SDPA always
    has a kernel on CPU (flash, or math for unequal head dims); whether it pays off there is the
    caller's to know.
    """
    if query.device.type != "cuda":
        return True
    flash, efficient, cudnn = _cuda_backends(query, key, value, mask, dropout)
    return efficient or cudnn or (flash and mask is None)


def _aligned_bias(bias: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``bias`` expanded to ``shape`` with every stride but the last a multiple of 8 elements (what
    the memory-efficient kernel reads); copied into a padded buffer only when it is not already."""
    out = bias.expand(shape)
    if out.stride(-1) == 1 and all(s % 8 == 0 for s in out.stride()[:-1]):
        return out
    t = bias.shape[-1]
    padded = bias.new_empty(*bias.shape[:-1], (t + 7) // 8 * 8)[..., :t]
    padded.copy_(bias)
    return padded.expand(shape)


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fused ``softmax(query·keyᵀ·scale + bias)·value`` and its log-sum-exp, or ``None`` when no
    fused kernel takes these inputs (the caller then runs its explicit path).

    ``query`` ``[b, h, q, dk]``, ``key`` ``[b, h, T, dk]``, ``value`` ``[b, h, T, dv]``, ``bias``
    (additive, the query's dtype) broadcastable to ``[b, h, q, T]`` or ``None``. Returns the output
    ``[b, h, q, dv]`` and the fp32 log-sum-exp ``[b, h, q]`` of the scaled, biased logits: what two
    softmax parts need to be merged exactly. ``scaled_dot_product_attention`` does not return it, so
    this calls the ATen kernels behind it (``_scaled_dot_product_flash_attention_for_cpu`` on CPU;
    ``_scaled_dot_product_flash_attention`` or ``_scaled_dot_product_efficient_attention`` on
    CUDA), after asking PyTorch which of them accepts the inputs. Inference only (no autograd, no
    dropout).
    """
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    try:
        return _aten_attention_with_lse(query, key, value, bias, scale)
    except (RuntimeError, TypeError) as err:  # a private ATen signature that changed: use the explicit path
        _warn_once(f"compresskv: fused attention with log-sum-exp unavailable ({type(err).__name__}: {err}); "
                   "using the explicit path")
        return None


def _aten_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    ops = torch.ops.aten
    if query.device.type == "cpu":
        if key.shape[-1] != value.shape[-1] or not hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
            return None  # the CPU flash kernel needs equal head dims
        out, lse = ops._scaled_dot_product_flash_attention_for_cpu(query, key, value, attn_mask=bias, scale=scale)
        return out, lse.float()
    if query.device.type != "cuda":
        return None
    flash, efficient, _ = _cuda_backends(query, key, value, bias, 0.0)
    if flash and bias is None and query.shape[-1] % 8 == 0:  # SDPA pads other dims before this kernel
        result = ops._scaled_dot_product_flash_attention(query, key, value, scale=scale)
        return result[0], result[1].float()
    if not efficient:
        return None  # (cuDNN attention may accept these, but its log-sum-exp comes back another way)
    b, h, q, _ = query.shape
    if bias is not None:
        bias = _aligned_bias(bias, (b, h, q, key.shape[-2]))
    result = ops._scaled_dot_product_efficient_attention(query, key, value, bias, True, scale=scale)
    return result[0], result[1][..., :q].float()  # its log-sum-exp is padded to 32 query rows


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


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
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.stored_before = self.keys.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
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

    def nbytes(self) -> int:
        return tensor_bytes(self.keys, self.values)


class EliteKVCache(CompressedCache):
    """The cache of an EliteKV-converted model (see :mod:`compresskv.elitekv`).

    A converted model builds one by itself in ``generate()`` and in a forward with
    ``use_cache=True``; pass one explicitly to reuse or inspect it::

        cache = compresskv.EliteKVCache(model)
        model.generate(**inputs, cache=cache)  # past_key_values=cache on transformers < 5.24
        cache.nbytes()  # == batch · T · L · (kv_dim + 2·rope_pairs·H_kv) · element_size

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

    def uncompressed_nbytes(self) -> int:
        """Bytes a ``DynamicCache`` of the original model would hold for the same tokens."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized and layer.keys is not None:
                per_token = 2 * self.num_kv_heads * self.head_dim
                total += layer.keys.shape[0] * layer.seen * per_token * layer.keys.element_size()
        return total

    def stats(self) -> CacheStats:
        """Tokens seen and stored per layer (all of them: EliteKV compresses dims, not tokens), bytes
        held and the ratio to the original model's uncompressed cache."""
        stored = [int(layer.keys.shape[-2]) if layer.is_initialized else 0 for layer in self.layers]
        return CacheStats(
            method=self.method,
            tokens_seen=self.get_seq_length(0),
            tokens_stored=stored,
            nbytes=self.nbytes(),
            uncompressed_nbytes=self.uncompressed_nbytes(),
        )
