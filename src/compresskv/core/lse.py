"""Fused attention that also returns its log-sum-exp, and the exact merge of two softmax parts.

A compressed layer often attends in two parts: the stored tokens in a compressed (latent) form,
and this forward's new tokens at full precision. Both parts must share one softmax; with each
part's log-sum-exp the merge is exact. ``scaled_dot_product_attention`` does not return the
log-sum-exp, so :func:`attention_with_lse` calls the ATen kernels behind it;
:func:`fused_sdpa_ok` says whether ``scaled_dot_product_attention`` has a fused kernel for the
inputs. Used by MatryoshkaKV's projected mode, EliteKV's absorbed decode and xKV's fused read.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .ops import small_matmul, small_softmax

_FUSED: dict[tuple[Any, ...], tuple[bool, bool, bool]] = {}


def _sdpa_params(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 dropout: float) -> Any:
    params = torch.backends.cuda.SDPAParams
    try:
        return params(query, key, value, mask, dropout, False, False)  # torch >= 2.5 (enable_gqa)
    except TypeError:
        return params(query, key, value, mask, dropout, False)


def _cuda_backends(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                   dropout: float) -> tuple[bool, bool, bool]:
    """``(flash, memory-efficient, cuDNN)``: which fused CUDA kernels accept these inputs.

    Asked of PyTorch itself (``torch.backends.cuda.can_use_*``), once per device, dtype, head dims
    and mask kind: those decide it (flash: q, k and v dims equal and at most 256, fp16/bf16, no
    mask; memory-efficient: q and k dims equal, v may differ, no upper bound, every dim a multiple
    of 8 in fp16/bf16 or of 4 in fp32 on sm80+; cuDNN: version- and hardware-dependent), not the
    sequence lengths. Our inputs are fresh tensors or views of the cache's, so the storage-offset
    alignment the memory-efficient check also asks holds for every call alike."""
    memo = (query.device, query.dtype, query.shape[-1], key.shape[-1], value.shape[-1], mask is None,
            None if mask is None else mask.dtype, query.requires_grad, dropout > 0)
    found = _FUSED.get(memo)
    if found is None:
        cuda = torch.backends.cuda
        flash = efficient = cudnn = False
        try:
            params = _sdpa_params(query, key, value, mask, dropout)
            flash = bool(cuda.can_use_flash_attention(params, False))
            efficient = bool(cuda.can_use_efficient_attention(params, False))
            cudnn = bool(cuda.can_use_cudnn_attention(params, False))
        except (AttributeError, RuntimeError, TypeError):  # an older torch without (some of) these checks
            pass
        found = _FUSED[memo] = (flash, efficient, cudnn)
    return found


def fused_sdpa_ok(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
                  dropout: float = 0.0) -> bool:
    """Whether ``scaled_dot_product_attention(query, key, value, mask)`` runs in a fused kernel.

    On CUDA, only when flash, memory-efficient or cuDNN attention accepts the inputs: otherwise
    SDPA falls back to its math kernel, which materialises the logits like the explicit path does
    and adds copies, so callers keep their explicit path instead. Elsewhere ``True``: SDPA always
    has a kernel on CPU (flash, or math for unequal head dims); whether it pays off there is the
    caller's to know.
    """
    if query.device.type != "cuda":
        return True
    flash, efficient, cudnn = _cuda_backends(query, key, value, mask, dropout)
    return efficient or cudnn or (flash and mask is None)


def _aligned_bias(bias: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``bias`` expanded to ``shape`` with every stride but the last a multiple of 8 elements (what
    the memory-efficient kernel reads); copied into a padded buffer only when it is not already."""
    out = bias.expand(shape)
    if out.stride(-1) == 1 and all(s % 8 == 0 for s in out.stride()[:-1]):
        return out
    t = bias.shape[-1]
    padded = bias.new_empty(*bias.shape[:-1], (t + 7) // 8 * 8)[..., :t]
    padded.copy_(bias)
    return padded.expand(shape)


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Fused ``softmax(query·keyᵀ·scale + bias)·value`` and its log-sum-exp, or ``None`` when no
    fused kernel takes these inputs (the caller then runs its explicit path).

    ``query`` ``[b, h, q, dk]``, ``key`` ``[b, h, T, dk]``, ``value`` ``[b, h, T, dv]``, ``bias``
    (additive, the query's dtype) broadcastable to ``[b, h, q, T]`` or ``None``. Returns the output
    ``[b, h, q, dv]`` and the fp32 log-sum-exp ``[b, h, q]`` of the scaled, biased logits: what two
    softmax parts need to be merged exactly. ``scaled_dot_product_attention`` does not return it, so
    this calls the ATen kernels behind it (``_scaled_dot_product_flash_attention_for_cpu`` on CPU;
    ``_scaled_dot_product_flash_attention`` or ``_scaled_dot_product_efficient_attention`` on
    CUDA), after asking PyTorch which of them accepts the inputs. Inference only (no autograd, no
    dropout).
    """
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    try:
        return _aten_attention_with_lse(query, key, value, bias, scale)
    except (RuntimeError, TypeError) as err:  # a private ATen signature that changed: use the explicit path
        _warn_once(f"compresskv: fused attention with log-sum-exp unavailable ({type(err).__name__}: {err}); "
                   "using the explicit path")
        return None


def _aten_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    ops = torch.ops.aten
    if query.device.type == "cpu":
        if key.shape[-1] != value.shape[-1] or not hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
            return None  # the CPU flash kernel needs equal head dims
        out, lse = ops._scaled_dot_product_flash_attention_for_cpu(query, key, value, attn_mask=bias, scale=scale)
        return out, lse.float()
    if query.device.type != "cuda":
        return None
    flash, efficient, _ = _cuda_backends(query, key, value, bias, 0.0)
    if flash and bias is None and query.shape[-1] % 8 == 0:  # SDPA pads other dims before this kernel
        result = ops._scaled_dot_product_flash_attention(query, key, value, scale=scale)
        return result[0], result[1].float()
    if not efficient:
        return None  # (cuDNN attention may accept these, but its log-sum-exp comes back another way)
    b, h, q, _ = query.shape
    if bias is not None:
        bias = _aligned_bias(bias, (b, h, q, key.shape[-2]))
    result = ops._scaled_dot_product_efficient_attention(query, key, value, bias, True, scale=scale)
    return result[0], result[1][..., :q].float()  # its log-sum-exp is padded to 32 query rows


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def merge_softmax(
    prefix_out: torch.Tensor, prefix_lse: torch.Tensor, tail_logits: torch.Tensor, tail_values: torch.Tensor
) -> torch.Tensor:
    """Attention over two parts sharing one softmax, from the first part's normalised output and
    log-sum-exp and the second part's logits (masked entries ``-inf`` or ``finfo.min``).

    ``prefix_out`` ``[..., R, d]``, ``prefix_lse`` ``[..., R]``, ``tail_logits`` ``[..., R, n]``,
    ``tail_values`` ``[..., n, d]``; returns ``[..., R, d]`` in fp32. Merged relative to the row
    maximum (one softmax, not ``logaddexp``): a row whose every key is masked gets finite,
    normalised weights (its output is unused, but NaN would spread).
    """
    if tail_logits.shape[-1] == 1:  # one new token (a decode step): the prefix's share is a sigmoid
        # (-inf - -inf, a row with every key masked, is NaN: counted as 0, equal shares)
        share = torch.sigmoid((prefix_lse.float().unsqueeze(-1) - tail_logits.float()).nan_to_num_(0.0))
        return torch.lerp(tail_values.float(), prefix_out.float(), share)  # tail + share·(prefix − tail)
    # one softmax over [prefix log-sum-exp, tail logits]: its first weight is the prefix's share
    # (-inf raised to finfo.min: a row with every key masked gets finite weights, not NaN)
    logits = torch.cat([prefix_lse.float().unsqueeze(-1), tail_logits.float()], dim=-1)
    weights = small_softmax(logits.clamp_min_(torch.finfo(torch.float32).min))
    out = prefix_out.float() * weights[..., :1]
    return out + small_matmul(weights[..., 1:], tail_values.float())
