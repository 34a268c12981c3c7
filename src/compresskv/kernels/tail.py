"""The uncompressed tail of a fused read: tokens decoded after the prefill, attended in plain
torch and merged with the prefix's ``(out, lse)`` exactly."""

from __future__ import annotations

from typing import Any

import torch

from ..core.lse import merge_softmax


# -- the uncompressed tail -----------------------------------------------------------------------
def tail_mask(
    tail_valid: torch.Tensor | None, n_tail: int, q_len: int, groups: int, device: Any = None
) -> torch.Tensor | None:
    """Mask of the tail keys for the grouped query rows: ``[batch|1, kv_heads|1, groups·q_len, n_tail]``.

    The tail is the ``n_tail - q_len`` tokens decoded earlier followed by this forward's ``q_len``
    new tokens; query ``t`` sees every earlier token and the new tokens ``≤ t`` (causal), and only
    tokens that ``tail_valid`` (``[batch, n_tail]`` or ``[batch, kv_heads, n_tail]``) marks real.
    ``None`` when nothing is masked.
    """
    old = n_tail - q_len
    causal = None
    if q_len > 1:
        t = torch.arange(q_len, device=device).repeat(groups)  # row r is query position r % q_len
        j = torch.arange(n_tail, device=device)
        causal = ((j[None, :] < old) | (j[None, :] - old <= t[:, None]))[None, None]
    if tail_valid is None:
        return causal
    valid = tail_valid.to(torch.bool)
    valid = valid[:, None, None, :] if valid.dim() == 2 else valid[:, :, None, :]
    return valid if causal is None else causal & valid


def merge_with_tail(
    prefix_out: torch.Tensor,
    prefix_lse: torch.Tensor,
    query_groups: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    scaling: float,
    q_len: int,
    tail_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over prefix + tail from the prefix's ``(out, lse)`` and the plain tail.

    ``tail_k``/``tail_v`` are ``[batch, kv_heads, n_tail, d]`` (earlier decoded tokens, then the
    ``q_len`` new ones), ``tail_valid`` their ``[batch, n_tail]`` (or ``[batch, kv_heads, n_tail]``)
    validity (``None``: all real).
    The tail is attended in fp32 under :func:`tail_mask` and the two softmaxes merged exactly by
    :func:`compresskv.core.lse.merge_softmax`.
    Returns ``[batch, kv_heads, R, d]`` in the query's dtype (zeros for a row that sees nothing).
    """
    q = query_groups.float()
    n_tail = tail_k.shape[-2]
    if n_tail == 0:
        return prefix_out.to(query_groups.dtype)
    logits = (q @ tail_k.float().transpose(-1, -2)) * scaling
    mask = tail_mask(tail_valid, n_tail, q_len, q.shape[2] // q_len, q.device)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    out = merge_softmax(prefix_out, prefix_lse, logits, tail_v)
    return out.to(query_groups.dtype)
