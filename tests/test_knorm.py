"""K-norm eviction: exact at no compression, keeps the lowest-norm keys, real bytes."""

from __future__ import annotations

import pytest
import torch

import compresskv
from conftest import ATTENTIONS, batch_inputs, dynamic, greedy, kv, tiny_model


@pytest.mark.parametrize("attn", ATTENTIONS)
def test_no_compression_matches_dynamic_cache(attn):
    model = tiny_model("llama", attn)
    ids, mask = batch_inputs(3, length=48)
    ref = greedy(model, ids, mask, dynamic(model))
    for options in (dict(compression_ratio=0.0), dict(budget=64)):
        out = greedy(model, ids, mask, compresskv.KnormCache(model, **options))
        assert torch.equal(out[0], ref[0])
        assert (out[1] - ref[1]).abs().max().item() <= 1e-5


def test_keeps_the_lowest_norm_keys_and_holds_only_them():
    model = tiny_model("qwen2", "sdpa")
    ids, _ = batch_inputs(1, length=40)
    full = dynamic(model)
    model(input_ids=ids, use_cache=True, **kv(full))
    cache = compresskv.KnormCache(model, budget=12)
    model(input_ids=ids, use_cache=True, **kv(cache))
    for plain, layer in zip(full.layers, cache.layers):
        norms = plain.keys.float().norm(dim=-1)  # [1, kv_heads, 40]
        expected = torch.sort(torch.sort(norms, dim=-1, stable=True).indices[..., :12], dim=-1).values
        index = expected[..., None].expand(-1, -1, -1, plain.keys.shape[-1])
        assert torch.equal(layer.keys, plain.keys.gather(2, index))
        assert torch.equal(layer.values, plain.values.gather(2, index))
    stats = cache.stats()
    assert stats.tokens_seen == 40 and set(stats.tokens_stored) == {12}
    assert stats.nbytes == pytest.approx(stats.uncompressed_nbytes * 12 / 40)


def test_registered_and_ratio_bytes():
    model = tiny_model("llama", "sdpa")
    assert "knorm" in compresskv.available_methods()
    assert compresskv.method_options("knorm") == [
        "budget", "compression_ratio", "window_size", "decode_tokens", "decode_budget", "decode_interval"
    ]
    ids, mask = batch_inputs(1, length=64)
    cache = compresskv.make_cache(model, "knorm", compression_ratio=0.75)
    greedy(model, ids, mask, cache, new_tokens=1)
    assert cache.stats().ratio == pytest.approx(0.25)
    with pytest.raises(ValueError, match="window_size"):
        compresskv.KnormCache(model, budget=8, window_size=-1)
