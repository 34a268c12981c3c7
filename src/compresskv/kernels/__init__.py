"""Attention kernels that read compressed caches in place (optional Triton, PyTorch references).

Importing this package never imports triton; a kernel is compiled the first time it is launched.
"""

from __future__ import annotations

from .xkv_decode import (
    PrefixRope,
    decode_flops,
    merge_with_tail,
    tail_mask,
    triton_available,
    xkv_decode,
    xkv_decode_reference,
    xkv_decode_triton,
)

__all__ = [
    "PrefixRope",
    "decode_flops",
    "merge_with_tail",
    "tail_mask",
    "triton_available",
    "xkv_decode",
    "xkv_decode_reference",
    "xkv_decode_triton",
]
