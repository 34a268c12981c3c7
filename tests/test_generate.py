"""generate() with compressed caches: sampling, beam search, multi-turn, patch/unpatch."""

from __future__ import annotations

import pytest
import torch

import compresskv
from conftest import batch_inputs, dynamic, greedy, tiny_model, kv


def test_sampling_matches_dynamic_cache_without_eviction():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(3)
    outs = []
    for cache in (dynamic(model), compresskv.PyramidKVCache(model, budget=64, window_size=8)):
        torch.manual_seed(123)
        outs.append(model.generate(input_ids=ids, attention_mask=mask, **kv(cache), do_sample=True,
                                   top_k=20, max_new_tokens=8, pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_beam_search_matches_dynamic_cache_without_eviction(attn):
    model = tiny_model("qwen3", attn)
    ids, mask = batch_inputs(2)
    kwargs = dict(input_ids=ids, attention_mask=mask, num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = model.generate(**kv(dynamic(model)), **kwargs)
    out = model.generate(**kv(compresskv.SnapKVCache(model, budget=64, window_size=8)), **kwargs)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_beam_search_and_sampling_run_with_eviction(attn):
    model = tiny_model("llama", attn)
    ids, mask = batch_inputs(2, length=60)
    cache = compresskv.PyramidKVCache(model, budget=20, window_size=4)
    out = model.generate(input_ids=ids, attention_mask=mask, **kv(cache), num_beams=3,
                         max_new_tokens=5, min_new_tokens=5, pad_token_id=0)
    assert out.shape == (2, 65)
    assert cache.stats().tokens_seen == 64  # the last token is never fed back
    sampled = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=5,
                             **kv(compresskv.StreamingLLMCache(model, compression_ratio=0.5)),
                             pad_token_id=0)
    assert sampled.shape[1] == 65


def test_multi_turn_continuation_of_the_same_cache():
    model = tiny_model("mistral", "sdpa")
    ids, mask = batch_inputs(1, length=40)
    ref_cache = dynamic(model)
    cache = compresskv.SnapKVCache(model, budget=64, window_size=8)
    first_ref = model.generate(input_ids=ids, **kv(ref_cache), max_new_tokens=4, do_sample=False)
    first = model.generate(input_ids=ids, **kv(cache), max_new_tokens=4, do_sample=False)
    assert torch.equal(first_ref, first)
    follow = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(5))
    second_ref = model.generate(input_ids=torch.cat([first_ref, follow], -1), **kv(ref_cache),
                                max_new_tokens=4, do_sample=False)
    second = model.generate(input_ids=torch.cat([first, follow], -1), **kv(cache),
                            max_new_tokens=4, do_sample=False)
    assert torch.equal(second_ref, second)
    assert cache.get_seq_length() == ref_cache.get_seq_length()

    # With eviction the second turn is appended to the evicted first turn and keeps working.
    evicting = compresskv.PyramidKVCache(model, budget=16, window_size=4)
    first = model.generate(input_ids=ids, **kv(evicting), max_new_tokens=4, do_sample=False)
    stored_after_first = list(evicting.stats().tokens_stored)
    second = model.generate(input_ids=torch.cat([first, follow], -1), **kv(evicting),
                            max_new_tokens=4, do_sample=False)
    assert second.shape[1] == first.shape[1] + 14
    # 11 new prompt tokens (the last answer token was never fed back) + 3 decoded
    assert [s + 14 for s in stored_after_first] == evicting.stats().tokens_stored


def test_patch_makes_generate_use_the_method_and_unpatch_restores_exactly():
    model = tiny_model("llama", "eager")
    ids, mask = batch_inputs(3, length=60)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = greedy(model, ids, mask, None)
    explicit = greedy(model, ids, mask, compresskv.PyramidKVCache(model, budget=20, window_size=4))
    compresskv.unpatch(model)
    assert model.config._attn_implementation == "eager"

    compresskv.patch(model, "pyramidkv", budget=20, window_size=4)
    assert compresskv.patching.patched_method(model) == "pyramidkv"
    patched = greedy(model, ids, mask, None)
    assert torch.equal(patched[0], explicit[0])
    assert (patched[1] - explicit[1]).abs().max().item() == 0.0
    assert not torch.equal(patched[1], plain[1])  # eviction changed something

    compresskv.patch(model, "snapkv", compression_ratio=0.0)  # re-patching replaces the method
    assert compresskv.patching.patched_method(model) == "snapkv"
    compresskv.unpatch(model)
    assert "generate" not in model.__dict__ and "_compresskv_patch" not in model.__dict__
    assert model.config._attn_implementation == "eager"
    restored = greedy(model, ids, mask, None)
    assert torch.equal(restored[0], plain[0]) and torch.equal(restored[1], plain[1])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_patch_generate_gets_a_fresh_cache_per_call():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(1)
    compresskv.patch(model, "snapkv", budget=16, window_size=4)
    a = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    b = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)
    compresskv.unpatch(model)
