"""Expected Attention (Devoto et al., arXiv 2510.00636; kvpress's ExpectedAttentionPress): score each
prompt token by the attention that future queries are expected to pay it, so that a context is
compressed without knowing the question that will follow (``compresskv.prefill`` + ``ask``,
``compresskv bench --question-after``). SnapKV scores by what the prompt's last queries attend to,
which is the question when the prompt ends with it, and only the context's tail when it does not.

Per query head, the last ``stat_queries`` prompt queries are taken back before RoPE (at their
positions) and summarised by their mean ``μ`` and covariance ``Σ``; the rotation RoPE will apply at
the next ``n_future`` positions is averaged into one linear map ``R̄`` (per pair of dims, the mean
``cos`` and ``sin``). A future query is modelled as ``q ~ N(R̄μ, R̄ΣR̄ᵀ)``, so its expected
``exp(s·qᵀk)`` is ``exp(s·(R̄μ)ᵀk + s²·kᵀR̄ΣR̄ᵀk / 2)``; normalised over the prompt's keys, that is the
expected attention of the head, averaged over the query heads of each KV head. The first ``n_sink``
real tokens are always kept.

Two departures from the paper's press, both measured on the embedded model (niah_single, 4k
tokens, ratio 0.5, question asked after compression, seeds 0-2): scores are max-pooled over
``kernel_size`` neighbours as SnapKV's are (without it the answer lost one digit of the 7-digit
number: 0/3; with it 3/3), and the covariance term is off by default (with it 0/3: its
``s²·kᵀΣk/2`` grows with the key's norm and drowns the mean term). The score is not weighted by the
value's norm (the eviction scorers see keys only)."""

from __future__ import annotations

from typing import Any

import torch

from ..core.facts import refuse_mla
from ..core.rope import RotaryTable, rotate_half
from .base import EvictionCache, _pool


def _rotate_half_matrix(d: int, device: torch.device) -> torch.Tensor:
    """``J`` with ``J·x = rotate_half(x)``."""
    return rotate_half(torch.eye(d, device=device)).T


class ExpectedAttentionCache(EvictionCache):
    """Keep, per layer and KV head, the prompt tokens future queries are expected to attend to most.

    Args:
        model: the transformers model the cache is for (standard RoPE over the whole head).
        n_future: future positions whose RoPE rotation is averaged (default 512).
        stat_queries: last prompt queries whose statistics model the future ones (default 128).
        n_sink: first real tokens always kept (default 4).
        use_covariance: add the covariance term (default ``False``: the mean query only; on the
            embedded model the term made every needle answer wrong, see the module notes).
        window_size: most recent prompt tokens always kept (default 0, as the paper's press).
        kernel_size: scores max-pooled over this many neighbours (odd; default 7, as SnapKV; 1: none).
        **kwargs: :class:`EvictionCache`'s ``budget`` or ``compression_ratio``, ``decode_tokens``,
            ``decode_budget`` and ``decode_interval`` (bounded decoding, scored from the last
            ``stat_queries`` queries).
    """

    method = "expected_attention"
    supports_mla = False

    def __init__(self, model: torch.nn.Module, *, n_future: int = 512, stat_queries: int = 128, n_sink: int = 4,
                 use_covariance: bool = False, window_size: int = 0, kernel_size: int = 7, **kwargs: Any) -> None:
        who = type(self).__name__
        refuse_mla(model, who, "its expected future query is rotated by RoPE over the whole head, and MLA rotates "
                   "only qk_rope_head_dim dims of a key, shared by every head")
        for name, value, least in (("n_future", n_future, 1), ("stat_queries", stat_queries, 1), ("n_sink", n_sink, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{who}: {name} must be an int >= {least}, got {value!r}.")
        self.n_future, self.stat_queries, self.n_sink = n_future, stat_queries, n_sink
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{who}: kernel_size must be an odd int >= 1, got {kernel_size!r}.")
        self.use_covariance = bool(use_covariance)
        self.kernel_size = kernel_size
        self.rope = RotaryTable(model, who, needs="expected attention", instead="use another scorer (snapkv, knorm)")
        super().__init__(model, window_size=window_size, **kwargs)

    @property
    def query_memory(self) -> int:
        return self.stat_queries

    def scores(
        self, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, window: int, scaling: float,
        seen: torch.Tensor | None = None,
    ) -> torch.Tensor:
        bsz, n_kv, seq_len, dim = keys.shape
        n_q, device = query.shape[1], keys.device
        groups = n_q // n_kv
        real = valid.to(torch.bool) if valid is not None else torch.ones(bsz, n_kv, seq_len, dtype=torch.bool, device=device)
        # [b] the newest query's position + 1 (real tokens stored, when no eviction has happened yet)
        length = seen.to(device) if seen is not None else real[:, 0].sum(-1)
        n = min(self.stat_queries, query.shape[2])
        at = length[:, None] - n + torch.arange(n, device=device)  # [b, n] positions of the last n queries
        # a row with fewer real tokens than n: its first slots are padding, left out of its statistics
        # (each row's statistics are its own, batched or alone)
        use = (at >= 0).float()[:, None, :, None]  # [b, 1, n, 1]
        cos, sin = self.rope.table(at.clamp_min(0))
        q = self.rope.unrotate(query[:, :, -n:].float(), cos[:, None], sin[:, None]) * use  # [b, n_q, n, d]
        count = use.sum(dim=2)  # [b, 1, 1]
        mean = q.sum(dim=2) / count
        future = length[:, None] + torch.arange(self.n_future, device=device)
        cos_f, sin_f = self.rope.table(future)
        cos_f, sin_f = cos_f.mean(dim=1), sin_f.mean(dim=1)  # [b, d]: R̄x = x·cos̄ + rotate_half(x)·sin̄
        rbar = torch.diag_embed(cos_f) + sin_f[:, :, None] * _rotate_half_matrix(dim, device)[None]  # [b, d, d]
        mu = torch.einsum("bij,bhj->bhi", rbar, mean)  # [b, n_q, d]
        k = keys.float().repeat_interleave(groups, dim=1)  # [b, n_q, T, d]
        logits = scaling * torch.einsum("bhtd,bhd->bht", k, mu)
        if self.use_covariance and n > 1:
            centred = (q - mean[:, :, None]) * use
            cov = centred.transpose(-1, -2) @ centred / (count[..., None] - 1).clamp_min(1)  # [b, n_q, d, d]
            cov = rbar[:, None] @ cov @ rbar[:, None].transpose(-1, -2)
            logits = logits + 0.5 * scaling**2 * ((k @ cov) * k).sum(-1)
        mask = real.repeat_interleave(groups, dim=1)
        probs = logits.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        scores = probs.view(bsz, n_kv, groups, seq_len).mean(dim=2)
        if self.kernel_size > 1:  # a token's neighbours go with it (a number is several tokens)
            scores = _pool(scores, real, self.kernel_size, "maxpool")
        if self.n_sink:
            scores = scores.masked_fill(real & (real.cumsum(-1) <= self.n_sink), float("inf"))
        scores = scores.masked_fill(~real, float("-inf"))
        return scores[..., : seq_len - window]
