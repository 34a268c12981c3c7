"""xKV (arXiv 2503.18893) and its single-layer SVD baseline, storing the compressed form for real.

The compressed full-attention layers are split into groups of ``group_size`` adjacent layers. When
the *last* layer of a group has run its prefill attention, the group's keys are concatenated along
features (``[T, G·H_kv·d]`` per batch row, keys un-rotated to pre-RoPE by default) and factorised by
a truncated fp32 SVD of rank ``r_k``; values likewise with ``r_v``. The group keeps the shared token
latent ``U·√S`` (``[batch, T, r]``) and each layer its own factor ``√S·Vᵀ`` (``[batch, r, H_kv·d]``);
the layers' full K/V are dropped. Until then the earlier layers of the group keep their full K/V
(they are needed for the SVD). Tokens decoded afterwards are appended uncompressed.
``group_size=1`` is the single-layer SVD baseline (:class:`SVDCache`).

Reading: values are never rebuilt: ``softmax · V = (softmax · latent) · factor``. Post-RoPE keys are
not rebuilt either: ``q · Kᵀ = (q · factorᵀ) · latentᵀ``. Pre-RoPE keys must be rotated at their own
positions, which does not commute with the factorisation, so each layer rebuilds its keys once per
forward, in blocks of :attr:`XKVCache.read_chunk` tokens (transient), re-rotates them with the
model's rotary embedding, and takes the logits block by block. Off the fused kernel (the CPU), fp32/fp64
keys are rebuilt with the factor's columns in pair order and rotated as complex numbers (one
product by ``cos + i·sin``), and the prefix's RoPE table is computed once per forward, shared by
the layers and dropped after the last one (a transient, not held between steps). Whichever of the latent and the
rebuilt form costs fewer multiply-adds is used (``read_mode="auto"``; :func:`latent_is_cheaper`),
or on CUDA the fused kernel (:mod:`compresskv.kernels.xkv_decode`). With ``profile=True`` the costs
of every read are kept and reported by :meth:`XKVCache.stats`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..core.attention import AttentionCall
from ..core.cache import KVLayer
from ..core.facts import mla_dims, model_dims, refuse_mla, text_config
from ..core.rope import RotaryTable
from ..core.storage import tensor_bytes
from ..kernels.xkv_decode import MAX_ROWS, PrefixRope, merge_with_tail, triton_usable, xkv_decode
from .factors import KEYS_MODES, SVD_SOLVERS, KeysMode, _is_int, _is_number, ranks_for_ratio, truncated_factors
from .group import ReadCost, _Group, _GroupedCache, _PrefixLayer
from .keys import PAIRED_DTYPES, ROPE_HALVES, PrefixKeys, pair_order

#: the ``read_mode`` values of xKV/SVD/MiniCache (see :data:`compresskv.core.readmode.READ_MODES`)
READ_MODES = ("auto", "latent", "rebuild", "model", "fused")
#: query rows per KV head (GQA group × new tokens) up to which ``read_mode="auto"`` uses the fused
#: kernel on CUDA: the rows one kernel launch takes (above it, a long chunk of new tokens, the
#: kernel would re-read the prefix once per launch).
FUSED_AUTO_MAX_ROWS = MAX_ROWS
def latent_is_cheaper(rows: int, rank: int, n_kv: int, dim: int, length: int) -> bool:
    """``read_mode="auto"``'s choice off the fused kernel: whether reading a layer's prefix of
    ``length`` tokens in latent space (``rows`` query rows per KV head against the rank-``rank``
    latent and the factor) takes no more multiply-adds than rebuilding the ``[length, n_kv·dim]``
    block and reading it."""
    latent = n_kv * rows * rank * (length + dim)
    rebuild = length * rank * n_kv * dim + n_kv * rows * length * dim
    return latent <= rebuild


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
        dim_v = first.values.shape[-1]  # (an MLA latent's shared RoPE key is narrower than the latent)
        rank_k, rank_v = cache.group_ranks(len(self.layers), length, n_kv, dim, dim_v)
        self.rank_k, self.rank_v = rank_k, rank_v
        # Each row gets the ranks it would get alone (from its own real tokens); the storage has
        # the largest, and a row's columns beyond its own ranks are zero.
        row_ranks = None
        if real is not None:
            lengths = real.sum(dim=-1).tolist()
            row_ranks = torch.tensor([cache.group_ranks(len(self.layers), int(n), n_kv, dim, dim_v) for n in lengths],
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
        for which, (kind, rank) in enumerate((("k", rank_k), ("v", rank_v))):
            width = n_kv * (dim if kind == "k" else dim_v)
            cols = []
            for layer in self.layers:
                x = (layer.keys if kind == "k" else layer.values).to(device).float()
                if kind == "k" and cos is not None:
                    x = cache.rope.unrotate(x, cos, sin)
                cols.append(x.transpose(1, 2).reshape(bsz, length, width))
            matrix = torch.cat(cols, dim=-1)
            if real is not None:
                matrix = matrix * real[..., None]
            latent, factor = cache.factorize(matrix, rank, cache.svd_solver)
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


class XKVLayer(PrefixKeys, _PrefixLayer):
    """One layer of an xKV group: its own key/value factors ``[batch, r, kv_heads·head_dim]``."""

    group: _XKVGroup
    storage = ("keys", "values", "factor_k", "factor_v")

    def __init__(self, cache: "XKVCache", group: _XKVGroup) -> None:
        super().__init__(cache, group)
        self.factor_k: torch.Tensor | None = None
        self.factor_v: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`_PrefixLayer.update`; for an MLA model the rebuilt prefix comes first: the model
        expands each head's keys and values from what the cache returns, after the cache, so the
        prefix cannot be read in latent space by this layer (see :meth:`attend`)."""
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.cache.mla is not None and self.prefix_len:
            prefix_k, prefix_v = self.rebuild_prefix()
            keys, values = torch.cat([prefix_k, keys], dim=-2), torch.cat([prefix_v, values], dim=-2)
        return keys, values

    def attend(self, call: AttentionCall, fn: Any) -> tuple[torch.Tensor, Any]:
        if self.cache.mla is not None:  # the keys and values the model passed hold the prefix already
            return KVLayer.attend(self, call, fn)
        return super().attend(call, fn)

    def _latent(self, kind: str) -> torch.Tensor:
        """The group's shared latent on this layer's device."""
        latent = self.group.latent_k if kind == "k" else self.group.latent_v
        factor = self.factor_k if kind == "k" else self.factor_v
        return self.group.on(latent, factor.device)

    def _use_latent(self, rows: int, rank: int, n_kv: int, dim: int) -> bool:
        mode = self.cache.read_mode
        if mode in ("latent", "rebuild"):
            return mode == "latent"
        return latent_is_cheaper(rows, rank, n_kv, dim, self.prefix_len)

    def _values_block(self, start: int, end: int, cost: ReadCost | None) -> torch.Tensor:
        latent, factor = self._latent("v"), self.factor_v
        bsz, rank = latent.shape[0], latent.shape[-1]
        n_kv, dim = self.values.shape[1], self.values.shape[-1]
        block = (latent[:, start:end] @ factor).view(bsz, end - start, n_kv, dim)
        if cost is not None:
            cost.flops += bsz * (end - start) * rank * n_kv * dim
            cost.rebuilt_bytes += tensor_bytes(block)
        return block.transpose(1, 2)

    def prefix_logits(self, qg: torch.Tensor, cost: ReadCost | None = None) -> torch.Tensor:
        latent, factor = self._latent("k"), self.factor_k
        bsz, length, rank = latent.shape
        _, n_kv, rows, dim = qg.shape
        if self.cache.keys_mode == "post_rope" and self._use_latent(rows, rank, n_kv, dim):
            projected = qg @ factor.view(bsz, rank, n_kv, dim).permute(0, 2, 3, 1)
            logits = projected @ latent[:, None].transpose(-1, -2)
            if cost is not None:
                cost.flops += bsz * n_kv * rows * rank * (dim + length)
            return logits
        chunk = self.cache.read_chunk
        # Pre-RoPE keys in fp32/fp64: rotate them as complex numbers, the factor's columns and the
        # query's dimensions put in pair order (a logit is a dot product: the same in any order).
        paired = self.cache.keys_mode == "pre_rope" and latent.dtype in PAIRED_DTYPES and qg.dtype == latent.dtype
        if paired:
            factor_pairs = pair_order(factor, rank, n_kv, dim)
            qg = pair_order(qg, -1, n_kv, dim)
            turns = self._rope_turns(factor.device, latent.dtype)
        pieces = []
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            if paired:
                block = self._paired_keys_block(start, end, factor_pairs, turns, cost)
            else:
                block = self._keys_block(start, end, cost)
            pieces.append(qg @ block.transpose(-1, -2))
            if cost is not None:
                table = 0
                if paired:
                    table = tensor_bytes(turns)
                elif self.cache.keys_mode == "pre_rope":
                    table = tensor_bytes(*self._rope_halves(factor.device, block.dtype))
                cost.transient_bytes = max(cost.transient_bytes, 2 * tensor_bytes(block) + table)
                cost.flops += bsz * n_kv * rows * (end - start) * dim
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def prefix_output(self, probs: torch.Tensor, cost: ReadCost | None = None) -> torch.Tensor:
        latent, factor = self._latent("v"), self.factor_v
        bsz, length, rank = latent.shape
        _, n_kv, rows, _ = probs.shape
        dim = self.values.shape[-1]
        if self._use_latent(rows, rank, n_kv, dim):
            # One product for all heads' rows (the latent is shared by the heads): the latent is
            # read once, not once per KV head as a batched matmul over a broadcast latent would.
            mixed = (probs.reshape(bsz, n_kv * rows, length) @ latent).view(bsz, n_kv, rows, rank)
            if cost is not None:
                cost.flops += bsz * n_kv * rows * rank * (length + dim)
            return mixed @ factor.view(bsz, rank, n_kv, dim).transpose(1, 2)
        chunk = self.cache.read_chunk
        out = None
        for start in range(0, length, chunk):
            end = min(start + chunk, length)
            block = self._values_block(start, end, cost)
            part = probs[..., start:end] @ block
            if cost is not None:
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
            and n_q // call.key.shape[1] * q_len <= FUSED_AUTO_MAX_ROWS
            and triton_usable(self.group.latent_k)
        )

    def _fused_attention(self, call: AttentionCall, cost: ReadCost | None) -> tuple[torch.Tensor, Any] | None:
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
        info: dict[str, Any] | None = {} if cost is not None else None
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
        if cost is not None and info is not None:
            cost.flops += info["flops"]
            cost.transient_bytes = max(cost.transient_bytes, info["workspace_bytes"])
        out = out.reshape(bsz, n_q, q_len, dim).transpose(1, 2).contiguous()
        return out, None

    def _read(self, call: AttentionCall, fn: Any, cost: ReadCost | None) -> tuple[torch.Tensor, Any]:
        try:
            return super()._read(call, fn, cost)
        finally:
            if self.cache.last_prefix_layer() is self:  # the forward's last compressed layer
                self.cache.positions.forget(ROPE_HALVES)

    def rebuild_prefix(self, cost: ReadCost | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.prefix_len
        keys = self._keys_block(0, length, cost)
        values = self._values_block(0, length, cost)
        return keys, values


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
        keys: ``"pre_rope"`` (the default, as the paper: keys are un-rotated with the model's rotary
            embedding before the SVD and re-rotated on read) or ``"post_rope"`` (the default, and
            the only choice, for an MLA model: see below).
        remainder: what to do when ``group_size`` does not divide the compressed layers:
            ``"last_group"`` (default: the leftover layers form a smaller last group; explicit
            ranks are scaled to its size) or ``"error"`` (refuse, listing the sizes that divide).
        key_rank_fraction: with ``compression_ratio``, the share of ``r_k + r_v`` given to keys
            (default 0.4, the paper's 2:3; for an MLA model the latent's share of the widths).
        svd_solver: ``"svd"`` (``torch.linalg.svd`` in fp32, default) or ``"gram"`` (eigenvectors of
            the Gram matrix in fp64: faster for long prompts, same result up to rounding).
        read_mode: how the compressed prompt is read at decode (all give the same result):
            ``"auto"`` (default: the fused Triton kernel on CUDA when triton is installed and the
            attention is sdpa, else the cheaper of the latent and rebuilt forms), ``"fused"``
            (:func:`compresskv.kernels.xkv_decode`: keys rebuilt and rotated on chip, values read
            in latent space; the PyTorch reference off CUDA), ``"latent"``, ``"rebuild"``,
            ``"model"`` (rebuild K/V and call the model's own attention function).
        profile: account every read of the compressed prompt (bytes rebuilt, transient bytes,
            multiply-adds, host time, fused reads) in ``stats().last_read``/``total_read``. Default
            ``False``: a decode step then runs no timer and no accounting, and those stay zero.

    The SVD itself goes through :attr:`factorize` (:func:`truncated_factors` by default), which an
    instance may replace by a function of the same signature, e.g. one sharing factorisations
    between caches of one prompt (``benchmarks/xkv.py``).

    What is stored, per batch row: per group, the latents ``[T, r_k]`` and ``[T, r_v]``; per layer,
    the factors ``[r_k, kv_heads·head_dim]`` and ``[r_v, kv_heads·head_dim]``; tokens decoded later,
    uncompressed; for pre-RoPE keys the prefill positions (one int64 offset per row in the usual
    case); a validity mask per layer when the batch is padded. All are counted by :meth:`nbytes`.

    MLA models (DeepSeek-V2/V3, on transformers releases that cache the latent): the group's
    latents ``[T, kv_lora_rank]`` are factorised as the keys are (``rank_k``) and the shared RoPE
    keys ``[T, qk_rope_head_dim]`` as the values are (``rank_v``; leave it out to keep them at full
    rank), both post-RoPE (the latent has no RoPE). The model expands each head's keys and values
    after the cache, so a layer returns its rebuilt prefix to the model at every forward instead of
    reading it in latent space.
    """

    method = "xkv"
    supports_mla = True
    #: ``factorize(x, rank, svd_solver) -> (latent, factor)``: the truncated factorisation of a
    #: group's ``[batch, T, F]`` fp32 matrix (see :func:`truncated_factors`, the default).
    factorize = staticmethod(truncated_factors)

    def __init__(
        self,
        model: torch.nn.Module,
        group_size: int = 4,
        rank_k: int | None = None,
        rank_v: int | None = None,
        compression_ratio: float | None = None,
        start_layer: int = 0,
        end_layer: int = -1,
        keys: KeysMode | None = None,
        remainder: str = "last_group",
        key_rank_fraction: float | None = None,
        svd_solver: str = "svd",
        read_mode: str = "auto",
        profile: bool = False,
    ) -> None:
        owner = self._check_reading(model, read_mode, READ_MODES, profile)
        dims, mla = model_dims(model), mla_dims(model)
        n_kv, head_dim, value_dim = dims["kv_heads"], dims["head_dim"], dims["head_dim"]
        if mla is not None:  # the latent is stored as "keys", the shared RoPE key as "values"
            if not mla["latent"]:
                refuse_mla(model, owner, "this transformers release caches each head's keys and values for it, "
                           "partly rotated by RoPE, where xKV factorises the latent newer releases cache")
            n_kv, head_dim, value_dim = 1, mla["kv_lora_rank"], mla["rope_dim"]
            if keys == "pre_rope":
                raise ValueError(f"{owner}: keys='pre_rope' does not apply to an MLA model: its latent carries no RoPE "
                                 "(the RoPE key is stored apart); leave keys unset (post-RoPE, the MLA default).")
        if keys is None:
            keys = "post_rope" if mla is not None else "pre_rope"
        if key_rank_fraction is None:  # MLA: ranks in proportion to the widths (the latent is the wider)
            key_rank_fraction = 0.4 if mla is None else head_dim / (head_dim + value_dim)
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
        if ranks_given and (rank_k is None or (rank_v is None and mla is None)):
            raise ValueError(
                f"{owner}: give both rank_k= and rank_v= (the paper uses r_v = 1.5 r_k), got rank_k={rank_k!r}, "
                f"rank_v={rank_v!r}; or give compression_ratio= instead."
            )
        if ranks_given:  # (MLA: rank_v, of the RoPE keys, may be left out: then they are kept at full rank)
            for name, rank, dim in (("rank_k", rank_k, head_dim), ("rank_v", rank_v, value_dim)):
                width = group_size * n_kv * dim
                if rank is not None and (not _is_int(rank) or not 1 <= rank <= width):
                    raise ValueError(
                        f"{owner}: {name} must be an int in [1, {width}]: a group of {group_size} layer(s) x "
                        f"{n_kv} KV heads x {dim} dims has {width} columns, so its rank is at most "
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

    def group_ranks(self, group_len: int, tokens: int, n_kv: int, head_dim: int,
                    value_dim: int | None = None) -> tuple[int, int]:
        """(r_k, r_v) of a group of ``group_len`` layers for a prefill of ``tokens`` tokens
        (``value_dim``: the values' width, when not ``head_dim``)."""
        d_v = head_dim if value_dim is None else value_dim
        if self.compression_ratio is not None:
            return ranks_for_ratio(self.compression_ratio, tokens, group_len, n_kv, head_dim, self.key_rank_fraction, d_v)
        assert self.rank_k is not None
        rank_k, rank_v = self.rank_k, self.rank_v if self.rank_v is not None else self.group_size * n_kv * d_v
        if group_len != self.group_size:  # a smaller last group (remainder="last_group")
            rank_k = max(1, round(rank_k * group_len / self.group_size))
            rank_v = max(1, round(rank_v * group_len / self.group_size))
        return min(rank_k, tokens, group_len * n_kv * head_dim), min(rank_v, tokens, group_len * n_kv * d_v)

    def prefix_rope(self, device: Any = None) -> PrefixRope | None:
        """The RoPE that re-rotates the stored pre-RoPE keys (``None`` for post-RoPE keys), with its
        tensors on ``device`` when given. Built once per device and compression: the positions
        drop it when they change (a new prefill, reset, batch operations)."""
        if self.rope is None or not self.positions.is_set:
            return None
        rope, pos = self.rope, self.positions

        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None and device is not None else t

        def make() -> PrefixRope:
            return PrefixRope(to(rope.inv_freq()), to(pos.offsets), to(pos.table), rope.scaling)

        return pos.derived(("prefix_rope", device), make)

    def last_prefix_layer(self) -> KVLayer | None:
        """The last layer (in model order) whose prompt is compressed: the last a forward reads."""
        for layer in reversed(self.layers):
            if isinstance(layer, _PrefixLayer):
                return layer
        return None

    def _prefilled(self, layer: _PrefixLayer, call: AttentionCall) -> None:
        if self.keys_mode == "pre_rope" and not self.positions.is_set:
            bsz, _, length, _ = layer.keys.shape
            real = call.pad2d[:, -length:].to(torch.bool) if call.pad2d is not None else None
            self.positions.set(call.position_ids, real, bsz, length, layer.keys.device)

    def cache_held_nbytes(self) -> int:
        return self.rope.nbytes() if self.rope is not None else 0  # a snapshotted RoPE table

    def _bytes_by_kind(self) -> dict[str, int]:
        out = super()._bytes_by_kind()
        out["positions"] = self.positions.storage_nbytes()
        out["rope"] = self.rope.nbytes() if self.rope is not None else 0
        return out

    def _extra_stats(self) -> dict[str, Any]:
        return {"group_size": self.group_size, "svd_solver": self.svd_solver, "read_mode": self.read_mode,
                "compression_ratio": self.compression_ratio, "compresses": self.compresses}
