"""Expected Attention (arXiv 2510.00636), the question-agnostic eviction scorer (#17): exact without
eviction, the budget kept, and its score the attention of the expected future query."""

from __future__ import annotations

import pytest
import torch

import compresskv
from compresskv.core.rope import RotaryTable
from conftest import batch_inputs, dynamic, greedy, tiny_model


def test_without_eviction_it_is_the_full_cache():
    model = tiny_model("llama", "sdpa", layers=2)
    ids, mask = batch_inputs(3, length=48)  # left padding
    expected = greedy(model, ids, mask, dynamic(model))
    got = greedy(model, ids, mask, compresskv.ExpectedAttentionCache(model, budget=64))
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_it_keeps_the_budget_and_the_sinks():
    model = tiny_model("llama", "sdpa", layers=2)
    ids, _ = batch_inputs(1, length=64)
    cache = compresskv.make_cache(model, "expected_attention", budget=20, n_sink=4)
    greedy(model, ids, None, cache, new_tokens=1)
    assert cache.stats().tokens_stored == [20, 20]
    query, keys = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)
    scores = cache.scores(query, keys, None, 0, 0.25)
    assert scores.shape == (1, 2, 64) and torch.isinf(scores[..., :4]).all() and torch.isfinite(scores[..., 4:]).all()
    # with the covariance term too, and pooled: still a score per token, sinks first
    both = compresskv.ExpectedAttentionCache(model, budget=20, use_covariance=True).scores(query, keys, None, 0, 0.25)
    assert torch.isinf(both[..., :4]).all() and torch.isfinite(both[..., 4:]).all()


def test_the_score_is_the_attention_of_the_rotated_mean_query():
    """Queries that are one vector before RoPE, one future position, no covariance: the score is the
    softmax of that vector rotated to the next position against the keys."""
    model = tiny_model("llama", "sdpa", layers=2)  # 4 query heads, 2 KV heads of 16 dims
    cache = compresskv.ExpectedAttentionCache(model, budget=8, n_future=1, n_sink=0, use_covariance=False, kernel_size=1)
    rope = RotaryTable(model, "test")
    g = torch.Generator().manual_seed(0)
    t, d = 40, 16
    u = torch.randn(1, 4, 1, d, generator=g)
    cos, sin = rope.table(torch.arange(t)[None])
    query = u * cos[:, None] + torch.cat([-u[..., d // 2:], u[..., : d // 2]], -1) * sin[:, None]  # RoPE at 0..t-1
    keys = torch.randn(1, 2, t, d, generator=g)
    got = cache.scores(query, keys, None, 0, 0.25)
    cos_t, sin_t = rope.table(torch.tensor([[t]]))
    future = u[:, :, 0] * cos_t + torch.cat([-u[:, :, 0, d // 2:], u[:, :, 0, : d // 2]], -1) * sin_t  # [1, 4, d]
    k = keys.repeat_interleave(2, dim=1)
    expected = (0.25 * torch.einsum("bhtd,bhd->bht", k, future)).softmax(-1).view(1, 2, 2, t).mean(2)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_bad_options_are_refused_by_name():
    model = tiny_model("llama", "sdpa", layers=2)
    for name, bad in (("n_future", 0), ("stat_queries", -1), ("n_sink", 1.5), ("kernel_size", 4)):
        with pytest.raises(ValueError, match=name):
            compresskv.ExpectedAttentionCache(model, compression_ratio=0.5, **{name: bad})
