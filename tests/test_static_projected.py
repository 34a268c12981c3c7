"""Static, compileable decoding of the projected caches (#19): a MatryoshkaKV/PCA cache built with
``decode_tokens=N`` moves its stored latents into buffers with room for N more right after the
prompt and writes each decoded token's latents in place (see compresskv.core.decode), so
``torch.compile`` traces a decode step once and ``generate(compile_config=...)`` uses it."""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

import compresskv
from compresskv.projected.cache import ProjectedLayer
from conftest import VOCAB, batch_inputs, dynamic, greedy, kv, tiny_model


def _model_and_projections(attn="sdpa", layers=2):
    model = tiny_model("llama", attn, layers=layers)
    ids = torch.randint(3, VOCAB, (4, 48), generator=torch.Generator().manual_seed(2))
    return model, compresskv.calibrate(model, ids, seq_len=48, progress=False)


def _layers(cache):
    return [layer for layer in cache.layers if isinstance(layer, ProjectedLayer)]


@pytest.mark.parametrize("read_mode", ["latent", "latent_explicit"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_static_decoding_gives_the_logits_of_the_room_way(attn, read_mode):
    model, p = _model_and_projections(attn)
    ids, mask = batch_inputs(3, length=40)  # left padding
    room = greedy(model, ids, mask, compresskv.MatryoshkaKVCache(model, p, rank=6, read_mode=read_mode), new_tokens=8)
    cache = compresskv.MatryoshkaKVCache(model, p, rank=6, read_mode=read_mode, decode_tokens=12)
    static = greedy(model, ids, mask, cache, new_tokens=8)
    assert torch.equal(static[0], room[0])
    torch.testing.assert_close(static[1], room[1], rtol=1e-5, atol=1e-5)
    assert all(layer.static for layer in _layers(cache))


def test_static_decoding_at_full_rank_matches_dynamic_cache():
    model, p = _model_and_projections()
    ids, mask = batch_inputs(2, length=40)
    expected = greedy(model, ids, mask, dynamic(model), new_tokens=8)
    got = greedy(model, ids, mask, compresskv.PCAKVCache(model, p, compression_ratio=0.0, decode_tokens=8), new_tokens=8)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [dict(rank=6, sink_tokens=2), dict(compression_ratio=0.5, use_allocation=False)],
                         ids=["sink-tokens", "ratio"])
def test_beam_search_and_sinks_read_the_static_buffers_as_the_room(options):
    model, p = _model_and_projections()
    ids, mask = batch_inputs(2, length=40)
    run = lambda cache: model.generate(  # noqa: E731
        input_ids=ids, attention_mask=mask, **kv(cache), max_new_tokens=6, min_new_tokens=6, num_beams=3,
        do_sample=False, pad_token_id=0,
    )
    room = run(compresskv.PCAKVCache(model, p, **options))
    static = run(compresskv.PCAKVCache(model, p, decode_tokens=8, **options))
    assert torch.equal(static, room)


def test_static_bytes_are_the_buffers_and_the_room_is_reported_apart():
    model, p = _model_and_projections()  # 2 KV heads of 16 dims, fp32
    ids, _ = batch_inputs(1, length=40)
    cache = compresskv.PCAKVCache(model, p, rank=6, decode_tokens=10)
    greedy(model, ids, None, cache, new_tokens=5)  # the prompt, then 4 tokens written (the 5th is not fed back)
    per_slot = 2 * 2 * 6 * 4 + 1  # key and value latents of 2 heads at rank 6, fp32, and one validity byte
    for layer in _layers(cache):
        assert layer.k_latent[0].shape == (1, 2, 40 + 10, 6) and layer.get_seq_length() == 44
    held = sum(layer.held_nbytes() for layer in _layers(cache))
    assert cache.nbytes() == 2 * 50 * per_slot + held
    assert cache.stats().room_nbytes == cache.room_nbytes() == 2 * 6 * per_slot


def test_decoding_past_the_room_grows_it_when_eager():
    model, p = _model_and_projections()
    ids, mask = batch_inputs(2, length=40)
    room = greedy(model, ids, mask, compresskv.PCAKVCache(model, p, rank=6), new_tokens=10)
    cache = compresskv.PCAKVCache(model, p, rank=6, decode_tokens=3)
    static = greedy(model, ids, mask, cache, new_tokens=10)
    assert torch.equal(static[0], room[0])
    assert all(layer.k_latent[0].shape[-2] >= 40 + 9 for layer in _layers(cache))


def test_decode_tokens_is_checked_by_name():
    model, p = _model_and_projections()
    assert compresskv.PCAKVCache(model, p, rank=6, decode_tokens=8).is_compileable
    assert not compresskv.PCAKVCache(model, p, rank=6).is_compileable
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="decode_tokens"):
            compresskv.PCAKVCache(model, p, rank=6, decode_tokens=bad)
    with pytest.raises(ValueError, match="read_mode='latent'"):
        compresskv.MatryoshkaKVCache(model, p, rank=6, read_mode="model", decode_tokens=8)


@pytest.mark.slow
@pytest.mark.parametrize("read_mode", ["latent", "latent_explicit"])
def test_compiled_generate_matches_eager_under_padding_without_recompiling(monkeypatch, read_mode):
    """Compiled on CPU, ``latent`` reads through the fused kernel (faster there than the explicit
    path compiled, at any thread count), ``latent_explicit`` through the explicit one; both trace
    without a graph break and give the eager tokens."""
    model, p = _model_and_projections()
    ids, mask = batch_inputs(3, length=40)
    eager = greedy(model, ids, mask, compresskv.PCAKVCache(model, p, rank=6, read_mode=read_mode), new_tokens=8)
    fused = torch.zeros((), dtype=torch.long)  # counted in the graph: replayed steps count too
    real = ProjectedLayer.projected_attention_sdpa
    monkeypatch.setattr(ProjectedLayer, "projected_attention_sdpa", lambda layer, call: (fused.add_(1), real(layer, call))[1])
    torch._dynamo.reset()
    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")  # fullgraph: a graph break raises
    config._compile_all_devices = True  # transformers compiles on GPUs only unless told
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):  # a second generate with a new cache reuses the graph
            cache = compresskv.PCAKVCache(model, p, rank=6, decode_tokens=8, read_mode=read_mode)
            got = greedy(model, ids, mask, cache, new_tokens=8, compile_config=config)
            assert torch.equal(got[0], eager[0])
            torch.testing.assert_close(got[1], eager[1], rtol=1e-4, atol=1e-4)
    assert (int(fused) > 0) == (read_mode == "latent")
