"""Multi-head latent attention (DeepSeek-V2/V3, #15 part 2): the eviction caches compress what
transformers caches for these models — recent releases the latent and the shared RoPE key
(``[batch, 1, T, kv_lora_rank]`` and ``[batch, 1, T, rope_dim]``, expanded per head after the
cache), older ones each head's keys and values — exactly at no compression, with the bytes they
hold measured; the methods that cannot apply refuse by name."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config

import compresskv
from compresskv.core.facts import mla_dims
from conftest import VOCAB, batch_inputs, dynamic, greedy

EVICTION = ("snapkv", "pyramidkv", "streamingllm", "knorm")
RANK, ROPE = 32, 8


def mla_model(kind: str = "v2", attn: str = "sdpa", q_lora: int | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny random DeepSeek model: layer 0 dense, the others mixture-of-experts."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=RANK, q_lora_rank=q_lora,
                  qk_rope_head_dim=ROPE, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                  n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = DeepseekV2Config(**common, topk_method="greedy") if kind == "v2" else DeepseekV3Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():  # sharpen attention, so that what is evicted matters
        for layer in model.model.layers:
            proj = layer.self_attn.q_proj if q_lora is None else layer.self_attn.q_b_proj
            proj.weight.mul_(4.0)
    return model


def _options(method: str, budget: int) -> dict:
    return dict(budget=budget) if method != "snapkv" and method != "pyramidkv" else dict(budget=budget, window_size=8)


@pytest.mark.parametrize("kind, q_lora", [("v2", None), ("v3", 24)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", EVICTION)
def test_no_compression_matches_dynamic_cache(method, attn, kind, q_lora):
    model = mla_model(kind, attn, q_lora)
    ids, mask = batch_inputs(2, length=40)
    cache = compresskv.make_cache(model, method, **_options(method, 512))
    seq, logits = greedy(model, ids, mask, cache, new_tokens=6)
    want_seq, want = greedy(model, ids, mask, dynamic(model), new_tokens=6)
    assert torch.equal(seq, want_seq)
    assert (logits - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("method", EVICTION)
def test_compressed_bytes_are_the_kept_latents(method):
    model = mla_model("v3", "sdpa")
    latent = mla_dims(model)["latent"]
    ids = torch.randint(3, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    cache = compresskv.make_cache(model, method, **_options(method, 24))
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, **compresskv.compat.cache_kwargs(cache))
    assert out.shape == (2, 68)
    stats = cache.stats()
    per_token = (RANK + ROPE) if latent else 4 * (16 + ROPE + 16)  # fp32 bytes / 4 per row and token
    assert stats.uncompressed_nbytes == 3 * 2 * 67 * per_token * 4  # 3 layers, 2 rows, 67 tokens seen
    kept = [layer.keys.shape[-2] for layer in cache.layers]
    # what the tokens take, plus decode-time room allocated ahead (reported apart)
    assert cache.nbytes() - cache.room_nbytes() == sum(2 * n * per_token * 4 for n in kept)
    assert stats.token_ratio < 0.5  # 24 of 64 prompt tokens (27 with the decoded ones)
    if latent:  # the stored tensors are the latent and the shared RoPE key
        layer = cache.layers[1]
        assert layer.keys.shape[1] == 1 and layer.keys.shape[-1] == RANK and layer.values.shape[-1] == ROPE


@pytest.mark.parametrize("method", ["snapkv", "streamingllm"])
def test_a_row_is_compressed_the_same_batched_or_alone(method):
    model = mla_model("v2", "sdpa")
    ids, mask = batch_inputs(3, length=48)
    options = _options(method, 20)
    seq, logits = greedy(model, ids, mask, compresskv.make_cache(model, method, **options), new_tokens=5)
    for row in range(3):
        alone = ids[row][mask[row] == 1][None]
        a_seq, a_logits = greedy(model, alone, torch.ones_like(alone), compresskv.make_cache(model, method, **options),
                                 new_tokens=5)
        assert torch.equal(a_seq[0, alone.shape[1]:], seq[row, 48:]), f"row {row}"
        assert (a_logits[0] - logits[row]).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "method, options",
    [("matryoshka", dict(compression_ratio=0.5)), ("pca", dict(compression_ratio=0.5)), ("minicache", {}),
     ("expected_attention", dict(compression_ratio=0.5)),
     ("elitekv", dict(cache_ratio=0.5, selection="uniform"))],
)
def test_methods_that_cannot_apply_refuse_mla_by_name(method, options):
    model = mla_model("v2", "sdpa")
    with pytest.raises(ValueError, match="multi-head latent attention") as err:
        compresskv.make_cache(model, method, **options)
    assert "snapkv" in str(err.value)


def test_bounded_decoding_refuses_a_latent_cache():
    model = mla_model("v2", "sdpa")
    if not mla_dims(model)["latent"]:
        pytest.skip("this transformers caches each head's keys and values (bounded decoding applies as usual)")
    with pytest.raises(ValueError, match="decode_budget"):
        compresskv.SnapKVCache(model, budget=32, window_size=8, decode_budget=64)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_static_decoding_of_an_mla_cache_gives_the_room_ways_tokens(attn):
    model = mla_model("v2", attn)
    ids, mask = batch_inputs(2, length=40)
    make = lambda **extra: compresskv.SnapKVCache(model, budget=20, window_size=8, **extra)  # noqa: E731
    seq, logits = greedy(model, ids, mask, make(decode_tokens=16), new_tokens=6)
    want_seq, want = greedy(model, ids, mask, make(), new_tokens=6)
    assert torch.equal(seq, want_seq) and (logits - want).abs().max().item() <= 1e-4


def _full_rank(model, group: int) -> dict:
    return dict(rank_k=group * RANK, rank_v=group * ROPE)


@pytest.mark.parametrize("kind, q_lora", [("v2", None), ("v3", 24)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method, group", [("xkv", 3), ("svd", 1)])
def test_cross_layer_svd_of_the_latents_is_exact_at_full_rank(method, group, attn, kind, q_lora):
    model = mla_model(kind, attn, q_lora)
    if not mla_dims(model)["latent"]:
        pytest.skip("this transformers caches each head's keys and values: xKV refuses it (tested below)")
    ids, mask = batch_inputs(2, length=40)
    options = _full_rank(model, group) | (dict(group_size=group) if method == "xkv" else {})
    seq, logits = greedy(model, ids, mask, compresskv.make_cache(model, method, **options), new_tokens=6)
    want_seq, want = greedy(model, ids, mask, dynamic(model), new_tokens=6)
    assert torch.equal(seq, want_seq)
    assert (logits - want).abs().max().item() <= 2e-4


@pytest.mark.parametrize("rank_v", [4, None])
def test_cross_layer_svd_bytes_are_the_latents_and_factors(rank_v):
    model = mla_model("v3", "sdpa")
    if not mla_dims(model)["latent"]:
        pytest.skip("this transformers caches each head's keys and values: xKV refuses it (tested below)")
    ids = torch.randint(3, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
    cache = compresskv.XKVCache(model, group_size=3, rank_k=12, rank_v=rank_v)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **compresskv.compat.cache_kwargs(cache))
    r_v = 3 * ROPE if rank_v is None else rank_v  # the RoPE keys at full rank when rank_v is left out
    latents = 2 * 64 * (12 + r_v)  # one group of 3 layers: [T, r_k] and [T, r_v] per row
    factors = 3 * 2 * (12 * RANK + r_v * ROPE)  # per layer and row: [r_k, kv_lora_rank], [r_v, rope_dim]
    assert cache.nbytes() == 4 * (latents + factors)
    assert cache.stats().uncompressed_nbytes == 4 * 3 * 2 * 64 * (RANK + ROPE)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [0, 0, 0]  # nothing kept uncompressed


def test_cross_layer_svd_from_a_ratio_and_its_errors():
    model = mla_model("v2", "sdpa")
    if not mla_dims(model)["latent"]:
        with pytest.raises(ValueError, match="multi-head latent attention"):
            compresskv.XKVCache(model, compression_ratio=0.5)
        return
    ids = torch.randint(3, VOCAB, (1, 96), generator=torch.Generator().manual_seed(1))
    cache = compresskv.XKVCache(model, group_size=3, compression_ratio=0.5)
    with torch.inference_mode():
        model(input_ids=ids, use_cache=True, **compresskv.compat.cache_kwargs(cache))
    assert 0.4 < cache.stats().token_ratio <= 0.5  # the prompt at half its bytes (what the ratio asks)
    cache = compresskv.XKVCache(model, group_size=3, compression_ratio=0.5)
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, **compresskv.compat.cache_kwargs(cache))
    assert out.shape == (1, 100)
    with pytest.raises(ValueError, match="pre_rope"):
        compresskv.XKVCache(model, rank_k=8, keys="pre_rope")
    with pytest.raises(ValueError, match="rank_k"):
        compresskv.XKVCache(model, group_size=3, rank_k=3 * RANK + 1)
    with pytest.raises(ValueError, match="rank_v"):
        compresskv.XKVCache(model, group_size=3, rank_k=8, rank_v=3 * ROPE + 1)
