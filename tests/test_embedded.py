"""Integration tests on the embedded SmolLM2-135M-Instruct (slow: loads real weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, pipeline

import compresskv
from compresskv.eval import make_needle_task, run_needle
from conftest import kv

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    model, tokenizer = compresskv.load_model()
    yield model, tokenizer
    compresskv.unpatch(model)


def test_embedded_model_shape(smol):
    model, _ = smol
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)


def test_no_eviction_matches_dynamic_cache_on_real_weights(smol):
    model, tokenizer = smol
    task = make_needle_task(tokenizer, length=300, seed=3)
    ids = task.input_ids
    kwargs = dict(input_ids=ids, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(**kv(DynamicCache(config=model.config)), **kwargs)
    for method in ("snapkv", "pyramidkv", "streamingllm"):
        out = model.generate(**kv(compresskv.make_cache(model, method, compression_ratio=0.0)), **kwargs)
        assert torch.equal(out.sequences, ref.sequences), method
        diff = max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits))
        assert diff <= 1e-4, method


def test_needle_at_4k_tokens(smol):
    """The full cache answers a 4k-token needle question; SnapKV evicting a quarter does too."""
    model, tokenizer = smol
    task = make_needle_task(tokenizer, length=4096, depth=0.5, seed=0)
    assert abs(task.length - 4096) <= 0.02 * 4096
    full = run_needle(model, tokenizer, task, max_new_tokens=24)
    assert full["correct"], full["answer"]
    cache = compresskv.SnapKVCache(model, compression_ratio=0.25)
    snap = run_needle(model, tokenizer, task, cache, max_new_tokens=24)
    assert snap["correct"], snap["answer"]
    used = snap["cache_bytes"] - cache.room_nbytes()  # decode room not yet filled is held, but not tokens
    assert abs(used / full["cache_bytes"] - 0.75) < 0.01
    assert cache.room_nbytes() <= 0.04 * snap["cache_bytes"]


def test_pipeline_built_on_a_patched_model_uses_the_method(smol, monkeypatch):
    model, tokenizer = smol
    prompt = make_needle_task(tokenizer, length=200, seed=4)
    text = tokenizer.decode(prompt.input_ids[0])
    compresskv.patch(model, "pyramidkv", budget=64, window_size=8)
    made = []
    real = compresskv.patching.make_cache
    monkeypatch.setattr(compresskv.patching, "make_cache", lambda *a, **k: made.append(a[1]) or real(*a, **k))
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator(text, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert made == ["pyramidkv"]
    compresskv.unpatch(model)
    ids = tokenizer(text, return_tensors="pt")
    explicit = model.generate(**ids, max_new_tokens=8, do_sample=False,
                              **kv(compresskv.PyramidKVCache(model, budget=64, window_size=8)))
    assert out == tokenizer.decode(explicit[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    compresskv.unpatch(model)


def test_the_readme_usage_example_runs_as_written():
    """The README's Python example, executed as written (on the embedded model)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    if compresskv.compat.CACHE_ARG == "past_key_values":  # as its comment says, before transformers 5.24
        code = code.replace("cache=cache", "past_key_values=cache")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    stats = namespace["cache"].stats()
    assert stats.method == "snapkv" and stats.tokens_seen > 0
    assert namespace["out"].shape[-1] > namespace["inputs"]["input_ids"].shape[-1]
