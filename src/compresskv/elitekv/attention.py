"""The EliteKV attention module: what a converted layer computes (see :mod:`.factorization` for the
weights it holds).

Attention. ``update(k_rope, latent)`` returns all stored tokens. Decoding (few queries, many
cached tokens) runs MLA-style with ``W_up`` absorbed: per query head the nope query is mapped into
the latent space (``q_nope · W_up,k``), logits are ``q_rope·k_ropeᵀ + q_abs·latentᵀ``, the context
``softmax · latent`` is mapped back with ``W_up,v``; nothing of size T × H_kv·d is ever built.
Prefill and training (many queries) reconstruct K and V from the latent and call the model's own
attention backend (eager, sdpa, flash), which is cheaper there and memory-efficient. ``read_mode``
``auto`` picks by a multiply-add count; ``latent`` (absorbed) / ``model`` (reconstructed) force one.

The absorbed attention runs in ``scaled_dot_product_attention`` (:meth:`EliteKVAttention._absorbed_sdpa`):
the latent is the key *and* the value of every query head (MQA-like, expanded as a view), the
query is ``q_abs``, and the RoPE'd dims' logits ``q_rope·k_ropeᵀ`` (per KV head) enter, scaled and
with the causal/padding mask, as SDPA's additive float mask; the ``q_nope·b_up,k`` term is the same
for every key of a query row, so softmax ignores it. The explicit matmul/softmax path
(:meth:`EliteKVAttention._absorbed`) is kept as the reference, and runs instead under ``eager``
attention (which returns the weights), on CUDA when no fused SDPA kernel accepts the shapes (e.g. a
``kv_dim`` not a multiple of 8 in fp16/bf16: SDPA would fall back to its math kernel), and when
forced with ``read_mode="latent_explicit"``.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import torch
from torch import nn

from .. import compat
from ..core.lse import fused_sdpa_ok
from ..core.readmode import check_read_mode
from ..core.rope import rotate_half
from .cache import EliteKVCache

#: how a converted layer reads its cache (``read_mode=`` of :func:`compresskv.elitekv.convert`; see
#: :data:`compresskv.core.readmode.READ_MODES`).
READ_MODES = ("auto", "latent", "latent_explicit", "model")
#: the old ``attention=`` values (and ``spec["attention"]`` of models converted before) → ``read_mode``
RENAMED_READ_MODES = {"absorb": "latent", "absorb_explicit": "latent_explicit", "reconstruct": "model"}


def spec_read_mode(spec: dict[str, Any]) -> str:
    """A converted model's read mode from its config entry: ``read_mode``, or the ``attention``
    key (old values mapped) that conversions before the rename wrote."""
    if "read_mode" in spec:
        return spec["read_mode"]
    old = spec.get("attention", "auto")
    return RENAMED_READ_MODES.get(old, old)


def additive_mask(mask: Any, bsz: int, q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Any transformers attention mask (eager float, sdpa bool, flash 2-D padding, ``None``, or
    compresskv's bundle) as an additive float mask broadcastable to ``[batch, heads, q, kv]``."""
    from ..core.attention import MaskBundle

    if isinstance(mask, MaskBundle):
        mask = mask.base_on(device)
    neg = torch.finfo(dtype).min
    causal = None
    if q_len > 1:
        qpos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
        causal = torch.arange(kv_len, device=device)[None, :] <= qpos
    if mask is None:
        if causal is None:
            return None
        return torch.where(causal, 0.0, neg).to(dtype)[None, None]
    if not isinstance(mask, torch.Tensor):
        raise ValueError(
            f"compresskv.elitekv: attention masks of type {type(mask).__name__} are not supported by the latent "
            "attention; use attn_implementation='sdpa' or 'eager'."
        )
    if mask.dim() == 2:  # flash-attention style padding mask [batch, kv]
        allowed = mask[:, None, None, :kv_len].to(device=device, dtype=torch.bool)
        if causal is not None:
            allowed = allowed & causal[None, None]
        return torch.where(allowed, 0.0, neg).to(dtype)
    mask = mask[..., :kv_len].to(device)
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, neg).to(dtype)
    return mask.to(dtype)


class EliteKVAttention(nn.Module):
    """A converted attention layer: RoPE on the chosen pairs, one joint K/V latent (see the module
    notes). Keeps ``config``, ``layer_idx``, ``scaling``, ``num_key_value_groups``, the forward
    signature and its ``(output, weights)`` return. Parameters: ``q_proj`` (rows permuted per head to
    [rope dims, nope dims]), ``k_rope_proj`` (hidden → H_kv·2r), ``kv_down`` (hidden → c),
    ``kv_up`` (c → H_kv·(d − 2r) nope keys, then H_kv·d values; carries the k/v biases), ``o_proj``."""

    def __init__(self, config: Any, layer_idx: int, spec: dict[str, Any], device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.num_heads, self.num_kv_heads = heads, kv_heads
        self.num_key_value_groups = heads // kv_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.is_causal = True
        self.rope_pairs, self.kv_dim = int(spec["rope_pairs"]), int(spec["kv_dim"])
        self.nope_dim = self.head_dim - 2 * self.rope_pairs
        self.pairs = tuple(tuple(int(p) for p in head) for head in spec["pairs"][layer_idx])
        self.read_mode = spec_read_mode(spec)
        self._eager_module = spec.get("eager_module")
        bias = spec["bias"]
        kw = {"device": device, "dtype": dtype}
        hidden, d = config.hidden_size, self.head_dim
        self.q_proj = nn.Linear(hidden, heads * d, bias=bias["q"], **kw)
        with warnings.catch_warnings():  # rope_pairs=0 (no RoPE dims kept) makes it empty, on purpose
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            self.k_rope_proj = nn.Linear(hidden, kv_heads * 2 * self.rope_pairs, bias=bias["k"], **kw)
        self.kv_down = nn.Linear(hidden, self.kv_dim, bias=False, **kw)
        self.kv_up = nn.Linear(self.kv_dim, kv_heads * (self.nope_dim + d), bias=bias["k"] or bias["v"], **kw)
        self.o_proj = nn.Linear(heads * d, hidden, bias=bias["o"], **kw)
        self._index: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fused: dict[tuple[Any, ...], bool] = {}  # does a fused SDPA kernel take the absorbed read

    def extra_repr(self) -> str:
        return f"rope_pairs={self.rope_pairs}, kv_dim={self.kv_dim}, read_mode={self.read_mode}"

    def _rope_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._index.get(device)
        if index is None:
            half = self.head_dim // 2
            kv = torch.tensor([list(p) + [i + half for i in p] for p in self.pairs], dtype=torch.long, device=device)
            kv = kv.view(self.num_kv_heads, 2 * self.rope_pairs)
            index = (kv, kv.repeat_interleave(self.num_key_value_groups, dim=0))
            self._index[device] = index
        return index

    def _eager(self) -> Any:
        module = sys.modules.get(self._eager_module or "")
        fn = getattr(module, "eager_attention_forward", None)
        if fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        return fn

    @property
    def attention_mode(self) -> str:
        """The old name of :attr:`read_mode` (setting it checks the value like ``read_mode=``, so an
        old value is refused naming the new one rather than silently ignored)."""
        return self.read_mode

    @attention_mode.setter
    def attention_mode(self, value: str) -> None:
        self.read_mode = check_read_mode(type(self).__name__, value, READ_MODES, RENAMED_READ_MODES)

    def choose_mode(self, q_len: int, kv_len: int) -> str:
        """``latent``, ``latent_explicit`` or ``model`` for ``q_len`` queries over ``kv_len``
        tokens (``auto``: ``latent`` or ``model``, the one with fewer multiply-adds)."""
        if self.read_mode != "auto":
            return self.read_mode
        hq, hkv, d, r2, nope, c = self.num_heads, self.num_kv_heads, self.head_dim, 2 * self.rope_pairs, self.nope_dim, self.kv_dim
        absorb = hq * q_len * c * (nope + d) + hq * q_len * kv_len * (r2 + 2 * c)
        rebuild = kv_len * c * hkv * (nope + d) + hq * q_len * kv_len * 2 * d
        return "latent" if absorb < rebuild else "model"

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache = compat.pop_cache(kwargs)  # `cache=` from transformers 5.24, `past_key_values=` before
        bsz, q_len, _ = hidden_states.shape
        d, r2 = self.head_dim, 2 * self.rope_pairs
        query = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, d).transpose(1, 2)
        k_rope = self.k_rope_proj(hidden_states).view(bsz, q_len, self.num_kv_heads, r2).transpose(1, 2)
        latent = self.kv_down(hidden_states).unsqueeze(1)  # [batch, 1, q_len, c]
        if r2:
            if position_embeddings is None:
                raise ValueError("compresskv.elitekv: the converted attention needs position_embeddings (cos, sin)")
            cos, sin = position_embeddings
            kv_idx, q_idx = self._rope_index(cos.device)
            ck, sk = cos[:, :, kv_idx].transpose(1, 2), sin[:, :, kv_idx].transpose(1, 2)
            cq, sq = cos[:, :, q_idx].transpose(1, 2), sin[:, :, q_idx].transpose(1, 2)
            k_rope = k_rope * ck + rotate_half(k_rope) * sk
            q_rope = query[..., :r2]
            query = torch.cat([q_rope * cq + rotate_half(q_rope) * sq, query[..., r2:]], dim=-1)
        if cache is not None:
            _check_cache(cache)
            k_rope, latent = cache.update(k_rope, latent, self.layer_idx)
        mode = self.choose_mode(q_len, latent.shape[-2])
        if mode == "latent" and not self._returns_weights():
            out, weights = self._absorbed_sdpa(query, k_rope, latent, attention_mask)
        elif mode in ("latent", "latent_explicit"):
            out, weights = self._absorbed(query, k_rope, latent, attention_mask)
        else:
            out, weights = self._reconstructed(query, k_rope, latent, attention_mask, **kwargs)
        out = out.reshape(bsz, q_len, -1).contiguous()
        return self.o_proj(out), weights

    def reconstruct_kv(self, k_rope: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full keys (``[rope dims, nope dims]`` per head) and values ``[batch, kv_heads, T, d]``
        from what the cache stores."""
        bsz, _, kv_len, _ = latent.shape
        n = self.num_kv_heads * self.nope_dim
        kv = self.kv_up(latent[:, 0])
        k_nope = kv[..., :n].view(bsz, kv_len, self.num_kv_heads, self.nope_dim).transpose(1, 2)
        value = kv[..., n:].view(bsz, kv_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return torch.cat([k_rope, k_nope], dim=-1), value

    def _reconstructed(self, query, k_rope, latent, attention_mask, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        key, value = self.reconstruct_kv(k_rope, latent)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager())
        kwargs.pop("sliding_window", None)
        return interface(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )

    def _returns_weights(self) -> bool:
        """Eager attention returns the attention weights, which only the explicit path computes."""
        return self.config._attn_implementation in ("eager", "compresskv_eager")

    def _absorbed_sdpa(
        self, query: torch.Tensor, k_rope: torch.Tensor, latent: torch.Tensor, attention_mask: Any,
        layout: str | None = None,
    ) -> tuple[torch.Tensor, None]:
        """The absorbed attention in ``scaled_dot_product_attention`` (see the module notes); falls
        back to :meth:`_absorbed` (the reference) where no fused kernel takes the shapes.

        ``query`` ``[b, hq, q, d]`` (rope dims first), ``k_rope`` ``[b, hkv, T, 2r]``, ``latent``
        ``[b, 1, T, c]``; returns ``([b, q, hq, d], None)``. ``layout``: ``"mqa"`` runs one SDPA head
        whose ``hq·q`` query rows share the latent (each latent row is read once: the faster layout
        on CPU, measured), ``"heads"`` runs ``hq`` heads over a stride-0 view of the latent (``b·hq``
        thread blocks instead of ``b``: the memory-efficient CUDA kernel parallelises over batch ×
        heads × query blocks, not over keys, and decoding has one query block); ``None``:
        ``heads`` on CUDA, ``mqa`` elsewhere.
        """
        bsz, hq, q_len, d = query.shape
        hkv, g, r2, nope, c = self.num_kv_heads, self.num_key_value_groups, 2 * self.rope_pairs, self.nope_dim, self.kv_dim
        kv_len = latent.shape[-2]
        n = hkv * nope
        if layout is None:
            layout = "heads" if query.device.type == "cuda" else "mqa"
        bias = additive_mask(attention_mask, bsz, q_len, kv_len, query.dtype, query.device)  # [b|1, 1, q, T]
        dropout = self.attention_dropout if self.training else 0.0
        # Whether a fused kernel takes the shapes depends on device, dtype, layout and mask only:
        # once known to be no, go straight to the reference without building SDPA's inputs.
        memo = (query.device, query.dtype, layout, bias is not None or r2 > 0, dropout > 0, torch.is_grad_enabled())
        if self._fused.get(memo) is False:
            return self._absorbed(query, k_rope, latent, attention_mask)
        w_up, b_up = self.kv_up.weight, self.kv_up.bias
        grouped = query.reshape(bsz, hkv, g * q_len, d)  # query head j = h·g + i belongs to KV head h
        q_latent = torch.matmul(grouped[..., r2:], w_up[:n].view(hkv, nope, c))  # [b, hkv, g·q, c]
        if r2:
            # The RoPE'd dims' logits, per KV head, as SDPA's additive mask; the scaling is applied to
            # the small query side rather than to the [b, hq, q, T] product.
            rope = torch.matmul(grouped[..., :r2] * self.scaling, k_rope.transpose(-1, -2))
            rope = rope.view(bsz, hq, q_len, kv_len)
            if bias is not None:
                rope = rope.add_(bias)
                if rope.dtype == torch.float16:  # finfo.min plus a negative logit overflows to -inf
                    rope = rope.clamp_(min=torch.finfo(rope.dtype).min)
            bias = rope
        if layout == "mqa":
            q_in, keys = q_latent.view(bsz, 1, hq * q_len, c), latent
            if bias is not None:
                bias = bias.expand(bsz, hq, q_len, kv_len).reshape(bsz, 1, hq * q_len, kv_len)
        else:
            # enable_gqa would say the same, but with a float mask some torch versions run it in the
            # math kernel, which repeats K/V: the stride-0 view keeps the fused kernels.
            q_in, keys = q_latent.view(bsz, hq, q_len, c), latent.expand(bsz, hq, kv_len, c)
        self._fused[memo] = fused_sdpa_ok(q_in, keys, keys, bias, dropout)
        if not self._fused[memo]:
            return self._absorbed(query, k_rope, latent, attention_mask)
        # q_nope·b_up,k (the reference adds it) is the same for every key of a row: softmax drops it.
        context = nn.functional.scaled_dot_product_attention(
            q_in, keys, keys, attn_mask=bias, dropout_p=dropout, scale=self.scaling)
        w_v = w_up[n:].view(hkv, d, c)
        out = torch.matmul(context.reshape(bsz, hkv, g * q_len, c), w_v.transpose(-1, -2))  # [b, hkv, g·q, d]
        if b_up is not None:
            out = out + b_up[n:].view(hkv, 1, d)
        return out.view(bsz, hq, q_len, d).transpose(1, 2), None

    def _absorbed(self, query, k_rope, latent, attention_mask):
        """The reference absorbed attention: explicit logits, fp32 softmax, weights returned under
        eager attention."""
        bsz, hq, q_len, d = query.shape
        hkv, g, r2, nope, c = self.num_kv_heads, self.num_key_value_groups, 2 * self.rope_pairs, self.nope_dim, self.kv_dim
        kv_len = latent.shape[-2]
        n = hkv * nope
        w_up, b_up = self.kv_up.weight, self.kv_up.bias
        w_k = w_up[:n].view(hkv, nope, c)
        w_v = w_up[n:].view(hkv, d, c)
        grouped = query.reshape(bsz, hkv, g * q_len, d)  # query head j = h·g + i belongs to KV head h
        q_nope = grouped[..., r2:]
        q_latent = torch.matmul(q_nope, w_k)  # [b, hkv, g·q, c]
        logits = torch.matmul(q_latent.reshape(bsz, 1, hkv * g * q_len, c), latent.transpose(-1, -2))
        logits = logits.view(bsz, hkv, g * q_len, kv_len)
        if r2:
            logits = logits + torch.matmul(grouped[..., :r2], k_rope.transpose(-1, -2))
        if b_up is not None and nope:
            logits = logits + torch.matmul(q_nope, b_up[:n].view(hkv, nope, 1))
        logits = (logits * self.scaling).view(bsz, hq, q_len, kv_len)
        mask = additive_mask(attention_mask, bsz, q_len, kv_len, logits.dtype, logits.device)
        if mask is not None:
            logits = logits + mask
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = nn.functional.dropout(probs, p=self.attention_dropout if self.training else 0.0, training=self.training)
        context = torch.matmul(probs.view(bsz, 1, hq * q_len, kv_len), latent)  # [b, 1, hq·q, c]
        out = torch.matmul(context.view(bsz, hkv, g * q_len, c), w_v.transpose(-1, -2))  # [b, hkv, g·q, d]
        if b_up is not None:
            out = out + b_up[n:].view(hkv, 1, d)
        out = out.view(bsz, hq, q_len, d).transpose(1, 2)
        return out, probs if self._returns_weights() else None


def _check_cache(cache: Any) -> None:
    from ..core.cache import CompressedCache

    if isinstance(cache, CompressedCache) and not isinstance(cache, EliteKVCache):
        raise ValueError(
            f"compresskv.elitekv: a converted model stores k_rope and a latent; it cannot use a "
            f"{type(cache).__name__}. Use compresskv.EliteKVCache(model) (the default) or a DynamicCache."
        )
