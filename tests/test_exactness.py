"""No compression ⇒ the same greedy tokens and logits as DynamicCache."""

from __future__ import annotations

import pytest
import torch

import compresskv
from conftest import ATTENTIONS, FAMILIES, batch_inputs, dynamic, greedy, tiny_model

NO_EVICTION = {
    "snapkv": dict(budget=64, window_size=8),
    "pyramidkv": dict(budget=64, window_size=8),
    "streamingllm": dict(window=60),
    "snapkv-ratio0": dict(compression_ratio=0.0),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("batch", [1, 3])
def test_no_eviction_matches_dynamic_cache(family, attn, batch):
    model = tiny_model(family, attn)
    ids, mask = batch_inputs(batch)
    ref_seq, ref_logits = greedy(model, ids, mask, dynamic(model))
    for name, options in NO_EVICTION.items():
        cache = compresskv.make_cache(model, name.split("-")[0], **options)
        seq, logits = greedy(model, ids, mask, cache)
        assert torch.equal(seq, ref_seq), name
        assert (logits - ref_logits).abs().max().item() <= 1e-4, name
        assert all(n == seq.shape[1] - 1 for n in cache.stats().tokens_stored), name


def test_installed_attention_is_transparent_for_dynamic_cache():
    """After a compresskv cache switched the model's attention, DynamicCache still gives the same logits."""
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(3)
    before = greedy(model, ids, mask, dynamic(model))
    compresskv.SnapKVCache(model, budget=16, window_size=4)
    assert model.config._attn_implementation == "compresskv_sdpa"
    after = greedy(model, ids, mask, dynamic(model))
    assert torch.equal(before[0], after[0])
    assert (before[1] - after[1]).abs().max().item() == 0.0


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _has_flash_attn(), reason="flash-attn is not installed (pip install 'compresskv[flash]')")
@pytest.mark.parametrize("batch", [1, 3])
def test_flash_attention_2_matches_dynamic_cache(batch):
    model = tiny_model("llama", "sdpa").to("cuda", torch.bfloat16)
    model.set_attn_implementation("flash_attention_2")
    ids, mask = batch_inputs(batch)
    ids, mask = ids.cuda(), mask.cuda()
    ref_seq, ref_logits = greedy(model, ids, mask, dynamic(model))
    seq, logits = greedy(model, ids, mask, compresskv.PyramidKVCache(model, budget=64, window_size=8))
    assert torch.equal(seq, ref_seq)
    assert (logits.float() - ref_logits.float()).abs().max().item() <= 2e-2


def test_flash_attention_2_without_flash_attn_is_a_clear_error():
    if _has_flash_attn():
        pytest.skip("flash-attn is installed here")
    model = tiny_model("llama", "sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="flash-attn"):
        compresskv.SnapKVCache(model, budget=64)
