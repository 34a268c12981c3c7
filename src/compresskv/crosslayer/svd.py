"""Single-layer SVD, the baseline xKV (arXiv 2503.18893) is compared against: xKV with groups of one
layer (each layer's keys and values factorised on their own)."""

from __future__ import annotations

from typing import Any

import torch

from .xkv import XKVCache


class SVDCache(XKVCache):
    """Single-layer SVD: :class:`XKVCache` with ``group_size=1`` (each layer factorised on its own),
    the baseline xKV is compared against.

    Args:
        model: the transformers model the cache is for.
        **kwargs: :class:`XKVCache`'s options but ``group_size`` (always 1; ``remainder`` does not
            matter then): ``rank_k``, ``rank_v``, ``compression_ratio``, ``start_layer``,
            ``end_layer``, ``keys``, ``key_rank_fraction``, ``svd_solver``, ``read_mode``, ``profile``.
    """

    method = "svd"

    fixed_options = ("group_size", "remainder")  # one layer per group: nothing to group or leave over

    def __init__(self, model: torch.nn.Module, **kwargs: Any) -> None:
        if "group_size" in kwargs:
            raise TypeError(
                f"{type(self).__name__} factorises each layer on its own (group_size=1); for groups of "
                f"layers use XKVCache(group_size=...), got group_size={kwargs['group_size']!r}."
            )
        super().__init__(model, group_size=1, **kwargs)
