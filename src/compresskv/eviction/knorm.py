"""K-norm eviction (Devoto et al., arXiv 2406.11430; kvpress's KnormPress): keep the keys with the
lowest L2 norm, which the paper finds draw the most attention. Needs no query, so it is the
cheapest scorer; everything else (budgets per row, padding, chunked prefill, batches) is the
eviction base's."""

from __future__ import annotations

from typing import Any

import torch

from .base import EvictionCache


class KnormCache(EvictionCache):
    """Keep, per layer and KV head, the prompt tokens whose keys have the lowest L2 norm.

    Args:
        model: the transformers model the cache is for (its attention is switched to compresskv's).
        window_size: most recent prompt tokens always kept (0, the paper's setting: none).
        **kwargs: :class:`EvictionCache`'s ``budget`` (tokens kept per layer and KV head, window
            included; must exceed ``window_size``) or ``compression_ratio`` (instead, the fraction
            of prompt tokens evicted, in [0, 1)); ``decode_tokens``; ``decode_budget`` and
            ``decode_interval`` (bounded decoding, see :mod:`compresskv.eviction.bounded`).
    """

    method = "knorm"

    def __init__(self, model: torch.nn.Module, *, window_size: int = 0, **kwargs: Any) -> None:
        super().__init__(model, window_size=window_size, **kwargs)  # the paper keeps no window

    query_memory = 0  # scores from the keys alone

    def scores(
        self, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, window: int, scaling: float,
        seen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # RoPE rotates pairs of dims, so the stored (rotated) keys have their pre-RoPE norms.
        scores = -keys[:, :, : keys.shape[2] - window].float().norm(dim=-1)
        if valid is not None:
            scores = scores.masked_fill(~valid[..., : scores.shape[-1]].to(torch.bool), float("-inf"))
        return scores
