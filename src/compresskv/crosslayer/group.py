"""What the grouped caches share: groups of layers compressed together once the last of them has
prefilled, layers whose prompt lives in the group's compressed form (and whose later tokens are a
plain tail), the cache that builds them, and the optional accounting of what reading costs.

Reading is accounted only when the cache is built with ``profile=True``: each read of a compressed
prefix then records a :class:`ReadCost` (bytes rebuilt, transient bytes, multiply-adds, host time),
reported by ``stats().last_read``/``total_read``. Without it (the default), a decode step runs no
timer and no arithmetic beyond the attention itself, and those fields stay zero.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..core import attention as _attention
from ..core.attention import AttentionCall
from ..core.cache import CacheStats, CompressedCache, KVLayer
from ..core.facts import full_attention_layers, refuse_mla, text_config
from ..core.readmode import check_read_mode
from ..core.storage import Storage, tensor_bytes
from .factors import REMAINDERS, _is_int, plan_groups
from .positions import PrefillPositions


# -- read accounting -----------------------------------------------------------------------------
@dataclass
class ReadCost:
    """What reading one layer's compressed prefix cost in one forward (or summed over many).

    ``rebuilt_bytes``: bytes of K/V rows rebuilt from the compressed form; ``transient_bytes``: the
    largest set of prefix-sized temporaries alive at once (rebuilt block + its logits/probabilities
    over the prefix), measured from the tensors created; ``flops``: multiply-adds spent on the
    prefix; ``seconds``: wall time of the layer's attention (host time: on a GPU it does not wait
    for the kernels); ``reads``: forwards counted; ``compressed_bytes``: bytes of the compressed
    form the read streams (the group's latents and the layer's factors: divide by a kernel's
    measured time for its bandwidth); ``fused_reads``: reads done by the fused decode
    (:mod:`compresskv.kernels.xkv_decode`), which writes no rebuilt K/V to memory."""

    rebuilt_bytes: int = 0
    transient_bytes: int = 0
    flops: int = 0
    seconds: float = 0.0
    reads: int = 0
    compressed_bytes: int = 0
    fused_reads: int = 0

    def add(self, other: "ReadCost") -> None:
        self.rebuilt_bytes += other.rebuilt_bytes
        self.transient_bytes = max(self.transient_bytes, other.transient_bytes)
        self.flops += other.flops
        self.seconds += other.seconds
        self.reads += other.reads
        self.compressed_bytes += other.compressed_bytes
        self.fused_reads += other.fused_reads


@dataclass
class LowRankStats(CacheStats):
    """:class:`CacheStats` plus what a low-rank / merged cache holds and what reading it costs.

    ``ranks_k``/``ranks_v``: per model layer (``None`` where not factorised); ``groups``: model
    layer indices of each group; ``bytes_by_kind``: ``nbytes`` split into shared latents (or merged
    directions), per-layer factors (or magnitudes and retained tokens), uncompressed tokens
    (decoded ones, and layers left uncompressed), validity masks, preallocated decode room not yet
    filled, positions and RoPE state;
    ``compress_seconds``: time spent compressing (SVD, merging) after prefill; ``last_read``: the
    last forward's :class:`ReadCost` summed over layers (``transient_bytes`` is the largest single
    layer's, since layers run one after another); ``total_read``: the same over all forwards. Reads
    are accounted only by a cache built with ``profile=True``; otherwise both are all zeros."""

    keys: str | None = None
    groups: list[list[int]] = field(default_factory=list)
    ranks_k: list[int | None] = field(default_factory=list)
    ranks_v: list[int | None] = field(default_factory=list)
    bytes_by_kind: dict[str, int] = field(default_factory=dict)
    compress_seconds: float = 0.0
    last_read: dict[str, Any] = field(default_factory=dict)
    total_read: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# -- groups and layers ---------------------------------------------------------------------------
class _Group(Storage):
    """Layers compressed together; compresses when the last of them has run its prefill attention.
    Its shared per-row tensors are named in ``storage``."""

    def __init__(self, cache: "_GroupedCache", layer_ids: list[int]) -> None:
        self.cache = cache
        self.layer_ids = list(layer_ids)
        self.layers: list[_PrefixLayer] = []
        self.done = 0
        self.compressed = False
        self.seconds = 0.0
        self._copies: dict[tuple[int, torch.device], torch.Tensor] = {}

    def on(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A shared tensor on a reading layer's device. A group whose layers sit on two devices (an
        accelerate ``device_map`` split) keeps one copy per extra device, made once and counted in
        :meth:`nbytes`."""
        if tensor.device == device:
            return tensor
        key = (id(tensor), device)
        if key not in self._copies:
            self._copies[key] = tensor.to(device)
        return self._copies[key]

    def layer_prefilled(self, call: AttentionCall) -> None:
        self.done += 1
        if self.done == len(self.layers) and not self.compressed:
            start = time.perf_counter()
            with torch.no_grad():
                self._copies.clear()
                self.compress(call)
            for layer in self.layers:
                layer.drop_prefix_tokens()
            self.compressed = True
            self.seconds = time.perf_counter() - start

    def compress(self, call: AttentionCall) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def storage_nbytes(self) -> int:
        return tensor_bytes(*self.tensors(), *self._copies.values())

    def map_storage(self, fn: Any) -> None:
        self._copies.clear()
        super().map_storage(fn)

    def reset(self) -> None:
        self._copies.clear()
        self.clear_storage()
        self.done = 0
        self.compressed = False
        self.seconds = 0.0


class _PrefixLayer(KVLayer):
    """A full-attention layer whose prefill tokens live in a compressed, group-shared form and whose
    later tokens are stored plainly in ``keys``/``values`` (the "tail")."""

    def __init__(self, cache: "_GroupedCache", group: _Group) -> None:
        super().__init__()
        self.cache, self.group = cache, group
        self.prefix_len = 0
        self.last_read = ReadCost()
        self.total_read = ReadCost()

    # -- storage ---------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens to the tail. Once compressed, this returns the tail and the new
        tokens only; :meth:`attend` reads the compressed prefix itself (compresskv's attention
        function always routes this layer's attention there). A further piece of a chunked prompt
        is refused (see :meth:`_GroupedCache.check_not_chunked`)."""
        self.cache.check_not_chunked(key_states.shape[-2], [self])
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.stored_before += self.prefix_len
        return keys, values

    def stored(self) -> int:
        return self.prefix_len + super().stored()

    def compress(self, call: AttentionCall) -> None:
        if not self.cache.compresses:
            return  # compression_ratio=0: the prompt stays as it is, uncompressed
        self.cache._prefilled(self, call)
        self.group.layer_prefilled(call)

    @property
    def prompt_open(self) -> bool:
        """Prefill ran, no single-token step yet: a multi-token forward now continues the prompt."""
        return self.prefilled and not self.decoding

    def drop_prefix_tokens(self) -> None:
        """Forget the full prefill K/V once the group holds them compressed."""
        b, h, t, d = self.keys.shape
        self.prefix_len = t
        self.keys = self.keys.new_empty(b, h, 0, d)
        self.values = self.values.new_empty(b, h, 0, self.values.shape[-1])

    def own_tensors(self) -> list[torch.Tensor]:
        """This layer's part of the compressed prefix (``storage`` beyond the plain tail)."""
        return [t for name in self.storage[2:] if (t := getattr(self, name, None)) is not None]

    def reset(self) -> None:
        super().reset()
        self.prefix_len = 0
        self.group.reset()
        self.last_read, self.total_read = ReadCost(), ReadCost()

    # -- reading ---------------------------------------------------------------------------
    # The read methods take ``cost``: a :class:`ReadCost` to add to when the cache profiles, else
    # ``None`` (and then count nothing).
    def attend(self, call: AttentionCall, fn: Any) -> tuple[torch.Tensor, Any]:
        if not self.prefix_len:
            return super().attend(call, fn)
        if not self.cache.profile:
            return self._read(call, fn, None)
        start = time.perf_counter()
        cost = ReadCost(reads=1, compressed_bytes=self.compressed_nbytes())
        out = self._read(call, fn, cost)
        cost.seconds = time.perf_counter() - start
        self.last_read = cost
        self.total_read.add(cost)
        return out

    def _read(self, call: AttentionCall, fn: Any, cost: ReadCost | None) -> tuple[torch.Tensor, Any]:
        """This forward's attention over the compressed prefix and the tail."""
        if self.cache.read_mode != "model" and self._direct_ok(call):
            out = self._fused_attention(call, cost)
            if out is None:
                return self._direct_attention(call, call.mask, cost)
            if cost is not None:
                cost.fused_reads = 1
            return out
        keys, values = self.rebuild_prefix(cost)
        keys = torch.cat([keys, call.key], dim=-2)
        values = torch.cat([values, call.value], dim=-2)
        if cost is not None:
            cost.transient_bytes = max(cost.transient_bytes, tensor_bytes(keys, values))
        return fn(call.module, call.query, keys, values, call.mask, **call.kwargs)

    def _direct_ok(self, call: AttentionCall) -> bool:
        """Whether this layer may compute attention itself (plain softmax attention, the eager/sdpa
        semantics); otherwise the prefix is rebuilt and the model's own attention function runs."""
        module = call.module
        if call.base not in ("eager", "sdpa") or getattr(module, "sinks", None) is not None:
            return False
        if getattr(getattr(module, "config", None), "attn_logit_softcapping", None):
            return False
        if module.training and float(call.kwargs.get("dropout", 0.0) or 0.0) > 0.0:
            return False
        return call.kwargs.get("sliding_window") is None

    def compressed_nbytes(self) -> int:
        """Bytes of the compressed prefix one read of this layer streams (group-shared and own tensors)."""
        return tensor_bytes(*self.group.tensors(), *self.own_tensors())

    def _fused_attention(self, call: AttentionCall, cost: ReadCost | None) -> tuple[torch.Tensor, Any] | None:
        """Attention by a fused decode read of the prefix, or ``None`` when this layer has none or it
        does not apply to ``call`` (layers with a fused read override this)."""
        return None

    def _direct_attention(self, call: AttentionCall, mask: Any, cost: ReadCost | None) -> tuple[torch.Tensor, Any]:
        query = call.query
        bsz, n_q, q_len, dim = query.shape
        n_kv = call.key.shape[1]
        groups = n_q // n_kv
        qg = query.reshape(bsz, n_kv, groups * q_len, dim)
        prefix = self.prefix_logits(qg, cost)
        tail = qg @ call.key.transpose(-1, -2)
        logits = torch.cat([prefix, tail], dim=-1).mul_(call.scaling)
        if mask is not None:
            m = mask.expand(bsz, n_q, q_len, logits.shape[-1]).reshape(bsz, n_kv, groups * q_len, -1)
            if m.dtype == torch.bool:
                logits = logits.masked_fill(~m, torch.finfo(logits.dtype).min)
            else:
                logits = logits + m
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        if cost is not None:
            cost.transient_bytes = max(cost.transient_bytes, tensor_bytes(prefix, logits, probs))
        out = self.prefix_output(probs[..., : self.prefix_len], cost) + probs[..., self.prefix_len :] @ call.value
        out = out.reshape(bsz, n_q, q_len, -1).transpose(1, 2).contiguous()
        weights = probs.reshape(bsz, n_q, q_len, -1) if call.base == "eager" else None
        return out, weights

    def prefix_logits(self, qg: torch.Tensor, cost: ReadCost | None = None) -> torch.Tensor:  # pragma: no cover
        """``qg · K_prefixᵀ``, ``[batch, kv_heads, groups·q_len, prefix]`` (unscaled)."""
        raise NotImplementedError

    def prefix_output(self, probs: torch.Tensor, cost: ReadCost | None = None) -> torch.Tensor:  # pragma: no cover
        """``probs · V_prefix``, ``[batch, kv_heads, groups·q_len, head_dim]``."""
        raise NotImplementedError

    def rebuild_prefix(self, cost: ReadCost | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """The prefix K (rotated) and V as the model would have them, ``[batch, kv_heads, prefix, d]``."""
        raise NotImplementedError


class _GroupedCache(CompressedCache):
    """Shared machinery of the grouped caches: which layers are compressed, in which groups, the
    groups' shared tensors under batch operations, and the stats."""

    method = "grouped"
    #: how compressed prefixes are read: ``"auto"`` (cheapest of latent/rebuilt form; for xKV on
    #: CUDA with triton installed, the fused kernel), ``"latent"``, ``"rebuild"`` (rebuild K/V block
    #: by block, attention computed here), ``"model"`` (rebuild the whole prefix and call the model's
    #: own attention function) or ``"fused"`` (xKV only: :mod:`compresskv.kernels.xkv_decode`, the
    #: Triton kernel on CUDA, its PyTorch reference elsewhere; sdpa attention only, other calls
    #: fall back to ``"auto"``'s way). All give the same result.
    read_mode: str = "auto"
    #: prefix tokens rebuilt at once when keys/values must be rebuilt (bounds the transient memory).
    read_chunk: int = 1024
    #: whether every read of a compressed prefix is accounted (:class:`ReadCost`, reported by
    #: ``stats().last_read``/``total_read``); set by the ``profile=`` constructor argument, and may
    #: be switched between forwards (e.g. on for warm-up steps only, off for timed ones).
    profile: bool = False

    def _check_reading(self, model: torch.nn.Module, read_mode: Any, allowed: Any, profile: Any) -> str:
        """The checks every grouped cache starts with (MLA refused before any option is judged
        against the wrong shapes; ``read_mode``, ``profile``); sets them and returns the owner's name."""
        owner = type(self).__name__
        if not self.supports_mla:
            refuse_mla(model, owner)
        self.read_mode = check_read_mode(owner, read_mode, allowed)
        if not isinstance(profile, bool):
            raise ValueError(f"{owner}: profile must be True or False, got {profile!r}.")
        self.profile = profile
        return owner

    def _setup_groups(
        self, model: torch.nn.Module, start_layer: Any, end_layer: Any, group_size: int, remainder: str
    ) -> None:
        owner = type(self).__name__
        if remainder not in REMAINDERS:
            raise ValueError(f"{owner}: remainder must be one of {list(REMAINDERS)}, got {remainder!r}.")
        n_layers = text_config(model).num_hidden_layers
        for name, value in (("start_layer", start_layer), ("end_layer", end_layer)):
            if not _is_int(value) or not -n_layers <= value < n_layers:
                raise ValueError(
                    f"{owner}: {name} must be a layer index in [0, {n_layers}) (negative counts from the end), "
                    f"got {value!r}."
                )
        start = start_layer % n_layers
        end = end_layer % n_layers
        if start > end:
            raise ValueError(f"{owner}: start_layer={start_layer} comes after end_layer={end_layer}.")
        chosen = [i for i in full_attention_layers(model) if start <= i <= end]
        if not chosen:
            raise ValueError(f"{owner}: no full-attention layer between start_layer={start} and end_layer={end}.")
        self.layer_range = (start, end)
        self.group_plan = plan_groups(chosen, group_size, remainder, owner)
        self.groups: list[_Group] = [self._new_group(ids) for ids in self.group_plan]
        self._group_of = {idx: group for group in self.groups for idx in group.layer_ids}
        self.positions = PrefillPositions()

    def _new_group(self, layer_ids: list[int]) -> _Group:  # pragma: no cover - abstract
        raise NotImplementedError

    def _new_layer(self, group: _Group) -> KVLayer:  # pragma: no cover - abstract
        raise NotImplementedError

    def make_layer(self, index: int, n_full: int) -> KVLayer:
        group = self._group_of.get(self.full_layers[index])
        if group is None:
            return KVLayer()
        layer = self._new_layer(group)
        if isinstance(layer, _PrefixLayer):
            group.layers.append(layer)
        return layer

    def _prefilled(self, layer: _PrefixLayer, call: AttentionCall) -> None:
        """Called by every compressed layer after its prefill attention, before its group compresses."""

    @property
    def compresses(self) -> bool:
        """Whether the prompt is compressed at all (``False`` for xKV/SVD at ``compression_ratio=0``)."""
        return True

    # -- chunked prefill ---------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Checked at every layer's update against the compressed layers this forward has not reached
        # yet (their state is the forward's starting state), so a refused forward stops at its
        # first layer, before any layer (compressed or not) stored a token of it.
        if key_states.shape[-2] > 1 and self.compresses:
            ahead = [x for x in self.layers[layer_idx:] if isinstance(x, _PrefixLayer)]
            if ahead:
                self.check_not_chunked(key_states.shape[-2], ahead)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def check_not_chunked(self, q_len: int, layers: "list[_PrefixLayer]") -> None:
        """Refuse a multi-token forward while the prompt is still open (after prefill, before any
        single-token step): the prompt was compressed once, after its first forward, so a further
        piece (``generate(prefill_chunk_size=...)``) would silently stay uncompressed. A
        multi-token forward after a decode step is a new turn, appended uncompressed as decoded
        tokens are."""
        if q_len <= 1 or not self.compresses or not any(x.prompt_open for x in layers):
            return
        _attention.clear_pending()
        name = type(self).__name__
        seen = max(x.seen for x in layers)
        raise ValueError(
            f"{name}: chunked prefill (generate(prefill_chunk_size=...), or a further multi-token forward of "
            f"{q_len} tokens after the prompt's first {seen} and before any single-token decode step) is not "
            f"supported: {name} compresses the whole prompt once, right after its prefill forward, and stores "
            "later tokens uncompressed, so the later chunks would silently stay uncompressed. Feed the prompt in "
            "one forward (leave prefill_chunk_size unset), or use an eviction method (PyramidKVCache, SnapKVCache, "
            "StreamingLLMCache), which supports chunked prefill. A multi-token forward after a decode step (a new "
            "turn) is fine."
        )

    # -- measurement -----------------------------------------------------------------------
    def shared(self) -> list[Storage]:
        return [*self.groups, self.positions]

    def _bytes_by_kind(self) -> dict[str, int]:
        shared = sum(g.storage_nbytes() for g in self.groups)
        own = tails = valid = 0
        for layer in self.layers:
            if isinstance(layer, _PrefixLayer):
                own += tensor_bytes(*layer.own_tensors())
            if isinstance(layer, KVLayer):
                tails += tensor_bytes(layer.keys, layer.values)
                valid += tensor_bytes(layer.valid)
            else:
                tails += tensor_bytes(getattr(layer, "keys", None), getattr(layer, "values", None))
        return {"shared": shared, "per_layer": own, "uncompressed_tokens": tails, "validity": valid,
                "decode_room": self.room_nbytes()}

    def stats(self) -> LowRankStats:
        ranks_k: list[int | None] = []
        ranks_v: list[int | None] = []
        last, total = ReadCost(), ReadCost()
        for idx, layer in enumerate(self.layers):
            group = self._group_of.get(idx)
            ranks_k.append(getattr(group, "rank_k", None) if group is not None and group.compressed else None)
            ranks_v.append(getattr(group, "rank_v", None) if group is not None and group.compressed else None)
            if isinstance(layer, _PrefixLayer):
                last.add(layer.last_read)
                total.add(layer.total_read)
        return LowRankStats(
            **self.stats_fields(),
            keys=getattr(self, "keys_mode", None),
            groups=[list(g.layer_ids) for g in self.groups],
            ranks_k=ranks_k,
            ranks_v=ranks_v,
            bytes_by_kind=self._bytes_by_kind(),
            compress_seconds=sum(g.seconds for g in self.groups),
            last_read=asdict(last),
            total_read=asdict(total),
            extra=self._extra_stats(),
        )

    def _extra_stats(self) -> dict[str, Any]:
        return {}

    def reset(self) -> None:
        super().reset()
        for group in self.groups:
            group.reset()
        self.positions.reset()


