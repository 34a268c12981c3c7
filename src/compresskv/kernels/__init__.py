"""Attention kernels that read compressed caches in place (optional Triton, PyTorch references).

Importing this package never imports triton; a kernel is compiled the first time it is launched.
The package exports what :mod:`compresskv.kernels.xkv_decode` exports (its ``__all__``).
"""

from __future__ import annotations

from . import xkv_decode as _xkv_decode
from .xkv_decode import *  # noqa: F403 - the module's __all__ is the package's

__all__ = list(_xkv_decode.__all__)
