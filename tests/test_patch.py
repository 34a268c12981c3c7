"""compresskv.patch as a user meets it: copies, use_cache=False, cache=None, cache_implementation,
bad arguments."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import compresskv
from compresskv import compat
from conftest import batch_inputs, greedy, kv, tiny_model

EVICT = dict(budget=20, window_size=4)


@pytest.fixture()
def model():
    return tiny_model("llama", "sdpa")


def test_a_deep_copy_of_a_patched_model_generates_with_its_own_weights(model):
    ids, mask = batch_inputs(2, length=48)
    compresskv.patch(model, "pyramidkv", **EVICT)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    assert compresskv.patching.patched_method(twin) == "pyramidkv"
    patched = greedy(twin, ids, mask, None)
    explicit = greedy(twin, ids, mask, compresskv.PyramidKVCache(twin, **EVICT))
    original = greedy(model, ids, mask, None)
    assert torch.equal(patched[0], explicit[0]) and torch.equal(patched[1], explicit[1])
    assert not torch.equal(patched[1], original[1])
    compresskv.unpatch(twin)
    assert "generate" not in twin.__dict__


def test_use_cache_false_is_honoured(model):
    ids, mask = batch_inputs(1, length=48)
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False,
                           output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    compresskv.patch(model, "snapkv", **EVICT)
    seen = []
    original = compresskv.patching.make_cache
    try:
        compresskv.patching.make_cache = lambda *a, **k: seen.append(1) or original(*a, **k)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    finally:
        compresskv.patching.make_cache = original
    assert seen == []  # no cache was built for a call that asked for none
    assert torch.equal(out.sequences, plain.sequences)
    assert torch.equal(torch.stack(out.logits), torch.stack(plain.logits))


def test_an_explicit_none_cache_still_gets_the_patch(model):
    ids, mask = batch_inputs(2, length=48)
    explicit = greedy(model, ids, mask, compresskv.SnapKVCache(model, **EVICT))
    plain = greedy(model, ids, mask, None)
    compresskv.patch(model, "snapkv", **EVICT)
    for name in ("cache", "past_key_values"):
        if name != compat.CACHE_ARG and name != "past_key_values":
            continue  # transformers < 5.24 has no `cache=`
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # past_key_values=None on 5.24 is the deprecated name
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                                 **{name: None})
        logits = torch.stack(out.logits, dim=1)
        assert torch.equal(out.sequences, explicit[0]) and torch.equal(logits, explicit[1]), name
        assert not torch.equal(logits, plain[1])


def test_an_explicit_cache_implementation_steps_aside_with_a_warning(model):
    ids, mask = batch_inputs(1, length=40)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    plain = model.generate(**kwargs)
    compresskv.patch(model, "snapkv", **EVICT)
    with pytest.warns(UserWarning, match=r"snapkv.*cache_implementation='static'.*uncompressed"):
        out = model.generate(**kwargs)
    assert torch.equal(out, plain)


def test_a_cache_implementation_in_the_model_generation_config_is_set_aside_while_patched(model):
    ids, mask = batch_inputs(2, length=48)
    explicit = greedy(model, ids, mask, compresskv.SnapKVCache(model, **EVICT))
    model.generation_config.cache_implementation = "dynamic"
    compresskv.patch(model, "snapkv", **EVICT)
    assert model.generation_config.cache_implementation is None
    patched = greedy(model, ids, mask, None)
    assert torch.equal(patched[0], explicit[0]) and torch.equal(patched[1], explicit[1])
    compresskv.unpatch(model)
    assert model.generation_config.cache_implementation == "dynamic"


@pytest.mark.parametrize("bad", ["x", None, 3])
def test_patch_names_the_model_argument(bad):
    with pytest.raises(TypeError, match=r"model must be a transformers model.*patch\(model, method"):
        compresskv.patch(bad, "snapkv", budget=64)


def test_an_explicit_cache_is_used_as_is(model):
    ids, mask = batch_inputs(1, length=48)
    compresskv.patch(model, "pyramidkv", **EVICT)
    cache = compresskv.SnapKVCache(model, budget=30, window_size=4)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, **kv(cache))
    assert cache.stats().tokens_seen == 48 + 2


def test_patched_is_a_context_manager_that_gives_the_model_back_also_on_error(model):
    ids, mask = batch_inputs(2, length=48)
    plain = greedy(model, ids, mask, None)
    explicit = greedy(model, ids, mask, compresskv.SnapKVCache(model, **EVICT))
    compresskv.unpatch(model)
    attention = model.config._attn_implementation
    with compresskv.patched(model, "snapkv", **EVICT) as same:
        assert same is model and compresskv.patching.patched_method(model) == "snapkv"
        inside = greedy(model, ids, mask, None)
    assert torch.equal(inside[1], explicit[1]) and not torch.equal(inside[1], plain[1])
    assert compresskv.patching.patched_method(model) is None and "generate" not in model.__dict__
    assert model.config._attn_implementation == attention
    assert torch.equal(greedy(model, ids, mask, None)[1], plain[1])
    with pytest.raises(RuntimeError, match="boom"):
        with compresskv.patched(model, "pyramidkv", **EVICT):
            raise RuntimeError("boom")
    assert compresskv.patching.patched_method(model) is None and model.config._attn_implementation == attention
    # an earlier patch comes back, with the generation_config value it had set aside
    model.generation_config.cache_implementation = "static"
    compresskv.patch(model, "pyramidkv", **EVICT)
    with compresskv.patched(model, "snapkv", **EVICT):
        assert compresskv.patching.patched_method(model) == "snapkv"
    assert compresskv.patching.patched_method(model) == "pyramidkv"
    compresskv.unpatch(model)
    assert model.generation_config.cache_implementation == "static"
    with pytest.raises(ValueError, match="unknown method"):
        with compresskv.patched(model, "nosuch"):
            pass
