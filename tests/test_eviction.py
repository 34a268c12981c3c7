"""Eviction picks what a straightforward reference picks, and decoding sees exactly the kept tokens."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import compresskv
from compresskv.eviction.base import pyramid_budgets
from conftest import batch_inputs, dynamic, tiny_model, kv

RECORDED: dict[int, torch.Tensor] = {}


def _recording_sdpa(module, query, key, value, attention_mask, **kwargs):
    RECORDED[module.layer_idx] = query.detach().clone()
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("ckv_test_record", _recording_sdpa)


def prefill_reference(model, ids):
    """Full keys and queries of every layer for an unpadded batch-1 prompt."""
    original = model.config._attn_implementation
    model.set_attn_implementation("ckv_test_record")
    cache = dynamic(model)
    RECORDED.clear()
    with torch.no_grad():
        model(input_ids=ids, **kv(cache), use_cache=True)
    model.set_attn_implementation(original)
    return [layer.keys for layer in cache.layers], dict(RECORDED)


def reference_keep(query, keys, n_keep, window, kernel, pooling, scaling):
    """SnapKV selection written out loop by loop: [kv_heads] lists of kept token indices."""
    _, n_q, seq_len, _ = query.shape
    n_kv = keys.shape[1]
    groups = n_q // n_kv
    prefix = seq_len - window
    kept = []
    for h in range(n_kv):
        head_scores = torch.zeros(prefix, dtype=torch.float64)
        for g in range(groups):
            qh = h * groups + g
            total = torch.zeros(seq_len, dtype=torch.float64)
            for i in range(seq_len - window, seq_len):
                logits = [float(query[0, qh, i].double() @ keys[0, h, j].double()) * scaling for j in range(i + 1)]
                m = max(logits)
                e = [math.exp(x - m) for x in logits]
                s = sum(e)
                for j in range(i + 1):
                    total[j] += e[j] / s
            pooled = torch.zeros(prefix, dtype=torch.float64)
            for j in range(prefix):
                lo, hi = j - kernel // 2, j + kernel // 2
                if pooling == "maxpool":
                    pooled[j] = max(total[t] for t in range(max(lo, 0), min(hi, prefix - 1) + 1))
                else:
                    pooled[j] = sum(total[t] for t in range(max(lo, 0), min(hi, prefix - 1) + 1)) / kernel
            head_scores += pooled / groups
        # Ties (pooling makes plateaus) go to the earlier token.
        top = sorted(sorted(range(prefix), key=lambda j: (-float(head_scores[j]), j))[: n_keep - window])
        kept.append(top + list(range(prefix, seq_len)))
    return kept


def kept_positions(stored_keys, full_keys):
    """Original position of every stored key row, [kv_heads][stored]."""
    out = []
    for h in range(full_keys.shape[1]):
        dist = torch.cdist(stored_keys[0, h].double(), full_keys[0, h].double())
        out.append(dist.argmin(-1).tolist())
    return out


@pytest.mark.parametrize("pooling", ["maxpool", "avgpool"])
@pytest.mark.parametrize("method", ["snapkv", "pyramidkv"])
def test_kept_indices_match_reference(method, pooling):
    model = tiny_model("llama", "sdpa", layers=3)
    ids, _ = batch_inputs(1, length=40)
    full_keys, queries = prefill_reference(model, ids)
    budget, window, kernel = 16, 4, 5
    cache = compresskv.make_cache(model, method, budget=budget, window_size=window, kernel_size=kernel, pooling=pooling)
    with torch.no_grad():
        model(input_ids=ids, **kv(cache), use_cache=True)
    budgets = pyramid_budgets(40, budget, window, 3) if method == "pyramidkv" else [budget] * 3
    scaling = model.config.head_dim**-0.5 if hasattr(model.config, "head_dim") else 16**-0.5
    for idx, layer in enumerate(cache.layers):
        expected = reference_keep(queries[idx], full_keys[idx], budgets[idx], window, kernel, pooling, scaling)
        assert layer.keys.shape[-2] == budgets[idx]
        assert kept_positions(layer.keys, full_keys[idx]) == expected
        index = torch.tensor(expected)[None, :, :, None].expand(-1, -1, -1, full_keys[idx].shape[-1])
        assert torch.equal(layer.keys, full_keys[idx].gather(2, index))


def _masked_eager(allowed):
    """Eager attention whose last query row sees only ``allowed[layer]`` ([kv_heads, T]) + itself."""

    def attention(module, query, key, value, attention_mask, scaling, **kwargs):
        n_q, q_len = query.shape[1], query.shape[2]
        groups = n_q // key.shape[1]
        k = key.repeat_interleave(groups, 1)
        v = value.repeat_interleave(groups, 1)
        mask = torch.ones(q_len, q_len, dtype=torch.bool).tril()[None, None].repeat(1, n_q, 1, 1)
        mask[:, :, -1, :-1] = allowed[module.layer_idx].repeat_interleave(groups, 0)
        logits = (query @ k.transpose(-1, -2)) * scaling
        logits = logits.masked_fill(~mask, float("-inf"))
        out = torch.softmax(logits, -1) @ v
        return out.transpose(1, 2).contiguous(), None

    return attention


@pytest.mark.parametrize("method,options", [
    ("pyramidkv", dict(budget=12, window_size=4)),
    ("snapkv", dict(compression_ratio=0.6, window_size=4)),
    ("streamingllm", dict(sink=2, window=6)),
])
def test_decode_equals_full_attention_with_evicted_tokens_hidden(method, options):
    model = tiny_model("qwen2", "eager", layers=3)
    ids, _ = batch_inputs(1, length=36)
    full_keys, _ = prefill_reference(model, ids)
    cache = compresskv.make_cache(model, method, **options)
    with torch.no_grad():
        out = model(input_ids=ids, **kv(cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        decoded = model(input_ids=token, **kv(cache), use_cache=True).logits[:, -1]
    allowed = {}
    for idx, layer in enumerate(cache.layers):
        assert layer.keys.shape[-2] < 37  # something was evicted in every layer
        keep = torch.zeros(full_keys[idx].shape[1], 36, dtype=torch.bool)
        for h, positions in enumerate(kept_positions(layer.keys[:, :, :-1], full_keys[idx])):
            keep[h, positions] = True
        allowed[idx] = keep
    AttentionInterface.register("ckv_test_masked", _masked_eager(allowed))
    model.set_attn_implementation("ckv_test_masked")
    with torch.no_grad():
        reference = model(input_ids=torch.cat([ids, token], -1)).logits[:, -1]
    assert (reference - decoded).abs().max().item() <= 1e-4


def test_streamingllm_keeps_sinks_and_recent_per_row():
    model = tiny_model("llama", "sdpa", layers=2)
    ids, mask = batch_inputs(2, length=30)  # row 1 has 7 padding tokens
    full = dynamic(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **kv(full), use_cache=True)
    cache = compresskv.StreamingLLMCache(model, sink=3, window=5)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **kv(cache), use_cache=True)
    for layer, ref in zip(cache.layers, full.layers):
        for row, first in ((0, 0), (1, 7)):
            expected = list(range(first, first + 3)) + list(range(25, 30))
            pos = kept_positions(layer.keys[row : row + 1], ref.keys[row : row + 1])
            assert all(p == expected for p in pos)
        assert layer.valid is None  # no padding token was kept


def test_padding_is_never_kept_when_real_tokens_suffice():
    model = tiny_model("llama", "sdpa", layers=2)
    ids, mask = batch_inputs(3, length=40)  # rows padded by 0, 7, 14
    cache = compresskv.SnapKVCache(model, budget=20, window_size=4)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **kv(cache), use_cache=True)
    for layer in cache.layers:
        assert layer.keys.shape[-2] == 20
        assert layer.valid is None


def test_padding_kept_when_a_row_is_shorter_than_the_budget_is_masked():
    model = tiny_model("llama", "sdpa", layers=2)
    ids, mask = batch_inputs(3, length=40)
    cache = compresskv.SnapKVCache(model, budget=30, window_size=4)  # row 2 has 26 real tokens
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **kv(cache), use_cache=True)
    for layer in cache.layers:
        assert layer.valid is not None
        assert layer.valid[0].all() and layer.valid[1].all()
        assert int(layer.valid[2, 0].sum()) == 26


# -- PyramidKV budgets ---------------------------------------------------------------------------
def paper_budgets(q_len, capacity, window, n_layers, beta=20):
    """Transcribed from the PyramidKV paper's released code (per layer, window included)."""
    min_num = (capacity - window) // beta
    max_num = (capacity - window) * 2 - min_num
    if max_num >= q_len - window:
        max_num = q_len - window
        min_num = (capacity - window) * 2 - max_num
    steps = (max_num - min_num) // (n_layers - 1)
    out = []
    for layer in range(n_layers):
        if q_len < capacity:
            out.append(q_len)
        elif q_len < (capacity - window) * 2:
            out.append(capacity)
        else:
            out.append(max_num - layer * steps + window)
    return out


@pytest.mark.parametrize("q_len,capacity,window,n_layers", [
    (4096, 512, 32, 30), (4096, 2048, 32, 30), (4096, 128, 8, 32), (1000, 600, 32, 24),
    (300, 64, 8, 4), (5000, 1024, 32, 30), (64, 40, 8, 3),
])
def test_pyramid_budgets_follow_the_paper(q_len, capacity, window, n_layers):
    ours = pyramid_budgets(q_len, capacity, window, n_layers)
    paper = paper_budgets(q_len, capacity, window, n_layers)
    if q_len <= capacity:
        assert ours is None
    else:
        assert ours == paper
        assert min(ours) > window
        # The paper floors the per-layer step, so the mean can exceed the budget by < (L-1)/2.
        assert -1 <= sum(ours) / n_layers - capacity <= (n_layers - 1) / 2


def test_pyramid_budgets_never_reach_zero():
    budgets = pyramid_budgets(10_000, budget=12, window=8, n_layers=40, beta=20)
    assert min(budgets) >= 9


def test_pyramid_cache_follows_its_budgets():
    model = tiny_model("llama", "sdpa", layers=6)
    ids, _ = batch_inputs(1, length=120)
    cache = compresskv.PyramidKVCache(model, budget=24, window_size=4)
    with torch.no_grad():
        model(input_ids=ids, **kv(cache), use_cache=True)
    assert cache.stats().tokens_stored == pyramid_budgets(120, 24, 4, 6)
    assert cache.stats().tokens_seen == 120


# -- memory --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["snapkv", "pyramidkv", "streamingllm"])
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.875])
def test_nbytes_is_the_kept_tokens_and_drops_by_the_ratio(method, ratio):
    model = tiny_model("llama", "sdpa", layers=4)
    ids, _ = batch_inputs(1, length=128)
    options = dict(compression_ratio=ratio) if method == "streamingllm" else dict(compression_ratio=ratio, window_size=4)
    cache = compresskv.make_cache(model, method, **options)
    with torch.no_grad():
        model(input_ids=ids, **kv(cache), use_cache=True)
    kept = sum(layer.keys.shape[-2] for layer in cache.layers)
    per_token = 2 * model.config.num_key_value_heads * 16 * 4  # K and V, head_dim 16, fp32
    assert cache.nbytes() == kept * per_token
    assert cache.uncompressed_nbytes() == 4 * 128 * per_token
    assert abs(cache.stats().ratio - (1 - ratio)) <= 1.5 / 128 + (0.02 if method == "pyramidkv" else 0)
    full = dynamic(model)
    with torch.no_grad():
        model(input_ids=ids, **kv(full), use_cache=True)
    dyn_bytes = sum(t.numel() * t.element_size() for layer in full.layers for t in (layer.keys, layer.values))
    assert cache.uncompressed_nbytes() == dyn_bytes


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9, 0.95])
def test_streamingllm_ratio_keeps_the_sinks_and_the_most_recent(ratio):
    """A ratio keeps the contract of budget=: the first ``sink`` real tokens of each row, then the
    most recent ones; a ratio that leaves fewer than ``sink + 1`` tokens keeps ``sink + 1``."""
    from compresskv.eviction.base import ratio_budget

    model = tiny_model("llama", "sdpa", layers=2)
    ids, mask = batch_inputs(3, length=48)  # rows padded by 0, 7, 14
    full = dynamic(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **kv(full), use_cache=True)
    sink = 4
    for rows in ([0], [0, 1, 2]):  # alone, then batched with padding
        cache = compresskv.StreamingLLMCache(model, sink=sink, compression_ratio=ratio)
        with torch.no_grad():
            model(input_ids=ids[rows], attention_mask=mask[rows], **kv(cache), use_cache=True)
        for layer, ref in zip(cache.layers, full.layers):
            for i, row in enumerate(rows):
                first = 7 * row
                n_keep = max(ratio_budget(48 - first, ratio), sink + 1)
                expected = list(range(first, first + sink)) + list(range(48 - (n_keep - sink), 48))
                slots = layer.valid[i, 0] if layer.valid is not None else torch.ones(layer.keys.shape[2], dtype=torch.bool)
                stored = layer.keys[i : i + 1][:, :, slots]
                pos = kept_positions(stored, ref.keys[row : row + 1])
                assert all(p == expected for p in pos), (ratio, row, pos[0])
