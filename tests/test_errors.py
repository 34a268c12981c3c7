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


# -- read_mode: one option name and one vocabulary for how a compressed layer is read ----------------
def _projections(model):
    ids = torch.randint(3, 96, (4, 48), generator=torch.Generator().manual_seed(0))
    return compresskv.calibrate(model, ids, seq_len=48, progress=False)


@pytest.mark.parametrize("method", ["matryoshka", "pca", "elitekv", "xkv", "svd", "minicache"])
def test_method_options_show_read_mode(method):
    assert "read_mode" in compresskv.method_options(method)
    for old in ("mode", "attention"):
        assert old not in compresskv.method_options(method)


def test_read_mode_vocabulary_covers_every_family():
    from compresskv.core import READ_MODES
    from compresskv.crosslayer import minicache, xkv
    from compresskv.elitekv import attention as elite
    from compresskv.projected import cache as projected

    for family in (projected.READ_MODES, elite.READ_MODES, xkv.READ_MODES, minicache.READ_MODES):
        assert set(family) <= set(READ_MODES), family
    assert projected.READ_MODES == ("latent", "latent_explicit", "model")
    assert elite.READ_MODES == ("auto", "latent", "latent_explicit", "model")
    assert xkv.READ_MODES == ("auto", "latent", "rebuild", "model", "fused")


@pytest.mark.parametrize("cls", ["MatryoshkaKVCache", "PCAKVCache"])
def test_projected_old_mode_option_is_refused_naming_read_mode(model, cls):
    p = _projections(model)
    make = getattr(compresskv, cls)
    with pytest.raises(TypeError) as err:
        make(model, p, compression_ratio=0.5, mode="projected")
    assert "read_mode" in str(err.value) and "'projected' -> 'latent'" in str(err.value)
    method = "matryoshka" if cls == "MatryoshkaKVCache" else "pca"
    for call in (compresskv.make_cache, compresskv.patch):
        with pytest.raises(TypeError) as err:
            call(model, method, projections=p, compression_ratio=0.5, mode="reconstruct")
        assert "mode= is now read_mode=" in str(err.value) and "'reconstruct' -> 'model'" in str(err.value)
    compresskv.unpatch(model)


@pytest.mark.parametrize("old,new", [("projected", "latent"), ("projected_explicit", "latent_explicit"),
                                     ("reconstruct", "model")])
def test_projected_old_read_mode_values_are_refused_naming_the_new_one(model, old, new):
    p = _projections(model)
    with pytest.raises(ValueError) as err:
        compresskv.MatryoshkaKVCache(model, p, compression_ratio=0.5, read_mode=old)
    message = str(err.value)
    assert "read_mode" in message and f"read_mode={new!r}" in message
    assert "['latent', 'latent_explicit', 'model']" in message
    assert compresskv.MatryoshkaKVCache(model, p, compression_ratio=0.5, read_mode=new).read_mode == new
    assert compresskv.MatryoshkaKVCache(model, p, compression_ratio=0.5).stats().read_mode == "latent"


@pytest.mark.parametrize("old,new", [("absorb", "latent"), ("absorb_explicit", "latent_explicit"),
                                     ("reconstruct", "model")])
def test_elitekv_old_attention_option_and_values_are_refused_naming_read_mode(old, new):
    from compresskv import elitekv

    fresh = tiny_model("llama", "sdpa")
    with pytest.raises(TypeError) as err:
        elitekv.convert(fresh, 2, 10, selection="uniform", attention=old, progress=False)
    assert "attention= was renamed read_mode=" in str(err.value) and f"{old!r} -> {new!r}" in str(err.value)
    with pytest.raises(TypeError, match="read_mode"):
        elitekv.make_cache(fresh, rope_pairs=2, kv_dim=10, selection="uniform", attention=old, progress=False)
    for call in (compresskv.make_cache, compresskv.patch):
        with pytest.raises(TypeError) as err:
            call(fresh, "elitekv", rope_pairs=2, kv_dim=10, selection="uniform", attention=old, progress=False)
        assert "attention= is now read_mode=" in str(err.value) and f"{old!r} -> {new!r}" in str(err.value)
    assert not elitekv.is_converted(fresh)
    with pytest.raises(ValueError) as err:
        elitekv.convert(fresh, 2, 10, selection="uniform", read_mode=old, progress=False)
    message = str(err.value)
    assert "read_mode" in message and f"read_mode={new!r}" in message and "latent_explicit" in message
    with pytest.raises(ValueError, match=f"read_mode={new!r}"):
        compresskv.make_cache(fresh, "elitekv", rope_pairs=2, kv_dim=10, selection="uniform", read_mode=old,
                              progress=False)
    elitekv.convert(fresh, 2, 10, selection="uniform", read_mode=new, progress=False)
    assert fresh.config.elitekv["read_mode"] == new and "attention" not in fresh.config.elitekv
    assert {m.read_mode for m in fresh.modules() if isinstance(m, elitekv.EliteKVAttention)} == {new}


@pytest.mark.parametrize("old,new", [("auto", "auto"), ("absorb", "latent"), ("absorb_explicit", "latent_explicit"),
                                     ("reconstruct", "model")])
def test_elitekv_model_saved_with_the_old_attention_key_still_loads(tmp_path, old, new):
    """Models converted before the rename have ``"attention": <old value>`` in their config: they
    load, read the same way (old values mapped silently) and generate the same tokens."""
    import json

    from compresskv import elitekv
    from conftest import greedy

    model = tiny_model("llama", "sdpa")
    elitekv.convert(model, 2, 10, selection="uniform", read_mode=new, progress=False)
    ids, mask = batch_inputs(2)
    before = greedy(model, ids, mask, None)
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    spec = config["elitekv"]
    del spec["read_mode"]
    spec["attention"] = old  # the format written before the rename
    path.write_text(json.dumps(config))
    back = elitekv.load_converted(tmp_path / "m")
    assert {m.read_mode for m in back.modules() if isinstance(m, elitekv.EliteKVAttention)} == {new}
    after = greedy(back, ids, mask, None)
    assert torch.equal(before[0], after[0]) and (before[1] - after[1]).abs().max().item() <= 1e-5
    # a new cache for it with the same sizes keeps working, and a new read_mode is written in the new key
    compresskv.make_cache(back, "elitekv")
    other = "model" if new != "model" else "latent"
    compresskv.make_cache(back, "elitekv", rope_pairs=2, kv_dim=10, selection="uniform", read_mode=other)
    assert back.config.elitekv["read_mode"] == other and "attention" not in back.config.elitekv
    assert {m.read_mode for m in back.modules() if isinstance(m, elitekv.EliteKVAttention)} == {other}


def test_crosslayer_read_mode_is_checked_with_the_shared_message(model):
    with pytest.raises(ValueError) as err:
        compresskv.XKVCache(model, group_size=2, rank_k=4, rank_v=4, read_mode="reconstruct")
    assert "read_mode must be one of ['auto', 'latent', 'rebuild', 'model', 'fused']" in str(err.value)
    with pytest.raises(ValueError, match=r"read_mode must be one of \['auto', 'latent', 'model'\]"):
        compresskv.MiniCache(model, start_layer=0, read_mode="fused")
    assert compresskv.MiniCache(model, start_layer=0, read_mode="model").read_mode == "model"
    assert compresskv.MiniCache(model, start_layer=0).read_mode == "auto"
    assert compresskv.SVDCache(model, rank_k=4, rank_v=4, read_mode="rebuild").read_mode == "rebuild"
