"""What calibration, training and rank allocation share: a cache that hands each layer's new
post-RoPE keys and values to a function (no model-specific code), calibration windows at random
position offsets, and the low-rank projection of keys and values with per-head rank masks."""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import DynamicCache

from .. import compat
from ..calibration import Texts, calibration_windows
from ..core.facts import text_config


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


# -- taps on the cache's update ----------------------------------------------------------------
class KVTap(DynamicCache):
    """A cache that stores nothing: each layer's new post-RoPE keys and values go to ``fn``, and
    what ``fn`` returns is what that layer's attention uses. Every call is a fresh forward."""

    def __init__(self, model: Any, fn: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(config=model.config)
        self._fn = fn

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return self._fn(layer_idx, key_states, value_states)


def forward(model: Any, ids: torch.Tensor, tap: KVTap | None = None, **kwargs: Any) -> Any:
    if tap is None:
        return model(input_ids=ids, use_cache=False, **kwargs)
    return model(input_ids=ids, use_cache=True, **compat.cache_kwargs(tap, model.forward), **kwargs)


def position_range_for(model: Any, position_range: int | None, seq_len: int, who: str) -> int:
    """The positions calibration windows are spread over (see :func:`calibrate`)."""
    if position_range is None:
        position_range = int(getattr(text_config(model), "max_position_embeddings", 0) or seq_len)
    if isinstance(position_range, bool) or not isinstance(position_range, int) or position_range < seq_len:
        raise ValueError(f"{who}: position_range must be an int >= seq_len={seq_len}, got {position_range!r}.")
    return position_range


def window_positions(n: int, seq_len: int, position_range: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, seq_len]`` position ids: each window at a random offset in ``[0, position_range − seq_len]``."""
    offsets = torch.randint(0, position_range - seq_len + 1, (n, 1), generator=generator)
    return offsets + torch.arange(seq_len)


def ensure_windows(texts: Texts, tokenizer: Any, seq_len: int, min_windows: int, max_windows: int | None) -> torch.Tensor:
    return calibration_windows(texts, tokenizer=tokenizer, seq_len=seq_len, min_windows=min_windows, max_windows=max_windows)


def rank_masks(ranks: torch.Tensor, head_dim: int, device: torch.device) -> torch.Tensor:
    """``[..., d]`` float masks keeping the first ``ranks`` projected dims."""
    return (torch.arange(head_dim, device=device) < ranks.to(device)[..., None]).float()


def low_rank(x: torch.Tensor, mu: torch.Tensor, proj: torch.Tensor, sink_tokens: int = 0) -> torch.Tensor:
    """``μ + (x − μ)·P`` per head, with ``x``: ``[B, H, T, d]``, ``μ``: ``[H, d]``,
    ``P = U_r U_rᵀ``: ``[H, d, d]`` (or ``[B, H, d, d]``), computed in fp32; the first
    ``sink_tokens`` tokens are left exact (as the cache's ``sink_tokens`` option does)."""
    xf = x.float() - mu[:, None, :]
    out = (torch.matmul(xf, proj) + mu[:, None, :]).to(x.dtype)
    if sink_tokens:
        out = torch.cat([x[:, :, :sink_tokens], out[:, :, sink_tokens:]], dim=2)
    return out
