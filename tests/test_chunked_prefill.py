"""Chunked prefill (``generate(prefill_chunk_size=...)``): the eviction methods evict as the
prompt's chunks arrive and end with the compression asked for (issue #12).

The prompt is every multi-token forward before the first single-token one; after each further
chunk an eviction layer evicts again to the budget of the real prompt tokens seen so far, scoring
with that chunk's own observation window.
"""

from __future__ import annotations

import pytest
import torch

import compresskv
from compresskv.eviction.base import ratio_budget
from conftest import greedy, VOCAB, batch_inputs, dynamic, kv, tiny_model

CHUNK = 16
LENGTH = 80  # five chunks of 16


def generate(model, ids, mask, cache, new_tokens: int = 6, chunk: int | None = CHUNK):
    """Greedy tokens and logits, the prompt fed ``chunk`` tokens at a time (``None``: at once)."""
    return greedy(model, ids, mask, cache, new_tokens, chunk)


def padded_inputs(pads: list[int], length: int = LENGTH, seed: int = 3):
    """Token ids left-padded by ``pads[i]`` tokens in row ``i``, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(pads), length), generator=g)
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    ids[mask == 0] = 0
    return ids, mask


# -- no compression: exactly DynamicCache ----------------------------------------------------------
NO_EVICTION = {
    "snapkv-budget": ("snapkv", dict(budget=LENGTH + 8, window_size=8)),
    "snapkv-ratio0": ("snapkv", dict(compression_ratio=0.0)),
    "pyramidkv-ratio0": ("pyramidkv", dict(compression_ratio=0.0, window_size=4)),
    "streamingllm-budget": ("streamingllm", dict(sink=4, budget=LENGTH + 8)),
    "streamingllm-ratio0": ("streamingllm", dict(compression_ratio=0.0)),
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_chunked_prefill_without_eviction_is_dynamic_cache(attn, batch):
    model = tiny_model("llama", attn)
    ids, mask = batch_inputs(batch, length=LENGTH)
    ref_seq, ref_logits = generate(model, ids, mask, dynamic(model))
    for name, (method, options) in NO_EVICTION.items():
        cache = compresskv.make_cache(model, method, **options)
        seq, logits = generate(model, ids, mask, cache)
        assert torch.equal(seq, ref_seq), name
        assert (logits - ref_logits).abs().max().item() <= 1e-5, name
        assert all(n == seq.shape[1] - 1 for n in cache.stats().tokens_stored), name


# -- compression: what was asked, as without chunks -------------------------------------------------
RATIO = {
    "snapkv": dict(compression_ratio=0.5),
    "pyramidkv": dict(compression_ratio=0.5),
    "streamingllm": dict(compression_ratio=0.5),
}


def _prefill(model, ids, mask, cache, chunk):
    # One new token: generate runs the prefill only, so the stats are those right after it.
    generate(model, ids, mask, cache, new_tokens=1, chunk=chunk)
    return cache.stats()


@pytest.mark.parametrize("method", sorted(RATIO))
@pytest.mark.parametrize("pads", [[0], [0, 7, 14]])
def test_chunked_prefill_compresses_as_asked(method, pads):
    model = tiny_model("llama", "sdpa", layers=4)
    ids, mask = padded_inputs(pads)
    whole = _prefill(model, ids, mask, compresskv.make_cache(model, method, **RATIO[method]), None)
    chunked = _prefill(model, ids, mask, compresskv.make_cache(model, method, **RATIO[method]), CHUNK)
    assert chunked.tokens_seen == whole.tokens_seen == LENGTH
    assert chunked.tokens_stored == whole.tokens_stored
    assert abs(chunked.ratio - whole.ratio) <= 0.05, (chunked.ratio, whole.ratio)
    assert chunked.ratio <= 0.6  # before the fix only the first chunk was evicted: about 0.84


@pytest.mark.parametrize("method", sorted(RATIO))
def test_chunked_prefill_keeps_per_row_budgets_from_real_tokens(method):
    """Every row keeps the tokens its own real prompt length allows, whatever its padding."""
    model = tiny_model("llama", "sdpa", layers=3)
    pads = [0, 16, 23]
    ids, mask = padded_inputs(pads)
    cache = compresskv.make_cache(model, method, **RATIO[method])
    _prefill(model, ids, mask, cache, CHUNK)
    for layer in cache.layers:
        valid = layer.valid if layer.valid is not None else torch.ones(layer.keys.shape[:3], dtype=torch.bool)
        for row, pad in enumerate(pads):
            kept = valid[row].sum(-1)
            if method == "pyramidkv":
                assert bool((kept == kept[0]).all())  # every KV head keeps as many
            else:
                assert kept.tolist() == [ratio_budget(LENGTH - pad, 0.5)] * kept.shape[0], row


def test_chunked_streamingllm_keeps_the_sinks_and_the_most_recent():
    model = tiny_model("llama", "sdpa", layers=2)
    pads = [0, 16, 9]
    ids, mask = padded_inputs(pads)
    full = dynamic(model)
    generate(model, ids, mask, full, new_tokens=1)  # every key, at the positions generate gives it
    for options in (dict(sink=4, window=12), dict(sink=4, compression_ratio=0.5), dict(sink=2, compression_ratio=0.95)):
        cache = compresskv.StreamingLLMCache(model, **options)
        _prefill(model, ids, mask, cache, CHUNK)
        for layer, ref in zip(cache.layers, full.layers):
            for row, pad in enumerate(pads):
                real = LENGTH - pad
                sink = options["sink"]
                if "window" in options:
                    n_keep = sink + options["window"]
                else:
                    n_keep = max(ratio_budget(real, options["compression_ratio"]), sink + 1)
                expected = list(range(pad, pad + sink)) + list(range(LENGTH - (n_keep - sink), LENGTH))
                slots = layer.valid[row, 0] if layer.valid is not None else torch.ones(layer.keys.shape[2], dtype=torch.bool)
                for h in range(layer.keys.shape[1]):
                    stored = layer.keys[row, h][slots]
                    dist = torch.cdist(stored.double(), ref.keys[row, h].double())
                    assert dist.argmin(-1).tolist() == expected, (options, row)


# -- batches: each row as when alone ----------------------------------------------------------------
BATCHED = {
    "snapkv-ratio": ("snapkv", dict(compression_ratio=0.5, window_size=8)),
    "snapkv-budget": ("snapkv", dict(budget=24, window_size=8)),
    "snapkv-avgpool": ("snapkv", dict(compression_ratio=0.6, window_size=4, pooling="avgpool")),
    "pyramidkv-ratio": ("pyramidkv", dict(compression_ratio=0.75, window_size=4)),
    "streamingllm-ratio": ("streamingllm", dict(compression_ratio=0.5)),
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", sorted(BATCHED))
def test_a_row_generates_the_same_batched_or_alone_under_chunking(variant, attn):
    """Left padding by whole chunks keeps each row's chunks the same as alone (padding that is
    not a multiple of the chunk size cuts a row's prompt into other chunks, as for DynamicCache's
    arithmetic, and eviction then sees other windows)."""
    method, options = BATCHED[variant]
    model = tiny_model("llama", attn, kv_heads=2)
    ids, mask = padded_inputs([0, 16, 32])
    batch_cache = compresskv.make_cache(model, method, **options)
    sequences, logits = generate(model, ids, mask, batch_cache)
    assert batch_cache.stats().ratio < 0.9, f"{variant}: nothing was compressed"
    for row in range(3):
        alone = ids[row][mask[row] == 1][None]
        cache = compresskv.make_cache(model, method, **options)
        alone_seq, alone_logits = generate(model, alone, torch.ones_like(alone), cache)
        assert torch.equal(alone_seq[0, alone.shape[1]:], sequences[row, LENGTH:]), f"row {row}"
        err = (alone_logits[0] - logits[row]).abs().max().item()
        assert err <= 1e-4, f"row {row}: logits differ by {err:.3g} between batched and alone"


# -- a later turn is appended, not evicted ----------------------------------------------------------
def test_a_second_turn_after_decoding_is_appended_under_chunking():
    model = tiny_model("mistral", "sdpa")
    ids, _ = batch_inputs(1, length=48)
    follow = torch.randint(3, 90, (1, 20), generator=torch.Generator().manual_seed(5))
    fed = []
    for cache in (dynamic(model), compresskv.PyramidKVCache(model, compression_ratio=0.5, window_size=4)):
        first = model.generate(input_ids=ids, **kv(cache), max_new_tokens=4, do_sample=False, prefill_chunk_size=CHUNK)
        seen_after_first = cache.get_seq_length()
        stored_after_first = [layer.keys.shape[-2] for layer in cache.layers]
        second = model.generate(input_ids=torch.cat([first, follow], -1), **kv(cache), max_new_tokens=4,
                                do_sample=False, prefill_chunk_size=CHUNK)
        assert second.shape[1] == first.shape[1] + 24
        fed.append(cache.get_seq_length() - seen_after_first)
    assert max(stored_after_first) < 48
    # Whatever the second call feeds (transformers >= 5.5: the 21 new prompt tokens, the last answer
    # token never fed back, in two chunks, + 3 decoded; 5.4's chunked prefill feeds the whole
    # sequence again) is appended, as DynamicCache takes it.
    assert fed[0] == fed[1]
    assert [s + fed[1] for s in stored_after_first] == cache.stats().tokens_stored


# -- perplexity: the continuation is not part of the prompt -----------------------------------------
def test_perplexity_appends_the_continuation_whatever_its_chunk_size():
    """run_perplexity feeds the continuation's first token alone, so a compressed cache does not
    take the continuation's chunks for more of the prompt: every chunk size stores it whole."""
    from compresskv.eval import make_perplexity_task, run_perplexity
    from tiny_tokenizer import prose, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), layers=2)
    task = make_perplexity_task(tok, prose(300), length=200, continuation=48, seed=1)
    full = run_perplexity(model, task, chunk_size=16)
    caches = {size: compresskv.SnapKVCache(model, compression_ratio=0.5) for size in (1, 16, 64)}
    runs = {size: run_perplexity(model, task, caches[size], chunk_size=size) for size in (1, 16, 64)}
    per_token = (full["cache_bytes"] - full["cache_bytes_prefill"]) / 47  # 47 fed continuation tokens
    for size, run in runs.items():
        assert run["cache_bytes_prefill"] < 0.6 * full["cache_bytes_prefill"], size
        used = run["cache_bytes"] - caches[size].room_nbytes()  # without decode room not yet filled
        assert used - run["cache_bytes_prefill"] == 47 * per_token, size
        assert run["nll"] == pytest.approx(runs[1]["nll"], abs=1e-5), size
