"""compresskv.compat: the cache argument under the name each transformers release (and model) takes."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from packaging.version import Version

import compresskv
from compresskv import compat
from conftest import batch_inputs, dynamic, tiny_model


def test_the_release_name_follows_transformers():
    renamed = Version(transformers.__version__) >= Version("5.24.0.dev0")
    assert compat.CACHE_ARG == ("cache" if renamed else "past_key_values")


def test_a_model_written_for_the_old_name_gets_the_old_name():
    def old_forward(input_ids=None, past_key_values=None, use_cache=None): ...

    def new_forward(input_ids=None, cache=None, use_cache=None): ...

    def opaque_forward(*args, **kwargs): ...

    assert compat.cache_arg(old_forward) == "past_key_values"
    assert compat.cache_arg(new_forward) == "cache"
    assert compat.cache_arg(opaque_forward) == compat.CACHE_ARG
    assert compat.cache_arg(tiny_model().forward) == compat.CACHE_ARG


def test_get_pop_set_and_output():
    a, b = object(), object()
    assert compat.get_cache({"cache": None, "past_key_values": a}) is a
    kwargs = {"past_key_values": a, "x": 1}
    assert compat.pop_cache(kwargs) is a and kwargs == {"x": 1}
    with pytest.raises(ValueError, match="both cache= and past_key_values="):
        compat.pop_cache({"cache": a, "past_key_values": b})
    kwargs = {"cache": None, "past_key_values": None}
    assert compat.set_cache(kwargs, a) == {compat.CACHE_ARG: a}
    model = tiny_model()
    ids, _ = batch_inputs(1, length=8)
    cache = dynamic(model)
    out = model(input_ids=ids, use_cache=True, **compat.cache_kwargs(cache, model.forward))
    assert compat.output_cache(out) is cache


def test_compresskv_calls_raise_no_future_warning():
    """Every path that passes a cache (patched generate, eval loops, EliteKV's own cache) uses the
    release's name: no FutureWarning about `past_key_values`, whatever the release."""
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(2, length=40)
    compresskv.patch(model, "snapkv", budget=20, window_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        compresskv.unpatch(model)
        from compresskv.eval.needle import NeedleTask, run_needle

        class Tok:
            eos_token_id = None

            def decode(self, ids, **_):
                return " ".join(map(str, ids))

        task = NeedleTask(input_ids=ids[:1], answer="1", depth=0.5)
        run_needle(model, Tok(), task, compresskv.SnapKVCache(model, budget=20, window_size=4), max_new_tokens=3)
        converted = compresskv.elitekv.convert(tiny_model("llama", "sdpa"), rope_pairs=4, kv_dim=16, selection="uniform", progress=False)
        out = converted(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = compat.output_cache(out)
        assert isinstance(cache, compresskv.EliteKVCache) and cache.stats().tokens_seen == 40


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_elitekv_attention_writes_its_cache_under_either_name(name):
    """On 5.24 decoder layers pass `cache=`, before `past_key_values=`: the converted attention
    takes both (reading only the old one left the cache empty and the output wrong on 5.24)."""
    model = compresskv.elitekv.convert(tiny_model("llama", "sdpa"), rope_pairs=8, kv_dim=32, selection="uniform", progress=False)
    attn = model.model.layers[0].self_attn
    hidden = torch.randn(1, 5, model.config.hidden_size)
    pos = torch.arange(5)[None]
    cos_sin = model.model.rotary_emb(hidden, pos)
    cache = compresskv.EliteKVCache(model)
    attn(hidden, position_embeddings=cos_sin, attention_mask=None, position_ids=pos, **{name: cache})
    assert cache.layers[0].get_seq_length() == 5
