"""Fused xKV decode attention: attend over the compressed prefix without rebuilding K/V in memory.

An xKV layer stores its prompt as a group-shared token latent ``latent_k`` ``[batch, T, r_k]``
(``latent_v`` likewise) and its own factors ``factor_k`` ``[batch, r_k, H·d]`` (``factor_v``).
Decode attention over that prefix is computed here from the compressed form only:

* keys: pre-RoPE keys are rebuilt tile by tile (``latent · factor`` for one KV head) and rotated at
  their own positions, with ``cos``/``sin`` computed from the positions (an offset per batch row, or
  a position table) rather than read from a ``[T, d]`` table, which would cost more bytes than the
  latent itself at small ranks; post-RoPE keys are never rebuilt: ``q·Kᵀ = (q·Fᵀ)·latentᵀ``;
* values are never rebuilt: ``softmax · V = (softmax · latent_v) · factor_v``, so the online
  softmax accumulates in value-latent space and the factor is applied once per query row;
* the result is the normalised output over the prefix and its log-sum-exp per query row, so the
  uncompressed tail (tokens decoded after the prefill) can be attended separately and merged
  exactly (:func:`merge_with_tail`).

Two implementations with one signature and one result: :func:`xkv_decode_reference` (PyTorch,
any device, chunked over ``T``) and :func:`xkv_decode_triton` (a flash-decoding Triton kernel,
CUDA, or CPU under ``TRITON_INTERPRET=1``); :func:`xkv_decode` picks one. Triton is optional:
nothing here imports it until the kernel is launched.

Query rows are grouped per KV head: ``query_groups`` is ``[batch, kv_heads, R, d]`` with
``R = (q_heads / kv_heads) · q_len`` (``query.reshape(batch, kv_heads, -1, d)`` of the model's
``[batch, q_heads, q_len, d]`` query), so GQA reads each KV head's compressed prefix once for all
of its query heads.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import replace
from typing import Any

import torch

from .inputs import DecodeInputs, PrefixRope, _inputs, _takes_inputs, decode_inputs
from .tail import merge_with_tail, tail_mask

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: query rows per KV head one Triton launch takes (more are processed in several launches, each
#: re-reading the prefix).
MAX_ROWS = 64

_triton_ok: bool | None = None


def triton_available() -> bool:
    """Whether the Triton kernel can be used: triton imports (checked once, then cached)."""
    global _triton_ok
    if _triton_ok is None:
        if importlib.util.find_spec("triton") is None:
            _triton_ok = False
        else:
            try:
                from . import _xkv_triton  # noqa: F401
            except Exception:  # a broken triton install must not break the package
                _triton_ok = False
            else:
                _triton_ok = True
    return _triton_ok


def _heads(factor: torch.Tensor, n_kv: int, dim: int) -> torch.Tensor:
    """``[batch, rank, H·d]`` -> ``[batch, H, rank, d]`` (a view)."""
    bsz, rank, _ = factor.shape
    return factor.view(bsz, rank, n_kv, dim).permute(0, 2, 1, 3)


def decode_flops(
    bsz: int, n_kv: int, rows: int, dim: int, length: int, rank_k: int, rank_v: int, rope: bool
) -> int:
    """Multiply-adds of the fused prefix attention (what both implementations compute)."""
    keys = bsz * n_kv * length * rank_k * dim + bsz * n_kv * rows * length * dim if rope else (
        bsz * n_kv * rows * rank_k * dim + bsz * n_kv * rows * length * rank_k
    )
    return keys + bsz * n_kv * rows * length * rank_v + bsz * n_kv * rows * rank_v * dim


def _per_head_output(out_lat: torch.Tensor, factor_v: torch.Tensor) -> torch.Tensor:
    """``out_lat[b, h] @ factor_v[b, :, h·d:(h+1)·d]`` -> ``[B, H, R, d]``, reading the factor in place.

    A per-head batched matmul would copy the factor (its head slices are not one batch stride
    apart); multiplying by the whole factor and keeping the diagonal head blocks costs ``H``
    times a tiny product (``R`` rows) instead of a second pass over the factor's bytes."""
    bsz, n_kv, rows, rank = out_lat.shape
    dim = factor_v.shape[-1] // n_kv
    full = out_lat.reshape(bsz, n_kv * rows, rank) @ factor_v  # [B, H·R, H·d]
    return full.view(bsz, n_kv, rows, n_kv, dim).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)


def _query_latent(query_groups: torch.Tensor, factor_k: torch.Tensor) -> torch.Tensor:
    """``q[b, h] @ factor_k[b, :, h·d:(h+1)·d]ᵀ`` -> ``[B, H, R, r_k]``, reading the factor in place
    (a block-diagonal query against the whole factor, for the same reason as above)."""
    bsz, n_kv, rows, dim = query_groups.shape
    blocks = query_groups.new_zeros(bsz, n_kv, rows, n_kv, dim)
    blocks.diagonal(dim1=1, dim2=3).copy_(query_groups.permute(0, 2, 3, 1))
    return (blocks.view(bsz, n_kv * rows, n_kv * dim) @ factor_k.transpose(-1, -2)).view(bsz, n_kv, rows, -1)


def _finish(acc: torch.Tensor, m: torch.Tensor, l: torch.Tensor, factor_v: torch.Tensor, n_kv: int, dim: int,
            log2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise the value-latent accumulator, apply the value factor, and return ``(out, lse)``."""
    seen = l > 0
    out_lat = torch.where(seen[..., None], acc / l.clamp_min(1e-30)[..., None], torch.zeros_like(acc))
    lse = torch.where(seen, (m * LN2 if log2 else m) + l.clamp_min(1e-30).log(), torch.full_like(m, float("-inf")))
    if log2:  # the kernel's path: the factor in its own dtype, read once
        out = _per_head_output(out_lat.to(factor_v.dtype), factor_v).float()
    else:  # the reference: plain per-head products in fp32
        out = out_lat @ _heads(factor_v, n_kv, dim).float()
    return out, lse


# -- reference -----------------------------------------------------------------------------------
@_takes_inputs
def xkv_decode_reference(
    *inputs: Any, chunk: int = 1024, info: dict[str, Any] | None = None, **named: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query_groups`` over an xKV-compressed prefix, in PyTorch (fp32 math).

    Args:
        query_groups: ``[batch, kv_heads, R, d]`` post-RoPE queries, grouped per KV head.
        latent_k, latent_v: ``[batch, T, r_k]`` / ``[batch, T, r_v]`` token latents.
        factor_k, factor_v: ``[batch, r_k, kv_heads·d]`` / ``[batch, r_v, kv_heads·d]`` layer factors.
        rope: how to re-rotate pre-RoPE keys; ``None`` when the keys were factorised post-RoPE.
        key_mask: ``[batch, T]`` (or ``[batch, kv_heads, T]``) booleans, ``True`` where a prefix
            token may be attended; ``None`` when all may.
        scaling: softmax scale (default ``d**-0.5``).
        chunk: prefix tokens processed at once: full K/V of the prefix are never materialised.
        info: if given, filled with ``backend``, ``flops`` and ``workspace_bytes``.

    Returns:
        ``(out, lse)``: ``[batch, kv_heads, R, d]`` fp32 softmax-normalised output over the prefix,
        and ``[batch, kv_heads, R]`` fp32 natural log-sum-exp of the scaled logits (``-inf``, with
        ``out = 0``, for a row that may attend no prefix token).
    """
    x = _inputs(inputs, named)
    query_groups, latent_k, factor_k, latent_v, factor_v, rope, key_mask, scaling = x.args()
    bsz, n_kv, rows, dim, length, rank_k, rank_v = x.sizes
    chunk = max(1, int(chunk))
    q = query_groups.float()
    fk = _heads(factor_k, n_kv, dim).float()
    q_lat = q @ fk.transpose(-1, -2) if rope is None else None  # [B, H, R, r_k]
    mask = None
    if key_mask is not None:
        mask = (key_mask[:, None] if key_mask.dim() == 2 else key_mask).to(torch.bool)  # [B, H|1, T]
    half = dim // 2
    m = torch.full((bsz, n_kv, rows), float("-inf"), device=q.device)
    l = torch.zeros(bsz, n_kv, rows, device=q.device)
    acc = torch.zeros(bsz, n_kv, rows, rank_v, device=q.device)
    workspace = 0
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        if rope is None:
            logits = q_lat @ latent_k[:, None, start:end].float().transpose(-1, -2)
        else:
            keys = (latent_k[:, start:end].float() @ factor_k.float()).view(bsz, end - start, n_kv, dim)
            cos, sin = rope.cos_sin(start, end)
            cos, sin = cos.to(q.device)[:, :, None], sin.to(q.device)[:, :, None]
            k1, k2 = keys[..., :half], keys[..., half:]
            keys = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1).transpose(1, 2)
            logits = q @ keys.transpose(-1, -2)
            workspace = max(workspace, keys.numel() * 4)
        logits = logits * scaling
        if mask is not None:
            logits = logits.masked_fill(~mask[:, :, None, start:end], float("-inf"))
        m_new = torch.maximum(m, logits.amax(dim=-1))
        m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # all masked so far
        alpha = torch.exp(m - m_use)
        p = torch.exp(logits - m_use[..., None])
        l = l * alpha + p.sum(dim=-1)
        acc = acc * alpha[..., None] + p @ latent_v[:, None, start:end].float()
        m = m_new
        workspace = max(workspace, (logits.numel() + p.numel()) * 4)
    out, lse = _finish(acc, m, l, factor_v, n_kv, dim, log2=False)
    if info is not None:
        info.update(
            backend="reference",
            flops=decode_flops(bsz, n_kv, rows, dim, length, rank_k, rank_v, rope is not None),
            workspace_bytes=workspace + acc.numel() * 4,
        )
    return out, lse


# -- Triton --------------------------------------------------------------------------------------
def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, int(n) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


_working_config: dict[tuple[Any, ...], tuple[int, int, int, int]] = {}


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few splits are enough to exercise the reduction


@_takes_inputs
def xkv_decode_triton(
    *inputs: Any,
    block_t: int | None = None,
    block_rv: int | None = None,
    splits: int | None = None,
    max_rows: int = MAX_ROWS,
    num_warps: int | None = None,
    num_stages: int = 2,
    info: dict[str, Any] | None = None,
    **named: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`xkv_decode_reference` as a flash-decoding Triton kernel (same arguments, same result).

    Grid ``(kv_heads · value-rank blocks, token splits, batch)``; each program streams its split's
    latent tiles ``[block_t, r]`` and the head's key-factor slice ``[r, d]`` through on-chip
    memory, rebuilds and rotates the keys there (pre-RoPE), takes the logits of all ``R`` query
    rows of the head, and runs an online softmax accumulating ``p · latent_v``. The splits are
    merged by log-sum-exp in PyTorch and the value factor applied once. fp16/bf16/fp32 inputs,
    fp32 accumulation (fp32 inputs use IEEE dots, not TF32).

    Tuning knobs (defaults chosen without measurement): ``block_t`` tokens per tile, ``block_rv``
    value-latent columns per program (value ranks above it are split over the grid, which repeats
    the key work), ``splits`` token splits (default: enough programs for two waves of the GPU),
    ``max_rows`` query rows per launch (more are processed in several launches), ``num_warps``,
    ``num_stages``. A configuration that does not fit the GPU's shared memory is retried smaller.
    """
    x = _inputs(inputs, named)
    query_groups, latent_k, factor_k, latent_v, factor_v, rope, key_mask, scaling = x.args()
    bsz, n_kv, rows, dim, length, rank_k, rank_v = x.sizes
    if rows > max_rows:
        parts = [
            xkv_decode_triton(
                replace(x, query_groups=query_groups[:, :, i : i + max_rows],
                        sizes=(bsz, n_kv, min(max_rows, rows - i), dim, length, rank_k, rank_v)),
                block_t=block_t, block_rv=block_rv, splits=splits, max_rows=max_rows, num_warps=num_warps,
                num_stages=num_stages, info=info,
            )
            for i in range(0, rows, max_rows)
        ]
        if info is not None:
            info["flops"] = decode_flops(bsz, n_kv, rows, dim, length, rank_k, rank_v, rope is not None)
        return torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)
    from . import _xkv_triton as kt

    import triton.runtime.errors as terrors

    dtype = latent_k.dtype
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"xkv_decode_triton: latents must be fp16, bf16 or fp32, got {dtype}.")
    if not (latent_v.dtype == factor_k.dtype == factor_v.dtype == dtype):
        raise ValueError("xkv_decode_triton: latents and factors must share one dtype.")
    device = latent_k.device
    latent_k, latent_v = latent_k.contiguous(), latent_v.contiguous()
    factor_k = factor_k.contiguous()
    query_groups = query_groups.to(dtype).contiguous()
    half = dim // 2
    if rope is None:
        q_lat = _query_latent(query_groups, factor_k).contiguous()  # [B, H, R, r_k]
        q_arg, pos, inv = query_groups, latent_k, latent_k  # unused pointers
        pos_strides = (0, 0)
        pos_table = False
    else:
        q_lat = query_groups  # unused pointer
        q_arg = query_groups
        inv = rope.inv_freq.to(device=device, dtype=torch.float32).contiguous()
        if rope.table is not None:
            pos = rope.table.to(device=device, dtype=torch.int32)
            pos_table = True
        else:
            assert rope.offsets is not None
            pos = rope.offsets.to(device=device, dtype=torch.int64).reshape(bsz, 1)
            pos_table = False
        pos_strides = (pos.stride(0), pos.stride(1))
    if key_mask is not None:
        mask = key_mask.to(torch.bool)
        mask = (mask[:, None] if mask.dim() == 2 else mask).expand(bsz, n_kv, length)
        mask = mask.view(torch.uint8)  # same bytes, a type triton loads as integers
        mask_strides = (mask.stride(0), mask.stride(1), mask.stride(2))
    else:
        mask, mask_strides = latent_k, (0, 0, 0)

    block_r = _pow2(rows)
    block_half = _pow2(half)
    block_rk = min(64, _pow2(rank_k))
    wide = 2 if dtype == torch.float32 else 1  # fp32 tiles take twice the shared memory
    key = (dtype, rope is not None, block_r, block_half, block_rk, _pow2(rank_v), device.type)
    explicit = block_t is not None or block_rv is not None or num_warps is not None
    tried = None if explicit else _working_config.get(key)
    if tried is None:
        first_bt = block_t or (64 // wide if rope is not None else 64)
        first_rv = block_rv or min(_pow2(rank_v), (512 if rope is not None else 256) // wide)
        tried = (first_bt, min(_pow2(rank_v), _pow2(first_rv)), num_warps or 0, num_stages)
    dot_prec = "ieee" if dtype == torch.float32 else "tf32"

    while True:
        bt, brv, warps, stages = tried
        n_v = _cdiv(rank_v, brv)
        tiles = _cdiv(length, bt)
        n_split = splits or max(1, min(tiles, _cdiv(2 * _sm_count(device), bsz * n_kv * n_v)))
        n_split = max(1, min(int(n_split), tiles))
        split_len = _cdiv(tiles, n_split) * bt
        n_split = _cdiv(length, split_len)
        acc = torch.empty(bsz, n_kv, n_split, rows, rank_v, device=device, dtype=torch.float32)
        m = torch.empty(bsz, n_kv, n_split, rows, device=device, dtype=torch.float32)
        l = torch.empty_like(m)
        warps_used = warps or (8 if brv * block_r >= 4096 or bt * block_half >= 4096 else 4)
        try:
            kt.xkv_split_kernel[(n_kv * n_v, n_split, bsz)](
                q_arg, q_lat, latent_k, factor_k, latent_v, pos, inv, mask, acc, m, l,
                q_arg.stride(0), q_arg.stride(1), q_arg.stride(2),
                q_lat.stride(0), q_lat.stride(1), q_lat.stride(2),
                latent_k.stride(0), latent_k.stride(1),
                factor_k.stride(0), factor_k.stride(1),
                latent_v.stride(0), latent_v.stride(1),
                pos_strides[0], pos_strides[1],
                *mask_strides,
                acc.stride(0), acc.stride(1), acc.stride(2), acc.stride(3),
                m.stride(0), m.stride(1), m.stride(2),
                length, rows, rank_k, rank_v, half, n_kv, split_len,
                scaling * LOG2E, float(rope.scaling) if rope is not None else 1.0,
                ROPE=rope is not None, POS_TABLE=pos_table, HAS_MASK=key_mask is not None,
                BLOCK_R=block_r, BLOCK_T=bt, BLOCK_HALF=block_half, BLOCK_RK=block_rk, BLOCK_RV=brv,
                DOT_PREC=dot_prec, num_warps=warps_used, num_stages=stages,
            )
        except terrors.OutOfResources:
            # Too much shared memory or too many registers: halve the value block, then the tile.
            if brv > 32:
                tried = (bt, brv // 2, warps, stages)
            elif bt > 16:
                tried = (bt // 2, brv, warps, stages)
            elif stages > 1:
                tried = (bt, brv, warps, 1)
            else:
                raise
            continue
        if not explicit:  # remember what fits this GPU for the next default call
            _working_config[key] = tried
        break

    # Flash-decoding reduction over the splits (log2-domain maxima from the kernel).
    m_all = m.amax(dim=2, keepdim=True)
    m_use = torch.where(torch.isinf(m_all), torch.zeros_like(m_all), m_all)
    w = torch.exp2(m - m_use)  # 0 for splits that saw only masked tokens
    l_tot = (l * w).sum(dim=2)
    acc_tot = (acc * w[..., None]).sum(dim=2)
    out, lse = _finish(acc_tot, m_use.squeeze(2), l_tot, factor_v, n_kv, dim, log2=True)
    if info is not None:
        info.update(
            backend="triton",
            splits=n_split,
            config=dict(block_t=bt, block_rv=brv, value_blocks=n_v, num_warps=warps_used, num_stages=stages),
            flops=decode_flops(bsz, n_kv, rows, dim, length, rank_k, rank_v, rope is not None),
            workspace_bytes=(acc.numel() + m.numel() + l.numel()) * 4,
        )
    return out, lse



# -- dispatch ------------------------------------------------------------------------------------
#: Why the Triton kernel failed when chosen automatically (then it is not tried again).
_TRITON_FAILED: list[str] = []


def triton_usable(latent: torch.Tensor) -> bool:
    """Whether :func:`xkv_decode` picks the Triton kernel for a prefix stored as ``latent``: on
    CUDA, in a float dtype, triton importable, and the kernel has not failed here before."""
    return latent.is_cuda and latent.dtype in _FLOAT_DTYPES and triton_available() and not _TRITON_FAILED


def _triton_usable(latent: torch.Tensor) -> bool:
    return triton_usable(latent)


@_takes_inputs
def xkv_decode(
    *inputs: Any, backend: str = "auto", chunk: int = 1024, info: dict[str, Any] | None = None, **named: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused xKV prefix attention: the Triton kernel when the tensors are on CUDA and triton
    imports (``backend="auto"``), else the PyTorch reference; ``backend="triton"`` or
    ``"reference"`` forces one. Arguments and result as :func:`xkv_decode_reference`."""
    x = _inputs(inputs, named)
    chosen = backend == "auto"
    if chosen:
        backend = "triton" if _triton_usable(x.latent_k) else "reference"
    if backend == "triton":
        try:
            return xkv_decode_triton(x, info=info)
        except Exception as err:  # noqa: BLE001 - a GPU/Triton the kernel does not build on
            if not chosen:
                raise
            # Chosen automatically: decoding must go on, so fall back to the reference from now on.
            _TRITON_FAILED.append(f"{type(err).__name__}: {err}")
            warnings.warn(f"compresskv: the fused xKV Triton kernel failed ({_TRITON_FAILED[0][:300]}); "
                          "using the PyTorch reference path", RuntimeWarning, stacklevel=2)
            backend = "reference"
    if backend != "reference":
        raise ValueError(f"xkv_decode: backend must be 'auto', 'triton' or 'reference', got {backend!r}.")
    return xkv_decode_reference(x, chunk=chunk, info=info)


__all__ = [
    "MAX_ROWS",
    "DecodeInputs",
    "PrefixRope",
    "decode_flops",
    "decode_inputs",
    "merge_with_tail",
    "tail_mask",
    "triton_available",
    "triton_usable",
    "xkv_decode",
    "xkv_decode_reference",
    "xkv_decode_triton",
]
