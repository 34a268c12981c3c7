"""xKV's prompt keys rebuilt on read, off the fused kernel (see :mod:`.xkv`).

Pre-RoPE keys do not commute with the factorisation, so each read rebuilds a block of keys from the
group's latent and the layer's factor and re-rotates it. fp32/fp64 keys are rebuilt with the
factor's columns in pair order and rotated as complex numbers (one product by ``cos + i·sin``);
other dtypes by the rotate-half formula written straight into a head-major block. The prefix's RoPE
table is computed once per forward, shared by the layers and dropped after the last one.
"""

from __future__ import annotations

import torch

from ..core.storage import tensor_bytes
from .group import ReadCost

#: key of the prefix's per-forward RoPE table among the positions' derived objects
ROPE_HALVES = "rope_halves"


#: dtypes whose pre-RoPE keys are rotated as complex numbers on read (complex64/complex128 products)
PAIRED_DTYPES = (torch.float32, torch.float64)


def pair_order(x: torch.Tensor, lead: int, heads: int, dim: int) -> torch.Tensor:
    """``x [batch, lead, heads·dim]`` or ``[batch, heads, rows, dim]`` (``lead=-1``) with each
    head's ``dim`` features reordered from rotate-half order ``(k[0..d/2), k[d/2..d))`` to pair
    order ``(k[0], k[d/2], k[1], k[d/2+1], ...)``, contiguous (a copy)."""
    half = dim // 2
    if lead == -1:
        bsz, _, rows, _ = x.shape
        return x.reshape(bsz, heads, rows, 2, half).transpose(-1, -2).reshape(bsz, heads, rows, dim)
    bsz = x.shape[0]
    return x.view(bsz, lead, heads, 2, half).transpose(-1, -2).reshape(bsz, lead, heads * dim)


class PrefixKeys:
    """Mixin of :class:`~compresskv.crosslayer.xkv.XKVLayer`: its prompt keys rebuilt from the group's
    latent and the layer's factor, re-rotated for pre-RoPE keys, a block at a time."""

    def _rope_halves(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``/``sin`` of the whole prefix, ``[batch | 1, T, 1, head_dim/2]`` (one half: the two
        halves of a rotate-half table are equal). Built by the first compressed layer a forward
        reads and shared by the others; dropped after the last one (:meth:`_read`), so it is a
        transient of the forward (``T·head_dim`` values), not held between steps."""
        cache = self.cache

        def make() -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = cache.rope.half_table(cache.positions.get(0, None, device), dtype)
            return cos[:, :, None].contiguous(), sin[:, :, None].contiguous()

        return cache.positions.derived((ROPE_HALVES, device, dtype), make)

    def _rope_turns(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``cos + i·sin`` of the whole prefix, ``[batch | 1, T, 1, head_dim/2]`` complex: the
        rotations :meth:`_paired_keys_block` multiplies by. A per-forward transient, like
        :meth:`_rope_halves`."""
        cache = self.cache

        def make() -> torch.Tensor:
            cos, sin = cache.rope.half_table(cache.positions.get(0, None, device), dtype)
            return torch.complex(cos, sin)[:, :, None].contiguous()

        return cache.positions.derived((ROPE_HALVES, "turns", device, dtype), make)

    def _paired_keys_block(self, start: int, end: int, factor_pairs: torch.Tensor, turns: torch.Tensor,
                           cost: ReadCost | None) -> torch.Tensor:
        """The rotated pre-RoPE keys of prefix tokens ``start:end`` with each head's dimensions in
        pair order (``k[i], k[i + d/2]`` side by side, see :func:`pair_order`), ``[batch, kv_heads,
        n, head_dim]`` contiguous. ``factor_pairs`` is the key factor with its columns in that order,
        so the rebuilt block is read as complex numbers and RoPE is one complex product by
        ``turns`` (:meth:`_rope_turns`): on a CPU half the time of the real-valued rotation."""
        latent = self._latent("k")
        bsz, rank = latent.shape[0], latent.shape[-1]
        n_kv, dim = self.keys.shape[1], self.keys.shape[-1]
        n = end - start
        block = latent[:, start:end] @ factor_pairs  # [batch, n, kv_heads·head_dim], pairs side by side
        if cost is not None:
            cost.flops += bsz * n * rank * n_kv * dim
            cost.rebuilt_bytes += tensor_bytes(block)
        keys = torch.view_as_complex(block.view(bsz, n, n_kv, dim // 2, 2))
        rotated = torch.empty(bsz, n_kv, n, dim // 2, dtype=keys.dtype, device=keys.device)
        torch.mul(keys, turns[:, start:end], out=rotated.transpose(1, 2))
        return torch.view_as_real(rotated).view(bsz, n_kv, n, dim)

    def _keys_block(self, start: int, end: int, cost: ReadCost | None) -> torch.Tensor:
        """Rebuilt (and, for pre-RoPE keys, re-rotated) keys of prefix tokens ``start:end``,
        ``[batch, kv_heads, n, head_dim]`` (pre-RoPE: contiguous, written head-major by the rotation)."""
        latent, factor = self._latent("k"), self.factor_k
        bsz, rank = latent.shape[0], latent.shape[-1]
        n_kv, dim = self.keys.shape[1], self.keys.shape[-1]
        n = end - start
        block = latent[:, start:end] @ factor  # [batch, n, kv_heads·head_dim]
        if cost is not None:
            cost.flops += bsz * n * rank * n_kv * dim
            cost.rebuilt_bytes += tensor_bytes(block)
        if self.cache.keys_mode != "pre_rope":
            return block.view(bsz, n, n_kv, dim).transpose(1, 2)
        # rotate_half RoPE, [k1, k2] -> [k1·cos - k2·sin, k2·cos + k1·sin], written straight into a
        # head-major block (no rotate_half copy, no concatenation, logits read it contiguously).
        half = dim // 2
        cos, sin = self._rope_halves(factor.device, block.dtype)
        cos, sin = cos[:, start:end], sin[:, start:end]
        k = block.view(bsz, n, n_kv, 2, half)
        rotated = torch.empty(bsz, n_kv, n, dim, dtype=block.dtype, device=block.device)
        out = rotated.view(bsz, n_kv, n, 2, half).transpose(1, 2)
        k1, k2, o1, o2 = k[..., 0, :], k[..., 1, :], out[..., 0, :], out[..., 1, :]
        torch.mul(k1, cos, out=o1)
        o1.addcmul_(k2, sin, value=-1)
        torch.mul(k2, cos, out=o2)
        o2.addcmul_(k1, sin)
        return rotated
