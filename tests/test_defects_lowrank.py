"""Regressions of the low-rank and projected methods (xKV, SVD, MiniCache, EliteKV, MatryoshkaKV/PCA):
compression_ratio=0 compresses nothing, chunked prefill is refused by the methods that compress the
prompt once (and gives the same cache for those that compress every token), attention maps come
back from the projected read, MLA models are refused with their real reason, Gemma3's per-layer-type
RoPE is used by xKV, and MiniCache's errors name MiniCache's own options."""

from __future__ import annotations

import pytest
import torch

import compresskv
from compresskv import elitekv
from compresskv.core.attention import base_of
from compresskv.crosslayer import XKVLayer
from compresskv.crosslayer.factors import ranks_for_ratio
from conftest import generate_output as generate, VOCAB, batch_inputs, dynamic, greedy, kv, tiny_model

HEAD_DIM = 16


def calib_ids(n: int = 4, length: int = 48, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (torch.stack(tuple(a), 1) - torch.stack(tuple(b), 1)).abs().max().item()


# -- 1. compression_ratio=0 compresses nothing ------------------------------------------------------
@pytest.mark.parametrize("method,options", [("xkv", dict(group_size=4)), ("xkv", dict(group_size=2, keys="post_rope")),
                                            ("svd", {})])
@pytest.mark.parametrize("batch", [1, 3])
def test_low_rank_ratio_zero_is_dynamic_cache(method, options, batch):
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(batch)
    ref_seq, ref_logits = greedy(model, ids, mask, dynamic(model))
    cache = compresskv.make_cache(model, method, compression_ratio=0.0, **options)
    seq, logits = greedy(model, ids, mask, cache)
    assert torch.equal(seq, ref_seq)
    # before: ranks 28/41 of 48 (xKV, groups of 4) and logits off
    assert (logits - ref_logits).abs().max().item() <= 1e-5
    stats = cache.stats()
    # DynamicCache's bytes, plus the padded batch's validity masks (as every compresskv layer)
    assert cache.nbytes() - stats.bytes_by_kind["validity"] - stats.room_nbytes == cache.uncompressed_nbytes()
    assert (stats.bytes_by_kind["validity"] == 0) == (batch == 1)
    assert all(r is None for r in stats.ranks_k)  # nothing factorised


@pytest.mark.parametrize("tokens,group_size,kv_heads", [(48, 4, 2), (48, 1, 2), (256, 2, 4), (10_000, 1, 2)])
@pytest.mark.parametrize("ratio", [0.01, 0.05, 0.3])
def test_small_ratios_keep_about_one_minus_ratio_of_the_bytes(tokens, group_size, kv_heads, ratio):
    """The ranks a ratio gives never hold more than ``1 − ratio`` of the bytes, and not much less:
    a rank clamped to the matrix rank hands its spare budget to the other (before: keys 25 and
    values 38 → 32 for 10k tokens at ratio 0.01, 89% of the bytes instead of 99%)."""
    width = group_size * kv_heads * HEAD_DIM
    rank_k, rank_v = ranks_for_ratio(ratio, tokens, group_size, kv_heads, HEAD_DIM)
    assert 1 <= rank_k <= min(tokens, width) and 1 <= rank_v <= min(tokens, width)
    kept = (tokens + width) * (rank_k + rank_v) / (2 * width * tokens)
    unit = (tokens + width) / (2 * width * tokens)  # the bytes of one rank more
    assert 1 - ratio - unit < kept <= 1 - ratio, (rank_k, rank_v, kept)


def test_small_ratio_on_a_model_holds_about_one_minus_ratio():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(1)
    for ratio in (0.01, 0.1):
        cache = compresskv.XKVCache(model, group_size=4, compression_ratio=ratio)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, **kv(cache), use_cache=True)
        stats = cache.stats()
        assert stats.ratio <= 1 - ratio and stats.ratio == pytest.approx(1 - ratio, abs=0.02), (ratio, stats.ratio)


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA, and MHA (joint rank capped by the hidden size)
def test_elitekv_ratio_zero_keeps_every_pair_and_the_full_rank(kv_heads):
    model = tiny_model("llama", "sdpa", kv_heads=kv_heads)
    dims = elitekv.model_dims(model)
    half = dims["head_dim"] // 2
    assert elitekv.resolve_sizes(dims, compression_ratio=0.0) == (half, elitekv.joint_rank(dims, half))
    assert elitekv.resolve_sizes(dims, cache_ratio=1.0) == (half, elitekv.joint_rank(dims, half))
    full = 2 * dims["kv_heads"] * dims["head_dim"]
    for ratio in (0.01, 0.1, 0.25, 0.5):
        r, c = elitekv.resolve_sizes(dims, compression_ratio=ratio)
        kept = (2 * r * dims["kv_heads"] + c) / full
        # before (MHA, ratio 0.1): r=5, c capped at 64 → 81% kept, the rest of the budget unused
        assert abs(kept - (1 - ratio)) <= 1 / full, (ratio, r, c, kept)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_elitekv_patch_at_ratio_zero_is_dynamic_cache(kv_heads):
    model = tiny_model("llama", "sdpa", kv_heads=kv_heads)
    ids, mask = batch_inputs(2)
    ref_seq, ref_logits = greedy(model, ids, mask, dynamic(model))
    # no ranking needed: every pair is kept, whichever the selection
    compresskv.patch(model, "elitekv", compression_ratio=0.0, progress=False)
    spec = model.config.elitekv
    assert spec["rope_pairs"] == HEAD_DIM // 2 and spec["cache_ratio"] == 1.0
    seq, logits = greedy(model, ids, mask, None)
    assert torch.equal(seq, ref_seq)
    assert (logits - ref_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cls", ["matryoshka", "pca"])
def test_projected_ratio_zero_keeps_full_rank(cls):
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(2)
    ref_seq, ref_logits = greedy(model, ids, mask, dynamic(model))
    projections = compresskv.calibrate(model, calib_ids(), seq_len=48, progress=False)
    cache = (compresskv.MatryoshkaKVCache(model, projections, compression_ratio=0.0) if cls == "matryoshka"
             else compresskv.PCAKVCache(model, texts=calib_ids(), seq_len=48, compression_ratio=0.0))
    assert bool((cache.ranks_k == HEAD_DIM).all()) and bool((cache.ranks_v == HEAD_DIM).all())
    seq, logits = greedy(model, ids, mask, cache)
    assert torch.equal(seq, ref_seq)
    assert (logits - ref_logits).abs().max().item() <= 1e-4


# -- 2. chunked prefill ----------------------------------------------------------------------------
ONCE = {
    "xkv": ("xkv", dict(group_size=2, compression_ratio=0.5)),
    "svd": ("svd", dict(rank_k=8, rank_v=8)),
    "minicache": ("minicache", dict(start_layer=0)),
}


@pytest.mark.parametrize("name", sorted(ONCE))
def test_methods_compressing_the_prompt_once_refuse_chunked_prefill(name):
    method, options = ONCE[name]
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(2, length=48)
    cache = compresskv.make_cache(model, method, **options)
    with pytest.raises(ValueError) as err:
        generate(model, ids, mask, cache, chunk=16)
    message = str(err.value)
    for word in ("prefill_chunk_size", "once", "one forward", "eviction"):
        assert word in message, (word, message)
    # refused before anything of the second chunk was stored, in any layer
    assert all(layer.get_seq_length() == 16 for layer in cache.layers)
    # the model is usable afterwards: a fresh cache of the same method, and a DynamicCache
    ref = generate(model, ids, mask, dynamic(model))
    again = generate(model, ids, mask, compresskv.make_cache(model, method, **options))
    assert again.sequences.shape == ref.sequences.shape
    assert torch.equal(generate(model, ids, mask, dynamic(model), chunk=16).sequences, ref.sequences)


def test_a_new_turn_after_decoding_is_still_appended_by_xkv():
    model = tiny_model("llama", "sdpa")
    ids, _ = batch_inputs(1, length=40)
    cache = compresskv.XKVCache(model, group_size=2, rank_k=8, rank_v=8)
    with torch.no_grad():
        model(input_ids=ids, **kv(cache), use_cache=True)
        model(input_ids=ids[:, :1], **kv(cache), use_cache=True)  # one decode step
        model(input_ids=ids[:, :12], **kv(cache), use_cache=True)  # a new turn: appended
    layers = [layer for layer in cache.layers if isinstance(layer, XKVLayer)]
    assert all(layer.prefix_len == 40 and layer.keys.shape[-2] == 13 for layer in layers)


def test_xkv_ratio_zero_accepts_chunked_prefill():
    """Nothing is compressed at ratio 0, so chunks are simply stored."""
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(2, length=48)
    ref = generate(model, ids, mask, dynamic(model))
    out = generate(model, ids, mask, compresskv.XKVCache(model, group_size=2, compression_ratio=0.0), chunk=16)
    assert torch.equal(out.sequences, ref.sequences)
    assert max_diff(out.logits, ref.logits) <= 1e-4


def _projected(model, rank):
    projections = compresskv.calibrate(model, calib_ids(), seq_len=48, progress=False)
    return lambda: compresskv.MatryoshkaKVCache(model, projections, rank=rank)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_projected_cache_chunked_prefill_compresses_as_unchunked(attn):
    model = tiny_model("llama", attn)
    ids, mask = batch_inputs(3, length=48)
    ref = generate(model, ids, mask, dynamic(model))
    for rank in (HEAD_DIM, 6):
        make = _projected(model, rank)
        whole, chunked = make(), make()
        out_whole = generate(model, ids, mask, whole)
        out_chunked = generate(model, ids, mask, chunked, chunk=16)
        assert chunked.nbytes() == whole.nbytes()
        assert chunked.stats().tokens_stored == whole.stats().tokens_stored
        # (at a lower rank the logits differ: a later chunk attends to the earlier ones compressed)
        if rank == HEAD_DIM:  # no compression: DynamicCache's logits
            assert torch.equal(out_chunked.sequences, ref.sequences)
            assert max_diff(out_chunked.logits, ref.logits) <= 1e-4


def test_elitekv_chunked_prefill_compresses_as_unchunked():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(3, length=48)
    ref = generate(model, ids, mask, dynamic(model))
    dims = elitekv.model_dims(model)
    half = dims["head_dim"] // 2
    elitekv.convert(model, rope_pairs=half, kv_dim=elitekv.joint_rank(dims, half), selection="uniform", progress=False)
    whole, chunked = compresskv.EliteKVCache(model), compresskv.EliteKVCache(model)
    out_whole = generate(model, ids, mask, whole)
    out_chunked = generate(model, ids, mask, chunked, chunk=16)
    assert chunked.nbytes() == whole.nbytes() > 0
    assert torch.equal(out_chunked.sequences, ref.sequences)
    assert max_diff(out_chunked.logits, ref.logits) <= 1e-4
    assert max_diff(out_whole.logits, ref.logits) <= 1e-4


# -- 3. attention maps from the projected read -------------------------------------------------------
@pytest.mark.parametrize("mode", ["latent", "latent_explicit", "model"])
def test_projected_cache_returns_attention_maps(mode):
    model = tiny_model("llama", "eager")
    ids, mask = batch_inputs(2, length=24)
    projections = compresskv.calibrate(model, calib_ids(), seq_len=48, progress=False)
    steps = 4
    ref = generate(model, ids, mask, dynamic(model), new_tokens=steps, output_attentions=True)
    out = generate(model, ids, mask, compresskv.MatryoshkaKVCache(model, projections, rank=HEAD_DIM, read_mode=mode),
                   new_tokens=steps, output_attentions=True)
    assert torch.equal(out.sequences, ref.sequences)
    assert [len(step) for step in out.attentions] == [4] * steps  # before: [4, 0, 0, 0]
    for i, (step, ref_step) in enumerate(zip(out.attentions, ref.attentions)):
        q_len = 24 if i == 0 else 1
        for got, want in zip(step, ref_step):
            assert got.shape == want.shape == (2, 4, q_len, 24 + i)
            assert (got - want).abs().max().item() <= 1e-5
    low = generate(model, ids, mask, compresskv.MatryoshkaKVCache(model, projections, rank=4, read_mode=mode),
                   new_tokens=steps, output_attentions=True)
    for step in low.attentions[1:]:
        for weights in step:
            assert torch.allclose(weights.sum(-1), torch.ones(()), atol=1e-5)


# -- 4. MLA models ------------------------------------------------------------------------------------
def tiny_mla(version: int = 3):
    from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config

    config_class = DeepseekV3Config if version == 3 else DeepseekV2Config
    config = config_class(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


MLA_CACHES = {
    "minicache": lambda m: compresskv.MiniCache(m, start_layer=0),
    "expected_attention": lambda m: compresskv.ExpectedAttentionCache(m, compression_ratio=0.5),
    "pca": lambda m: compresskv.PCAKVCache(m, texts=calib_ids(), compression_ratio=0.5),
    "base": lambda m: compresskv.CompressedCache(m),
}


@pytest.mark.parametrize("version", [2, 3])
def test_mla_models_are_refused_at_construction_with_the_reason(version):
    model = tiny_mla(version)
    before = model.config._attn_implementation
    for name, make in MLA_CACHES.items():
        with pytest.raises(ValueError) as err:
            make(model)
        message = str(err.value)
        # the reason, and the methods that do compress an MLA cache (the eviction ones: tests/test_mla.py)
        # (xKV and SVD factorise the latent where transformers caches it: tests/test_mla.py)
        for word in ("MLA", "kv_lora_rank", "latent", f"deepseek_v{version}", "snapkv, pyramidkv, streamingllm, knorm, xkv, svd"):
            assert word in message, (name, word, message)
        assert "create one cache per model" not in message
        assert model.config._attn_implementation == before, name  # refused before switching attention
    for method, options in (("minicache", {}), ("expected_attention", dict(compression_ratio=0.5)),
                            ("elitekv", dict(compression_ratio=0.5, selection="uniform"))):
        with pytest.raises(ValueError) as err:
            compresskv.patch(model, method, **options)
        assert "MLA" in str(err.value) and "kv_lora_rank" in str(err.value), (method, str(err.value))
    assert base_of(model.config._attn_implementation) == "sdpa"
    ids, mask = batch_inputs(1, length=12)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)


# -- 5. Gemma3: one rotary embedding per layer type ------------------------------------------------------
def tiny_gemma3(attn: str = "sdpa"):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=HEAD_DIM, sliding_window=8, max_position_embeddings=1024,
        layer_types=["sliding_attention", "full_attention"] * 3, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM._from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_gemma3_pre_rope_xkv_full_rank_matches_dynamic_cache(attn, batch):
    model = tiny_gemma3(attn)
    ids, mask = batch_inputs(batch)
    ref_seq, ref_logits = greedy(model, ids, mask, dynamic(model))
    width = 2 * 2 * HEAD_DIM
    for read_mode in ("auto", "rebuild", "model", "fused"):
        cache = compresskv.XKVCache(model, group_size=2, rank_k=width, rank_v=width, read_mode=read_mode)
        assert cache.rope is not None and cache.rope.layer_type == "full_attention"
        seq, logits = greedy(model, ids, mask, cache)
        assert torch.equal(seq, ref_seq), read_mode
        assert (logits - ref_logits).abs().max().item() <= 1e-4, read_mode
        stats = cache.stats()
        assert stats.groups == [[1, 3], [5]] and stats.ranks_k[1] == 48
    # the full-attention layers' RoPE base, not the sliding layers' (1e6 vs 1e4 here)
    assert torch.equal(cache.rope.inv_freq(), model.model.rotary_emb.full_attention_inv_freq)


# -- 6. MiniCache's errors name MiniCache's options -------------------------------------------------------
@pytest.mark.parametrize("options,words", [
    (dict(start_layer=1), ["start_layer=1", "end_layer", "3 full-attention layers", "remainder='last_group'", "pairs"]),
    (dict(start_layer=3), ["start_layer=3", "only 1 full-attention layer", "pairs"]),
    (dict(end_layer=1), ["end_layer=1", "start_layer", "default", "middle"]),
    (dict(end_layer=0), ["end_layer=0", "[1, 4)", "pairs"]),
    (dict(start_layer=2, end_layer=1), ["start_layer=2", "end_layer=1"]),
    (dict(start_layer=4), ["start_layer", "[0, 4)"]),
    (dict(start_layer=1.5), ["start_layer", "[0, 4)"]),
    (dict(end_layer=9), ["end_layer", "[0, 4)"]),
    (dict(t=1.5), ["t ", "[0, 1]"]),
    (dict(gamma=-1), ["gamma", "[0, 1]"]),
    (dict(remainder="drop"), ["remainder", "'error'", "'last_group'"]),
])
def test_minicache_errors_name_its_own_options(options, words):
    model = tiny_model("llama", "sdpa")  # 4 layers
    with pytest.raises(ValueError) as err:
        compresskv.MiniCache(model, **options)
    message = str(err.value)
    assert message.startswith("MiniCache:")
    assert "group_size" not in message, message  # MiniCache has no group_size option
    for word in words:
        assert word in message, (word, message)


def test_minicache_default_start_fits_a_short_range():
    """end_layer=2 on 4 layers: the default start (the middle, 2) moves to 1 to make a pair rather
    than past end_layer (before: "start_layer=3 comes after end_layer=2")."""
    model = tiny_model("llama", "sdpa")
    assert compresskv.MiniCache(model, end_layer=2).group_plan == [[1, 2]]
    assert compresskv.MiniCache(model).group_plan == [[2, 3]]
    assert compresskv.MiniCache(tiny_model("llama", "sdpa", layers=5)).group_plan == [[3, 4]]
