"""The cache foundation: a ``transformers.Cache`` holding one layer object per model layer.

Full-attention layers get a :class:`KVLayer` (or a subclass that compresses); every other layer
(sliding-window, KV-shared, linear attention) keeps exactly the layer ``DynamicCache`` would give
it. A :class:`KVLayer` counts tokens *seen* separately from tokens *stored*, keeps a per-KV-head
validity tensor once stored tokens stop being contiguous real tokens (left padding, eviction), and
is told by compresskv's attention function when its attention has run, which is when methods
compress (see :mod:`compresskv.core.attention`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from . import attention as _attention
from .attention import AttentionCall
from .decode import DecodeStorage
from .facts import full_attention_layers, mla_dims, model_dims, plain_layers, refuse_mla
from .ops import serial_when_small, take_tokens
from .storage import Storage, batch_fn, tensor_bytes


class KVLayer(Storage, DecodeStorage, CacheLayerMixin):
    """An uncompressed full-attention layer that builds its own mask; subclasses compress it.

    Stores ``keys``/``values`` as ``[batch, kv_heads, stored, head_dim]`` (never the
    ``repeat_kv``-expanded form) and ``valid`` as ``[batch, kv_heads, stored]`` booleans, or
    ``None`` while every stored token is a real token. A subclass that stores other tensors names
    them in :attr:`storage` (see :mod:`compresskv.core.storage`): bytes, reset, batch operations
    and offload follow.
    """

    storage: tuple[str, ...] = ("keys", "values")

    is_sliding = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.init_decode_storage()
        self.valid = None
        self.layer_idx: int | None = None  # the model layer it caches; set by CompressedCache
        self.seen = 0
        self.stored_before = 0
        self.prefilled = False
        # The prompt is every multi-token forward before the first single-token one (chunked
        # prefill sends it in pieces); from that first single-token step on, the layer decodes.
        self.decoding = False
        self.expected: tuple[int, int, int] | None = None  # (num_layers, kv_heads, head_dim)
        self.token_dims: tuple[int, int] | None = None  # (key, value) dims per KV head and token

    # -- storage ---------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, dk = key_states.shape
        self.keys = key_states.new_empty(b, h, 0, dk)
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens and return everything the mask advertises (stored + new)."""
        if self.expected is not None and key_states.shape[1] != self.expected[1]:
            raise ValueError(
                f"compresskv: this cache was built for a model with {self.expected[1]} KV heads per "
                f"layer, but got keys with {key_states.shape[1]}; create one cache per model."
            )
        self.append(key_states, value_states)
        self.mark_pending()
        return self.keys, self.values

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store the new tokens after the stored ones (initialising on the first call). The prompt
        is concatenated (it is compressed right after, into new tensors); later tokens go where
        :mod:`compresskv.core.decode` says (room written in place, or static buffers)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.static:
            self.write_static(key_states, value_states)
            return
        if self.prefilled:
            self.make_room(key_states.shape[-2])
        self.stored_before = self.keys.shape[-2]
        if self.prefilled:
            self.keys = self.write_in_room(self.keys, key_states, "keys")
            self.values = self.write_in_room(self.values, value_states, "values")
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]

    def make_room(self, n: int) -> None:
        """Before ``n`` tokens are appended after the prompt: a layer with a bounded size evicts
        here (see :mod:`compresskv.eviction.bounded`); the base keeps everything."""

    def mark_pending(self) -> None:
        """Tell compresskv's attention function that the next attention call of model layer
        :attr:`layer_idx` is this layer's (``update()`` calls it; see :mod:`compresskv.core.attention`)."""
        if self.layer_idx is not None:
            _attention.mark_pending(self.layer_idx, self)

    # -- validity --------------------------------------------------------------------------
    @property
    def valid(self) -> torch.Tensor | None:
        """``[batch, kv_heads, stored]`` validity of the stored tokens, ``None`` while all are real."""
        return self._valid

    @valid.setter
    def valid(self, value: torch.Tensor | None) -> None:
        self._valid = value
        self._heads_agree: bool | None = None  # unknown until row_validity checks it (once)

    def attend(self, call: AttentionCall, fn: Any) -> tuple[torch.Tensor, Any]:
        """Compute this layer's attention. The base runs the model's backend ``fn`` on what
        the model passed (``call.key``/``call.value``) under the layer's mask ``call.mask``; a
        layer that stores a latent form can override this to attend in the latent space instead
        (and then need not build the mask)."""
        plain = not call.kwargs.get("softcap") and call.kwargs.get("position_bias") is None
        if self.static and call.base == "sdpa" and call.query.shape[-2] == 1 and plain:
            return self.static_sdpa(call.query, call.key, call.value, call.scaling), None
        return serial_when_small(call.query.shape[-2], call.key.nbytes + call.value.nbytes, call.key.device,
                                 fn, call.module, call.query, call.key, call.value, call.mask, **call.kwargs)

    def after_attention(self, call: AttentionCall) -> None:
        """Called by compresskv's attention once this layer's attention has run: records the new
        tokens' validity, then compresses once after prefill (and then, with ``decode_tokens``,
        moves to static decoding: see :mod:`compresskv.core.decode`)."""
        if self.static:
            return  # the write recorded everything; the Python state stays the same step to step
        bsz, _, q_len, _ = call.query.shape
        n_kv = self.expected[1] if self.expected is not None else call.query.shape[1]
        if call.new_valid is not None or self.valid is not None:
            device = call.query.device
            old = self.valid
            if old is None:
                old = torch.ones(bsz, n_kv, self.stored_before, dtype=torch.bool, device=device)
            new = call.new_valid
            if new is None:
                new = torch.ones(bsz, q_len, dtype=torch.bool, device=device)
            # Appending columns that agree across heads keeps what row_validity knows about them.
            agree = self._heads_agree if self._valid is not None else True
            new = new[:, None, :].expand(-1, n_kv, -1)
            self.valid = self.append_valid(new) if self.prefilled and self._valid is not None else torch.cat([old, new], -1)
            self._heads_agree = agree
        if not self.prefilled:
            self.prefilled = True
            self.compress(call)
            if self.decode_tokens is not None:
                self.begin_static()
        elif not self.decoding:
            if q_len == 1:
                self.decoding = True
            else:
                self.compress_chunk(call)

    def compress(self, call: AttentionCall) -> None:
        """Compress what the prefill stored (runs once, right after prefill attention). The base
        layer keeps everything."""

    def compress_chunk(self, call: AttentionCall) -> None:
        """Compress again after a further piece of a chunked prompt (``generate(prefill_chunk_size=...)``:
        another multi-token forward before any single-token step). The base layer keeps everything,
        which is right for layers that compress every token as it is stored."""

    def check_model(self, module: torch.nn.Module) -> None:
        if self.expected is not None:
            n_layers = getattr(module.config, "num_hidden_layers", self.expected[0])
            if n_layers != self.expected[0]:
                raise ValueError(
                    f"compresskv: this cache was built for a model with {self.expected[0]} layers, "
                    f"but is used with one of {n_layers}; create one cache per model."
                )

    def row_validity(self, stored: int) -> torch.Tensor | None:
        """``[batch, stored]`` validity when it is the same for every KV head (flash attention).
        Whether it is is checked (a host sync) once per new validity tensor, not per decode step:
        appending the new tokens' validity, the same for every head, keeps the answer."""
        if self.valid is None:
            return None
        if self._heads_agree is None:
            self._heads_agree = bool((self.valid == self.valid[:, :1]).all())
        if not self._heads_agree:
            raise ValueError(
                "compresskv: this cache kept different tokens per KV head under padding, which "
                "flash_attention_2 cannot mask; use attn_implementation='sdpa'."
            )
        return self.valid[:, 0, :stored]

    def keep(self, index: torch.Tensor, slot_valid: torch.Tensor | None = None, capacity: int | None = None) -> None:
        """Keep only the stored tokens at ``index`` (``[batch, kv_heads, n]``); ``slot_valid``
        (same shape) marks slots kept only as filler, masked from then on. With ``capacity`` the
        kept tokens go to the front of the layer's room of that many slots (a bounded layer's,
        reused eviction after eviction); without, they are new tensors."""
        keys, values = take_tokens(self.keys, index), take_tokens(self.values, index)
        valid = self.valid.gather(2, index) if self.valid is not None else None
        if slot_valid is not None:
            valid = slot_valid if valid is None else valid & slot_valid
        valid = None if valid is None or bool(valid.all()) else valid
        if capacity is None:
            self.free_room()
            self.keys, self.values, self.valid = keys, values, valid
            return
        self.keys = self.refill_room(keys, "keys", capacity)
        self.values = self.refill_room(values, "values", capacity)
        self.valid = None if valid is None else self.refill_room(valid[..., None], "valid", capacity)[..., 0]

    # -- what transformers asks --------------------------------------------------------------
    def stored(self) -> int:
        if self.static:
            return int(self._fill)
        return self.keys.shape[-2] if self.is_initialized and self.keys is not None else 0

    def get_seq_length(self) -> int | torch.Tensor:
        if self.static and torch.compiler.is_compiling():
            return self._fill + (self._seen0 - self._fill0)  # a tensor, as StaticCache's: no host sync
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static:
            return self._valid.shape[-1], 0  # the whole buffers are attended (under the layer's own mask)
        stored = self.stored()
        return stored + query_length, self.seen - stored

    def get_max_length(self) -> int:
        return -1

    get_max_cache_shape = get_max_length  # its name before transformers 5.16

    def nbytes(self) -> int:
        """Bytes of every tensor this layer holds: :attr:`storage`, validity, decode-time room not
        yet filled (:meth:`room_nbytes`) and :meth:`held_nbytes`."""
        room = 0 if self.static else self.room_nbytes()  # static buffers are the stored tensors themselves
        return tensor_bytes(*self.tensors(), self.valid) + room + self.held_nbytes()

    def held_nbytes(self) -> int:
        """Bytes of per-layer tensors that are not per row (projection columns, means)."""
        return 0

    def uncompressed_nbytes(self) -> int:
        """Bytes a ``DynamicCache`` would hold for this layer's tokens seen, in the same dtype."""
        stored = self.tensors()
        if not self.is_initialized or not stored or self.expected is None:
            return 0
        _, kv_heads, head_dim = self.expected
        dims = sum(self.token_dims) if self.token_dims is not None else 2 * head_dim
        return stored[0].shape[0] * self.seen * kv_heads * dims * self.dtype.itemsize

    def reset(self) -> None:
        self.clear_storage()
        self.free_room()
        self.end_static()
        self.valid = None
        self.is_initialized = False
        self.seen = self.stored_before = 0
        self.prefilled = self.decoding = False

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError(
            f"compresskv: {type(self).__name__} cannot be cropped (compressed tokens cannot be "
            "un-seen); assisted/speculative decoding needs a croppable cache such as DynamicCache."
        )

    def map_valid(self, fn: Any) -> None:
        """Apply ``fn`` (a row selection or a device move) to ``valid``: whether heads agree is
        kept, so no new check (a host sync) follows."""
        if self._valid is not None:
            self._valid = fn(self._valid)

    def map_rows(self, fn: Any) -> None:
        """Apply ``fn`` to every per-row tensor: :attr:`storage` and validity."""
        if self.is_initialized:
            self.map_storage(fn)
            self.map_valid(fn)
            self.free_room()  # the rows now live in new tensors
            self.static_moved()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_rows(batch_fn("reorder", beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_rows(batch_fn("repeat", repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_rows(batch_fn("select", indices))

    def offload(self) -> None:
        self.map_rows(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self.map_rows(lambda t: t.to(self.device, non_blocking=True))


@dataclass
class CacheStats:
    """What a compressed cache holds, measured from its tensors."""

    method: str
    tokens_seen: int
    tokens_stored: list[int | None] = field(default_factory=list)
    nbytes: int = 0
    uncompressed_nbytes: int = 0
    #: the part of ``nbytes`` held once whatever the number of tokens (projection columns and
    #: means, a RoPE table): a per-model overhead, large next to a short prompt's cache
    fixed_nbytes: int = 0
    #: the part of ``nbytes`` that is decode-time room allocated ahead of the tokens that will fill
    #: it (at most 1/32 of what is stored, or 16 tokens a layer): held, but not yet used
    room_nbytes: int = 0

    @property
    def ratio(self) -> float:
        """Bytes held (all of them, the fixed part included: what the memory holds) / bytes a
        ``DynamicCache`` would hold for the same tokens. The bench's bytes column is this."""
        return self.nbytes / self.uncompressed_nbytes if self.uncompressed_nbytes else 1.0

    @property
    def token_ratio(self) -> float:
        """Bytes of the tokens stored (``nbytes`` without ``fixed_nbytes`` and ``room_nbytes``) / a
        ``DynamicCache``'s: the compression itself, what the ratio tends to on long prompts."""
        used = self.nbytes - self.fixed_nbytes - self.room_nbytes
        return used / self.uncompressed_nbytes if self.uncompressed_nbytes else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "token_ratio": self.token_ratio}


class CompressedCache(Cache):
    """Base of compresskv's caches: a ``Cache`` whose full-attention layers are :class:`KVLayer`s.

    Subclasses implement :meth:`make_layer` to build the layer for the ``index``-th full-attention
    layer (of ``n_full``). Creating a cache installs compresskv's attention on ``model``
    (:func:`compresskv.core.attention.install`); that attention computes exactly what the model's own
    did for any layer that is not compressed.
    """

    method = "full"
    #: decode tokens to make room for after compression, for static (compileable) decoding; set by
    #: the caches that offer it (see :mod:`compresskv.core.decode`)
    decode_tokens: int | None = None

    #: whether the cache compresses a multi-head latent attention model's cache (see :attr:`mla`)
    supports_mla = False

    def __init__(self, model: torch.nn.Module) -> None:
        if not self.supports_mla:
            refuse_mla(model, type(self).__name__)  # before switching the model's attention
        #: an MLA model's sizes (``None`` for other attention); with ``mla["latent"]`` a layer stores the
        #: latent as ``keys`` (``[batch, 1, T, kv_lora_rank]``) and the shared RoPE key as ``values``
        self.mla = mla_dims(model)
        decode_tokens = self.decode_tokens
        if decode_tokens is not None and (isinstance(decode_tokens, bool) or not isinstance(decode_tokens, int)
                                          or decode_tokens < 1):
            raise ValueError(
                f"{type(self).__name__}: decode_tokens (room for this many decoded tokens, for static, "
                f"compileable decoding) must be an int >= 1 or None, got {decode_tokens!r}."
            )
        self.base_attention = _attention.install(model)
        if self.decode_tokens is not None and self.base_attention not in ("sdpa", "eager"):
            raise ValueError(
                f"{type(self).__name__}: decode_tokens= (static, compileable decoding) needs "
                f"attn_implementation 'sdpa' or 'eager', not {self.base_attention!r}."
            )
        plain = plain_layers(model)
        full = full_attention_layers(model, plain)
        if not full:
            raise ValueError(
                f"compresskv: {type(model).__name__} has no full-attention layer to compress "
                "(all its layers are sliding-window, shared or linear)."
            )
        self.full_layers = full
        dims = model_dims(model)
        kv_heads, head_dim = dims["kv_heads"], dims["head_dim"]
        token_dims = (head_dim, head_dim)  # (key, value) dims a DynamicCache holds per KV head and token
        if self.mla is not None:
            mla = self.mla
            kv_heads, token_dims = ((1, (mla["kv_lora_rank"], mla["rope_dim"])) if mla["latent"]
                                    else (dims["heads"], (mla["nope_dim"] + mla["rope_dim"], mla["v_dim"])))
        self.num_kv_heads, self.head_dim = kv_heads, head_dim
        expected = (dims["layers"], kv_heads, head_dim)
        layers: list[Any] = list(plain)
        for index, idx in enumerate(full):
            layer = self.make_layer(index, len(full))
            layer.expected = expected
            layer.token_dims = token_dims
            layer.layer_idx = idx
            if self.decode_tokens is not None:
                layer.decode_tokens = self.decode_tokens
            layers[idx] = layer
        super().__init__(layers=layers)

    def make_layer(self, index: int, n_full: int) -> KVLayer:
        """The layer for the ``index``-th of the model's ``n_full`` full-attention layers."""
        return KVLayer()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx >= len(self.layers):
            raise ValueError(
                f"compresskv: this cache has {len(self.layers)} layers but layer_idx={layer_idx} was "
                "updated; it was built for another model. Create one cache per model."
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> Any:
        # A compileable cache takes transformers' own masks (generate() prepares them outside the
        # compiled forward, as plain tensors); compresskv's attention reads padding from them.
        if not self.is_compileable:
            _attention.note_mask_for_compressed_cache()
        return super().get_mask_sizes(*args, **kwargs)

    @property
    def is_croppable(self) -> bool:
        """Compressed layers cannot roll back (also defined for transformers < 5.16)."""
        return all(getattr(layer, "is_croppable", False) for layer in self.layers)

    def crop(self, tokens_to_remove: int) -> None:
        for layer in self.layers:
            layer.crop(tokens_to_remove)

    # -- state shared by layers (cross-layer latents, positions) ------------------------------
    def shared(self) -> list[Storage]:
        """Objects holding per-row tensors shared by several layers (none in the base)."""
        return []

    def _map_shared(self, fn: Any) -> None:
        for owner in self.shared():
            owner.map_storage(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_shared(batch_fn("reorder", beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_shared(batch_fn("repeat", repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_shared(batch_fn("select", indices))

    def end_prompt(self) -> "CompressedCache":
        """Close the prompt: a multi-token forward from now on (a question asked after a compressed
        context, see :mod:`compresskv.reuse`) is appended as decoded tokens are, not compressed as a
        further piece of the prompt (or refused as chunked prefill). Returns the cache."""
        for layer in self.layers:
            if isinstance(layer, KVLayer) and layer.prefilled:
                layer.decoding = True
        return self

    # -- measurement -------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds, all layers and shared state included, and the
        fixed part (:meth:`held_nbytes`)."""
        shared = sum(owner.storage_nbytes() for owner in self.shared())
        return shared + self._per_layer(lambda layer: layer.nbytes()) + self.cache_held_nbytes()

    def held_nbytes(self) -> int:
        """The part of :meth:`nbytes` held once whatever the tokens (per-model projection columns
        and means, a RoPE table): an overhead per cache, not per token."""
        layers = sum(layer.held_nbytes() for layer in self.layers if isinstance(layer, KVLayer))
        return layers + self.cache_held_nbytes()

    def cache_held_nbytes(self) -> int:
        """Fixed bytes the cache itself holds (beyond its layers'); none in the base."""
        return 0

    def room_nbytes(self) -> int:
        """The part of :meth:`nbytes` that is decode-time room not yet holding tokens
        (see :meth:`KVLayer.append`)."""
        return sum(layer.room_nbytes() for layer in self.layers if isinstance(layer, KVLayer))

    def uncompressed_nbytes(self) -> int:
        """Bytes a ``DynamicCache`` would hold for the same tokens in the same dtype."""
        return self._per_layer(lambda layer: layer.uncompressed_nbytes())

    def _per_layer(self, of_kv_layer: Any) -> int:
        """``of_kv_layer(layer)`` summed over the compresskv layers, plus the keys and values of
        the layers left as transformers made them (uncompressed either way)."""
        return sum(
            of_kv_layer(layer) if isinstance(layer, KVLayer)
            else tensor_bytes(getattr(layer, "keys", None), getattr(layer, "values", None))
            for layer in self.layers
        )

    def stats(self) -> CacheStats:
        """Tokens seen, tokens stored per layer (``None`` for layers that hold none), bytes held
        and the ratio to an uncompressed cache of the same tokens. Subclasses add their own fields
        to :meth:`stats_fields`."""
        return CacheStats(**self.stats_fields())

    def stats_fields(self) -> dict[str, Any]:
        """The :class:`CacheStats` fields, for a subclass's stats dataclass to extend."""
        stored: list[int | None] = []
        for layer in self.layers:
            if isinstance(layer, KVLayer):
                stored.append(layer.stored() if layer.is_initialized else None)
            else:
                keys = getattr(layer, "keys", None)
                stored.append(int(keys.shape[-2]) if isinstance(keys, torch.Tensor) and keys.dim() == 4 else None)
        return {
            "method": self.method,
            "tokens_seen": self.get_seq_length(self.full_layers[0]),
            "tokens_stored": stored,
            "nbytes": self.nbytes(),
            "room_nbytes": self.room_nbytes(),
            "uncompressed_nbytes": self.uncompressed_nbytes(),
            "fixed_nbytes": self.held_nbytes(),
        }
