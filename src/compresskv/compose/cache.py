"""Composed caches: which tokens × which channels × how many bits, one after the other.

A composition is named by its stages joined with ``+``, in this order: a token stage (an eviction
method: ``snapkv``, ``pyramidkv``, ``streamingllm``, ``knorm``, ``expected_attention``), a channel
stage (``pca`` or ``matryoshka``: per-KV-head orthogonal projections to ``rank`` columns), a bits
stage (``int2``, ``int4`` or ``int8``: KIVI's group-wise quantization, :mod:`.quant`). ``snapkv+int4``,
``pyramidkv+pca+int8``; ``int2``, ``int4`` and ``int8`` alone are the quantization stage by itself.

A layer evicts right after prefill attention (which ran on the full keys and values, as for every
compresskv cache), then stores what it kept *encoded*: projected to ``rank`` channels and/or
quantized. The last tokens stay at full precision in a *residual* (KIVI's: ``residual`` tokens
and up to ``group_size - 1`` more, since keys are quantized ``group_size`` tokens at a time); while
decoding, each new token joins the residual, and whenever it holds ``group_size`` tokens beyond
``residual`` the oldest ``group_size`` are encoded. Each forward reads the encoded tokens back
(dequantized, un-projected) and attends with the model's own backend. The stages multiply: the
bytes are ``tokens kept × bytes of an encoded token`` plus the residual at full precision.

``compression_ratio`` is the fraction of the cache's *bytes* removed, split between the stages:
the channel stage keeps ``rank / head_dim`` (``rank`` defaults to half the head), the bits stage
what its codes and scales take, and the token stage evicts what is left to reach the target on
each prompt (its exact length is known only then). ``token_ratio`` (fraction of tokens evicted)
or ``budget`` (tokens kept) sets the token stage directly instead.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.attention import AttentionCall
from ..core.cache import KVLayer
from ..eviction import EvictionCache, EvictionLayer
from ..projected.cache import LayerFactors, ProjectedLayer
from .quant import BITS, QuantSpec, dequantize, quantize

#: the stages of a composition, in the order they are named
TOKEN_STAGES = ("snapkv", "pyramidkv", "streamingllm", "knorm", "expected_attention")
CHANNEL_STAGES = ("pca", "matryoshka")
BIT_STAGES = {"int2": 2, "int4": 4, "int8": 8}


class ComposedLayer(EvictionLayer):
    """An eviction layer that stores the tokens it keeps encoded (projected and/or quantized),
    the newest ``residual`` (+ < ``group_size``) at full precision in ``keys``/``values``."""

    storage = EvictionLayer.storage + ("k_enc", "v_enc")

    def __init__(self, cache: "Composition", index: int, n_full: int) -> None:
        super().__init__(cache, index, n_full)
        self.k_enc: list[torch.Tensor] = []  # [codes, scale, zero] when quantized, else [latent]
        self.v_enc: list[torch.Tensor] = []
        self.n_enc = 0  # tokens held encoded (in front of the residual)
        self.factors: LayerFactors | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        cache = self.cache
        if cache.projections is not None:
            ranks = [cache.rank] * key_states.shape[1]
            self.factors = LayerFactors(cache.projections, self.layer_idx, ranks, ranks, self.dtype, self.device)

    # -- encoding --------------------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, kind: str, valid: torch.Tensor | None) -> list[torch.Tensor]:
        f = self.factors
        if f is not None:
            mu, groups = (f.mu_k4, f.k_groups) if kind == "k" else (f.mu_v4, f.v_groups)
            x = ProjectedLayer._project(x - mu, groups)[0]
        spec = self.cache.specs[kind]
        return list(quantize(x, spec, valid)) if spec is not None else [x]

    def _decode(self, enc: list[torch.Tensor], kind: str) -> torch.Tensor:
        f, spec = self.factors, self.cache.specs[kind]
        channels = self.cache.rank if f is not None else self.keys.shape[-1]
        x = dequantize(*enc, spec, channels, self.dtype) if spec is not None else enc[0]
        if f is not None:
            if kind == "k":
                x = ProjectedLayer._reconstruct([x], f.mu_k, f.k_groups, f.k_inverse)
            else:
                x = ProjectedLayer._reconstruct([x], f.mu_v, f.v_groups, f.v_inverse)
        return x

    def flush(self) -> None:
        """Encode the oldest residual tokens, ``group_size`` at a time, while more than
        ``residual`` would stay."""
        cache = self.cache
        n = self.keys.shape[-2]
        m = (n - cache.residual) // cache.group_size * cache.group_size
        if m <= 0:
            return
        valid = None if self.valid is None else self.valid[..., self.n_enc : self.n_enc + m]
        new_k = self._encode(self.keys[..., :m, :], "k", valid)
        new_v = self._encode(self.values[..., :m, :], "v", valid)
        if self.n_enc:
            new_k = [torch.cat([old, new], dim=-2) for old, new in zip(self.k_enc, new_k)]
            new_v = [torch.cat([old, new], dim=-2) for old, new in zip(self.v_enc, new_v)]
        self.k_enc, self.v_enc = new_k, new_v
        # The residual gets tensors of its own: a view would keep the whole old room alive, unaccounted.
        self.keys, self.values = self.keys[..., m:, :].clone(), self.values[..., m:, :].clone()
        self._rooms.pop("keys", None)
        self._rooms.pop("values", None)
        self.n_enc += m

    # -- the layer's life --------------------------------------------------------------------------
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().append(key_states, value_states)
        self.stored_before += self.n_enc  # the encoded tokens come first

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens to the residual; return every stored token, the encoded ones read
        back, followed by the residual and the new ones."""
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if not self.n_enc:
            return keys, values
        return (torch.cat([self._decode(self.k_enc, "k"), keys], dim=-2),
                torch.cat([self._decode(self.v_enc, "v"), values], dim=-2))

    def compress(self, call: AttentionCall) -> None:
        super().compress(call)  # eviction: what the token stage keeps
        self.flush()

    def compress_chunk(self, call: AttentionCall) -> None:
        raise ValueError(
            f"compresskv: {self.cache.method} encodes the prompt after its first forward; a second "
            "multi-token forward before any decode step (chunked prefill, generate(prefill_chunk_size=...)) "
            "is not supported. Send the prompt in one forward, or close it first (compresskv.prefill)."
        )

    def after_attention(self, call: AttentionCall) -> None:
        was_prefilled = self.prefilled
        super().after_attention(call)
        if was_prefilled:
            self.flush()

    def stored(self) -> int:
        return self.n_enc + super().stored()

    def held_nbytes(self) -> int:
        """The projection columns and means the channel stage reads with."""
        return self.factors.nbytes() if self.factors is not None else 0

    def reset(self) -> None:
        super().reset()
        self.n_enc = 0
        self.factors = None


class Composition(EvictionCache):
    """The stages after the token stage; mixed in before an eviction cache class by :func:`composed`
    (the token stage is that class, or none for ``int2``/``int4``/``int8`` alone)."""

    channel_stage: str | None = None
    bits: int | None = None
    #: what the composed cache sets itself (bounded and static decoding do not apply)
    fixed_options = ("decode_tokens", "decode_budget", "decode_interval")

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        compression_ratio: float | None = None,
        token_ratio: float | None = None,
        budget: int | None = None,
        projections: Any = None,
        rank: int | None = None,
        group_size: int | None = None,
        residual: int | None = None,
        **kwargs: Any,
    ) -> None:
        """A composed cache (see :mod:`compresskv.compose.cache`).

        Args:
            model: the transformers model (its attention is switched to compresskv's).
            compression_ratio: fraction of the cache's bytes removed, in [0, 1), split between the
                stages: the token stage evicts what the channel and bits stages leave, per prompt.
            token_ratio: instead, the fraction of prompt tokens the token stage evicts.
            budget: instead, the tokens each layer keeps (window included).
            projections: the channel stage's :class:`compresskv.Projections` (``compresskv.calibrate``
                for ``pca``, ``compresskv.train_projections`` for ``matryoshka``).
            rank: the channel stage's columns per KV head, in [1, head_dim] (default head_dim // 2).
            group_size: the bits stage's tokens per key scale and channels per value scale (32).
            residual: the bits stage's newest tokens kept at full precision (128).
            **kwargs: the token method's own options (``window_size``, ``kernel_size``, ``sink``, ...).

        Raises:
            ValueError: a missing or contradictory budget, an option out of range (named), an option
                of a stage the composition does not have, or ``decode_budget``/``decode_tokens``.
        """
        who = f"{type(self).__name__} ({self.method})"
        for name in Composition.fixed_options:
            if kwargs.get(name) is not None:
                raise ValueError(f"{who}: {name}= is not supported by composed caches (bounded and static decoding "
                                 "apply to the eviction caches alone).")
        if sum(x is not None for x in (compression_ratio, token_ratio, budget)) != 1:
            raise ValueError(
                f"{who}: give exactly one of compression_ratio= (fraction of the cache's bytes removed, split "
                "between the stages), token_ratio= (fraction of tokens evicted) or budget= (tokens kept per layer); "
                f"got compression_ratio={compression_ratio!r}, token_ratio={token_ratio!r}, budget={budget!r}."
            )
        if compression_ratio is not None and not (
                isinstance(compression_ratio, (int, float)) and 0.0 <= compression_ratio < 1.0):
            raise ValueError(f"{who}: compression_ratio is the fraction of bytes removed and must be in [0, 1), "
                             f"got {compression_ratio!r}.")
        self._check_encoding(who, model, projections, rank, group_size, residual)
        self.byte_ratio = compression_ratio
        # With a byte target the token stage's ratio is set per prompt (plan); 0 until then.
        token_kwargs = {"budget": budget} if budget is not None else {"compression_ratio": token_ratio or 0.0}
        super().__init__(model, **token_kwargs, **kwargs)

    def _check_encoding(self, who: str, model: torch.nn.Module, projections: Any, rank: int | None,
                        group_size: int | None, residual: int | None) -> None:
        from ..core.facts import model_dims

        head_dim = model_dims(model)["head_dim"]
        if self.channel_stage is not None:
            from ..projected import Projections

            if not isinstance(projections, Projections):
                raise ValueError(f"{who}: the {self.channel_stage} stage needs projections= (compresskv.calibrate(...) "
                                 f"for pca, compresskv.train_projections(...) for matryoshka), got {type(projections).__name__}.")
            rank = head_dim // 2 if rank is None else rank
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= head_dim:
                raise ValueError(f"{who}: rank (columns kept per KV head) must be an int in [1, {head_dim}], got {rank!r}.")
        elif projections is not None or rank is not None:
            raise ValueError(f"{who}: projections= and rank= belong to a channel stage (+pca or +matryoshka), "
                             "which this composition does not have.")
        if self.bits is None:  # nothing is grouped: every token is encoded as soon as its attention ran
            if group_size is not None or residual is not None:
                raise ValueError(f"{who}: residual= and group_size= belong to a bits stage (+int2, +int4 or +int8), which this "
                                 "composition does not have.")
            group_size, residual = 1, 0
        group_size = 32 if group_size is None else group_size  # KIVI's
        residual = 128 if residual is None else residual  # KIVI's, and transformers' QuantizedCache's
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"{who}: group_size (tokens per key scale, channels per value scale) must be an int >= 1, "
                             f"got {group_size!r}.")
        if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
            raise ValueError(f"{who}: residual (newest tokens kept at full precision) must be an int >= 0, got {residual!r}.")
        self.projections, self.rank = projections, rank
        self.head_dim = head_dim
        self.group_size, self.residual = group_size, residual
        self.specs = {"k": None, "v": None} if self.bits is None else {
            "k": QuantSpec(self.bits, group_size, per_channel=True), "v": QuantSpec(self.bits, group_size, per_channel=False)}

    def make_layer(self, index: int, n_full: int) -> KVLayer:
        return ComposedLayer(self, index, n_full)

    def token_bytes(self, dtype: torch.dtype) -> tuple[float, float]:
        """(bytes of one encoded token, of one full-precision token) per KV head, keys and values."""
        channels = self.rank if self.channel_stage is not None else self.head_dim
        full = 2 * self.head_dim * dtype.itemsize
        if self.bits is None:
            return 2 * channels * dtype.itemsize, full
        return self.specs["k"].token_bytes(channels, dtype) + self.specs["v"].token_bytes(channels, dtype), full

    def plan(self, seq_len: int, index: int, n_full: int) -> tuple[int, int] | None:
        if self.byte_ratio is not None:
            self.compression_ratio = self.token_ratio_for(seq_len)
        return super().plan(seq_len, index, n_full)

    def token_ratio_for(self, seq_len: int, dtype: torch.dtype | None = None) -> float:
        """The fraction of ``seq_len`` prompt tokens the token stage evicts so that the bytes kept are
        ``1 - compression_ratio`` of an uncompressed cache's (0 when the other stages already reach it)."""
        encoded, full = self.token_bytes(dtype or self._dtype)
        target = (1.0 - self.byte_ratio) * seq_len * full
        residual = min(self.residual, seq_len)
        if target <= residual * full:
            kept = target / full
        else:  # whole groups encoded, so that the residual left is exactly `residual` tokens
            kept = residual + (target - residual * full) / encoded // self.group_size * self.group_size
        return min(max(1.0 - kept / seq_len, 0.0), 1.0 - 1.0 / seq_len)

    @property
    def _dtype(self) -> torch.dtype:
        return next((layer.dtype for layer in self.layers if isinstance(layer, KVLayer) and layer.is_initialized),
                    torch.float32)


class _KeepAll(EvictionCache):
    """No token stage: every token is kept (``int2``/``int4``/``int8`` alone)."""

    method = "keep_all"


class QuantizedKVCache(Composition, _KeepAll):
    """KIVI quantization alone (arXiv 2402.02750): every token's key and value stored in ``bits``
    bits (keys per channel over groups of ``group_size`` tokens, values per token over groups of
    ``group_size`` channels), the newest ``residual`` (+ < ``group_size``) at full precision.

    Args:
        model: the transformers model.
        group_size: tokens sharing a key scale and zero point, channels sharing a value's (32, as KIVI).
        residual: newest tokens kept at full precision (128, as KIVI and transformers' ``QuantizedCache``).
    """

    fixed_options = Composition.fixed_options + ("compression_ratio", "token_ratio", "budget", "projections",
                                                 "rank", "window_size")

    def __init__(self, model: torch.nn.Module, *, group_size: int = 32, residual: int = 128) -> None:
        super().__init__(model, token_ratio=0.0, group_size=group_size, residual=residual, window_size=0)


_CLASSES: dict[str, type] = {}


def parse(name: str) -> tuple[str | None, str | None, str | None]:
    """``(tokens, channels, bits)`` stages of a composed method name (``None`` where absent); a
    ``ValueError`` naming the stages allowed otherwise."""
    parts = name.split("+") if isinstance(name, str) else []
    stages: list[str | None] = [None, None, None]
    order = (TOKEN_STAGES, CHANNEL_STAGES, tuple(BIT_STAGES))
    at = 0
    for part in parts:
        while at < 3 and part not in order[at]:
            at += 1
        if at == 3:
            break
        stages[at] = part
        at += 1
    else:
        if len(parts) >= 2 or (len(parts) == 1 and stages[2] is not None):
            return stages[0], stages[1], stages[2]
    raise ValueError(
        f"compresskv: {name!r} is not a composition: join stages with '+' in this order, at most one each: "
        f"tokens {list(TOKEN_STAGES)}, channels {list(CHANNEL_STAGES)}, bits {list(BIT_STAGES)} "
        "(e.g. 'snapkv+int4', 'pyramidkv+pca+int8'); a channel stage needs a token or bits stage with it."
    )


def composed(name: str) -> type:
    """The cache class of the composed method ``name`` (see the module notes), built once per name."""
    if name in _CLASSES:
        return _CLASSES[name]
    tokens, channels, bits = parse(name)
    if tokens is None and channels is not None:
        raise ValueError(f"compresskv: {name!r}: a channel stage alone is the method {channels!r} itself.")
    if tokens is None:
        bases: tuple[type, ...] = (QuantizedKVCache,)
    else:
        from ..patching import _registry

        bases = (Composition, _registry()[tokens])
    cls = type("Composed_" + name.replace("+", "_"), bases, {
        "method": name, "channel_stage": channels, "bits": None if bits is None else BIT_STAGES[bits],
        "__doc__": f"The composed cache {name!r}: stages {' → '.join(p for p in (tokens, channels, bits) if p)}.",
    })
    _CLASSES[name] = cls
    return cls


__all__ = ["BITS", "ComposedLayer", "Composition", "QuantizedKVCache", "composed", "parse"]
