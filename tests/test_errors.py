"""Bad input gets a clear error naming the parameter and what is allowed."""

from __future__ import annotations

import pytest
import torch

import compresskv
from conftest import batch_inputs, tiny_model, kv


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "sdpa")


@pytest.mark.parametrize("cls,options,words", [
    (compresskv.SnapKVCache, dict(budget=32, window_size=32), ["budget", "window_size=32"]),
    (compresskv.PyramidKVCache, dict(budget=8), ["budget", "window_size=32"]),
    (compresskv.SnapKVCache, dict(compression_ratio=-0.1), ["compression_ratio", "[0, 1)"]),
    (compresskv.SnapKVCache, dict(compression_ratio=1.5), ["compression_ratio", "[0, 1)"]),
    (compresskv.PyramidKVCache, dict(compression_ratio=1.0), ["compression_ratio"]),
    (compresskv.SnapKVCache, dict(budget=64, pooling="minpool"), ["pooling", "maxpool", "avgpool"]),
    (compresskv.SnapKVCache, dict(budget=64, kernel_size=4), ["kernel_size"]),
    (compresskv.SnapKVCache, dict(), ["budget", "compression_ratio"]),
    (compresskv.SnapKVCache, dict(budget=64, compression_ratio=0.5), ["exactly one"]),
    (compresskv.PyramidKVCache, dict(budget=64, beta=0), ["beta"]),
    (compresskv.StreamingLLMCache, dict(sink=4, budget=4), ["budget", "sink=4"]),
    (compresskv.StreamingLLMCache, dict(window=8, compression_ratio=0.5), ["exactly one"]),
])
def test_bad_options(model, cls, options, words):
    with pytest.raises(ValueError) as err:
        cls(model, **options)
    for word in words:
        assert word in str(err.value)


def test_unknown_method_lists_the_methods(model):
    with pytest.raises(ValueError) as err:
        compresskv.patch(model, "pyramid", budget=64)
    assert "pyramidkv" in str(err.value) and "snapkv" in str(err.value) and "streamingllm" in str(err.value)


def test_unknown_option_lists_the_options(model):
    with pytest.raises(TypeError) as err:
        compresskv.patch(model, "snapkv", budgt=64)
    assert "budgt" in str(err.value) and "budget" in str(err.value) and "window_size" in str(err.value)


def test_unsupported_attention_backend():
    model = tiny_model("llama", "sdpa")
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError) as err:
        compresskv.SnapKVCache(model, budget=64)
    assert "flex_attention" in str(err.value) and "sdpa" in str(err.value) and "eager" in str(err.value)


def test_model_whose_attention_is_not_hookable(monkeypatch):
    model = tiny_model("llama", "sdpa")
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(ValueError) as err:
        compresskv.SnapKVCache(model, budget=64)
    assert "AttentionInterface" in str(err.value) and "LlamaForCausalLM" in str(err.value)


def test_only_sliding_window_layers_is_refused():
    model = tiny_model("mistral", "sdpa", sliding_window=16)
    with pytest.raises(ValueError, match="no full-attention layer"):
        compresskv.SnapKVCache(model, budget=64)


@pytest.mark.parametrize("other_layers", [2, 6])
def test_cache_reused_across_models_with_different_layer_counts(model, other_layers):
    ids, mask = batch_inputs(1)
    cache = compresskv.SnapKVCache(model, budget=16, window_size=4)
    other = tiny_model("llama", "sdpa", layers=other_layers)
    with pytest.raises((ValueError, RuntimeError), match="one cache per model"):
        other.generate(input_ids=ids, attention_mask=mask, **kv(cache), max_new_tokens=2)
    compresskv.core.attention.clear_pending()
    # Also when the other model runs compresskv's attention too.
    compresskv.SnapKVCache(other, budget=16, window_size=4)
    cache = compresskv.SnapKVCache(model, budget=16, window_size=4)
    with pytest.raises(ValueError, match=f"{4} layers.*one of {other_layers}"):
        other.generate(input_ids=ids, attention_mask=mask, **kv(cache), max_new_tokens=2)
    compresskv.core.attention.clear_pending()


def test_changing_attention_after_creating_the_cache_is_caught():
    model = tiny_model("llama", "sdpa")
    ids, _ = batch_inputs(1)
    cache = compresskv.SnapKVCache(model, budget=16, window_size=4)
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="attention"):
        with torch.no_grad():
            model(input_ids=ids, **kv(cache), use_cache=True)
    compresskv.core.attention.clear_pending()


def test_crop_is_refused_clearly(model):
    cache = compresskv.SnapKVCache(model, budget=16, window_size=4)
    assert not cache.is_croppable
    with pytest.raises(RuntimeError, match="cropped"):
        cache.crop(-1)


def test_streamingllm_ratio_below_the_sinks_is_clamped_not_refused(model):
    """A budget is checked when the cache is built; a ratio is relative to a prompt length not
    known then, so it is clamped at run time to the sinks plus one recent token."""
    cache = compresskv.StreamingLLMCache(model, sink=4, compression_ratio=0.95)
    assert cache.plan(48, 0, 1) == (5, 0)  # 48 * 0.05 rounds to 2 tokens: the sinks + 1 instead
    assert cache.plan(5, 0, 1) is None  # nothing to evict from a prompt that short
    with pytest.raises(ValueError) as err:
        compresskv.StreamingLLMCache(model, sink=4, compression_ratio=1.0)
    assert "compression_ratio" in str(err.value)
