"""The inputs of a fused xKV prefix read: the prefix's RoPE (:class:`PrefixRope`) and the checked
bundle every decode implementation takes (:class:`DecodeInputs`, :func:`decode_inputs`)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch


# -- RoPE of the prefix --------------------------------------------------------------------------
@dataclass
class PrefixRope:
    """How pre-RoPE prefix keys are re-rotated on read: standard rotate-half RoPE with
    ``cos = cos(pos·inv_freq)·scaling`` (and ``sin`` likewise) on both halves of the head.

    Positions are either ``offsets`` (``[batch, 1]`` integers: token ``t`` of row ``b`` sits at
    ``offsets[b] + t``, what ``generate`` produces, left padding included) or ``table``
    (``[batch, T]`` integers). ``inv_freq`` is ``[d/2]``; ``scaling`` is the rotary embedding's
    ``attention_scaling``. This is exactly :meth:`compresskv.core.rope.RotaryTable.table`.
    """

    inv_freq: torch.Tensor
    offsets: torch.Tensor | None = None
    table: torch.Tensor | None = None
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if (self.offsets is None) == (self.table is None):
            raise ValueError("PrefixRope: give exactly one of offsets= ([batch, 1]) and table= ([batch, T]).")

    def positions(self, start: int, end: int) -> torch.Tensor:
        """Positions of prefix tokens ``start:end``, ``[batch, n]`` int64."""
        if self.table is not None:
            return self.table[:, start:end].to(torch.long)
        assert self.offsets is not None
        return self.offsets.to(torch.long) + torch.arange(start, end, device=self.offsets.device)

    def cos_sin(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos``/``sin`` of one half of the head, ``[batch, n, d/2]``, for tokens ``start:end``."""
        pos = self.positions(start, end)
        freqs = pos[..., None].float() * self.inv_freq.to(device=pos.device, dtype=torch.float32)
        return freqs.cos() * self.scaling, freqs.sin() * self.scaling


# -- the inputs of a read -------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeInputs:
    """The checked inputs of one fused prefix read (see :func:`xkv_decode_reference` for each),
    with ``scaling`` resolved and ``sizes`` = ``(batch, kv_heads, R, d, T, r_k, r_v)``. Every
    decode function takes the inputs as its leading arguments, or one :class:`DecodeInputs`
    (from :func:`decode_inputs`) in their place, which is then not checked again."""

    query_groups: torch.Tensor
    latent_k: torch.Tensor
    factor_k: torch.Tensor
    latent_v: torch.Tensor
    factor_v: torch.Tensor
    rope: PrefixRope | None
    key_mask: torch.Tensor | None
    scaling: float
    sizes: tuple[int, int, int, int, int, int, int]

    def args(self) -> tuple[Any, ...]:
        """``(query_groups, latent_k, factor_k, latent_v, factor_v, rope, key_mask, scaling)``."""
        return (self.query_groups, self.latent_k, self.factor_k, self.latent_v, self.factor_v, self.rope,
                self.key_mask, self.scaling)


def decode_inputs(
    query_groups: torch.Tensor,
    latent_k: torch.Tensor,
    factor_k: torch.Tensor,
    latent_v: torch.Tensor,
    factor_v: torch.Tensor,
    rope: PrefixRope | None = None,
    key_mask: torch.Tensor | None = None,
    scaling: float | None = None,
) -> DecodeInputs:
    """Check the inputs of a fused prefix read (shapes, RoPE, mask) and bundle them."""
    if query_groups.dim() != 4:
        raise ValueError(f"query_groups must be [batch, kv_heads, rows, head_dim], got {tuple(query_groups.shape)}.")
    bsz, n_kv, rows, dim = query_groups.shape
    if latent_k.dim() != 3 or latent_v.dim() != 3 or latent_k.shape[:2] != latent_v.shape[:2]:
        raise ValueError(
            f"latent_k/latent_v must be [batch, T, rank] with the same T, got {tuple(latent_k.shape)} "
            f"and {tuple(latent_v.shape)}."
        )
    length, rank_k, rank_v = latent_k.shape[1], latent_k.shape[2], latent_v.shape[2]
    for name, factor, rank in (("factor_k", factor_k, rank_k), ("factor_v", factor_v, rank_v)):
        if tuple(factor.shape) != (latent_k.shape[0], rank, n_kv * dim):
            raise ValueError(
                f"{name} must be [batch, rank, kv_heads*head_dim] = {(latent_k.shape[0], rank, n_kv * dim)}, "
                f"got {tuple(factor.shape)}."
            )
    if latent_k.shape[0] != bsz:
        raise ValueError(f"latents have batch {latent_k.shape[0]}, queries {bsz}.")
    if rope is not None:
        if dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {dim}.")
        if rope.inv_freq.numel() != dim // 2:
            raise ValueError(f"rope.inv_freq must have head_dim/2 = {dim // 2} entries, got {rope.inv_freq.numel()}.")
        if rope.table is not None and tuple(rope.table.shape) != (bsz, length):
            raise ValueError(f"rope.table must be [batch, T] = {(bsz, length)}, got {tuple(rope.table.shape)}.")
    if key_mask is not None and not (
        (key_mask.dim() == 2 and tuple(key_mask.shape) == (bsz, length))
        or (key_mask.dim() == 3 and tuple(key_mask.shape) == (bsz, n_kv, length))
    ):
        raise ValueError(f"key_mask must be [batch, T] or [batch, kv_heads, T] booleans, got {tuple(key_mask.shape)}.")
    scaling = dim**-0.5 if scaling is None else float(scaling)
    return DecodeInputs(query_groups, latent_k, factor_k, latent_v, factor_v, rope, key_mask, scaling,
                        (bsz, n_kv, rows, dim, length, rank_k, rank_v))




def _inputs(args: tuple[Any, ...], named: dict[str, Any]) -> DecodeInputs:
    if len(args) == 1 and not named and isinstance(args[0], DecodeInputs):
        return args[0]
    return decode_inputs(*args, **named)


def _takes_inputs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show ``fn(*inputs, **options)`` with :func:`decode_inputs`' parameters, then its options."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    base = inspect.signature(decode_inputs)
    fn.__signature__ = base.replace(  # type: ignore[attr-defined]
        parameters=[*base.parameters.values(), *own], return_annotation=inspect.signature(fn).return_annotation
    )
    return fn
