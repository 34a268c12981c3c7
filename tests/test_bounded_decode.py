"""Bounded decoding (#17, second part): with ``decode_budget`` an eviction cache holds at most that
many tokens per layer through any generation, evicting every ``decode_interval`` steps with its own
scores, in one room allocated once; without eviction it is exact, batched rows evict as they would
alone, and StreamingLLM's bounded cache is exactly its sinks plus the most recent tokens."""

from __future__ import annotations

import copy

import pytest
import torch

import compresskv
from compresskv.core.cache import KVLayer
from conftest import VOCAB, batch_inputs, dynamic, greedy, kv, tiny_model

BOUNDED = {
    "snapkv": dict(budget=40, window_size=8),
    "pyramidkv": dict(budget=40, window_size=8),
    "streamingllm": dict(budget=40),
    "knorm": dict(budget=40),
    "expected_attention": dict(budget=40, stat_queries=16),
}


def _stream(model, cache, ids, prompt: int, chunk: int):
    """Prefill ``ids[:, :prompt]``, close the prompt, then feed the rest ``chunk`` tokens per forward;
    returns the logits of every position from ``prompt - 1`` on and the layers' sizes after each forward."""
    sizes, logits = [], []
    with torch.inference_mode():
        out = model(input_ids=ids[:, :prompt], use_cache=True, **kv(cache))
        logits.append(out.logits[:, -1:])
        if hasattr(cache, "end_prompt"):
            cache.end_prompt()
        for start in range(prompt, ids.shape[1], chunk):
            out = model(input_ids=ids[:, start : start + chunk], use_cache=True, **kv(cache))
            logits.append(out.logits)
            sizes.append([layer.keys.shape[-2] for layer in cache.layers if isinstance(layer, KVLayer)])
    return torch.cat(logits, dim=1), sizes


def _ids(length: int, batch: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", sorted(BOUNDED))
def test_without_eviction_the_bounded_cache_is_exact(method):
    model = tiny_model("llama", "eager")
    ids = _ids(100)
    cache = compresskv.make_cache(model, method, **{**BOUNDED[method], "budget": 128}, decode_budget=2048)
    got, _ = _stream(model, cache, ids, prompt=30, chunk=1)
    want, _ = _stream(model, dynamic(model), ids, prompt=30, chunk=1)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", sorted(BOUNDED))
def test_a_layer_never_holds_more_than_its_limit_and_the_room_is_allocated_once(method):
    model = tiny_model("llama", "sdpa")
    cache = compresskv.make_cache(model, method, **BOUNDED[method], decode_budget=48, decode_interval=8)
    layers = [layer for layer in cache.layers if isinstance(layer, KVLayer)]
    limits = [layer.decode_limit for layer in layers]
    assert sum(limits) / len(limits) == pytest.approx(48, abs=1)
    _, sizes = _stream(model, cache, _ids(200), prompt=40, chunk=1)
    for step in sizes:
        assert all(size <= limit for size, limit in zip(step, limits)), step
    # every decode_interval steps a layer falls to its limit minus the interval, then fills again
    first = [step[0] for step in sizes]
    assert min(first[60:]) == limits[0] - 8 + 1 and max(first) == limits[0]
    pointers, nbytes = set(), set()
    with torch.inference_mode():
        for token in _ids(40, seed=4)[0]:
            model(input_ids=token.view(1, 1), use_cache=True, **kv(cache))
            pointers.add(layers[0].keys.data_ptr())
            nbytes.add(cache.nbytes())
    assert len(pointers) == 1 and len(nbytes) == 1  # written in place; memory flat


def test_bytes_are_the_room_and_the_query_ring():
    model = tiny_model("llama", "sdpa", kv_heads=2, heads=4)
    cache = compresskv.SnapKVCache(model, budget=40, window_size=8, decode_budget=48, decode_interval=8)
    _stream(model, cache, _ids(150, batch=2), prompt=40, chunk=1)
    head_dim, n_layers = 16, 4
    room = 2 * 48 * 2 * head_dim * 4  # batch 2 x 48 slots x 2 KV heads x head_dim, fp32, keys
    ring = 2 * 4 * 8 * head_dim * 4  # the last 8 queries of 4 query heads
    assert cache.nbytes() == n_layers * (2 * room + ring)
    assert cache.stats().tokens_seen == 150


def test_streaming_in_chunks_of_the_interval_is_token_by_token_decoding():
    """Eviction before a forward that would overflow: fed ``decode_interval`` tokens at a time,
    the cache evicts at the same points, with the same queries, as one token at a time."""
    model = tiny_model("llama", "sdpa")
    ids = _ids(160)
    make = lambda: compresskv.SnapKVCache(model, budget=40, window_size=8, decode_budget=48, decode_interval=8)  # noqa: E731
    one, _ = _stream(model, make(), ids, prompt=32, chunk=1)  # 32 + 2 x 8 = 48: chunk edges meet the limit
    eight, _ = _stream(model, make(), ids, prompt=32, chunk=8)
    assert (one - eight).abs().max().item() <= 1e-4


def test_bounded_streamingllm_holds_its_sinks_and_the_most_recent_tokens():
    model = tiny_model("llama", "sdpa")
    ids = _ids(137)
    cache = compresskv.StreamingLLMCache(model, sink=4, budget=40, decode_budget=40, decode_interval=8)
    _stream(model, cache, ids, prompt=24, chunk=1)
    full = dynamic(model)
    _stream(model, full, ids, prompt=24, chunk=1)
    layer, whole = cache.layers[0], full.layers[0]  # (a deeper layer's keys depend on what was evicted below)
    held = layer.keys.shape[-2]
    assert 32 < held <= 40
    want = torch.cat([whole.keys[:, :, :4], whole.keys[:, :, -(held - 4) :]], dim=2)
    assert torch.equal(layer.keys, want)


@pytest.mark.parametrize("method", ["snapkv", "streamingllm", "expected_attention"])
def test_a_row_is_bounded_the_same_batched_or_alone(method):
    """Rows of 64, 57 and 50 real tokens: each evicts when its own real tokens overflow, whatever
    slots padding takes in the batch."""
    model = tiny_model("llama", "sdpa", kv_heads=2)
    options = dict(BOUNDED[method], budget=52, decode_budget=56, decode_interval=4)
    ids, mask = batch_inputs(3, length=64)
    sequences, logits = greedy(model, ids, mask, compresskv.make_cache(model, method, **options), new_tokens=20)
    for row in range(3):
        alone = ids[row][mask[row] == 1][None]
        cache = compresskv.make_cache(model, method, **options)
        seq, lg = greedy(model, alone, torch.ones_like(alone), cache, new_tokens=20)
        assert torch.equal(seq[0, alone.shape[1] :], sequences[row, 64:]), f"row {row}"
        assert (lg[0] - logits[row]).abs().max().item() <= 1e-4, f"row {row}"
        assert max(layer.keys.shape[-2] for layer in cache.layers) <= 56


def test_beam_search_and_copies_of_a_bounded_cache():
    model = tiny_model("llama", "sdpa")
    ids = _ids(50)
    cache = compresskv.SnapKVCache(model, budget=40, window_size=8, decode_budget=48, decode_interval=8)
    out = model.generate(ids, max_new_tokens=30, min_new_tokens=30, num_beams=2, do_sample=False, **kv(cache))
    assert out.shape == (1, 80)
    assert max(layer.keys.shape[-2] for layer in cache.layers) <= 48
    context = compresskv.prefill(
        model, ids, compresskv.SnapKVCache(model, budget=40, window_size=8, decode_budget=48, decode_interval=8)
    )
    before = copy.deepcopy(context.layers[0].keys)
    question = _ids(20, seed=5)  # 40 kept + 20 > 48: the question's forward evicts first, in a copy
    answer = compresskv.ask(model, context, ids, question, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert answer.shape == (1, 82)
    assert torch.equal(context.layers[0].keys, before)


def test_patch_passes_the_decode_budget():
    model = tiny_model("llama", "sdpa")
    compresskv.patch(model, "pyramidkv", budget=40, window_size=8, decode_budget=48)
    out = model.generate(_ids(50), max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert out.shape == (1, 90)
    cache = compresskv.last_cache(model)
    assert cache.decode_budget == 48
    assert all(layer.keys.shape[-2] <= layer.decode_limit for layer in cache.layers)
    limits = [layer.decode_limit for layer in cache.layers]
    assert limits == sorted(limits, reverse=True) and limits[0] > 48 > limits[-1]  # PyramidKV: 48 on average


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(budget=40, window_size=8, decode_budget=16), "decode_budget"),
        (dict(budget=40, window_size=8, decode_budget=True), "decode_budget"),
        (dict(budget=40, window_size=8, decode_budget=64, decode_interval=0), "decode_interval"),
        (dict(budget=40, window_size=8, decode_budget=64, decode_tokens=32), "decode_tokens"),
    ],
)
def test_errors_name_the_parameter(options, message):
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match=message):
        compresskv.SnapKVCache(model, **options)


def test_streamingllm_must_keep_recent_tokens_and_a_forward_must_fit():
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match="sink"):
        compresskv.StreamingLLMCache(model, sink=8, budget=40, decode_budget=16, decode_interval=8)
    cache = compresskv.SnapKVCache(model, budget=40, window_size=8, decode_budget=48, decode_interval=8)
    compresskv.prefill(model, _ids(40), cache)
    with pytest.raises(ValueError, match="decode_budget"):
        with torch.inference_mode():
            model(input_ids=_ids(45, seed=6), use_cache=True, **kv(cache))

