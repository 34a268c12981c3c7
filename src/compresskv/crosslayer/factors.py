"""The numbers behind the cross-layer caches: option validators and names, the truncated SVD that
factorises a group, how layers are split into groups, and the ranks a compression ratio implies."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

KeysMode = Literal["pre_rope", "post_rope"]
KEYS_MODES = ("pre_rope", "post_rope")
REMAINDERS = ("error", "last_group")
SVD_SOLVERS = ("svd", "gram")


# -- validators ------------------------------------------------------------------------------------
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
    compression_ratio: float, tokens: int, group_len: int, kv_heads: int, head_dim: int, key_rank_fraction: float = 0.4,
    value_dim: int | None = None,
) -> tuple[int, int]:
    """(r_k, r_v) that remove at least ``compression_ratio`` of a group's K/V bytes.

    From the bytes of a group of ``G`` layers, ``T·(r_k+r_v) + G·H·d·(r_k+r_v)`` against
    ``2·G·H·T·d`` uncompressed: ``r_k + r_v = ⌊(1−ratio)·2·G·H·T·d / (T + G·H·d)⌋``, split
    ``key_rank_fraction : 1 − key_rank_fraction`` (the paper's 2:3 by default). Each rank is at
    least 1 and at most the matrix rank ``min(T, G·H·d)``; what one rank cannot take beyond that
    bound goes to the other, so the ranks hold ``1 − ratio`` of the bytes up to one rank's worth.

    Even full rank removes nothing at ``ratio = 0`` (the factors cost more than they save), so
    :class:`XKVCache` stores the prompt uncompressed there instead of calling this.

    ``value_dim`` (default ``head_dim``) is the values' width when it differs from the keys' (an MLA
    model's shared RoPE key, stored as "values" next to the latent): with ``f = key_rank_fraction``
    the factors then cost ``G·H·(f·d_k + (1−f)·d_v)`` per rank instead of ``G·H·d``.
    """
    d_v = head_dim if value_dim is None else value_dim
    width_k, width_v = group_len * kv_heads * head_dim, group_len * kv_heads * d_v
    per_rank = tokens + key_rank_fraction * width_k + (1 - key_rank_fraction) * width_v
    total = math.floor((1.0 - compression_ratio) * (width_k + width_v) * tokens / per_rank + 1e-9)
    top_k, top_v = min(tokens, width_k), min(tokens, width_v)
    rank_k = min(top_k, max(1, int(round(total * key_rank_fraction))))
    rank_v = min(top_v, max(1, total - rank_k))
    rank_k = min(top_k, max(rank_k, total - rank_v))  # keys take what the values could not
    return rank_k, rank_v
