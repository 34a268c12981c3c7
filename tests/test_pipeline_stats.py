"""compresskv.last_cache / last_stats: the cache a patched model's latest generate() built, read
after a transformers pipeline call, replaced by the next call and dropped by unpatch."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from transformers import pipeline

import compresskv
from conftest import kv, tiny_model
from tiny_tokenizer import prose, tiny_tokenizer

NEW = 4
GEN = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def model(tok):
    return tiny_model("llama", vocab_size=len(tok), layers=2)


def prompt_length(tok, text: str) -> int:
    return len(tok(text)["input_ids"])


def test_pipeline_stats_are_those_of_the_cache_generate_used(model, tok):
    text = prose(4)
    compresskv.patch(model, "snapkv", compression_ratio=0.5)
    assert compresskv.last_cache(model) is None and compresskv.last_stats(model) is None
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    pipe(text, **GEN)
    cache = compresskv.last_cache(model)
    assert isinstance(cache, compresskv.SnapKVCache)
    stats = compresskv.last_stats(model)
    n = prompt_length(tok, text)
    assert stats.tokens_seen == n + NEW - 1  # the last new token is never fed back
    assert all(s < n // 2 + NEW for s in stats.tokens_stored)  # half the prompt evicted
    # The same prompt through an explicit cache measures the same.
    explicit = compresskv.SnapKVCache(model, compression_ratio=0.5)
    model.generate(**tok(text, return_tensors="pt"), **kv(explicit), **GEN)
    assert explicit.stats().as_dict() == stats.as_dict()
    # ...and that call (bringing its own cache) leaves no latest cache of the patch.
    assert compresskv.last_cache(model) is None


def test_a_second_call_replaces_the_cache_and_the_first_is_released(model, tok):
    compresskv.patch(model, "streamingllm", compression_ratio=0.75)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    pipe(prose(4), **GEN)
    first = weakref.ref(compresskv.last_cache(model))
    first_stats = compresskv.last_stats(model)
    short = prose(2, seed=3)
    pipe(short, **GEN)
    gc.collect()
    assert first() is None  # only the latest cache is kept alive
    stats = compresskv.last_stats(model)
    assert stats.tokens_seen == prompt_length(tok, short) + NEW - 1 != first_stats.tokens_seen
    model.generate(**tok(short, return_tensors="pt"), use_cache=False, **GEN)
    assert compresskv.last_cache(model) is None  # a call without the patch's cache clears it


def test_unpatch_drops_the_cache_and_a_copy_does_not_carry_it(model, tok):
    compresskv.patch(model, "snapkv", budget=16, window_size=4)
    pipeline("text-generation", model=model, tokenizer=tok)(prose(4), **GEN)
    held = weakref.ref(compresskv.last_cache(model))
    twin = copy.deepcopy(model)
    assert compresskv.last_cache(twin) is None and compresskv.patching.patched_method(twin) == "snapkv"
    assert compresskv.last_stats(model).tokens_stored == [16 + NEW - 1] * 2
    compresskv.unpatch(model)
    gc.collect()
    assert compresskv.last_cache(model) is None and compresskv.last_stats(model) is None
    assert held() is None


def test_last_stats_is_none_for_a_registered_cache_without_stats(model, tok):
    from transformers import DynamicCache

    compresskv.register_method("plain_dynamic_for_test", lambda m: DynamicCache(config=m.config))
    try:
        compresskv.patch(model, "plain_dynamic_for_test")
        model.generate(**tok(prose(2), return_tensors="pt"), **GEN)
        assert isinstance(compresskv.last_cache(model), DynamicCache)
        assert compresskv.last_stats(model) is None
    finally:
        compresskv.unpatch(model)
        compresskv.patching._METHODS.pop("plain_dynamic_for_test", None)
