"""Group-wise integer quantization of cached tokens, as KIVI stores them (arXiv 2402.02750).

Keys are quantized **per channel**: each channel's min and max over a group of ``group``
consecutive tokens give its scale and zero point (keys have outlier channels, so one range per
channel keeps the others precise). Values are quantized **per token**: each token's range over a
group of ``group`` consecutive channels (values have no outlier channels, and attention mixes
them per token). Codes are unsigned ``bits``-bit integers, packed ``8 // bits`` to a byte; scales
and zero points are kept in 16 bits (the model's dtype when it is already 16-bit, else fp16).

Tensors are ``[batch, heads, tokens, channels]``; every per-group tensor keeps tokens (or groups
of tokens) on dim -2, so a layer grows all of them by appending along dim -2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: the supported code widths
BITS = (2, 4, 8)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (keys or values) is quantized: ``bits`` per code, ``group`` tokens (keys,
    ``per_channel=True``) or channels (values) sharing one scale and zero point."""

    bits: int
    group: int
    per_channel: bool

    def scale_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype if dtype.itemsize == 2 else torch.float16

    def token_bytes(self, channels: int, dtype: torch.dtype) -> float:
        """Bytes per token and head of a quantized tensor with ``channels`` channels: codes plus
        the token's share of the scales and zero points."""
        codes = (channels * self.bits + 7) // 8
        s = self.scale_dtype(dtype).itemsize
        if self.per_channel:
            return codes + 2 * channels * s / self.group
        return codes + 2 * (channels // self.channel_group(channels)) * s

    def channel_group(self, channels: int) -> int:
        """Channels sharing a value scale: ``group``, or every channel when they do not divide."""
        return self.group if channels % self.group == 0 else channels


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``uint8`` codes ``[..., n]`` stored in ``bits`` bits each, ``8 // bits`` to a byte (``n`` padded
    with zero codes to a whole byte)."""
    per = 8 // bits
    if per == 1:
        return codes
    pad = -codes.shape[-1] % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    out = codes[..., 0::per].clone()
    for i in range(1, per):
        out |= codes[..., i::per] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The ``n`` codes per row that :func:`pack` stored, as ``dtype``. Each code position is written
    straight into one output of ``dtype`` (strided): stacking the shifted bytes and converting after,
    the obvious way, measured 10-20x slower on a CPU, and this runs for every stored token at every
    decode step."""
    per = 8 // bits
    if per == 1:
        return packed.to(dtype)
    mask = (1 << bits) - 1
    out = torch.empty(*packed.shape[:-1], packed.shape[-1] * per, dtype=dtype, device=packed.device)
    for i in range(per):
        out[..., i::per] = (packed >> (bits * i)) & mask
    return out[..., :n]


def quantize(x: torch.Tensor, spec: QuantSpec, valid: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale, zero)`` of ``x`` (``[batch, heads, tokens, channels]``). Per channel, the
    tokens must be a multiple of ``spec.group``; scale and zero are ``[b, h, tokens/group, channels]``,
    and the range of a group spans its ``valid`` tokens only (``[b, h, tokens]``; padding and filler,
    never read, must not widen it). Per token, they are ``[b, h, tokens, channels/group]``."""
    b, h, t, c = x.shape
    levels = (1 << spec.bits) - 1
    xf = x.float()
    if spec.per_channel:
        if t % spec.group:
            raise ValueError(f"quantize: {t} tokens is not a multiple of the key group size {spec.group}")
        grouped = xf.view(b, h, t // spec.group, spec.group, c)
        if valid is None:
            lo, hi = grouped.amin(dim=3), grouped.amax(dim=3)
        else:
            real = valid.view(b, h, t // spec.group, spec.group, 1)
            lo = grouped.masked_fill(~real, float("inf")).amin(dim=3)
            hi = grouped.masked_fill(~real, float("-inf")).amax(dim=3)
            empty = torch.isinf(lo)  # a group of padding only: any finite range
            lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
        expand = (lambda s: s[:, :, :, None, :])  # noqa: E731 - one broadcast, used twice
    else:
        g = spec.channel_group(c)
        grouped = xf.view(b, h, t, c // g, g)
        lo, hi = grouped.amin(dim=4), grouped.amax(dim=4)
        expand = (lambda s: s[..., None])  # noqa: E731
    sdt = spec.scale_dtype(x.dtype)
    # Rounded to the stored precision first, so that codes are computed with the scale that is read back.
    scale = ((hi - lo) / levels).to(sdt)
    zero = lo.to(sdt)
    safe = scale.float().clamp_min(torch.finfo(torch.float16).tiny)
    codes = ((grouped - expand(zero.float())) / expand(safe)).round_().clamp_(0, levels).to(torch.uint8)
    return pack(codes.view(b, h, t, c), spec.bits), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec,
               channels: int, dtype: torch.dtype) -> torch.Tensor:
    """The tensor :func:`quantize` encoded, ``[batch, heads, tokens, channels]`` in ``dtype``."""
    q = unpack(codes, spec.bits, channels, dtype)
    b, h, t, c = q.shape
    if spec.per_channel:
        grouped = q.reshape(b, h, t // spec.group, spec.group, c)
        out = torch.addcmul(zero[:, :, :, None, :].to(dtype), grouped, scale[:, :, :, None, :].to(dtype))
    else:
        g = spec.channel_group(c)
        out = torch.addcmul(zero[..., None].to(dtype), q.reshape(b, h, t, c // g, g), scale[..., None].to(dtype))
    return out.view(b, h, t, c)


__all__ = ["BITS", "QuantSpec", "dequantize", "pack", "quantize", "unpack"]
