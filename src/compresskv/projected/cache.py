"""The layer of the MatryoshkaKV and PCA caches (arXiv 2410.14731, :mod:`.caches`): keys and values
stored as orthogonal low-rank projections per KV head, and the ways to read them back.

Every token's key and value are stored as ``(k − μ_k)·U_k[:, :r_k]`` and ``(v − μ_v)·U_v[:, :r_v]``
with a rank per (layer, KV head, K/V). Heads of equal rank are stored together, one tensor
``[batch, heads_of_that_rank, tokens, rank]`` per group, so nothing is padded and the bytes held
are exactly ``Σ tokens·(r_k + r_v)·element size`` plus the per-head projection columns and means
the layer keeps for reading.

Like every compresskv cache, the tokens of a forward call attend to what is stored plus their own
keys and values at full precision (prefill attention runs on the full keys and values); they are
compressed when stored, right after. Two ways to read what is stored:

* ``read_mode="latent"`` (default): attention in the projected space, through compresskv's attention
  function. Per KV head, ``q′ = q·U_k[:, :r]``, logits ``q′·k′ᵀ + q·μ_k`` scaled by the full head
  dim's scaling, ``softmax``, then ``(P·v′)·U_v[:, :r]ᵀ + (ΣP)·μ_v``; query heads are grouped onto
  their KV head (GQA) and padding is masked. Reads ``r/d`` of the bytes: this is the fast mode.
* ``read_mode="model"``: rebuild ``k̂ = k′·U_kᵀ + μ_k`` (and ``v̂``) for every stored token on every
  read and run the model's own attention backend on them. Simple, but slower than no compression.

In ``latent`` mode the stored tokens are read by a fused attention kernel where one takes them
(:meth:`ProjectedLayer.projected_attention_sdpa`): per group of KV heads sharing one key rank and
one value rank, one fused call over the stored latents (query ``q·U_k[:, :r_k]``, keys ``k′``,
values ``v′``, padding as an additive bias) that also returns its log-sum-exp; every logit is
taken relative to ``q·μ_k`` (the same for every stored key of a query row: the new tokens' keys
are centred instead), and the new tokens (full precision, a few) are merged in through the
log-sum-exp, so both parts share one softmax exactly. ``scaled_dot_product_attention`` itself does not return the
log-sum-exp, and without it the merge cannot be exact unless the new tokens are copied into the
latent tensors (a copy of the whole cache per step) or the stored logits are computed (what the
fused kernel avoids): so this calls the ATen kernels behind it (see
:func:`compresskv.core.lse.attention_with_lse`). The explicit path
(:meth:`ProjectedLayer.projected_attention`, forced by ``read_mode="latent_explicit"``) stays the
reference, and runs where the fused one does not apply: eagerly on CPU with one thread, and for a
decode step's small read with any (on one thread: measured faster there, see
:attr:`ProjectedLayer.fused_cpu_threads`; compiled, the fused read is the faster on CPU at any
thread count), compiled on CUDA, under ``eager`` attention (which returns the
attention weights, ``[batch, q_heads, q_len, stored + q_len]``, for ``output_attentions=True``),
with sink tokens, for heads whose key ranks and value ranks group them differently, and for shapes no fused kernel takes (on CUDA: ranks not a multiple of 8 in
fp16/bf16, or of 4 in fp32).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..core.attention import AttentionCall
from ..core.cache import KVLayer, tensor_bytes
from ..core.lse import attention_with_lse, merge_softmax
from ..core.ops import (add_product, heads_matmul, per_batch, product_for, scaled_product, serial_read, serial_when_small,
                        small_softmax)
from .projections import Projections

if TYPE_CHECKING:
    from .caches import MatryoshkaKVCache

#: the ``read_mode`` values of the projected caches (see :data:`compresskv.core.readmode.READ_MODES`)
READ_MODES = ("latent", "latent_explicit", "model")
#: the old ``mode=`` values and their ``read_mode`` names
RENAMED_READ_MODES = {"projected": "latent", "projected_explicit": "latent_explicit", "reconstruct": "model"}


@dataclass
class _Group:
    """KV heads that share one rank: their stored latents live in one tensor."""

    heads: list[int]
    index: torch.Tensor | None  # None when the group is every head, in order
    rank: int
    proj: torch.Tensor  # [heads, d, rank]: U[:, :rank] of each head
    proj_t: torch.Tensor  # [heads, rank, d]: its transposed view (made once: a decode step's dispatch less)


def _groups(u: torch.Tensor, ranks: list[int], dtype: torch.dtype, device: torch.device) -> tuple[list[_Group], torch.Tensor | None]:
    """Group heads by rank; also the permutation that puts group-ordered heads back in order."""
    n = len(ranks)
    groups = []
    for rank in sorted(set(ranks), reverse=True):
        heads = [h for h in range(n) if ranks[h] == rank]
        index = None if heads == list(range(n)) else torch.tensor(heads, device=device)
        proj = u[heads, :, :rank].to(device=device, dtype=dtype).contiguous()
        groups.append(_Group(heads, index, rank, proj, proj.mT))
    order = [h for g in groups for h in g.heads]
    inverse = None if order == list(range(n)) else torch.tensor(order, device=device).argsort()
    return groups, inverse


def _select(x: torch.Tensor, index: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """A group's heads of ``x`` (``index``: the group's, ``None`` for every head in order), along
    the heads (``dim=1``) or, on ``[batch·kv_heads]`` views, along the rows (``dim=0``, the indices
    of :meth:`LayerFactors.flat`)."""
    return x if index is None else x.index_select(dim, index)


def _assemble(parts: list[torch.Tensor], inverse: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """The groups' parts back in head order (the dim as in :func:`_select`)."""
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
    return out if inverse is None else out.index_select(dim, inverse)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, without the call (a dispatch a decode step pays per layer) when it is one."""
    return x if x.dtype == dtype else x.to(dtype)


class LayerFactors:
    """One layer's projection columns and means, on the cache's device and dtype."""

    def __init__(self, projections: Projections, layer: int, ranks_k: list[int], ranks_v: list[int],
                 dtype: torch.dtype, device: torch.device) -> None:
        t = projections.tensors
        self.mu_k = t["mu_k"][layer].to(device=device, dtype=dtype).contiguous()
        self.mu_v = t["mu_v"][layer].to(device=device, dtype=dtype).contiguous()
        self.mu_k4, self.mu_v4 = self.mu_k[None, :, None, :], self.mu_v[None, :, None, :]  # [1, kv, 1, d]
        self.mu_v3 = self.mu_v[:, None, :]  # [kv, 1, d]
        self.k_groups, self.k_inverse = _groups(t["U_k"][layer], ranks_k, dtype, device)
        self.v_groups, self.v_inverse = _groups(t["U_v"][layer], ranks_v, dtype, device)
        # The fused read needs each group's key and value latents over the same heads (true for
        # uniform ranks, and whenever equal key ranks go with equal value ranks).
        self.paired = [g.heads for g in self.k_groups] == [g.heads for g in self.v_groups]
        self._flat: dict[int, tuple[Any, ...]] = {}

    def flat(self, bsz: int) -> tuple[list[torch.Tensor | None], torch.Tensor | None, list[torch.Tensor | None], torch.Tensor | None]:
        """For ``[batch·kv_heads]`` views: each key group's rows and the inverse permutation of
        their concatenation, then the same for the value groups (``None``: every head, in order)."""
        if bsz not in self._flat:
            n = self.mu_k.shape[0]
            base = torch.arange(bsz, device=self.mu_k.device)[:, None] * n

            def rows(groups: list[_Group]) -> tuple[list[torch.Tensor | None], torch.Tensor | None]:
                if len(groups) == 1 and groups[0].index is None:
                    return [None], None
                index = [(base + g.index[None, :]).flatten() for g in groups]
                return index, torch.cat(index).argsort()

            self._flat[bsz] = (*rows(self.k_groups), *rows(self.v_groups))
        return self._flat[bsz]

    def nbytes(self) -> int:
        return tensor_bytes(self.mu_k, self.mu_v, *[g.proj for g in self.k_groups + self.v_groups])


class ProjectedLayer(KVLayer):
    """A full-attention layer storing every token as per-head low-rank projections."""

    #: Devices on which ``read_mode="latent"`` reads through the fused kernels.
    fused_devices: tuple[str, ...] = ("cuda", "cpu")
    #: On CPU, eagerly, the fewest torch threads with which the fused read runs; a decode step reading
    #: at most 2 MiB of latents (:func:`compresskv.core.ops.serial_read`) runs the explicit path on
    #: one thread instead. With one thread the explicit path's two GEMMs measured 15-25% faster than
    #: the CPU flash kernel at rank 16 and on par at rank 32 (2k-16k tokens, batch 1-8); with two, a
    #: small decode read's GEMMs and softmax each wake the thread pool (:mod:`compresskv.core.ops`),
    #: and on one thread the explicit read beat the fused one (PCA@0.5, 2 threads, A/B in one
    #: process: 1.045x DynamicCache against 0.990x at 1k tokens, 1.16x against 1.14x at 4k, even at
    #: 8k; ``benchmarks/results/decode_pca_serial.md``).
    fused_cpu_threads: int = 2
    storage = ("k_latent", "v_latent", "sink_index", "sink_k", "sink_v")

    def __init__(self, cache: "MatryoshkaKVCache", layer_idx: int) -> None:
        super().__init__()
        self.cache_ref = weakref.ref(cache)
        self.layer_idx = layer_idx
        self.read_mode = cache.read_mode
        self.ranks_k = [int(r) for r in cache.ranks_k[layer_idx]]
        self.ranks_v = [int(r) for r in cache.ranks_v[layer_idx]]
        self.factors: LayerFactors | None = None
        self.k_latent: list[torch.Tensor] = []
        self.v_latent: list[torch.Tensor] = []
        self._new: tuple[torch.Tensor, ...] | None = None  # this call's keys and values, as given and centred
        self._plain_module = 0  # id() of the attention module checked to have no sinks and no soft-capping
        # Optional full-precision copies of each row's first real tokens (attention sinks).
        self.sink_tokens = cache.sink_tokens
        self.sink_index: torch.Tensor | None = None  # [batch, n] positions in the stored sequence
        self.sink_k: torch.Tensor | None = None  # [batch, kv_heads, n, d]
        self.sink_v: torch.Tensor | None = None

    # -- storage -------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        cache = self.cache_ref()
        self.factors = LayerFactors(cache.projections, self.layer_idx, self.ranks_k, self.ranks_v, self.dtype, self.device)
        bsz = key_states.shape[0]
        self.factors.flat(bsz)  # built here, eagerly: never first inside a compiled decode step
        self.k_latent = [key_states.new_empty(bsz, len(g.heads), 0, g.rank) for g in self.factors.k_groups]
        self.v_latent = [value_states.new_empty(bsz, len(g.heads), 0, g.rank) for g in self.factors.v_groups]
        self.is_initialized = True

    @staticmethod
    def _project(centred: torch.Tensor, groups: list[_Group]) -> list[torch.Tensor]:
        return [heads_matmul(_select(centred, g.index), g.proj) for g in groups]

    @staticmethod
    def _reconstruct(latent: list[torch.Tensor], mu: torch.Tensor, groups: list[_Group], inverse: torch.Tensor | None) -> torch.Tensor:
        parts = [torch.matmul(z, g.proj_t) for z, g in zip(latent, groups)]
        return _assemble(parts, inverse) + mu[None, :, None, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold the new tokens for this call's attention (they are stored, projected, right after
        it) and return what the attention reads: the new tokens only in ``latent`` modes (the
        stored ones are read in the projected space by :meth:`attend`), the reconstructed stored
        tokens followed by the new ones in ``model`` mode."""
        if self.expected is not None and (key_states.shape[1] != self.expected[1] or key_states.shape[-1] != self.expected[2]):
            raise ValueError(
                f"compresskv: this cache was built for a model with {self.expected[1]} KV heads of dim "
                f"{self.expected[2]}, but got keys of shape {tuple(key_states.shape)}; create one cache per model."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.stored_before = self.stored()  # static: the buffers' slots, the same every step
        if not self.static:  # (static: seen follows the fill, see compresskv.core.decode)
            self.seen += key_states.shape[-2]
        # Centred once: stored projected (after_attention), and read relative to the means (attend).
        self._new = (key_states, value_states, *self.centre(key_states, value_states))
        keys, values = key_states, value_states
        if self.read_mode == "model" and self.stored_before > 0:
            f = self.factors
            old_k = self._with_sinks(self._reconstruct(self.k_latent, f.mu_k, f.k_groups, f.k_inverse), self.sink_k)
            old_v = self._with_sinks(self._reconstruct(self.v_latent, f.mu_v, f.v_groups, f.v_inverse), self.sink_v)
            keys = torch.cat([old_k, key_states], dim=-2)
            values = torch.cat([old_v, value_states], dim=-2)
        self.mark_pending()
        return keys, values

    def after_attention(self, call: AttentionCall) -> None:
        """Store this call's tokens, projected (unless :meth:`attend` did), then record their
        validity (base class)."""
        if self._new is not None:
            self._store_new(call)
        super().after_attention(call)

    def _store_new(self, call: AttentionCall) -> None:
        keys, values, centred_k, centred_v = self._new
        self._new = None
        if self.stored() == 0 and self.sink_tokens:
            pad = call.pad2d[:, -keys.shape[-2]:] if call.pad2d is not None else None
            self._keep_sinks(keys, values, pad)
        self._store(centred_k, centred_v)

    def _read_then_store(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The explicit read, then the new tokens stored: together in :meth:`attend`'s one-thread
        region for a small decode step (the store's products then need no written-out form to keep
        a thread pool asleep)."""
        out = self.projected_attention(call)
        self._store_new(call)
        return out

    def _keep_sinks(self, keys: torch.Tensor, values: torch.Tensor, pad: torch.Tensor | None) -> None:
        """Keep full-precision copies of each row's first ``sink_tokens`` real tokens of the prefill."""
        bsz, n_kv, seq, dim = keys.shape
        n = min(self.sink_tokens, seq)
        if pad is None:
            index = torch.arange(n, device=keys.device).expand(bsz, n)
        else:  # real tokens first, in order; a row with fewer real tokens points at padding (masked)
            index = torch.sort((pad == 0).to(torch.int8), dim=-1, stable=True).indices[:, :n]
        gather = index[:, None, :, None].expand(bsz, n_kv, n, dim)
        self.sink_index = index.contiguous()
        self.sink_k = keys.gather(2, gather).contiguous()
        self.sink_v = values.gather(2, gather).contiguous()

    def centre(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k − μ_k, v − μ_v)``: what is projected and stored."""
        return keys - self.factors.mu_k4, values - self.factors.mu_v4

    def _store(self, centred_k: torch.Tensor, centred_v: torch.Tensor) -> None:
        f = self.factors
        new_k = self._project(centred_k, f.k_groups)
        new_v = self._project(centred_v, f.v_groups)
        if self.static:
            self.write_static(*new_k, *new_v)
        elif self.prefilled:  # decode: written in place into room (compresskv.core.decode)
            self.k_latent = [self.write_in_room(old, new, ("k_latent", i)) for i, (old, new) in enumerate(zip(self.k_latent, new_k))]
            self.v_latent = [self.write_in_room(old, new, ("v_latent", i)) for i, (old, new) in enumerate(zip(self.v_latent, new_v))]
        else:
            self.k_latent = [torch.cat([old, new], dim=-2) for old, new in zip(self.k_latent, new_k)]
            self.v_latent = [torch.cat([old, new], dim=-2) for old, new in zip(self.v_latent, new_v)]

    def static_keys(self) -> list[Any]:
        return [("k_latent", i) for i in range(len(self.k_latent))] + [("v_latent", i) for i in range(len(self.v_latent))]

    def keep(self, index: torch.Tensor) -> None:  # pragma: no cover - no eviction here
        raise RuntimeError("compresskv: a projected cache keeps every token; it does not evict.")

    # -- attention ------------------------------------------------------------------------------
    def attend(self, call: AttentionCall, fn: Any) -> tuple[torch.Tensor, Any]:
        if self.read_mode == "model" or self.stored_before == 0:
            return super().attend(call, fn)
        module = call.module
        # asked once per module eagerly (two getattr were ~4 µs a layer per step); compiled, at every
        # trace (free there, and no Python state may change within a compiled step)
        compiling = torch.compiler.is_compiling()
        if compiling or id(module) != self._plain_module:
            if getattr(module, "sinks", None) is not None or getattr(module.config, "attn_logit_softcapping", None):
                raise ValueError(
                    f"compresskv: {type(module).__name__} uses attention sinks or logit soft-capping, which the "
                    "projected-space attention does not implement; use read_mode='model'."
                )
            if not compiling:
                self._plain_module = id(module)
        # eager attention returns the weights (output_attentions), which only the explicit path forms
        q_len, device, read_bytes = call.query.shape[-2], call.query.device, self.latent_nbytes()
        if (self.read_mode == "latent" and self.sink_k is None and self.factors.paired and call.base != "eager"
                and self._fused_on(device, q_len, read_bytes)):
            out = self.projected_attention_sdpa(call)
            if out is not None:
                return out
        return serial_when_small(q_len, read_bytes, device, self._read_then_store, call)

    def _fused_on(self, device: torch.device, q_len: int, read_bytes: int) -> bool:
        if device.type not in self.fused_devices:
            return False
        if torch.compiler.is_compiling():
            # Compiled on CPU the fused read beat inductor's explicit path at 1 and 2 threads, 1k
            # and 4k tokens (PCA@0.5 at 1k, 1 thread: 1.24x DynamicCache against 1.13x; same
            # tokens; benchmarks/results/decode_pca_compiled.md against decode.md). On CUDA the
            # kernel choice (SDPAParams) does not trace, so compiled reads stay explicit there.
            return device.type == "cpu"
        if device.type != "cpu":
            return True
        # Eagerly on CPU a decode step's small read runs the explicit path on one thread (see
        # fused_cpu_threads); the fused kernel takes larger reads where there are threads for it.
        return torch.get_num_threads() >= self.fused_cpu_threads and not serial_read(q_len, read_bytes, device)

    def _grouped_rows(self, call: AttentionCall) -> torch.Tensor:
        """The query, unscaled, as ``[batch·kv_heads, rows, d]``: query head h·G+g → KV head h, row
        g·q_len+i (``G`` query heads per KV head)."""
        bsz, n_q, q_len, dim = call.query.shape
        n_kv = self.factors.mu_k.shape[0]
        return call.query.reshape(bsz * n_kv, n_q // n_kv * q_len, dim)

    def _mask_new(self, logits: torch.Tensor, call: AttentionCall, groups: int, start: int = 0) -> None:
        """Apply the causal and padding masks, in place, to fp32 logits ``[batch, kv_heads, rows,
        start + q_len]`` whose columns from ``start`` on are the grouped queries' on this call's own
        (new) keys."""
        q_len = logits.shape[-1] - start
        pad_new = call.new_valid  # [batch, q_len], None when all real (checked once per forward)
        if q_len > 1 or pad_new is not None:
            logits = logits[..., start:]
            allowed = torch.ones(q_len, q_len, dtype=torch.bool, device=logits.device).tril().repeat(groups, 1)[None, None]
            if pad_new is not None:
                allowed = allowed & pad_new[:, None, None, :]
            logits.masked_fill_(~allowed, torch.finfo(logits.dtype).min)

    def _finish(self, out: torch.Tensor, call: AttentionCall) -> torch.Tensor:
        """``[batch, kv_heads, rows, d]`` (or its ``[batch·kv_heads, rows, d]`` view) → the attention
        output ``[batch, q_len, q_heads, d]`` in the query's dtype."""
        bsz, n_q, q_len, dim = call.query.shape
        out = _as(out, call.query.dtype)
        if q_len == 1:  # [batch, kv_heads, G, d] is [batch, 1, q_heads, d] (head h·G+g): a view
            return out.reshape(bsz, 1, n_q, dim)  # (eagerly; inductor may lay the sum out otherwise)
        return out.reshape(bsz, n_q, q_len, dim).transpose(1, 2).contiguous()

    def projected_attention_sdpa(self, call: AttentionCall) -> tuple[torch.Tensor, None] | None:
        """:meth:`projected_attention` in fused kernels, merged by log-sum-exp (see the module notes);
        ``None`` when no fused kernel takes the shapes (the caller then runs the explicit path).

        With ``q`` scaled, per group of KV heads ``O, L = attn(q·U_k, k′, v′, bias)`` over the stored
        tokens, and the new tokens' logits ``s = q·(k_new − μ_k)`` (both relative to ``q·μ_k``):
        ``out = μ_v + (e^{L}·O·U_vᵀ + Σ e^{s}·(v_new − μ_v)) / (e^{L} + Σ e^{s})``.
        """
        f = self.factors
        bsz, n_q, q_len, dim = call.query.shape
        n_kv = f.mu_k.shape[0]
        groups = n_q // n_kv
        qs = (self._grouped_rows(call) * call.scaling).view(bsz, n_kv, groups * q_len, dim)
        stored = self.stored_before
        bias = None
        if self.valid is not None:
            # Allocated 8-aligned along the tokens so the memory-efficient kernel reads it in place.
            width = (stored + 7) // 8 * 8
            bias = qs.new_zeros(bsz, n_kv, 1, width)
            bias[..., :stored].masked_fill_(~self.valid[:, :, None, :stored], torch.finfo(qs.dtype).min)
        parts, lses = [], []
        for kg, vg, zk, zv in zip(f.k_groups, f.v_groups, self.k_latent, self.v_latent):
            group_bias = None if bias is None else _select(bias, kg.index)[..., :stored]
            found = attention_with_lse(heads_matmul(_select(qs, kg.index), kg.proj), zk, zv, group_bias, 1.0)
            if found is None:
                return None
            out, lse = found
            parts.append(heads_matmul(out, vg.proj_t))
            lses.append(lse)
        old = _assemble(parts, f.v_inverse)  # [b, kv, rows, d]; v_inverse == k_inverse (paired)
        lse_old = _assemble(lses, f.k_inverse)  # [b, kv, rows]
        # the new tokens' logits, centred: q·(k − μ_k), relative to q·μ_k like the stored ones
        new_logits = heads_matmul(qs, self._new[2].mT).float()
        self._mask_new(new_logits, call, groups)
        out = merge_softmax(old, lse_old, new_logits, self._new[3]) + f.mu_v4
        return self._finish(out, call), None

    def projected_attention(self, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over the stored latents (projected space) and the new full-precision tokens:
        the explicit reference (logits, fp32 softmax, weighted latents).

        Returns ``([batch, q_len, q_heads, d], weights)`` like transformers' attention functions:
        under ``eager`` attention (which returns them, for ``output_attentions=True``) the softmax
        weights ``[batch, q_heads, q_len, stored + q_len]``, else ``None``.

        Per step the work over the stored tokens is what counts, so nothing is added to their
        logits: the scaling is in their products (:func:`compresskv.core.ops.scaled_product`), and
        every logit is taken relative to ``q·μ_k`` (the new tokens' keys are centred instead); the
        values' mean goes in with the new tokens, as
        ``Σ p_old·μ_v + Σ p_new·v_new = μ_v + Σ p_new·(v_new − μ_v)``. It runs on
        ``[batch·kv_heads, rows, ·]`` views, one ``bmm`` per product (see
        :func:`compresskv.core.ops.heads_matmul`); a decode step pays every dispatch and every line of
        Python here per layer, so the one-group case (uniform ranks) takes no selection or assembly.
        """
        f = self.factors
        bsz, n_q, q_len, dim = call.query.shape
        n_kv = f.mu_k.shape[0]
        groups = n_q // n_kv
        rows, stored, scaling = groups * q_len, self.stored_before, call.scaling
        k_rows, k_inverse, v_rows, v_inverse = f.flat(bsz)
        mm = product_for(call.query)
        q = self._grouped_rows(call)  # unscaled: the scaling goes into the logits' products (scaled_product)
        _, _, centred_k, centred_v = self._new
        old = [scaled_product(mm(_select(q, i, 0), per_batch(g.proj, bsz)), z.flatten(0, 1).mT, scaling, mm)
               for g, i, z in zip(f.k_groups, k_rows, self.k_latent)]
        new_logits = scaled_product(q, centred_k.flatten(0, 1).mT, scaling, mm)
        logits = _as(torch.cat([_assemble(old, k_inverse, 0), new_logits], dim=-1), torch.float32)
        sink_at = None
        if q_len > 1 or call.new_valid is not None or self.sink_k is not None or self.valid is not None:
            grid = logits.view(bsz, n_kv, rows, stored + q_len)  # (a decode step of real tokens skips it)
            self._mask_new(grid, call, groups, stored)
            if self.sink_k is not None:  # the sink tokens' logits at full precision, relative alike
                sink_at = self.sink_index[:, None, None, :].expand(bsz, n_kv, rows, -1)
                sink = torch.matmul(q.view(bsz, n_kv, rows, dim) * scaling, (self.sink_k - f.mu_k4).mT).float()
                grid[..., :stored].scatter_(-1, sink_at, sink)
            if self.valid is not None:  # in place, broadcast over the rows: no [.., rows, stored] boolean built
                grid[..., :stored].masked_fill_(~self.valid[:, :, None, :stored], torch.finfo(grid.dtype).min)
        probs = _as(small_softmax(logits), call.value.dtype)  # [batch·kv_heads, rows, stored + q_len]
        p_old, p_new = probs[..., :stored], probs[..., stored:]

        out = add_product(per_batch(f.mu_v3, bsz), p_new, centred_v.flatten(0, 1), mm)  # μ_v + Σ p_new·(v_new − μ_v)
        read = [mm(_select(p_old, i, 0), z.flatten(0, 1)) for i, z in zip(v_rows, self.v_latent)]
        if v_inverse is None and len(read) == 1:
            out = add_product(out, read[0], per_batch(f.v_groups[0].proj_t, bsz), mm)
        else:
            out = out + _assemble([mm(x, per_batch(g.proj_t, bsz)) for x, g in zip(read, f.v_groups)], v_inverse, 0)
        if sink_at is not None:  # their values at full precision: add what the projection lost
            error = self.sink_v - self._sink_reconstruction("v")
            sink_probs = probs.view(bsz, n_kv, rows, -1)[..., :stored].gather(-1, sink_at)
            out = out + torch.matmul(sink_probs, error).flatten(0, 1)
        weights = probs.view(bsz, n_kv, groups, q_len, -1).reshape(bsz, n_q, q_len, -1) if call.base == "eager" else None
        return self._finish(out, call), weights

    def _sink_reconstruction(self, name: str) -> torch.Tensor:
        """What the stored latents give back for the sink tokens, ``[batch, kv_heads, n, d]``."""
        f = self.factors
        latent, groups, inverse, mu = ((self.k_latent, f.k_groups, f.k_inverse, f.mu_k) if name == "k"
                                       else (self.v_latent, f.v_groups, f.v_inverse, f.mu_v))
        n = self.sink_index.shape[-1]
        picked = [z.gather(2, self.sink_index[:, None, :, None].expand(z.shape[0], z.shape[1], n, z.shape[-1]))
                  for z in latent]
        return self._reconstruct(picked, mu, groups, inverse)

    def _with_sinks(self, full: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
        """``full`` (reconstructed stored tokens) with the sink tokens' exact keys/values put back."""
        if sink is None:
            return full
        index = self.sink_index[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[-1])
        return full.scatter(2, index, sink)

    # -- what transformers and stats ask --------------------------------------------------------
    def stored(self) -> int:
        return int(self.k_latent[0].shape[-2]) if self.is_initialized and self.k_latent else 0

    def held_nbytes(self) -> int:
        """The projection columns and means this layer keeps for reading."""
        return self.factors.nbytes() if self.factors is not None else 0

    def latent_nbytes(self) -> int:
        return tensor_bytes(*self.k_latent, *self.v_latent)

    def reset(self) -> None:
        super().reset()
        self.factors = None
        self._new = None
