"""Decode-time appends write in place into preallocated room (#19, first part): a decode step copies
its own token, not the layer's whole cache; the room is memory held, counted by ``nbytes()`` and
reported apart as ``room_nbytes``; anything that replaces the stored tensors frees it."""

from __future__ import annotations

import pytest
import torch

import compresskv
from compresskv.core.cache import KVLayer
from conftest import batch_inputs, dynamic, greedy, kv, tiny_model


def _decode(model, cache, ids, steps):
    """Prefill ``ids`` into ``cache``, then ``steps`` single-token forwards; yields after each step."""
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, **kv(cache))
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=token, use_cache=True, **kv(cache))
            token = out.logits[:, -1:].argmax(-1)
            yield


@pytest.mark.parametrize("method", ["snapkv", "streamingllm", "pyramidkv"])
def test_decode_steps_write_in_place_and_reallocate_only_when_the_room_is_full(method):
    model = tiny_model("llama", layers=2)
    ids, _ = batch_inputs(1, length=96)
    cache = compresskv.make_cache(model, method, compression_ratio=0.5)
    layer = next(layer for layer in cache.layers if isinstance(layer, KVLayer))
    pointers, stored = [], []
    for _ in _decode(model, cache, ids, steps=40):
        pointers.append(layer.keys.data_ptr())
        stored.append(layer.stored())
    assert stored == list(range(stored[0], stored[0] + 40))
    # 48 kept + 40 decoded with room of max(16, stored / 32) tokens: a handful of allocations, not 40
    assert len(set(pointers)) <= 3, len(set(pointers))
    room = layer._rooms["keys"]
    assert layer.keys.data_ptr() == room.data_ptr() and room.shape[-2] > layer.stored()


def test_nbytes_counts_the_room_and_stats_report_it_apart():
    model = tiny_model("llama", layers=2)
    ids, _ = batch_inputs(1, length=96)
    cache = compresskv.SnapKVCache(model, compression_ratio=0.5)
    for _ in _decode(model, cache, ids, steps=5):
        pass
    layers = [layer for layer in cache.layers if isinstance(layer, KVLayer)]
    used = sum(layer.keys.numel() * 4 + layer.values.numel() * 4 for layer in layers)  # float32 views
    held = sum(layer._rooms["keys"].numel() * 4 + layer._rooms["values"].numel() * 4 for layer in layers)
    stats = cache.stats()
    assert cache.nbytes() == held > used
    assert stats.room_nbytes == cache.room_nbytes() == held - used
    assert stats.token_ratio == pytest.approx(used / stats.uncompressed_nbytes)
    assert stats.ratio == pytest.approx(held / stats.uncompressed_nbytes)


def test_a_row_operation_frees_the_room():
    """Beam reordering (or offloading) puts the rows in new tensors: the old room must not stay
    alive unaccounted."""
    model = tiny_model("llama", layers=2)
    ids, _ = batch_inputs(2, length=64)
    cache = compresskv.SnapKVCache(model, compression_ratio=0.5)
    for _ in _decode(model, cache, ids, steps=3):
        pass
    assert cache.room_nbytes() > 0
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.room_nbytes() == 0
    assert all("keys" not in layer._rooms for layer in cache.layers if isinstance(layer, KVLayer))


@pytest.mark.parametrize("method", ["snapkv", "xkv", "pca"])
def test_generation_is_unchanged_by_the_room(method):
    """Writing in place gives the tokens and logits a concatenating cache gives (ratio 0 here:
    also the exactness contract against DynamicCache)."""
    from compresskv.projected import calibrate

    model = tiny_model("llama", layers=4)
    ids, mask = batch_inputs(2, length=48)
    options = {"compression_ratio": 0.0}
    if method == "pca":
        options["projections"] = calibrate(model, [ids[0].tolist()], seq_len=48, progress=False)
    ref_seq, ref_logits = greedy(model, ids, mask, compresskv.make_cache(model, "snapkv", compression_ratio=0.0),
                                 new_tokens=24)
    full_seq, full_logits = greedy(model, ids, mask, dynamic(model), new_tokens=24)
    seq, logits = greedy(model, ids, mask, compresskv.make_cache(model, method, **options), new_tokens=24)
    assert torch.equal(seq, full_seq) and torch.equal(ref_seq, full_seq)
    assert (logits - full_logits).abs().max().item() <= 1e-4


def test_validity_and_projected_latents_are_written_in_place_too():
    """Under padding the validity grows by a column per step, and a projected cache stores latents:
    both go into room, so a step allocates neither."""
    model = tiny_model("llama", layers=2)
    ids, mask = batch_inputs(3, length=64)
    snap = compresskv.SnapKVCache(model, compression_ratio=0.5)
    pca = compresskv.make_cache(model, "pca", projections=compresskv.calibrate(model, ids, seq_len=64, progress=False),
                                compression_ratio=0.5)
    for cache in (snap, pca):
        layer = next(layer for layer in cache.layers if isinstance(layer, KVLayer))
        pointers = []
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **kv(cache))
            token = out.logits[:, -1:].argmax(-1)
            for step in range(30):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
                out = model(input_ids=token, attention_mask=mask, use_cache=True, **kv(cache))
                token = out.logits[:, -1:].argmax(-1)
                stored = layer.valid if cache is snap else layer.k_latent[0]
                pointers.append(stored.data_ptr())
        assert len(set(pointers)) <= 3, (type(cache).__name__, len(set(pointers)))
        assert cache.room_nbytes() > 0
