"""Static, compileable decoding (#19): an eviction cache built with ``decode_tokens=N`` moves its
kept tokens into buffers with room for N more right after compression and decodes into them in
place, with the same shapes and Python state at every step, so ``torch.compile`` traces a decode
step once without a graph break and ``generate(compile_config=...)`` uses it."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

import compresskv
from compresskv.core.cache import KVLayer
from conftest import batch_inputs, dynamic, greedy, kv, tiny_model

EVICTION = ["snapkv", "pyramidkv", "streamingllm", "knorm"]


def _layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, KVLayer)]


def _steps(model, cache, ids, steps, forward=None):
    """Prefill ``ids`` eagerly, then ``steps`` greedy single-token forwards through ``forward``
    (the model, or a compiled one) with explicit positions; the tokens and each step's logits."""
    forward = model if forward is None else forward
    tokens, logits = [], []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **kv(cache))
        token = out.logits[:, -1:].argmax(-1)
        for i in range(steps):
            position = torch.full((ids.shape[0], 1), ids.shape[1] + i)
            out = forward(input_ids=token, position_ids=position, use_cache=True, **kv(cache))
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
    return torch.cat(tokens, -1), torch.stack(logits, 1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", EVICTION)
def test_static_decoding_gives_the_logits_of_the_room_way(method, attn):
    model = tiny_model("llama", attn, layers=3)
    ids, mask = batch_inputs(3, length=64)
    room = greedy(model, ids, mask, compresskv.make_cache(model, method, compression_ratio=0.6), new_tokens=10)
    cache = compresskv.make_cache(model, method, compression_ratio=0.6, decode_tokens=16)
    static = greedy(model, ids, mask, cache, new_tokens=10)
    assert torch.equal(static[0], room[0])
    torch.testing.assert_close(static[1], room[1], rtol=1e-5, atol=1e-5)
    assert all(layer.static for layer in _layers(cache))


@pytest.mark.parametrize("method", EVICTION)
def test_static_decoding_without_compression_matches_dynamic_cache(method):
    model = tiny_model("llama", "sdpa", layers=3)
    ids, mask = batch_inputs(2, length=40)
    expected = greedy(model, ids, mask, dynamic(model), new_tokens=8)
    # budget above the prompt: nothing is evicted, and the window-less knorm keeps everything too
    cache = compresskv.make_cache(model, method, budget=60, decode_tokens=8)
    got = greedy(model, ids, mask, cache, new_tokens=8)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_static_bytes_are_the_buffers_and_the_room_is_reported_apart():
    model = tiny_model("llama", "sdpa", layers=2)  # 2 KV heads of 16 dims, fp32
    ids, _ = batch_inputs(1, length=64)
    cache = compresskv.SnapKVCache(model, budget=24, window_size=8, decode_tokens=10)
    _steps(model, cache, ids, steps=4)
    for layer in _layers(cache):
        assert layer.keys.shape == (1, 2, 24 + 10, 16) and layer.stored() == 24 + 4
        assert layer.get_seq_length() == 64 + 4
    per_slot = 2 * 2 * 16 * 4 + 1  # keys and values of 2 heads, fp32, and one validity byte
    stats = cache.stats()
    assert cache.nbytes() == 2 * 34 * per_slot
    assert stats.room_nbytes == cache.room_nbytes() == 2 * 6 * per_slot
    assert stats.tokens_stored == [28, 28] and stats.tokens_seen == 68


def test_decoding_past_the_room_grows_it_when_eager():
    model = tiny_model("llama", "sdpa", layers=2)
    ids, _ = batch_inputs(1, length=64)
    room = _steps(model, compresskv.SnapKVCache(model, compression_ratio=0.5), ids, steps=12)
    cache = compresskv.SnapKVCache(model, compression_ratio=0.5, decode_tokens=4)
    static = _steps(model, cache, ids, steps=12)
    assert torch.equal(static[0], room[0])
    assert all(layer.stored() == 32 + 12 <= layer.keys.shape[-2] for layer in _layers(cache))


def test_beam_search_reorders_the_static_buffers():
    model = tiny_model("llama", "sdpa", layers=2)
    ids, mask = batch_inputs(2, length=48)
    run = lambda cache: model.generate(  # noqa: E731
        input_ids=ids, attention_mask=mask, **kv(cache), max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False
    )
    room = run(compresskv.SnapKVCache(model, compression_ratio=0.5))
    static = run(compresskv.SnapKVCache(model, compression_ratio=0.5, decode_tokens=8))
    assert torch.equal(static, room)


def test_compileable_only_with_decode_tokens():
    model = tiny_model("llama", "sdpa", layers=2)
    assert not compresskv.SnapKVCache(model, compression_ratio=0.5).is_compileable
    assert compresskv.SnapKVCache(model, compression_ratio=0.5, decode_tokens=8).is_compileable
    assert compresskv.StreamingLLMCache(model, window=8, decode_tokens=8).is_compileable


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8"])
def test_bad_decode_tokens_is_refused_by_name(bad):
    model = tiny_model("llama", "sdpa", layers=2)
    with pytest.raises(ValueError, match="decode_tokens"):
        compresskv.SnapKVCache(model, compression_ratio=0.5, decode_tokens=bad)


def test_a_second_prompt_piece_before_decoding_is_refused():
    model = tiny_model("llama", "sdpa", layers=2)
    ids, mask = batch_inputs(1, length=64)
    cache = compresskv.SnapKVCache(model, compression_ratio=0.5, decode_tokens=8)
    with pytest.raises(ValueError, match="chunked prefill"):
        greedy(model, ids, mask, cache, new_tokens=3, chunk=32)


@pytest.mark.slow
def test_compiled_decode_step_has_no_graph_break_and_no_recompile():
    model = tiny_model("llama", "sdpa", layers=2)
    ids, _ = batch_inputs(2, length=64)
    eager = _steps(model, compresskv.SnapKVCache(model, compression_ratio=0.75, decode_tokens=12), ids, steps=8)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False)  # fullgraph: a graph break raises
    with torch._dynamo.config.patch(error_on_recompile=True):
        cache = compresskv.SnapKVCache(model, compression_ratio=0.75, decode_tokens=12)
        got = _steps(model, cache, ids, steps=8, forward=compiled)
    assert torch.equal(got[0], eager[0])
    torch.testing.assert_close(got[1], eager[1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["snapkv", "pyramidkv"])
def test_generate_with_compile_config_matches_eager_under_padding(method):
    model = tiny_model("llama", "sdpa", layers=2)
    ids, mask = batch_inputs(3, length=56)
    eager = greedy(model, ids, mask, compresskv.make_cache(model, method, compression_ratio=0.5), new_tokens=8)
    torch._dynamo.reset()
    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    for _ in range(2):  # a second generate with a new cache reuses the graph
        cache = compresskv.make_cache(model, method, compression_ratio=0.5, decode_tokens=8)
        got = greedy(model, ids, mask, cache, new_tokens=8, compile_config=config)
        assert torch.equal(got[0], eager[0])
        torch.testing.assert_close(got[1], eager[1], rtol=1e-4, atol=1e-4)
