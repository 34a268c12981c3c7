"""RoPE helpers matching transformers' layout."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The ``rotate_half`` of transformers' RoPE: ``[x1, x2] -> [-x2, x1]`` on the last dim (pair
    ``i`` is dims ``i`` and ``i + d/2``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
