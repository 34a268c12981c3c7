"""J-LRD conversion (EliteKV, arXiv 2503.01586, §3.2), the EliteKV attention module, and the
converted model class (default cache, save/reload, revert).

For every layer and KV head ``h`` with chosen RoPE pairs ``p_h`` (``r`` of the ``d/2``), the head's
dims split into the *rope* dims ``p_h ∪ (p_h + d/2)`` (``2·r``; rotated as before, in queries and
keys) and the ``d − 2·r`` *nope* dims (position-free: neither queries nor keys are rotated there).
Query heads use their KV head's pairs. The key rows of the nope dims of all KV heads and all value
rows are stacked into one joint weight ``W`` (``H_kv·(2d − 2r)`` × hidden) and factorised to rank
``c``: ``W ≈ W_up · W_down`` with ``W_down``: hidden → c (its output, the latent, is cached) and
``W_up``: c → (K_nope, V). Weight-only (the paper): truncated SVD of ``W``. Activation-aware:
truncated SVD of ``W·S`` with ``S = (E[x xᵀ] + λI)^{1/2}`` from calibration inputs, then
``W_down = Σ^{1/2} Vᵀ S⁻¹`` — the rank-c map closest to ``W`` on the calibration activations. Biases
(Qwen2 has q/k/v biases) go to ``W_up`` (the latent itself carries none), so at full rank the
converted layer computes exactly the original's keys and values.

Attention. ``update(k_rope, latent)`` returns all stored tokens. Decoding (few queries, many
cached tokens) runs MLA-style with ``W_up`` absorbed: per query head the nope query is mapped into
the latent space (``q_nope · W_up,k``), logits are ``q_rope·k_ropeᵀ + q_abs·latentᵀ``, the context
``softmax · latent`` is mapped back with ``W_up,v``; nothing of size T × H_kv·d is ever built.
Prefill and training (many queries) reconstruct K and V from the latent and call the model's own
attention backend (eager, sdpa, flash), which is cheaper there and memory-efficient. ``auto``
picks by a multiply-add count; ``absorb`` / ``reconstruct`` force one.

The absorbed attention runs in ``scaled_dot_product_attention`` (:meth:`EliteKVAttention._absorbed_sdpa`):
the latent is the key *and* the value of every query head (MQA-like, expanded as a view), the
query is ``q_abs``, and the RoPE'd dims' logits ``q_rope·k_ropeᵀ`` (per KV head) enter, scaled and
with the causal/padding mask, as SDPA's additive float mask; the ``q_nope·b_up,k`` term is the same
for every key of a query row, so softmax ignores it. The explicit matmul/softmax path
(:meth:`EliteKVAttention._absorbed`) is kept as the reference, and runs instead under ``eager``
attention (which returns the weights), on CUDA when no fused SDPA kernel accepts the shapes (e.g. a
``kv_dim`` not a multiple of 8 in fp16/bf16: SDPA would fall back to its math kernel), and when
forced with ``attention="absorb_explicit"``.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import compat
from ..core.lse import fused_sdpa_ok
from .cache import EliteKVCache
from ..core.facts import model_dims, text_config
from ..core.rope import rotate_half
from .ranking import SELECTIONS, FrequencyRanking, input_moments, select_pairs
from .support import attention_modules, check_supported, decoder_layers, is_converted

SVD_MODES = ("auto", "weight", "activation")
ATTENTION_MODES = ("auto", "absorb", "absorb_explicit", "reconstruct")
FORMAT = 1


# -- sizes -----------------------------------------------------------------------------------------
def joint_rank(dims: dict[str, int], rope_pairs: int) -> int:
    """The largest useful ``kv_dim`` for ``rope_pairs``: the rank bound of the joint K_nope/V weight."""
    return min(dims["kv_heads"] * (2 * dims["head_dim"] - 2 * rope_pairs), dims["hidden"])


def default_rope_pairs(head_dim: int, budget: int | None = None, kv_heads: int = 1) -> int:
    """The RoPE pairs per KV head when only a size is given.

    With a per-token budget of ``budget`` elements (per layer): about 3/8 of it for the rotated key
    dims (``2·r·H_kv ≈ 0.375·budget``), the rest for the latent. Measured training-free on
    SmolLM2-135M (50% cache, 1k-token window): r = 6 → ppl 94, r = 12 → 38, r = 16 → 40. Without a
    budget (``kv_dim`` given): 3/16 of the pairs, the paper's LLaMA2-7B setting (12 of 64).
    """
    half = head_dim // 2
    if budget is None:
        return max(1, min(half, round(3 * head_dim / 32)))
    r = max(1, min(half, round(0.375 * budget / (2 * kv_heads))))
    return max(0, min(r, (budget - 1) // (2 * kv_heads)))  # leave the latent at least one dim


def check_sizes(dims: dict[str, int], rope_pairs: Any, kv_dim: Any) -> None:
    half = dims["head_dim"] // 2
    if isinstance(rope_pairs, bool) or not isinstance(rope_pairs, int) or not 0 <= rope_pairs <= half:
        raise ValueError(
            f"compresskv.elitekv: rope_pairs must be an int in [0, head_dim/2 = {half}] (RoPE pairs kept per "
            f"KV head), got {rope_pairs!r}"
        )
    top = joint_rank(dims, rope_pairs)
    if isinstance(kv_dim, bool) or not isinstance(kv_dim, int) or not 1 <= kv_dim <= top:
        raise ValueError(
            f"compresskv.elitekv: kv_dim must be an int in [1, {top}] for rope_pairs={rope_pairs} ({top} = the rank "
            f"of the joint K_nope/V weight: min(H_kv·(2·head_dim − 2·rope_pairs), hidden) = "
            f"min({dims['kv_heads']}·{2 * dims['head_dim'] - 2 * rope_pairs}, {dims['hidden']})), got {kv_dim!r}"
        )


def resolve_sizes(
    dims: dict[str, int],
    rope_pairs: int | None = None,
    kv_dim: int | None = None,
    cache_ratio: float | None = None,
    compression_ratio: float | None = None,
) -> tuple[int, int]:
    """``(rope_pairs, kv_dim)`` from ``kv_dim`` or a ratio (``cache_ratio`` = fraction of the original
    cache kept, ``compression_ratio`` = 1 − cache_ratio). With a ratio, the budget per token and layer
    is ``round(ratio · 2·H_kv·d)`` elements: ``2·r·H_kv`` rope dims, the rest latent (at most the
    joint rank).

    Without ``rope_pairs``: the whole budget (``cache_ratio=1``, ``compression_ratio=0``) keeps every
    pair and the full joint rank, which is the original attention exactly (any pair left unrotated
    changes it, whatever the rank); a smaller budget starts from :func:`default_rope_pairs` and adds
    pairs while the latent, capped at its joint rank, would leave budget unused (models whose joint
    rank is bounded by the hidden size, e.g. MHA), so the sizes use the budget asked for."""
    given = [n for n, v in (("kv_dim", kv_dim), ("cache_ratio", cache_ratio), ("compression_ratio", compression_ratio)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"compresskv.elitekv: give one of kv_dim, cache_ratio, compression_ratio, not {given}")
    if not given:
        raise ValueError("compresskv.elitekv: give the latent size: kv_dim=... or cache_ratio=... (or compression_ratio=...)")
    if compression_ratio is not None:
        if not isinstance(compression_ratio, (int, float)) or not 0.0 <= compression_ratio < 1.0:
            raise ValueError(f"compresskv.elitekv: compression_ratio must be in [0, 1), got {compression_ratio!r}")
        cache_ratio = 1.0 - float(compression_ratio)
    if cache_ratio is not None:
        if not isinstance(cache_ratio, (int, float)) or not 0.0 < cache_ratio <= 1.0:
            raise ValueError(f"compresskv.elitekv: cache_ratio must be in (0, 1], got {cache_ratio!r}")
        full = 2 * dims["kv_heads"] * dims["head_dim"]
        budget = int(round(cache_ratio * full))
        half = dims["head_dim"] // 2
        if rope_pairs is not None:
            r = rope_pairs
        elif budget >= full:
            r = half  # nothing to compress: the original attention
        else:
            r = default_rope_pairs(dims["head_dim"], budget, dims["kv_heads"])
            while r < half and budget - 2 * r * dims["kv_heads"] > joint_rank(dims, r):
                r += 1  # the latent is capped: give the spare budget to rotated pairs
        check_sizes(dims, r, 1)  # rope_pairs first: the latent size depends on it
        c = min(budget - 2 * r * dims["kv_heads"], joint_rank(dims, r))
        if c < 1:
            raise ValueError(
                f"compresskv.elitekv: cache_ratio={cache_ratio:g} leaves {budget} elements per token and layer, but "
                f"rope_pairs={r} alone takes 2·r·H_kv = {2 * r * dims['kv_heads']}; lower rope_pairs"
            )
        check_sizes(dims, r, c)
        return r, c
    r = default_rope_pairs(dims["head_dim"], None, dims["kv_heads"]) if rope_pairs is None else rope_pairs
    check_sizes(dims, r, kv_dim)
    return r, int(kv_dim)  # type: ignore[arg-type]


# -- factorisation -----------------------------------------------------------------------------------
def factorize(
    weight: torch.Tensor, rank: int, moment: torch.Tensor | None = None, damping: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_up, W_down)`` with ``W_up @ W_down`` the best rank-``rank`` approximation of ``weight``
    (``out × in``): in Frobenius norm, or, with ``moment`` = E[x xᵀ] (``in × in``), in
    E‖(W − Ŵ)x‖². Singular values are split evenly between the factors. Float64 inside."""
    w = weight.double()
    if moment is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        return u[:, :rank] * root, root[:, None] * vh[:rank]
    m = moment.double().to(w.device)
    m = (m + m.T) / 2
    m = m + damping * m.diagonal().mean().clamp_min(1e-12) * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    evals, q = torch.linalg.eigh(m)
    evals = evals.clamp_min(evals.max() * 1e-12)
    sqrt_m = (q * evals.sqrt()) @ q.T
    inv_sqrt_m = (q * evals.rsqrt()) @ q.T
    u, s, vh = torch.linalg.svd(w @ sqrt_m, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, (root[:, None] * vh[:rank]) @ inv_sqrt_m


def _head_layout(pairs: list[int], head_dim: int) -> tuple[list[int], list[int]]:
    half = head_dim // 2
    rope = list(pairs) + [p + half for p in pairs]
    taken = set(rope)
    return rope, [i for i in range(head_dim) if i not in taken]


@torch.no_grad()
def jlrd_weights(
    attn: nn.Module, pairs: torch.Tensor, kv_dim: int, dims: dict[str, int], moment: torch.Tensor | None = None,
    damping: float = 1e-6,
) -> tuple[dict[str, torch.Tensor | None], dict[str, float]]:
    """The converted weights of one original attention module (float64) and the joint weight's
    relative reconstruction errors (``weight``; ``activation`` when ``moment`` is given)."""
    d, hq, hkv = dims["head_dim"], dims["heads"], dims["kv_heads"]
    g = hq // hkv
    layouts = [_head_layout(pairs[h].tolist(), d) for h in range(hkv)]
    perm = [rope + nope for rope, nope in layouts]
    dev = attn.q_proj.weight.device
    q_rows = torch.tensor([j * d + i for j in range(hq) for i in perm[j // g]], device=dev)
    kr_rows = torch.tensor([h * d + i for h in range(hkv) for i in layouts[h][0]], dtype=torch.long, device=dev)
    kn_rows = torch.tensor([h * d + i for h in range(hkv) for i in layouts[h][1]], dtype=torch.long, device=dev)

    def wb(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        return lin.weight.double(), None if lin.bias is None else lin.bias.double()

    wq, bq = wb(attn.q_proj)
    wk, bk = wb(attn.k_proj)
    wv, bv = wb(attn.v_proj)
    wo, bo = wb(attn.o_proj)
    joint = torch.cat([wk[kn_rows], wv])
    joint_bias = None
    if bk is not None or bv is not None:
        zk = bk[kn_rows] if bk is not None else torch.zeros(len(kn_rows), dtype=torch.float64, device=dev)
        zv = bv if bv is not None else torch.zeros(wv.shape[0], dtype=torch.float64, device=dev)
        joint_bias = torch.cat([zk, zv])
    up, down = factorize(joint, kv_dim, moment, damping)
    diff = joint - up @ down
    errors = {"weight": float(diff.norm() / joint.norm().clamp_min(1e-30))}
    if moment is not None:
        m = moment.double().to(dev)
        num = torch.einsum("oi,ij,oj->", diff, m, diff)
        den = torch.einsum("oi,ij,oj->", joint, m, joint)
        errors["activation"] = float((num / den.clamp_min(1e-30)).clamp_min(0).sqrt())
    weights = {
        "q_proj.weight": wq[q_rows], "q_proj.bias": None if bq is None else bq[q_rows],
        "k_rope_proj.weight": wk[kr_rows], "k_rope_proj.bias": None if bk is None else bk[kr_rows],
        "kv_down.weight": down, "kv_up.weight": up, "kv_up.bias": joint_bias,
        "o_proj.weight": wo, "o_proj.bias": bo,
    }
    return weights, errors


# -- attention -------------------------------------------------------------------------------------
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
        self.attention_mode = spec.get("attention", "auto")
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
        return f"rope_pairs={self.rope_pairs}, kv_dim={self.kv_dim}, mode={self.attention_mode}"

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

    def choose_mode(self, q_len: int, kv_len: int) -> str:
        """``absorb``, ``absorb_explicit`` or ``reconstruct`` for ``q_len`` queries over ``kv_len``
        tokens (``auto``: ``absorb`` or ``reconstruct``, the one with fewer multiply-adds)."""
        if self.attention_mode != "auto":
            return self.attention_mode
        hq, hkv, d, r2, nope, c = self.num_heads, self.num_kv_heads, self.head_dim, 2 * self.rope_pairs, self.nope_dim, self.kv_dim
        absorb = hq * q_len * c * (nope + d) + hq * q_len * kv_len * (r2 + 2 * c)
        rebuild = kv_len * c * hkv * (nope + d) + hq * q_len * kv_len * 2 * d
        return "absorb" if absorb < rebuild else "reconstruct"

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
        if mode == "absorb" and not self._returns_weights():
            out, weights = self._absorbed_sdpa(query, k_rope, latent, attention_mask)
        elif mode in ("absorb", "absorb_explicit"):
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


# -- the converted model class ---------------------------------------------------------------------
class _EliteKVModelMixin:
    """Mixed into the model's own class on conversion: builds the EliteKV attention from
    ``config.elitekv`` (so ``from_pretrained`` works) and makes ``EliteKVCache`` the default cache."""

    _elitekv_base: type

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        spec = getattr(config, "elitekv", None)
        if spec:
            for i, layer in enumerate(decoder_layers(self)):  # type: ignore[arg-type]
                layer.self_attn = EliteKVAttention(text_config(self), i, spec)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if compat.get_cache(kwargs) is None and len(args) < 4:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = bool(getattr(self.config, "use_cache", False)) and not self.training  # type: ignore[attr-defined]
            if use_cache:
                compat.set_cache(kwargs, EliteKVCache(self), super().forward)  # type: ignore[arg-type, misc]
        return super().forward(*args, **kwargs)  # type: ignore[misc]

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any) -> Any:
        if compat.get_cache(model_kwargs) is None and generation_config.use_cache is not False:
            impl = generation_config.cache_implementation
            if impl not in (None, "dynamic"):
                raise ValueError(
                    f"compresskv.elitekv: cache_implementation={impl!r} cannot hold an EliteKV latent; leave it unset "
                    "(the converted model uses compresskv.EliteKVCache)."
                )
            compat.set_cache(model_kwargs, EliteKVCache(self))  # type: ignore[arg-type]
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)  # type: ignore[misc]


_CLASSES: dict[type, type] = {}


def converted_class(base: type) -> type:
    """The EliteKV subclass of a transformers model class (``EliteKVLlamaForCausalLM``, ...)."""
    if getattr(base, "_elitekv_base", None) is not None:
        return base
    cls = _CLASSES.get(base)
    if cls is None:
        name = f"EliteKV{base.__name__}"
        cls = type(name, (_EliteKVModelMixin, base), {"__module__": __name__, "_elitekv_base": base})
        _CLASSES[base] = cls
        setattr(sys.modules[__name__], name, cls)  # importable by name (pickling)
    return cls


# -- conversion ------------------------------------------------------------------------------------
def _resolve_ranking(model: nn.Module, ranking: Any) -> FrequencyRanking | None:
    if ranking is None:
        return None
    if isinstance(ranking, (str, Path)):
        return FrequencyRanking.from_pretrained(ranking, model)
    if not isinstance(ranking, FrequencyRanking):
        raise ValueError(
            f"compresskv.elitekv: ranking must be a FrequencyRanking or the path of a saved one, got {type(ranking).__name__}"
        )
    ranking.check_model(model)
    dims = model_dims(model)
    want = (dims["layers"], dims["kv_heads"], dims["head_dim"] // 2)
    if ranking.shape != want:
        raise ValueError(f"compresskv.elitekv: this ranking has shape {ranking.shape}, the model needs {want}")
    return ranking


@torch.no_grad()
def convert(
    model: nn.Module,
    rope_pairs: int | None = None,
    kv_dim: int | None = None,
    *,
    cache_ratio: float | None = None,
    ranking: Any = None,
    selection: str = "ropelite",
    svd: str = "auto",
    pairs: Any = None,
    calibration_texts: Any = None,
    tokenizer: Any = None,
    seq_len: int = 1024,
    num_windows: int = 8,
    attention: str = "auto",
    keep_original: bool = False,
    damping: float = 1e-6,
    progress: bool = True,
) -> nn.Module:
    """Convert ``model`` in place to EliteKV attention and return it.

    ``rope_pairs`` (r) RoPE pairs are kept per KV head, chosen by ``selection`` (``ropelite`` /
    ``contribution`` from ``ranking``, a :class:`FrequencyRanking` or its path; ``uniform`` /
    ``low_frequency`` need none) or given explicitly as ``pairs`` (``[layers, kv_heads, r]``). The
    joint K_nope/V latent has ``kv_dim`` (c) dims, or is sized from ``cache_ratio``. ``svd``:
    ``weight`` (the paper) or ``activation`` (whitened by calibration inputs: from the ranking's
    ``input_moment``, else computed from ``calibration_texts``); ``auto`` (default) is
    ``activation`` when such data is given and ``weight`` otherwise. ``attention``: ``auto``,
    ``absorb`` (through ``scaled_dot_product_attention`` where a fused kernel takes it),
    ``absorb_explicit`` (the explicit reference path) or ``reconstruct`` (see the module notes).
    ``keep_original`` keeps the original attention modules so that :func:`revert` (and
    re-conversion to other sizes) can restore them.

    After conversion ``generate()`` and ``forward(use_cache=True)`` use an :class:`EliteKVCache`;
    ``save_pretrained`` writes the sizes and chosen pairs into the config
    (:func:`load_converted` reads it back). ``compresskv.unpatch`` does not undo a conversion.
    """
    from tqdm.auto import tqdm

    check_supported(model)
    dims = model_dims(model)
    r, c = resolve_sizes(dims, rope_pairs, kv_dim, cache_ratio)
    if selection not in SELECTIONS:
        raise ValueError(f"compresskv.elitekv: unknown selection {selection!r}; choose one of {list(SELECTIONS)}")
    if svd not in SVD_MODES:
        raise ValueError(f"compresskv.elitekv: svd must be one of {list(SVD_MODES)}, got {svd!r}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"compresskv.elitekv: attention must be one of {list(ATTENTION_MODES)}, got {attention!r}")
    rank = _resolve_ranking(model, ranking)
    if svd == "auto":
        has_data = (rank is not None and rank.input_moment is not None) or calibration_texts is not None
        svd = "activation" if has_data else "weight"
    shape = (dims["layers"], dims["kv_heads"], r)
    if pairs is not None:
        chosen = torch.as_tensor(pairs, dtype=torch.long).cpu()
        if tuple(chosen.shape) != shape or (r and (chosen.min() < 0 or chosen.max() >= dims["head_dim"] // 2)):
            raise ValueError(f"compresskv.elitekv: pairs must be {list(shape)} pair indices in [0, {dims['head_dim'] // 2})")
        if any(len(set(h.tolist())) != r for h in chosen.view(-1, r)) if r else False:
            raise ValueError("compresskv.elitekv: pairs repeat a pair within a head")
        chosen = chosen.sort(dim=-1).values
        selection = "explicit"
    elif r == dims["head_dim"] // 2:  # every pair: no selection (nor ranking) to make
        chosen = torch.arange(r).expand(shape).clone()
    else:
        chosen = select_pairs(dims["layers"], dims["kv_heads"], dims["head_dim"] // 2, r, selection, rank)
    moments = None
    if svd == "activation":
        if rank is not None and rank.input_moment is not None:
            moments = rank.input_moment
        elif calibration_texts is not None:
            moments = input_moments(model, calibration_texts, tokenizer, seq_len=seq_len, num_windows=num_windows, progress=progress)
        else:
            raise ValueError(
                "compresskv.elitekv: svd='activation' needs calibration activations: pass a ranking computed with "
                "activation_stats=True, or calibration_texts=... (with tokenizer=...)"
            )
    modules = attention_modules(model)
    config = text_config(model)
    first = modules[0]
    spec: dict[str, Any] = {
        "format": FORMAT,
        "rope_pairs": r,
        "kv_dim": c,
        "selection": selection,
        "svd": svd,
        "attention": attention,
        "pairs": chosen.tolist(),
        "bias": {
            "q": first.q_proj.bias is not None, "k": first.k_proj.bias is not None,
            "v": first.v_proj.bias is not None, "o": first.o_proj.bias is not None,
        },
        "base_class": type(model).__name__,
        "eager_module": type(first).__module__,
        "cache_ratio": (c + 2 * r * dims["kv_heads"]) / (2 * dims["kv_heads"] * dims["head_dim"]),
        "ranking": None if rank is None else {
            "model_name": rank.model_name, "config_hash": rank.config_hash, "options": rank.options,
        },
    }
    errors: list[dict[str, float]] = []
    originals = []
    for i, layer in enumerate(tqdm(decoder_layers(model), desc="EliteKV: J-LRD conversion", disable=not progress)):
        attn = layer.self_attn
        weight = attn.q_proj.weight
        moment = None if moments is None else moments[i]
        new_weights, err = jlrd_weights(attn, chosen[i], c, dims, moment, damping)
        errors.append(err)
        # Built on the meta device and given the decomposed weights: no random init to overwrite.
        new = EliteKVAttention(config, i, spec, device="meta", dtype=weight.dtype)
        state = {k: v.to(weight.device, weight.dtype) for k, v in new_weights.items() if v is not None}
        new.load_state_dict(state, strict=True, assign=True)
        new.train(attn.training)
        layer.self_attn = new
        if keep_original:
            originals.append(attn)
    spec["reconstruction_error"] = {
        key: [round(e[key], 6) for e in errors] for key in errors[0]
    }
    config.elitekv = spec
    if config is not model.config:
        model.config.elitekv = spec
    original_class = type(model)
    model.__class__ = converted_class(original_class)
    if keep_original:
        model.__dict__["_elitekv_original"] = (original_class, originals, rank)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Give a model converted with ``keep_original=True`` its original attention back (in place)."""
    stash = model.__dict__.get("_elitekv_original")
    if stash is None:
        if is_converted(model):
            raise ValueError(
                "compresskv.elitekv: this model was converted without keep_original=True, so its original attention "
                "weights are gone; reload the original model."
            )
        return model
    original_class, originals, _ = stash
    for layer, attn in zip(decoder_layers(model), originals):
        layer.self_attn = attn.to(device=next(layer.parameters()).device)  # each layer's own device (device_map)
    for config in {id(c): c for c in (model.config, text_config(model))}.values():
        if hasattr(config, "elitekv"):
            delattr(config, "elitekv")
    model.__class__ = original_class
    del model.__dict__["_elitekv_original"]
    return model


def load_converted(path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after :func:`convert` (keyword arguments go to
    ``from_pretrained``: ``dtype``, ``device_map``, ``attn_implementation``, ...)."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    spec = getattr(config, "elitekv", None)
    if not spec:
        raise ValueError(f"compresskv.elitekv: {path} is not an EliteKV-converted model (its config has no 'elitekv')")
    if spec.get("format", 1) > FORMAT:
        raise ValueError(f"compresskv.elitekv: {path} was saved by a newer compresskv (format {spec['format']})")
    base = getattr(transformers, spec["base_class"], None)
    if base is None:
        raise ValueError(f"compresskv.elitekv: unknown model class {spec['base_class']!r} in {path}")
    model = converted_class(base).from_pretrained(path, **kwargs)
    return model.eval()


def conversion_info(model: nn.Module) -> dict[str, Any]:
    """The sizes, selection and per-layer reconstruction errors of a converted model."""
    from .cache import elitekv_spec

    spec = elitekv_spec(model)
    return {k: v for k, v in spec.items() if k != "pairs"}
