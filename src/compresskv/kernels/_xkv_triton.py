"""The Triton kernel of xKV's fused decode. Imported only when it is launched (it needs triton);
:mod:`compresskv.kernels.xkv_decode` holds the wrapper, the reference and the documentation."""

from __future__ import annotations

import triton
import triton.language as tl

# Cody-Waite split of 2π: 6.28125 has 8 significant bits, so n·HI is exact for |n| < 2^16 and the
# reduced angle keeps fp32 accuracy even where a fast hardware cos/sin would not (large positions).
_INV_2PI = 0.15915494309189535
_TWO_PI_HI = 6.28125
_TWO_PI_LO = 0.0019353071795864769


@triton.jit
def xkv_split_kernel(
    Q, QL, LK, FK, LV, POS, INV, MASK, ACC, MOUT, LOUT,
    stride_qb, stride_qh, stride_qr,
    stride_qlb, stride_qlh, stride_qlr,
    stride_lkb, stride_lkt,
    stride_fkb, stride_fkr,
    stride_lvb, stride_lvt,
    stride_pb, stride_pt,
    stride_mb, stride_mh, stride_mt,
    stride_ab, stride_ah, stride_as, stride_ar,
    stride_sb, stride_sh, stride_ss,
    T, R, RANK_K, RANK_V, HALF, H, SPLIT_LEN,
    qk_scale, rope_scale,
    ROPE: tl.constexpr, POS_TABLE: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_RK: tl.constexpr, BLOCK_RV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One (KV head, value-rank block, token split, batch row): online softmax of the head's
    ``R`` query rows over the split's prefix tokens, accumulated in value-latent space.

    Writes the unnormalised ``Σ p·latent_v`` ``[R, BLOCK_RV]``, the running max ``m`` (log2
    domain, logits pre-multiplied by ``qk_scale = scaling·log2 e``) and the sum ``l``.
    """
    pid_hv = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    # Heads vary fastest so that the programs reading the same latent tile run together (L2 reuse).
    h = pid_hv % H
    vb = pid_hv // H
    dtype = LK.dtype.element_ty

    t_begin = pid_s * SPLIT_LEN
    t_end = tl.minimum(t_begin + SPLIT_LEN, T)
    offs_r = tl.arange(0, BLOCK_R)
    offs_t = tl.arange(0, BLOCK_T)
    offs_rk = tl.arange(0, BLOCK_RK)
    offs_v = vb * BLOCK_RV + tl.arange(0, BLOCK_RV)
    r_ok = offs_r < R
    v_ok = offs_v < RANK_V

    if ROPE:
        # The head's query, split into the two rotate-half halves (loaded once).
        offs_d = tl.arange(0, BLOCK_HALF)
        d_ok = offs_d < HALF
        q_ptr = Q + b * stride_qb + h * stride_qh + offs_r[:, None] * stride_qr + offs_d[None, :]
        q_mask = r_ok[:, None] & d_ok[None, :]
        q1 = tl.load(q_ptr, mask=q_mask, other=0.0).to(dtype)
        q2 = tl.load(q_ptr + HALF, mask=q_mask, other=0.0).to(dtype)
        inv = tl.load(INV + offs_d, mask=d_ok, other=0.0)
        pos0 = tl.load(POS + b * stride_pb)
        fk_base = FK + b * stride_fkb + h * (2 * HALF) + offs_d[None, :]
    else:
        ql_base = QL + b * stride_qlb + h * stride_qlh + offs_r[:, None] * stride_qlr

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_RV], tl.float32)

    for t0 in range(t_begin, t_end, BLOCK_T):
        t = t0 + offs_t
        t_ok = t < t_end
        lk_base = LK + b * stride_lkb + t[:, None] * stride_lkt
        if ROPE:
            # Rebuild the tile's keys, one rotate-half half at a time, in registers:
            # K1 = latent · F[:, :d/2], K2 = latent · F[:, d/2:], tiled over the rank.
            k1 = tl.zeros([BLOCK_T, BLOCK_HALF], tl.float32)
            k2 = tl.zeros([BLOCK_T, BLOCK_HALF], tl.float32)
            for r0 in range(0, RANK_K, BLOCK_RK):
                rk = r0 + offs_rk
                rk_ok = rk < RANK_K
                lk = tl.load(lk_base + rk[None, :], mask=t_ok[:, None] & rk_ok[None, :], other=0.0)
                f_ptr = fk_base + rk[:, None] * stride_fkr
                f_mask = rk_ok[:, None] & d_ok[None, :]
                f1 = tl.load(f_ptr, mask=f_mask, other=0.0)
                f2 = tl.load(f_ptr + HALF, mask=f_mask, other=0.0)
                k1 = tl.dot(lk, f1, k1, input_precision=DOT_PREC)
                k2 = tl.dot(lk, f2, k2, input_precision=DOT_PREC)
            # RoPE on chip: cos/sin of the tile's positions, never read from memory.
            if POS_TABLE:
                pos = tl.load(POS + b * stride_pb + t * stride_pt, mask=t_ok, other=0).to(tl.float32)
            else:
                pos = (pos0 + t).to(tl.float32)
            ang = pos[:, None] * inv[None, :]
            turns = tl.floor(ang * _INV_2PI + 0.5)
            ang = (ang - turns * _TWO_PI_HI) - turns * _TWO_PI_LO
            cos = tl.cos(ang) * rope_scale
            sin = tl.sin(ang) * rope_scale
            # rotate_half: [k1, k2] -> [k1·cos - k2·sin, k2·cos + k1·sin] (cos/sin equal on both halves).
            kr1 = (k1 * cos - k2 * sin).to(dtype)
            kr2 = (k2 * cos + k1 * sin).to(dtype)
            qk = tl.dot(q1, tl.trans(kr1), input_precision=DOT_PREC)
            qk = tl.dot(q2, tl.trans(kr2), qk, input_precision=DOT_PREC)
        else:
            # Post-RoPE keys: logits straight from the latent, q_lat = q·F_hᵀ computed once outside.
            qk = tl.zeros([BLOCK_R, BLOCK_T], tl.float32)
            for r0 in range(0, RANK_K, BLOCK_RK):
                rk = r0 + offs_rk
                rk_ok = rk < RANK_K
                ql = tl.load(ql_base + rk[None, :], mask=r_ok[:, None] & rk_ok[None, :], other=0.0)
                lk = tl.load(lk_base + rk[None, :], mask=t_ok[:, None] & rk_ok[None, :], other=0.0)
                qk = tl.dot(ql, tl.trans(lk), qk, input_precision=DOT_PREC)

        keep = t_ok
        if HAS_MASK:
            valid = tl.load(MASK + b * stride_mb + h * stride_mh + t * stride_mt, mask=t_ok, other=0)
            keep = keep & (valid != 0)
        qk = tl.where(keep[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen only masked tokens keeps m = -inf; subtract 0 there instead (no NaN).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # Values are never rebuilt: accumulate p·latent_v and apply the factor once at the end.
        lv = tl.load(
            LV + b * stride_lvb + t[:, None] * stride_lvt + offs_v[None, :],
            mask=t_ok[:, None] & v_ok[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(dtype), lv, acc, input_precision=DOT_PREC)
        m_i = m_new

    a_ptr = ACC + b * stride_ab + h * stride_ah + pid_s * stride_as + offs_r[:, None] * stride_ar + offs_v[None, :]
    tl.store(a_ptr, acc, mask=r_ok[:, None] & v_ok[None, :])
    s_off = b * stride_sb + h * stride_sh + pid_s * stride_ss + offs_r
    # Every value block computes the same m and l; the first one writes them.
    first = offs_r < tl.where(vb == 0, R, 0)
    tl.store(MOUT + s_off, m_i, mask=first)
    tl.store(LOUT + s_off, l_i, mask=first)
