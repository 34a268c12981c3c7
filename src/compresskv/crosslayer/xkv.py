"""Cross-layer low-rank KV caches: xKV (arXiv 2503.18893), single-layer SVD, and MiniCache
(arXiv 2405.14366), storing the compressed form for real.

All three compress once, right after prefill attention (which ran on the full keys and values), and
append the tokens decoded afterwards uncompressed.

**xKV.** The compressed full-attention layers are split into groups of ``group_size`` adjacent
layers. When the *last* layer of a group has run its prefill attention, the group's keys are
concatenated along features (``[T, G·H_kv·d]`` per batch row, keys un-rotated to pre-RoPE by
default) and factorised by a truncated fp32 SVD of rank ``r_k``; values likewise with ``r_v``. The
group keeps the shared token latent ``U·√S`` (``[batch, T, r]``) and each layer its own factor
``√S·Vᵀ`` (``[batch, r, H_kv·d]``); the layers' full K/V are dropped. Until then the earlier layers
of the group keep their full K/V (they are needed for the SVD). ``group_size=1`` is the
single-layer SVD baseline (:class:`SVDCache`).

Reading: values are never rebuilt: ``softmax · V = (softmax · latent) · factor``. Post-RoPE keys are
not rebuilt either: ``q · Kᵀ = (q · factorᵀ) · latentᵀ``. Pre-RoPE keys must be rotated at their own
positions, which does not commute with the factorisation, so each layer rebuilds its keys once per
forward, in blocks of :attr:`XKVCache.read_chunk` tokens (transient), re-rotates them with the
model's rotary embedding, and takes the logits block by block. Whichever of the latent and the
rebuilt form costs fewer multiply-adds is used (``read_mode="auto"``); the costs of every read are
kept and reported by :meth:`stats`.

**MiniCache.** Adjacent layers ``(l, l+1)`` from the middle of the model on are merged per token
and KV head: both vectors are split into magnitude and direction, the directions are SLERP'd
(``t = 0.6``) into one shared unit direction, each layer keeps its own magnitudes, and the most
divergent token pairs (angular distance in the top ``gamma`` of the observed range) keep both
original vectors. Attention is computed from the shared direction without rebuilding anything.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from ..core import attention as _attention
from ..core.attention import AttentionCall
from ..core.facts import full_attention_layers, model_dims, text_config
from ..core.rope import rotate_half
from ..kernels.xkv_decode import PrefixRope, merge_with_tail, triton_available, xkv_decode
from ..core.storage import Storage
from ..core.cache import CacheStats, CompressedCache, KVLayer, refuse_mla, tensor_bytes

KeysMode = Literal["pre_rope", "post_rope"]
KEYS_MODES = ("pre_rope", "post_rope")
REMAINDERS = ("error", "last_group")
SVD_SOLVERS = ("svd", "gram")
READ_MODES = ("auto", "latent", "rebuild", "model", "fused")
#: query rows per KV head (GQA group × new tokens) up to which ``read_mode="auto"`` uses the fused
#: kernel on CUDA; above it (a long chunk of new tokens) the kernel would re-read the prefix per 64 rows.
FUSED_AUTO_MAX_ROWS = 64


# -- small helpers -------------------------------------------------------------------------------
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def truncated_factors(x: torch.Tensor, rank: int, solver: str = "svd") -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factorisation of ``x`` (``[batch, T, F]``, fp32) per batch row.

    Returns ``(latent, factor)``, ``[batch, T, rank]`` and ``[batch, rank, F]``, with
    ``latent @ factor`` the truncated SVD ``U_r S_r V_rᵀ`` and the singular values split evenly
    (``latent = U_r √S_r``, ``factor = √S_r V_rᵀ``). ``solver="svd"`` runs ``torch.linalg.svd`` in
    fp32; ``"gram"`` takes the top eigenvectors of ``xᵀx`` in fp64, much faster when ``T ≫ F``
    and equal up to rounding.
    """
    if solver == "svd":
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        u, s, vh = u[..., :rank], s[..., :rank], vh[..., :rank, :]
    elif solver == "gram":
        xd = x.double()
        evals, evecs = torch.linalg.eigh(xd.mT @ xd)
        v = evecs[..., -rank:].flip(-1)
        s = evals[..., -rank:].flip(-1).clamp_min(0).sqrt()
        us = xd @ v
        u = torch.where(s[..., None, :] > 0, us / s.clamp_min(1e-300)[..., None, :], torch.zeros_like(us))
        u, s, vh = u.float(), s.float(), v.mT.float()
    else:  # pragma: no cover - validated by the caches
        raise ValueError(f"svd_solver must be one of {list(SVD_SOLVERS)}, got {solver!r}")
    root = s.sqrt()
    return u * root[..., None, :], root[..., :, None] * vh


def plan_groups(layers: list[int], group_size: int, remainder: str = "error", owner: str = "XKVCache") -> list[list[int]]:
    """Split ``layers`` (model layer indices, in order) into groups of ``group_size`` adjacent ones.

    When ``group_size`` does not divide their number, ``remainder="error"`` refuses (naming the
    divisors) and ``remainder="last_group"`` makes the leftover layers one last, smaller group.
    """
    n = len(layers)
    if group_size > n:
        raise ValueError(
            f"{owner}: group_size={group_size} is larger than the {n} compressed layers "
            f"({layers[0]}..{layers[-1]}); choose group_size <= {n}."
        )
    if n % group_size and remainder == "error":
        divisors = [g for g in range(1, n + 1) if n % g == 0]
        raise ValueError(
            f"{owner}: group_size={group_size} does not divide the {n} compressed layers "
            f"({layers[0]}..{layers[-1]}); choose group_size in {divisors}, change start_layer/end_layer, "
            f"or pass remainder='last_group' to make the last {n % group_size} layer(s) a smaller group."
        )
    return [layers[i : i + group_size] for i in range(0, n, group_size)]


def ranks_for_ratio(
    compression_ratio: float, tokens: int, group_len: int, kv_heads: int, head_dim: int, key_rank_fraction: float = 0.4
) -> tuple[int, int]:
    """(r_k, r_v) that remove at least ``compression_ratio`` of a group's K/V bytes.

    From the bytes of a group of ``G`` layers, ``T·(r_k+r_v) + G·H·d·(r_k+r_v)`` against
    ``2·G·H·T·d`` uncompressed: ``r_k + r_v = ⌊(1−ratio)·2·G·H·T·d / (T + G·H·d)⌋``, split
    ``key_rank_fraction : 1 − key_rank_fraction`` (the paper's 2:3 by default). Each rank is at
    least 1 and at most the matrix rank ``min(T, G·H·d)``; what one rank cannot take beyond that
    bound goes to the other, so the ranks hold ``1 − ratio`` of the bytes up to one rank's worth.

    Even full rank removes nothing at ``ratio = 0`` (the factors cost more than they save), so
    :class:`XKVCache` stores the prompt uncompressed there instead of calling this.
    """
    width = group_len * kv_heads * head_dim
    total = math.floor((1.0 - compression_ratio) * 2 * width * tokens / (tokens + width) + 1e-9)
    top = min(tokens, width)
    rank_k = min(top, max(1, int(round(total * key_rank_fraction))))
    rank_v = min(top, max(1, total - rank_k))
    rank_k = min(top, max(rank_k, total - rank_v))  # keys take what the values could not
    return rank_k, rank_v


# -- RoPE and positions --------------------------------------------------------------------------
class RotaryTable:
    """The model's rotary embedding, as needed to un-rotate keys once and re-rotate them on read.

    Un-rotation uses exactly the ``cos``/``sin`` the model's ``rotary_emb`` returns for the prefill
    positions (it carries rope scaling). Re-rotation recomputes ``cos``/``sin`` for a block of
    stored positions from the embedding's ``inv_freq`` and ``attention_scaling`` (checked against the
    model's own output at compression time); for rope types whose frequencies change with the
    length (``dynamic``, ``longrope``) the prefill's ``inv_freq`` is snapshotted and held.

    A rotary embedding shared by several layer types, each with its own frequencies (Gemma3: one
    ``rotary_emb`` with ``sliding_attention_inv_freq`` and ``full_attention_inv_freq``, called with
    ``layer_type=``), is used for ``layer_type``: the type of the compressed layers.
    """

    def __init__(self, model: torch.nn.Module, owner: str, layer_type: str | None = None) -> None:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
        rotary = getattr(decoder, "rotary_emb", None)
        if rotary is None:
            rotary = getattr(model, "rotary_emb", None)
        self.layer_type: str | None = None
        if (rotary is not None and not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor)
                and layer_type is not None and isinstance(getattr(rotary, f"{layer_type}_inv_freq", None), torch.Tensor)):
            self.layer_type = layer_type  # one embedding, frequencies per layer type
        if rotary is None or not isinstance(getattr(rotary, self._prefix + "inv_freq", None), torch.Tensor):
            per_type = sorted(getattr(rotary, "layer_types", None) or []) if rotary is not None else []
            found = f" (it has frequencies for layer types {per_type}, not {layer_type!r})" if per_type else ""
            raise ValueError(
                f"{owner}: keys='pre_rope' needs the model's rotary embedding (a `rotary_emb` module with "
                f"`inv_freq`, or `<layer_type>_inv_freq` for the compressed layers' type), and "
                f"{type(model).__name__} has none{found}; use keys='post_rope'."
            )
        self.rotary = rotary
        self.scaling = float(getattr(rotary, self._prefix + "attention_scaling", 1.0) or 1.0)
        rope_type = getattr(rotary, "rope_type", "default")
        if isinstance(rope_type, dict):
            rope_type = rope_type.get(self.layer_type, "default")
        rope_type = str(rope_type)
        self.length_dependent = "dynamic" in rope_type or rope_type == "longrope"
        self.frozen_inv_freq: torch.Tensor | None = None
        self.owner = owner

    @property
    def _prefix(self) -> str:
        return f"{self.layer_type}_" if self.layer_type is not None else ""

    def _model_inv_freq(self) -> torch.Tensor:
        return getattr(self.rotary, self._prefix + "inv_freq")

    def inv_freq(self) -> torch.Tensor:
        return self.frozen_inv_freq if self.frozen_inv_freq is not None else self._model_inv_freq()

    def prefill_table(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos``/``sin`` ``[batch, T, d]`` of the prefill, from the model's own embedding,
        after checking that :meth:`table` reproduces them."""
        # The rotary module may sit on another device than the calling layer (device_map).
        home = self._model_inv_freq().device
        probe = torch.empty(0, dtype=torch.float32, device=home)
        if self.layer_type is not None:
            cos, sin = self.rotary(probe, position_ids.to(home), layer_type=self.layer_type)
        else:
            cos, sin = self.rotary(probe, position_ids.to(home))
        cos, sin = cos.to(position_ids.device, torch.float32), sin.to(position_ids.device, torch.float32)
        if self.length_dependent:
            self.frozen_inv_freq = self._model_inv_freq().detach().clone()
        mine_cos, mine_sin = self.table(position_ids)
        if mine_cos.shape != cos.shape or not (
            torch.allclose(mine_cos, cos, atol=1e-5, rtol=1e-5) and torch.allclose(mine_sin, sin, atol=1e-5, rtol=1e-5)
        ):
            raise ValueError(
                f"{self.owner}: the model's rotary embedding ({type(self.rotary).__name__}) is not the standard "
                "rotate-half RoPE over the whole head (partial or multimodal rotary?), so keys cannot be "
                "re-rotated on read; use keys='post_rope'."
            )
        return cos, sin

    def table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos``/``sin`` ``[..., d]`` for integer ``positions``."""
        inv = self.inv_freq().to(device=positions.device, dtype=torch.float32)
        freqs = positions[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scaling, emb.sin() * self.scaling

    def unrotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys from rotated ones: ``(k·cos − rotate_half(k)·sin) / scaling²``."""
        out = keys * cos - rotate_half(keys) * sin
        return out / (self.scaling**2) if self.scaling != 1.0 else out

    def nbytes(self) -> int:
        return tensor_bytes(self.frozen_inv_freq)


class PrefillPositions(Storage):
    """The RoPE positions of the compressed prefill tokens, per batch row (needed to re-rotate
    pre-RoPE keys). Stored as one offset per row (``[batch, 1]`` int64) when every real token sits
    at ``offset + index`` (what ``generate`` produces, left padding included), else as a
    ``[batch, T]`` int32 table. Padding tokens are masked and zero in the latent, so their
    positions do not matter."""

    storage = ("offsets", "table")

    def __init__(self) -> None:
        self.offsets: torch.Tensor | None = None
        self.table: torch.Tensor | None = None
        self.length = 0

    @property
    def is_set(self) -> bool:
        return self.offsets is not None or self.table is not None

    def set(self, position_ids: torch.Tensor | None, real: torch.Tensor | None, batch: int, length: int, device: Any) -> None:
        index = torch.arange(length, device=device)
        if position_ids is None:
            pos = index.expand(batch, length)
        else:
            pos = position_ids[..., -length:].to(device).expand(batch, length)
        offset = pos - index
        if real is None:
            first = torch.zeros(batch, 1, dtype=torch.long, device=device)
            ok = bool((offset == offset[:, :1]).all())
        else:
            first = real.to(torch.long).argmax(dim=-1, keepdim=True)
            ok = bool(((offset == offset.gather(1, first)) | ~real).all())
        self.length = length
        if ok:
            self.offsets, self.table = offset.gather(1, first).to(torch.long).contiguous(), None
        else:
            self.offsets, self.table = None, pos.to(torch.int32).contiguous()

    def get(self, start: int = 0, end: int | None = None, device: Any = None) -> torch.Tensor:
        """Positions of prefill tokens ``start:end``, ``[batch, n]`` int64 (on ``device`` when given:
        the reading layer's, under a multi-device ``device_map``)."""
        end = self.length if end is None else end
        if self.table is not None:
            return self.table[:, start:end].to(device=device, dtype=torch.long)
        assert self.offsets is not None
        offsets = self.offsets.to(device) if device is not None else self.offsets
        return offsets + torch.arange(start, end, device=offsets.device)

    def reset(self) -> None:
        self.clear_storage()
        self.length = 0


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
    (decoded ones, and layers left uncompressed), validity masks, positions and RoPE state;
    ``compress_seconds``: time spent compressing (SVD, merging) after prefill; ``last_read``: the
    last forward's :class:`ReadCost` summed over layers (``transient_bytes`` is the largest single
    layer's, since layers run one after another); ``total_read``: the same over all forwards."""

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
    def attend(self, call: AttentionCall, fn: Any) -> tuple[torch.Tensor, Any]:
        if not self.prefix_len:
            return super().attend(call, fn)
        start = time.perf_counter()
        cost = ReadCost(reads=1, compressed_bytes=self.compressed_nbytes())
        if self.cache.read_mode != "model" and self._direct_ok(call):
            out = self._fused_attention(call, cost)
            if out is None:
                out = self._direct_attention(call, call.mask, cost)
            else:
                cost.fused_reads = 1
        else:
            keys, values = self.rebuild_prefix(cost)
            keys = torch.cat([keys, call.key], dim=-2)
            values = torch.cat([values, call.value], dim=-2)
            cost.transient_bytes = max(cost.transient_bytes, tensor_bytes(keys, values))
            out = fn(call.module, call.query, keys, values, call.mask, **call.kwargs)
        cost.seconds = time.perf_counter() - start
        self.last_read = cost
        self.total_read.add(cost)
        return out

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

    def _fused_attention(self, call: AttentionCall, cost: ReadCost) -> tuple[torch.Tensor, Any] | None:
        """Attention by a fused decode read of the prefix, or ``None`` when this layer has none or it
        does not apply to ``call`` (layers with a fused read override this)."""
        return None

    def _direct_attention(self, call: AttentionCall, mask: Any, cost: ReadCost) -> tuple[torch.Tensor, Any]:
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
        cost.transient_bytes = max(cost.transient_bytes, tensor_bytes(prefix, logits, probs))
        out = self.prefix_output(probs[..., : self.prefix_len], cost) + probs[..., self.prefix_len :] @ call.value
        out = out.reshape(bsz, n_q, q_len, -1).transpose(1, 2).contiguous()
        weights = probs.reshape(bsz, n_q, q_len, -1) if call.base == "eager" else None
        return out, weights

    def prefix_logits(self, qg: torch.Tensor, cost: ReadCost) -> torch.Tensor:  # pragma: no cover
        """``qg · K_prefixᵀ``, ``[batch, kv_heads, groups·q_len, prefix]`` (unscaled)."""
        raise NotImplementedError

    def prefix_output(self, probs: torch.Tensor, cost: ReadCost) -> torch.Tensor:  # pragma: no cover
        """``probs · V_prefix``, ``[batch, kv_heads, groups·q_len, head_dim]``."""
        raise NotImplementedError

    def rebuild_prefix(self, cost: ReadCost) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        """The prefix K (rotated) and V as the model would have them, ``[batch, kv_heads, prefix, d]``."""
        raise NotImplementedError


# -- xKV -----------------------------------------------------------------------------------------
class _XKVGroup(_Group):
    storage = ("latent_k", "latent_v")

    def __init__(self, cache: "XKVCache", layer_ids: list[int]) -> None:
        super().__init__(cache, layer_ids)
        self.latent_k: torch.Tensor | None = None
        self.latent_v: torch.Tensor | None = None
        self.rank_k: int | None = None
        self.rank_v: int | None = None

    def reset(self) -> None:
        super().reset()
        self.rank_k = self.rank_v = None

    def compress(self, call: AttentionCall) -> None:
        cache: XKVCache = self.cache  # type: ignore[assignment]
        first = self.layers[0]
        bsz, n_kv, length, dim = first.keys.shape
        dtype, device = first.keys.dtype, first.keys.device  # the latent lives with the group's first layer
        real = call.pad2d[:, -length:].to(device, torch.bool) if call.pad2d is not None else None
        rank_k, rank_v = cache.group_ranks(len(self.layers), length, n_kv, dim)
        self.rank_k, self.rank_v = rank_k, rank_v
        # Each row gets the ranks it would get alone (from its own real tokens); the storage has
        # the largest, and a row's columns beyond its own ranks are zero.
        row_ranks = None
        if real is not None:
            lengths = real.sum(dim=-1).tolist()
            row_ranks = torch.tensor([cache.group_ranks(len(self.layers), int(n), n_kv, dim) for n in lengths],
                                     device=device).T  # [2, batch]: r_k, r_v per row
        cos = sin = None
        if cache.keys_mode == "pre_rope":
            pos = call.position_ids
            pos = (
                torch.arange(length, device=first.keys.device).expand(bsz, length)
                if pos is None
                else pos[..., -length:].to(device).expand(bsz, length)
            )
            cos, sin = cache.rope.prefill_table(pos)
            cos, sin = cos[:, None], sin[:, None]
        width = n_kv * dim
        for which, (kind, rank) in enumerate((("k", rank_k), ("v", rank_v))):
            cols = []
            for layer in self.layers:
                x = (layer.keys if kind == "k" else layer.values).to(device).float()
                if kind == "k" and cos is not None:
                    x = cache.rope.unrotate(x, cos, sin)
                cols.append(x.transpose(1, 2).reshape(bsz, length, width))
            matrix = torch.cat(cols, dim=-1)
            if real is not None:
                matrix = matrix * real[..., None]
            latent, factor = truncated_factors(matrix, rank, cache.svd_solver)
            if real is not None:
                latent = latent * real[..., None]  # padding rows exactly zero (LAPACK leaves ~1e-7)
            if row_ranks is not None and bool((row_ranks[which] < rank).any()):
                used = torch.arange(rank, device=device)[None, :] < row_ranks[which][:, None]  # [batch, rank]
                latent = latent * used[:, None, :]
                factor = factor * used[:, :, None]
            setattr(self, f"latent_{kind}", latent.to(dtype).contiguous())
            for i, layer in enumerate(self.layers):
                part = factor[..., i * width : (i + 1) * width]
                setattr(layer, f"factor_{kind}", part.to(layer.keys.device, dtype).contiguous())


class XKVLayer(_PrefixLayer):
    """One layer of an xKV group: its own key/value factors ``[batch, r, kv_heads·head_dim]``."""

    group: _XKVGroup
    storage = ("keys", "values", "factor_k", "factor_v")

    def __init__(self, cache: "XKVCache", group: _XKVGroup) -> None:
        super().__init__(cache, group)
        self.factor_k: torch.Tensor | None = None
        self.factor_v: torch.Tensor | None = None

    def _latent(self, kind: str) -> torch.Tensor:
        """The group's shared latent on this layer's device."""
        latent = self.group.latent_k if kind == "k" else self.group.latent_v
        factor = self.factor_k if kind == "k" else self.factor_v
        return self.group.on(latent, factor.device)

    def _use_latent(self, rows: int, rank: int, n_kv: int, dim: int) -> bool:
        mode = self.cache.read_mode
        if mode in ("latent", "rebuild"):
            return mode == "latent"
        length = self.prefix_len
        latent = n_kv * rows * rank * (length + dim)
        rebuild = length * rank * n_kv * dim + n_kv * rows * length * dim
        return latent <= rebuild

    def _keys_block(self, start: int, end: int, cost: ReadCost) -> torch.Tensor:
        """Rebuilt (and, for pre-RoPE keys, re-rotated) keys of prefix tokens ``start:end``,
        ``[batch, kv_heads, n, head_dim]``."""
        latent, factor = self._latent("k"), self.factor_k
        bsz, rank = latent.shape[0], latent.shape[-1]
        n_kv, dim = self.keys.shape[1], self.keys.shape[-1]
        block = (latent[:, start:end] @ factor).view(bsz, end - start, n_kv, dim)
        cost.flops += bsz * (end - start) * rank * n_kv * dim
        if self.cache.keys_mode == "pre_rope":
            cos, sin = self.cache.rope.table(self.cache.positions.get(start, end, factor.device))
            cos, sin = cos[:, :, None].to(block.dtype), sin[:, :, None].to(block.dtype)
            block = block * cos + rotate_half(block) * sin
        cost.rebuilt_bytes += tensor_bytes(block)
        return block.transpose(1, 2)

    def _values_block(self, start: int, end: int, cost: ReadCost) -> torch.Tensor:
        latent, factor = self._latent("v"), self.factor_v
        bsz, rank = latent.shape[0], latent.shape[-1]
        n_kv, dim = self.values.shape[1], self.values.shape[-1]
        block = (latent[:, start:end] @ factor).view(bsz, end - start, n_kv, dim)
        cost.flops += bsz * (end - start) * rank * n_kv * dim
        cost.rebuilt_bytes += tensor_bytes(block)
        return block.transpose(1, 2)

    def prefix_logits(self, qg: torch.Tensor, cost: ReadCost) -> torch.Tensor:
        latent, factor = self._latent("k"), self.factor_k
        bsz, length, rank = latent.shape
        _, n_kv, rows, dim = qg.shape
        if self.cache.keys_mode == "post_rope" and self._use_latent(rows, rank, n_kv, dim):
            projected = qg @ factor.view(bsz, rank, n_kv, dim).permute(0, 2, 3, 1)
            logits = projected @ latent[:, None].transpose(-1, -2)
            cost.flops += bsz * n_kv * rows * rank * (dim + length)
            return logits
        chunk = self.cache.read_chunk
        pieces = []
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            block = self._keys_block(start, end, cost)
            pieces.append(qg @ block.transpose(-1, -2))
            cost.transient_bytes = max(cost.transient_bytes, 2 * tensor_bytes(block))
            cost.flops += bsz * n_kv * rows * (end - start) * dim
        return torch.cat(pieces, dim=-1)

    def prefix_output(self, probs: torch.Tensor, cost: ReadCost) -> torch.Tensor:
        latent, factor = self._latent("v"), self.factor_v
        bsz, length, rank = latent.shape
        _, n_kv, rows, _ = probs.shape
        dim = self.values.shape[-1]
        if self._use_latent(rows, rank, n_kv, dim):
            mixed = probs @ latent[:, None]
            cost.flops += bsz * n_kv * rows * rank * (length + dim)
            return mixed @ factor.view(bsz, rank, n_kv, dim).transpose(1, 2)
        chunk = self.cache.read_chunk
        out = None
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            block = self._values_block(start, end, cost)
            part = probs[..., start:end] @ block
            cost.transient_bytes = max(cost.transient_bytes, tensor_bytes(block))
            cost.flops += bsz * n_kv * rows * (end - start) * dim
            out = part if out is None else out + part
        assert out is not None
        return out

    def _fused_ok(self, call: AttentionCall) -> bool:
        # sdpa only: eager returns the attention weights, which the fused read never forms.
        mode = self.cache.read_mode
        if mode not in ("fused", "auto") or call.base != "sdpa":
            return False
        if mode == "fused":
            return True
        _, n_q, q_len, _ = call.query.shape
        return (
            call.query.is_cuda
            and self.group.latent_k.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and n_q // call.key.shape[1] * q_len <= FUSED_AUTO_MAX_ROWS
            and triton_available()
        )

    def _fused_attention(self, call: AttentionCall, cost: ReadCost) -> tuple[torch.Tensor, Any] | None:
        """``None`` unless :meth:`_fused_ok`; then prefix attention by
        :func:`~compresskv.kernels.xkv_decode.xkv_decode` (the Triton kernel on CUDA, its PyTorch
        reference elsewhere), the tail in plain torch, merged by log-sum-exp."""
        if not self._fused_ok(call):
            return None
        query = call.query
        bsz, n_q, q_len, dim = query.shape
        n_kv = call.key.shape[1]
        qg = query.reshape(bsz, n_kv, n_q // n_kv * q_len, dim)
        key_mask = tail_valid = None
        if self.valid is not None or call.new_valid is not None:
            n_old = call.key.shape[-2] - q_len
            valid = self.valid
            if valid is None:
                valid = torch.ones(bsz, n_kv, self.prefix_len + n_old, dtype=torch.bool, device=query.device)
            new = call.new_valid
            new = torch.ones(bsz, q_len, dtype=torch.bool, device=query.device) if new is None else new
            key_mask = valid[:, :, : self.prefix_len] if self.valid is not None else None
            tail_valid = torch.cat([valid[:, :, self.prefix_len :], new[:, None, :].expand(-1, n_kv, -1)], dim=-1)
        info: dict[str, Any] = {}
        out, lse = xkv_decode(
            qg,
            self._latent("k"),
            self.factor_k,
            self._latent("v"),
            self.factor_v,
            self.cache.prefix_rope(query.device),
            key_mask,
            call.scaling,
            chunk=self.cache.read_chunk,
            info=info,
        )
        out = merge_with_tail(out, lse, qg, call.key, call.value, call.scaling, q_len, tail_valid)
        cost.flops += info["flops"]
        cost.transient_bytes = max(cost.transient_bytes, info["workspace_bytes"])
        out = out.reshape(bsz, n_q, q_len, dim).transpose(1, 2).contiguous()
        return out, None

    def rebuild_prefix(self, cost: ReadCost) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.prefix_len
        keys = self._keys_block(0, length, cost)
        values = self._values_block(0, length, cost)
        return keys, values


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

    def make_layer(self, rank: int, n_full: int) -> KVLayer:
        group = self._group_of.get(self.full_layers[rank])
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

    def held_nbytes(self) -> int:
        """Bytes held once per cache that are not per row (a snapshotted RoPE table)."""
        return 0

    def nbytes(self) -> int:
        return super().nbytes() + self.held_nbytes()

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
        return {"shared": shared, "per_layer": own, "uncompressed_tokens": tails, "validity": valid}

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


class XKVCache(_GroupedCache):
    """xKV: cross-layer SVD of the prompt's K/V, stored as a shared token latent per group of
    ``group_size`` adjacent layers plus a small factor per layer (arXiv 2503.18893).

    Args:
        model: the transformers model the cache is for (its attention is switched to compresskv's).
        group_size: adjacent compressed layers sharing one latent (``1`` is single-layer SVD).
        rank_k: SVD rank of each group's keys (the paper: 512 for groups of 4 on Llama-3.1-8B); at
            most ``group_size·kv_heads·head_dim`` (the matrix's columns). A prompt shorter than a
            rank is stored at full rank (the rank is clamped to ``T``).
        rank_v: SVD rank of each group's values (the paper: 768 for groups of 4), same bounds.
        compression_ratio: instead of ranks, the fraction of the compressed layers' K/V bytes removed
            (kvpress convention: ``0.875`` is 8× smaller), in [0, 1); ranks are derived per prompt
            from the bytes formula (:func:`ranks_for_ratio`), keys getting ``key_rank_fraction`` of it.
            ``0`` compresses nothing: the prompt is stored as it is (exactly ``DynamicCache``).
        start_layer: first model layer compressed (negative counts from the end). Layers outside
            ``start_layer..end_layer`` stay uncompressed; only full-attention layers are ever compressed.
        end_layer: last model layer compressed (inclusive; ``-1`` is the last).
        keys: ``"pre_rope"`` (default, as the paper: keys are un-rotated with the model's rotary
            embedding before the SVD and re-rotated on read) or ``"post_rope"``.
        remainder: what to do when ``group_size`` does not divide the compressed layers:
            ``"last_group"`` (default: the leftover layers form a smaller last group; explicit
            ranks are scaled to its size) or ``"error"`` (refuse, listing the sizes that divide).
        key_rank_fraction: with ``compression_ratio``, the share of ``r_k + r_v`` given to keys.
        svd_solver: ``"svd"`` (``torch.linalg.svd`` in fp32, default) or ``"gram"`` (eigenvectors of
            the Gram matrix in fp64: faster for long prompts, same result up to rounding).
        read_mode: how the compressed prompt is read at decode (all give the same result):
            ``"auto"`` (default: the fused Triton kernel on CUDA when triton is installed and the
            attention is sdpa, else the cheaper of the latent and rebuilt forms), ``"fused"``
            (:func:`compresskv.kernels.xkv_decode`: keys rebuilt and rotated on chip, values read
            in latent space; the PyTorch reference off CUDA), ``"latent"``, ``"rebuild"``,
            ``"model"`` (rebuild K/V and call the model's own attention function).

    What is stored, per batch row: per group, the latents ``[T, r_k]`` and ``[T, r_v]``; per layer,
    the factors ``[r_k, kv_heads·head_dim]`` and ``[r_v, kv_heads·head_dim]``; tokens decoded later,
    uncompressed; for pre-RoPE keys the prefill positions (one int64 offset per row in the usual
    case); a validity mask per layer when the batch is padded. All are counted by :meth:`nbytes`.
    """

    method = "xkv"

    def __init__(
        self,
        model: torch.nn.Module,
        group_size: int = 4,
        rank_k: int | None = None,
        rank_v: int | None = None,
        compression_ratio: float | None = None,
        start_layer: int = 0,
        end_layer: int = -1,
        keys: KeysMode = "pre_rope",
        remainder: str = "last_group",
        key_rank_fraction: float = 0.4,
        svd_solver: str = "svd",
        read_mode: str = "auto",
    ) -> None:
        owner = type(self).__name__
        refuse_mla(model, owner)  # before the options, which would be judged against the wrong shapes
        if read_mode not in READ_MODES:
            raise ValueError(f"{owner}: read_mode must be one of {list(READ_MODES)}, got {read_mode!r}.")
        self.read_mode = read_mode
        dims = model_dims(model)
        n_kv, head_dim = dims["kv_heads"], dims["head_dim"]
        if not _is_int(group_size) or group_size < 1:
            raise ValueError(f"{owner}: group_size must be an int >= 1, got {group_size!r}.")
        if keys not in KEYS_MODES:
            raise ValueError(f"{owner}: keys must be one of {list(KEYS_MODES)}, got {keys!r}.")
        if svd_solver not in SVD_SOLVERS:
            raise ValueError(f"{owner}: svd_solver must be one of {list(SVD_SOLVERS)}, got {svd_solver!r}.")
        ranks_given = rank_k is not None or rank_v is not None
        if ranks_given == (compression_ratio is not None):
            raise ValueError(
                f"{owner}: give either rank_k= and rank_v= (SVD ranks per group) or compression_ratio= "
                f"(fraction of the compressed layers' K/V bytes removed, in [0, 1)), exactly one of the two; "
                f"got rank_k={rank_k!r}, rank_v={rank_v!r}, compression_ratio={compression_ratio!r}."
            )
        width = group_size * n_kv * head_dim
        if ranks_given and (rank_k is None or rank_v is None):
            raise ValueError(
                f"{owner}: give both rank_k= and rank_v= (the paper uses r_v = 1.5 r_k), got rank_k={rank_k!r}, "
                f"rank_v={rank_v!r}; or give compression_ratio= instead."
            )
        if ranks_given:
            for name, rank in (("rank_k", rank_k), ("rank_v", rank_v)):
                if not _is_int(rank) or not 1 <= rank <= width:
                    raise ValueError(
                        f"{owner}: {name} must be an int in [1, {width}]: a group of {group_size} layer(s) x "
                        f"{n_kv} KV heads x head_dim {head_dim} has {width} columns, so its rank is at most "
                        f"{width}; got {name}={rank!r}."
                    )
        if compression_ratio is not None and not (_is_number(compression_ratio) and 0.0 <= compression_ratio < 1.0):
            raise ValueError(
                f"{owner}: compression_ratio is the fraction of K/V bytes removed and must be in [0, 1) "
                f"(0.75 = 4x smaller), got {compression_ratio!r}."
            )
        if not (_is_number(key_rank_fraction) and 0.0 < key_rank_fraction < 1.0):
            raise ValueError(f"{owner}: key_rank_fraction must be in (0, 1), got {key_rank_fraction!r}.")
        self.group_size, self.rank_k, self.rank_v = group_size, rank_k, rank_v
        self.compression_ratio, self.keys_mode, self.svd_solver = compression_ratio, keys, svd_solver
        self.key_rank_fraction = float(key_rank_fraction)
        self._setup_groups(model, start_layer, end_layer, group_size, remainder)
        self.rope = RotaryTable(model, owner, self._layer_type(text_config(model))) if keys == "pre_rope" else None
        super().__init__(model)

    def _new_group(self, layer_ids: list[int]) -> _Group:
        return _XKVGroup(self, layer_ids)

    def _layer_type(self, config: Any) -> str | None:
        """The ``config.layer_types`` entry of the compressed layers (``None`` without layer types)."""
        types = getattr(config, "layer_types", None)
        if not types:
            return None
        found = {types[i] for group in self.group_plan for i in group}
        return found.pop() if len(found) == 1 else None

    @property
    def compresses(self) -> bool:
        """``False`` at ``compression_ratio=0``: the prompt is then stored uncompressed (a
        factorisation at full rank would hold more bytes than the keys and values themselves)."""
        return self.compression_ratio != 0

    def _new_layer(self, group: _Group) -> KVLayer:
        return XKVLayer(self, group)  # type: ignore[arg-type]

    def group_ranks(self, group_len: int, tokens: int, n_kv: int, head_dim: int) -> tuple[int, int]:
        """(r_k, r_v) of a group of ``group_len`` layers for a prefill of ``tokens`` tokens."""
        if self.compression_ratio is not None:
            return ranks_for_ratio(self.compression_ratio, tokens, group_len, n_kv, head_dim, self.key_rank_fraction)
        assert self.rank_k is not None and self.rank_v is not None
        rank_k, rank_v = self.rank_k, self.rank_v
        if group_len != self.group_size:  # a smaller last group (remainder="last_group")
            rank_k = max(1, round(rank_k * group_len / self.group_size))
            rank_v = max(1, round(rank_v * group_len / self.group_size))
        top = min(tokens, group_len * n_kv * head_dim)
        return min(rank_k, top), min(rank_v, top)

    def prefix_rope(self, device: Any = None) -> PrefixRope | None:
        """The RoPE that re-rotates the stored pre-RoPE keys (``None`` for post-RoPE keys), with its
        tensors on ``device`` when given."""
        if self.rope is None or not self.positions.is_set:
            return None
        rope, pos = self.rope, self.positions

        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None and device is not None else t

        return PrefixRope(to(rope.inv_freq()), to(pos.offsets), to(pos.table), rope.scaling)

    def _prefilled(self, layer: _PrefixLayer, call: AttentionCall) -> None:
        if self.keys_mode == "pre_rope" and not self.positions.is_set:
            bsz, _, length, _ = layer.keys.shape
            real = call.pad2d[:, -length:].to(torch.bool) if call.pad2d is not None else None
            self.positions.set(call.position_ids, real, bsz, length, layer.keys.device)

    def held_nbytes(self) -> int:
        return self.rope.nbytes() if self.rope is not None else 0

    def _bytes_by_kind(self) -> dict[str, int]:
        out = super()._bytes_by_kind()
        out["positions"] = self.positions.storage_nbytes()
        out["rope"] = self.rope.nbytes() if self.rope is not None else 0
        return out

    def _extra_stats(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "svd_solver": self.svd_solver, "read_mode": self.read_mode,
                "compression_ratio": self.compression_ratio, "compresses": self.compresses}


class SVDCache(XKVCache):
    """Single-layer SVD: :class:`XKVCache` with ``group_size=1`` (each layer factorised on its own),
    the baseline xKV is compared against. Same arguments, without ``group_size``/``remainder``."""

    method = "svd"

    def __init__(
        self,
        model: torch.nn.Module,
        rank_k: int | None = None,
        rank_v: int | None = None,
        compression_ratio: float | None = None,
        start_layer: int = 0,
        end_layer: int = -1,
        keys: KeysMode = "pre_rope",
        key_rank_fraction: float = 0.4,
        svd_solver: str = "svd",
        read_mode: str = "auto",
    ) -> None:
        super().__init__(
            model,
            group_size=1,
            rank_k=rank_k,
            rank_v=rank_v,
            compression_ratio=compression_ratio,
            start_layer=start_layer,
            end_layer=end_layer,
            keys=keys,
            key_rank_fraction=key_rank_fraction,
            svd_solver=svd_solver,
            read_mode=read_mode,
        )


# -- MiniCache -----------------------------------------------------------------------------------
def slerp_merge(
    xa: torch.Tensor, xb: torch.Tensor, t: float, real: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge two layers' vectors (``[batch, heads, T, d]``, fp32) per token and head.

    Returns ``(direction, norm_a, norm_b, distance)``: the SLERP at ``t`` of the two unit
    directions (renormalised; linear interpolation where they are parallel), each layer's norms,
    and the angular distance ``arccos(cos)/π`` in [0, 1] (``-inf`` at padding tokens).
    """
    norm_a, norm_b = xa.norm(dim=-1), xb.norm(dim=-1)
    ua = xa / norm_a.clamp_min(1e-12)[..., None]
    ub = xb / norm_b.clamp_min(1e-12)[..., None]
    cos = (ua * ub).sum(dim=-1).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    near = sin < 1e-6
    safe = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * theta) / safe)
    wb = torch.where(near, torch.full_like(sin, t), torch.sin(t * theta) / safe)
    direction = wa[..., None] * ua + wb[..., None] * ub
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    distance = theta / math.pi
    if real is not None:
        distance = distance.masked_fill(~real[:, None, :], float("-inf"))
    return direction, norm_a, norm_b, distance


def retention_index(distance: torch.Tensor, gamma: float, real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens kept unmerged: per batch row, those whose angular distance lies in the top ``gamma``
    of the row's observed range (``d ≥ d_max − gamma·(d_max − d_min)``, over KV heads and real
    tokens). Every head of a row keeps the same number ``n_row`` of tokens, its ``n_row`` most
    divergent, ``n_row`` being the largest count above the threshold among the row's heads.

    Storage needs the same number ``n`` (the largest ``n_row``) of slots in every row. Returns
    ``(index, retained)``, both ``[batch, heads, n]``: the ``n`` most divergent tokens in ascending
    order, and whether each is retained (``False``: a slot only the batch needs, whose token is
    read as merged, so that a row's result does not depend on its batch)."""
    bsz, n_kv, length = distance.shape
    finite = torch.isfinite(distance)
    hi = distance.masked_fill(~finite, float("-inf")).amax(dim=(1, 2))
    lo = distance.masked_fill(~finite, float("inf")).amin(dim=(1, 2))
    threshold = hi - gamma * (hi - lo)
    above = (distance >= threshold[:, None, None]) & finite
    per_row = above.sum(dim=-1).amax(dim=1).clamp_min(1)  # [batch]
    count = max(1, min(int(per_row.max()) if above.numel() else 0, length))
    top = distance.topk(count, dim=-1).indices  # most divergent first
    retained = torch.arange(count, device=distance.device)[None, None, :] < per_row[:, None, None]
    index, order = top.sort(dim=-1)
    return index, retained.expand(bsz, n_kv, count).gather(-1, order)


class _MiniGroup(_Group):
    storage = ("direction_k", "direction_v", "index_k", "index_v")

    def __init__(self, cache: "MiniCache", layer_ids: list[int]) -> None:
        super().__init__(cache, layer_ids)
        self.direction_k: torch.Tensor | None = None
        self.direction_v: torch.Tensor | None = None
        self.index_k: torch.Tensor | None = None
        self.index_v: torch.Tensor | None = None

    def compress(self, call: AttentionCall) -> None:
        cache: MiniCache = self.cache  # type: ignore[assignment]
        layer_a, layer_b = self.layers
        length = layer_a.keys.shape[-2]
        dtype, device = layer_a.keys.dtype, layer_a.keys.device  # shared tensors live with the first layer
        real = call.pad2d[:, -length:].to(device, torch.bool) if call.pad2d is not None else None
        index_dtype = torch.int16 if length <= 2**15 else torch.int32
        for kind in ("k", "v"):
            xa = (layer_a.keys if kind == "k" else layer_a.values).float()
            xb = (layer_b.keys if kind == "k" else layer_b.values).to(device).float()
            direction, norm_a, norm_b, distance = slerp_merge(xa, xb, cache.t, real)
            index, retained = retention_index(distance, cache.gamma, real)
            gather = index[..., None].expand(-1, -1, -1, xa.shape[-1])
            if real is not None:
                direction = direction * real[:, None, :, None]
            direction = direction.to(dtype)
            setattr(self, f"direction_{kind}", direction.contiguous())
            setattr(self, f"index_{kind}", index.to(index_dtype).contiguous())
            for layer, x, norm in ((layer_a, xa, norm_a), (layer_b, xb, norm_b)):
                # A filler slot holds the merged vector, as stored (direction and magnitude in dtype).
                merged = direction.gather(2, gather).float() * norm.to(dtype).float().gather(2, index)[..., None]
                kept = torch.where(retained[..., None], x.gather(2, gather), merged)
                # Magnitudes are zero in the slots, so the merged term vanishes there.
                home = layer.keys.device
                setattr(layer, f"magnitude_{kind}", norm.scatter(2, index, 0.0).to(home, dtype).contiguous())
                setattr(layer, f"retained_{kind}", kept.to(home, dtype).contiguous())


class MiniCacheLayer(_PrefixLayer):
    """One layer of a MiniCache pair: per-token magnitudes (``[batch, kv_heads, T]``) and the
    original vectors of the retained tokens (``[batch, kv_heads, n, head_dim]``)."""

    group: _MiniGroup
    storage = ("keys", "values", "magnitude_k", "magnitude_v", "retained_k", "retained_v")

    def __init__(self, cache: "MiniCache", group: _MiniGroup) -> None:
        super().__init__(cache, group)
        self.magnitude_k: torch.Tensor | None = None
        self.magnitude_v: torch.Tensor | None = None
        self.retained_k: torch.Tensor | None = None
        self.retained_v: torch.Tensor | None = None

    def prefix_logits(self, qg: torch.Tensor, cost: ReadCost) -> torch.Tensor:
        device = self.magnitude_k.device
        direction, index = self.group.on(self.group.direction_k, device), self.group.on(self.group.index_k, device).long()
        bsz, n_kv, rows, dim = qg.shape
        logits = (qg @ direction.transpose(-1, -2)) * self.magnitude_k[:, :, None, :]
        kept = qg @ self.retained_k.transpose(-1, -2)
        logits.scatter_add_(-1, index[:, :, None, :].expand(-1, -1, rows, -1), kept)
        cost.flops += bsz * n_kv * rows * (direction.shape[-2] + index.shape[-1]) * dim
        return logits

    def prefix_output(self, probs: torch.Tensor, cost: ReadCost) -> torch.Tensor:
        device = self.magnitude_v.device
        direction, index = self.group.on(self.group.direction_v, device), self.group.on(self.group.index_v, device).long()
        bsz, n_kv, rows, _ = probs.shape
        weighted = probs * self.magnitude_v[:, :, None, :]
        kept = probs.gather(-1, index[:, :, None, :].expand(-1, -1, rows, -1))
        cost.transient_bytes = max(cost.transient_bytes, tensor_bytes(weighted))
        cost.flops += bsz * n_kv * rows * (direction.shape[-2] + index.shape[-1]) * direction.shape[-1]
        return weighted @ direction + kept @ self.retained_v

    def rebuild_prefix(self, cost: ReadCost) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for kind in ("k", "v"):
            magnitude = getattr(self, f"magnitude_{kind}")
            direction = self.group.on(getattr(self.group, f"direction_{kind}"), magnitude.device)
            index = self.group.on(getattr(self.group, f"index_{kind}"), magnitude.device).long()
            full = direction * getattr(self, f"magnitude_{kind}")[..., None]
            full = full.scatter(2, index[..., None].expand(-1, -1, -1, full.shape[-1]), getattr(self, f"retained_{kind}"))
            cost.rebuilt_bytes += tensor_bytes(full)
            out.append(full)
        return out[0], out[1]


class MiniCache(_GroupedCache):
    """MiniCache (arXiv 2405.14366): merge the K/V of adjacent layer pairs ``(l, l+1)``, from the
    middle of the model to ``end_layer``, into one shared direction per token and KV head.

    Per token and KV head, both layers' vectors are split into magnitude and direction; the
    directions are interpolated by SLERP at ``t`` into one unit direction shared by the pair; each
    layer keeps its magnitudes; tokens whose two vectors diverge most (angular distance
    ``arccos(cos)/π`` in the top ``gamma`` of the row's range) keep both originals, unmerged.
    Keys are merged post-RoPE (a rotation preserves norms and angles, so merging before or after
    RoPE is the same). Attention is computed from the merged form directly.

    Args:
        model: the transformers model the cache is for.
        start_layer: first merged layer (default: the middle layer ``L // 2``, moved one layer
            deeper when that leaves an odd number of layers).
        end_layer: last merged layer (inclusive, default the last).
        t: SLERP interpolation weight towards the deeper layer of a pair (paper: 0.6).
        gamma: retention threshold in [0, 1] (paper: 0.05); ``1`` retains every token (exact).
        remainder: ``"error"`` when the range has an odd number of layers, or ``"last_group"`` to
            leave the last one unmerged.

    Stored per pair and per K/V: the shared direction ``[batch, kv_heads, T, d]`` and the retained
    token indices ``[batch, kv_heads, n]`` (int16); per layer: magnitudes ``[batch, kv_heads, T]``
    and retained originals ``[batch, kv_heads, n, d]``. A pair stores a little over half of what
    its two layers held, so MiniCache alone cannot compress beyond about 2×.
    """

    method = "minicache"

    def __init__(
        self,
        model: torch.nn.Module,
        start_layer: int | None = None,
        end_layer: int = -1,
        t: float = 0.6,
        gamma: float = 0.05,
        remainder: str = "error",
    ) -> None:
        owner = type(self).__name__
        refuse_mla(model, owner)
        if not (_is_number(t) and 0.0 <= t <= 1.0):
            raise ValueError(f"{owner}: t is the SLERP weight and must be in [0, 1], got {t!r}.")
        if not (_is_number(gamma) and 0.0 <= gamma <= 1.0):
            raise ValueError(f"{owner}: gamma is the retention threshold and must be in [0, 1], got {gamma!r}.")
        if remainder not in REMAINDERS:
            raise ValueError(f"{owner}: remainder must be one of {list(REMAINDERS)}, got {remainder!r}.")
        start = self._pair_range(model, start_layer, end_layer, remainder)
        self.t, self.gamma = float(t), float(gamma)
        self.keys_mode = "post_rope"
        self._setup_groups(model, start, end_layer, 2, remainder)
        super().__init__(model)

    def _pair_range(self, model: torch.nn.Module, start_layer: Any, end_layer: Any, remainder: str) -> int:
        """The first merged layer, after checking that ``start_layer..end_layer`` holds layers to
        pair; errors name MiniCache's own options (it has no ``group_size``: pairs are fixed)."""
        owner = type(self).__name__
        n_layers = text_config(model).num_hidden_layers
        for name, value in (("start_layer", start_layer), ("end_layer", end_layer)):
            if name == "start_layer" and value is None:
                continue
            if not _is_int(value) or not -n_layers <= value < n_layers:
                raise ValueError(
                    f"{owner}: {name} must be a layer index in [0, {n_layers}) (negative counts from the end)"
                    f"{' or None (the middle layer)' if name == 'start_layer' else ''}, got {value!r}."
                )
        end = end_layer % n_layers
        end_name = f"end_layer={end_layer}" + (f" (layer {end})" if end_layer < 0 else "")
        full = full_attention_layers(model)
        upto = [i for i in full if i <= end]
        if len(upto) < 2:
            raise ValueError(
                f"{owner}: {end_name} leaves {len(upto)} full-attention layer{'' if len(upto) == 1 else 's'} "
                f"{upto} up to it, and layers are merged in pairs: choose an end_layer in [{full[1] if len(full) > 1 else n_layers}, "
                f"{n_layers}) (layer indices; negative counts from the end)."
            )
        if start_layer is None:
            middle = n_layers // 2
            start = middle
            chosen = [i for i in full if middle <= i <= end]
            if len(chosen) % 2 and len(chosen) >= 3:
                start = chosen[1]  # an even number of layers from just past the middle
            elif len(chosen) < 2:
                start = upto[-2]  # the last pair up to end_layer
                if len(chosen) == 0:  # end_layer before the middle: say so rather than move that far
                    raise ValueError(
                        f"{owner}: {end_name} comes before the default start_layer, the middle layer ({middle}; "
                        f"MiniCache merges from the middle of the model on): pass start_layer <= {start} too, or "
                        f"an end_layer >= {middle}."
                    )
            where = f"start_layer={start} (the default) to {end_name}"
        else:
            start = start_layer % n_layers
            if start > end:
                raise ValueError(
                    f"{owner}: start_layer={start_layer} comes after end_layer={end_layer}; choose "
                    f"start_layer < end_layer (layer indices in [0, {n_layers}))."
                )
            where = f"start_layer={start_layer} to {end_name}"
        chosen = [i for i in full if start <= i <= end]
        if len(chosen) < 2:
            raise ValueError(
                f"{owner}: layers are merged in pairs, and {where} holds only {len(chosen)} "
                f"full-attention layer{'' if len(chosen) == 1 else 's'} {chosen}; widen the range with "
                f"start_layer/end_layer (layer indices in [0, {n_layers}), at least two full-attention layers)."
            )
        if len(chosen) % 2 and remainder == "error":
            raise ValueError(
                f"{owner}: layers are merged in pairs, and {where} holds {len(chosen)} "
                f"full-attention layers ({chosen[0]}..{chosen[-1]}), an odd number; choose start_layer/end_layer "
                f"covering an even number (e.g. start_layer={chosen[1]} or end_layer={chosen[-2]}), or pass "
                "remainder='last_group' to leave the last one unmerged."
            )
        return start

    def _new_group(self, layer_ids: list[int]) -> _Group:
        return _MiniGroup(self, layer_ids)

    def _new_layer(self, group: _Group) -> KVLayer:
        if len(group.layer_ids) < 2:
            return KVLayer()  # the odd layer out of remainder="last_group" has nothing to merge with
        return MiniCacheLayer(self, group)  # type: ignore[arg-type]

    def _extra_stats(self) -> dict[str, Any]:
        retained = []
        for group in self.groups:
            if isinstance(group, _MiniGroup) and group.index_k is not None:
                retained.append((int(group.index_k.shape[-1]), int(group.index_v.shape[-1])))
            else:
                retained.append(None)
        return {"t": self.t, "gamma": self.gamma, "retained_tokens_kv": retained, "read_mode": self.read_mode}


__all__ = [
    "KEYS_MODES",
    "LowRankStats",
    "MiniCache",
    "MiniCacheLayer",
    "PrefillPositions",
    "ReadCost",
    "RotaryTable",
    "SVDCache",
    "XKVCache",
    "XKVLayer",
    "plan_groups",
    "ranks_for_ratio",
    "retention_index",
    "slerp_merge",
    "truncated_factors",
]
