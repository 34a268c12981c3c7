"""The attention function compresskv registers with transformers.

A compressed cache changes what a layer holds: PyramidKV keeps a different number of tokens per
layer, and under left padding the kept tokens of a row are no longer contiguous. transformers
builds one mask per forward, sized from the first full-attention layer, so compressed layers need
their own. We register, for each base backend (``eager``, ``sdpa``, ``flash_attention_2``), an
attention function ``compresskv_<base>`` and a mask function under the same name (transformers
drops the mask of a name it has no mask function for). The mask function returns a
:class:`MaskBundle` carrying the base backend's mask and the 2-D padding mask; the attention
function rebuilds the mask of a compressed layer from that layer's own validity tensor and then
calls the base backend, so every model whose attention goes through ``ALL_ATTENTION_FUNCTIONS``
works unchanged. After the base attention it lets the layer compress (eviction scores, SVD, ...),
so prefill attention always runs on the full, uncompressed keys and values.

Layers that are not compressed (sliding-window layers, plain ``DynamicCache``) get the base mask
and the base function untouched: a model with compresskv's attention installed computes exactly
what it computed before.

The attention function finds a compressed layer by the attention module's ``layer_idx``: the
layer's ``update()`` records itself for its model layer (:func:`mark_pending`, per thread), and
the next attention call of the module with that index takes it. The tensors the model passes need
not be the ones ``update()`` returned (a model may copy, cast or expand them). This module imports
no cache module; it knows a layer by the :class:`HookedLayer` protocol, and the caches import it.
"""

from __future__ import annotations

import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

PREFIX = "compresskv_"
BASE_BACKENDS = ("eager", "sdpa", "flash_attention_2")

_state = threading.local()


class HookedLayer(Protocol):
    """What compresskv's attention function needs of a cache layer (``KVLayer`` implements it).

    The hook depends on this protocol only, never on the cache modules, which import the hook."""

    stored_before: int
    valid: torch.Tensor | None
    static: bool  # decodes into static buffers under its own mask (compresskv.core.decode)
    decoding: bool  # a single-token forward followed the prompt

    def static_mask(self, query: torch.Tensor, eager: bool) -> torch.Tensor: ...

    def check_model(self, module: torch.nn.Module) -> None: ...

    def row_validity(self, stored: int) -> torch.Tensor | None: ...

    def attend(self, call: "AttentionCall", fn: Callable[..., Any]) -> tuple[torch.Tensor, Any]: ...

    def after_attention(self, call: "AttentionCall") -> None: ...


def mark_pending(layer_idx: int, layer: HookedLayer) -> None:
    """Record that the cache layer of model layer ``layer_idx`` was just updated: the next attention
    call of the module with that ``layer_idx`` belongs to it (per thread).

    A layer is always attended before the next layer is updated, so at most one is pending; one
    still pending here (and still alive) was updated but never attended through compresskv's
    attention function, which is an error."""
    previous = getattr(_state, "pending", None)
    _state.pending = None
    if previous is not None and previous[1]() is not None:
        raise RuntimeError(
            "compresskv: a compressed cache layer was updated but its attention never ran through "
            "compresskv's attention function, so nothing was compressed and its mask would be wrong. "
            "Either the model's attention implementation was changed after the cache was created, or "
            "the cache is used with another model than the one it was built for. Create one cache per "
            "model (or call compresskv.patch), after choosing the attention implementation."
        )
    _state.pending = (layer_idx, weakref.ref(layer))


def _take_pending(module: torch.nn.Module) -> HookedLayer | None:
    """The layer pending for ``module.layer_idx``, taken (``None`` when there is none)."""
    entry = getattr(_state, "pending", None)
    if entry is None or entry[0] != getattr(module, "layer_idx", None):
        return None
    _state.pending = None
    return entry[1]()


def clear_pending() -> None:
    """Forget a pending layer (used after a forward that raised)."""
    _state.pending = None


@dataclass
class MaskBundle:
    """What compresskv's mask function hands to its attention function: the base backend's mask
    (built lazily, once per forward, shared by all layers) and the 2-D padding mask."""

    base_fn: Callable[..., Any]
    kwargs: dict[str, Any]
    pad2d: torch.Tensor | None
    _base: Any = field(default=None, repr=False)
    _built: bool = field(default=False, repr=False)
    _new: dict[int, torch.Tensor | None] = field(default_factory=dict, repr=False)
    _moved: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def base(self) -> Any:
        if not self._built:
            self._base = self.base_fn(**self.kwargs)
            self._built = True
        return self._base

    def _on(self, name: Any, value: Any, device: torch.device | None) -> Any:
        """``value`` on ``device``, moved at most once per forward and device. A model spread over
        devices (accelerate ``device_map``) builds the mask on its first device, and accelerate's
        hooks move tensors only, not this bundle, so each layer asks for its own device's copy."""
        if device is None or not isinstance(value, torch.Tensor) or value.device == device:
            return value
        key = (name, device)
        if key not in self._moved:
            self._moved[key] = value.to(device)
        return self._moved[key]

    def base_on(self, device: torch.device | None) -> Any:
        """The base backend's mask on ``device``."""
        return self._on("base", self.base, device)

    def pad_on(self, device: torch.device | None) -> torch.Tensor | None:
        """The 2-D padding mask on ``device``."""
        return self._on("pad", self.pad2d, device)

    def new_valid(self, q_len: int, device: torch.device | None = None) -> torch.Tensor | None:
        """``[batch, q_len]`` validity of this forward's new tokens (on ``device`` when given),
        ``None`` when all are real. Computed once per forward: the check is a host sync, not to be
        paid per layer."""
        if q_len not in self._new:
            new = self.pad2d[:, -q_len:].to(torch.bool) if self.pad2d is not None else None
            self._new[q_len] = None if new is None or bool(new.all()) else new
        return self._on(("new", q_len), self._new[q_len], device)


def _base_attention(base: str, module: torch.nn.Module) -> Callable[..., Any]:
    if base == "eager":
        # The model family's own eager function (it may carry soft-capping, sinks, ...).
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ValueError(
                f"compresskv: {type(module).__name__} has no module-level `eager_attention_forward`; "
                "use attn_implementation='sdpa' for this model."
            )
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[base]


def _layer_mask(layer: HookedLayer, call: "AttentionCall") -> Any:
    """The mask of a compressed layer: its stored tokens' validity, then causal over the new ones."""
    query, new_valid = call.query, call.new_valid
    if layer.static:
        return layer.static_mask(query, call.base == "eager")
    bsz, n_heads, q_len, _ = query.shape
    stored = layer.stored_before
    if stored == 0 and layer.valid is None:
        # Nothing stored yet (prefill): transformers' own mask is exactly right.
        return call.base_mask
    device = query.device
    if call.base.startswith("flash"):
        # Flash attention takes a 2-D padding mask and unpads wherever the holes are.
        old = layer.row_validity(stored)
        if old is None and new_valid is None:
            return None
        ones = lambda n: torch.ones(bsz, n, dtype=torch.bool, device=device)  # noqa: E731
        return torch.cat([old if old is not None else ones(stored), new_valid if new_valid is not None else ones(q_len)], -1)
    if layer.valid is None and q_len == 1 and new_valid is None:
        return None  # a single query that may see every stored token
    if layer.valid is None:
        old = torch.ones(bsz, 1, q_len, stored, dtype=torch.bool, device=device)
    else:
        groups = n_heads // layer.valid.shape[1]
        old = layer.valid.repeat_interleave(groups, dim=1)[:, :, None, :].expand(-1, -1, q_len, -1)
    new = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()[None, None]
    if new_valid is not None:
        new = new & new_valid[:, None, None, :]
    mask = torch.cat([old, new.expand(bsz, old.shape[1], q_len, q_len)], dim=-1)
    if call.base == "eager":
        zero = torch.zeros((), dtype=query.dtype, device=device)
        mask = torch.where(mask, zero, torch.finfo(query.dtype).min)
    return mask


_UNBUILT = object()


@dataclass
class AttentionCall:
    """One attention call of a compressed layer, as compresskv's attention function saw it.

    ``query`` is post-RoPE, ``[batch, q_heads, q_len, head_dim]``; ``key``/``value`` are what the
    model passed to the attention function (what the layer's ``update()`` returned, unless the model
    transformed it on the way); ``pad2d`` is the ``[batch, seen + q_len]`` padding mask (or
    ``None``); ``new_valid`` is the ``[batch, q_len]`` validity of the new tokens, ``None`` when
    all are real; ``kwargs`` are the model's extra attention arguments (``position_ids`` among
    them for the standard decoder layers). :attr:`mask` is the layer's mask for the base backend,
    built on first use only (a layer that attends in its own way never pays for it).
    """

    module: torch.nn.Module
    query: torch.Tensor
    key: Any
    value: Any
    pad2d: torch.Tensor | None
    scaling: float
    base: str
    kwargs: dict[str, Any]
    new_valid: torch.Tensor | None = None
    layer: HookedLayer | None = field(default=None, repr=False)
    attention_mask: Any = field(default=None, repr=False)  # what the model passed (a MaskBundle, say)
    _mask: Any = field(default=_UNBUILT, repr=False)

    @property
    def position_ids(self) -> torch.Tensor | None:
        return self.kwargs.get("position_ids")

    @property
    def base_mask(self) -> Any:
        """The base backend's mask for this forward (on this layer's device)."""
        mask = self.attention_mask
        return mask.base_on(self.query.device) if isinstance(mask, MaskBundle) else mask

    @property
    def mask(self) -> Any:
        """The mask to hand the base backend for this layer: its stored tokens' validity, then
        causal over the new ones (:attr:`base_mask` for a call without a layer). Built once, on
        first use."""
        if self._mask is _UNBUILT:
            self._mask = self.base_mask if self.layer is None else _layer_mask(self.layer, self)
        return self._mask


def _make_attention(base: str) -> Callable[..., Any]:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        layer = _take_pending(module)
        bundle = attention_mask if isinstance(attention_mask, MaskBundle) else None
        fn = _base_attention(base, module)
        device = query.device  # the layer's device: masks follow it under a multi-device device_map
        if layer is None:
            return fn(module, query, key, value, bundle.base_on(device) if bundle else attention_mask, **kwargs)
        pad2d = bundle.pad_on(device) if bundle is not None else None
        if bundle is None and attention_mask is not None and not layer.static:
            if layer.stored_before > 0:
                raise ValueError(
                    "compresskv: a prepared 4-D attention mask cannot be mapped onto a compressed cache; "
                    "pass the usual 2-D attention_mask (batch, tokens) instead."
                )
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
                pad2d = _padding_of(attention_mask)  # a prompt under transformers' own mask (compileable caches)
        layer.check_model(module)
        new_valid, q_len = None, query.shape[-2]
        if bundle is not None and layer.decoding and (layer.valid is not None or q_len == 1):
            # Decoding: no check of the new tokens (a host sync per step). With validity held, their
            # columns are appended as they are; without, a single decoded token is a real token
            # (generate() makes it so; padding belongs to prompts).
            if layer.valid is not None and pad2d is not None:
                new_valid = pad2d[:, -q_len:].to(torch.bool)
        elif bundle is not None:
            new_valid = bundle.new_valid(q_len, device)
        elif pad2d is not None:
            new_valid = pad2d if not bool(pad2d.all()) else None
        scaling = kwargs.get("scaling")
        call = AttentionCall(
            module,
            query,
            key,
            value,
            pad2d,
            scaling if scaling is not None else query.shape[-1] ** -0.5,
            base,
            kwargs,
            new_valid,
            layer,
            attention_mask,
        )
        out = layer.attend(call, fn)
        layer.after_attention(call)
        return out

    attention.__name__ = f"{PREFIX}{base}_attention"
    return attention


def _padding_of(mask: torch.Tensor) -> torch.Tensor:
    """``[batch, kv]`` padding of a prompt from transformers' own 4-D mask over it: the last query,
    a real token under left padding, sees every real token and no padding."""
    row = mask[:, 0, -1, :]
    return row if row.dtype == torch.bool else row == 0


def note_mask_for_compressed_cache() -> None:
    """Called by a compresskv cache when transformers sizes a mask from it: the mask function
    that follows hands compresskv's attention a :class:`MaskBundle`."""
    _state.bundle = True


def _make_mask(base: str) -> Callable[..., Any]:
    def mask_function(**kwargs: Any) -> Any:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        fn = ALL_MASK_ATTENTION_FUNCTIONS[base]
        if not getattr(_state, "bundle", False):
            # No compresskv cache in this forward (a StaticCache, say, whose mask generate() builds
            # ahead and the model then takes as is): transformers' own mask, a plain tensor.
            return fn(**kwargs)
        _state.bundle = False
        return MaskBundle(fn, kwargs, kwargs.get("attention_mask"))

    mask_function.__name__ = f"{PREFIX}{base}_mask"
    return mask_function


_registered = False


def register() -> None:
    """Register ``compresskv_<base>`` attention and mask functions with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for base in BASE_BACKENDS:
        AttentionInterface.register(PREFIX + base, _make_attention(base))
        AttentionMaskInterface.register(PREFIX + base, _make_mask(base))
    _registered = True


def base_of(attn_implementation: str | None) -> str:
    """The base backend behind a (possibly compresskv) attention implementation name."""
    name = attn_implementation or "sdpa"
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def install(model: torch.nn.Module) -> str:
    """Switch ``model`` to compresskv's attention over its current backend; returns the base name.

    Raises a ``ValueError`` naming the allowed backends for any other implementation, and for a
    model whose attention does not dispatch through transformers' ``AttentionInterface``.
    """
    register()
    config = model.config
    current = config._attn_implementation
    base = base_of(current)
    if base not in BASE_BACKENDS:
        raise ValueError(
            f"compresskv: attn_implementation={current!r} is not supported; use one of "
            f"{list(BASE_BACKENDS)} (load the model with attn_implementation='sdpa', say)."
        )
    if base.startswith("flash"):
        try:
            import flash_attn  # noqa: F401
        except ImportError as err:  # pragma: no cover - depends on the machine
            raise ValueError(
                "compresskv: attn_implementation='flash_attention_2' needs the flash-attn package "
                "(pip install 'compresskv[flash]'); use 'sdpa' otherwise."
            ) from err
    if current == PREFIX + base:
        return base
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        raise ValueError(
            f"compresskv: {type(model).__name__} does not route its attention through transformers' "
            "AttentionInterface, so compresskv cannot hook it. Supported: models whose attention "
            "follows transformers' standard path (Llama, Mistral, Qwen2, Qwen3, ...)."
        )
    if not hasattr(model, "_compresskv_base_attn"):
        model._compresskv_base_attn = current
    model.set_attn_implementation(PREFIX + base)
    return base


def uninstall(model: torch.nn.Module) -> None:
    """Give ``model`` back the attention implementation it had before :func:`install`."""
    original = model.__dict__.pop("_compresskv_base_attn", None)
    if original is not None:
        model.set_attn_implementation(original)
