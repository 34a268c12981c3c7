"""J-LRD, the joint low-rank decomposition of EliteKV (arXiv 2503.01586, §3.2): the sizes
(``rope_pairs``, ``kv_dim``, from a ratio) and the factorisation of one attention layer's weights.

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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SVD_MODES = ("auto", "weight", "activation")


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
