"""xKV, single-layer SVD and MiniCache: exact at full rank, the stored form is the paper's (and
only that), every way of reading it agrees, memory follows the formula, bad input is refused."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import compresskv
from compresskv.core.cache import KVLayer
from compresskv.crosslayer import MiniCacheLayer, ReadCost, XKVLayer
from compresskv.crosslayer.factors import ranks_for_ratio
from conftest import ATTENTIONS, FAMILIES, batch_inputs, dynamic, greedy, tiny_model, kv

HEAD_DIM = 16  # every tiny model has head_dim 16
KEYS = ("pre_rope", "post_rope")


def full_rank(group_size: int, kv_heads: int = 2) -> dict:
    width = group_size * kv_heads * HEAD_DIM
    return dict(rank_k=width, rank_v=width)


def assert_matches(model, ids, mask, cache, reference):
    ref_seq, ref_logits = reference
    seq, logits = greedy(model, ids, mask, cache)
    assert torch.equal(seq, ref_seq)
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    return seq


def assert_compressed(cache, prompt_len, new_tokens=6):
    """Every compressed layer holds its prompt only in compressed form, plus the decoded tail."""
    compressed = [layer for layer in cache.layers if isinstance(layer, (XKVLayer, MiniCacheLayer))]
    assert compressed
    for layer in compressed:
        assert layer.prefix_len == prompt_len
        assert layer.keys.shape[-2] == new_tokens - 1  # the last generated token is never fed back
        assert layer.stored() == prompt_len + new_tokens - 1


# -- exactness -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("keys", KEYS)
def test_full_rank_xkv_matches_dynamic_cache(family, attn, batch, keys):
    model = tiny_model(family, attn)  # GQA: 4 query heads, 2 KV heads, 4 layers
    ids, mask = batch_inputs(batch)
    reference = greedy(model, ids, mask, dynamic(model))
    cache = compresskv.XKVCache(model, group_size=2, keys=keys, **full_rank(2))
    assert_matches(model, ids, mask, cache, reference)
    assert_compressed(cache, ids.shape[1])
    assert cache.stats().ranks_k == [48] * 4  # rank 64 asked, clamped to the 48 prompt tokens


@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("keys", KEYS)
@pytest.mark.parametrize("group_size", [1, 4])
def test_full_rank_mha_matches_dynamic_cache(attn, batch, keys, group_size):
    model = tiny_model("llama", attn, kv_heads=4)  # MHA
    ids, mask = batch_inputs(batch)
    reference = greedy(model, ids, mask, dynamic(model))
    cache = compresskv.XKVCache(model, group_size=group_size, keys=keys, **full_rank(group_size, kv_heads=4))
    assert_matches(model, ids, mask, cache, reference)
    assert_compressed(cache, ids.shape[1])


@pytest.mark.parametrize("keys", KEYS)
@pytest.mark.parametrize("attn", ATTENTIONS)
def test_single_layer_svd_full_rank(attn, keys):
    model = tiny_model("qwen2", attn)
    ids, mask = batch_inputs(3)
    reference = greedy(model, ids, mask, dynamic(model))
    cache = compresskv.SVDCache(model, keys=keys, **full_rank(1))
    assert_matches(model, ids, mask, cache, reference)
    assert cache.stats().groups == [[0], [1], [2], [3]]
    assert cache.stats().ranks_k == [32] * 4  # the matrix's 32 columns


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("batch", [1, 3])
def test_minicache_retaining_everything_matches_dynamic_cache(family, attn, batch):
    model = tiny_model(family, attn)
    ids, mask = batch_inputs(batch)
    reference = greedy(model, ids, mask, dynamic(model))
    cache = compresskv.MiniCache(model, start_layer=0, gamma=1.0)
    assert_matches(model, ids, mask, cache, reference)
    assert_compressed(cache, ids.shape[1])


@pytest.mark.parametrize("keys", KEYS)
def test_read_paths_agree_and_low_rank_really_compresses(keys):
    """Latent-space attention, block-wise rebuilt attention, and the model's own attention function
    on the fully rebuilt K/V give the same logits; and a low rank does change them."""
    model = tiny_model("llama", "sdpa", kv_heads=2)
    ids, mask = batch_inputs(3, length=64)
    _, ref_logits = greedy(model, ids, mask, dynamic(model))
    outputs = {}
    for mode in ("latent", "rebuild", "model", "auto"):
        cache = compresskv.XKVCache(model, group_size=2, rank_k=6, rank_v=10, keys=keys)
        cache.read_mode = mode
        cache.read_chunk = 7  # several uneven blocks
        outputs[mode] = greedy(model, ids, mask, cache)
    for mode in ("rebuild", "model", "auto"):
        assert (outputs[mode][1] - outputs["latent"][1]).abs().max().item() <= 1e-4, mode
    assert (outputs["latent"][1] - ref_logits).abs().max().item() > 1e-2


def test_minicache_read_paths_agree():
    model = tiny_model("qwen2", "eager")
    ids, mask = batch_inputs(3)
    outputs = {}
    for mode in ("auto", "model"):
        cache = compresskv.MiniCache(model, start_layer=0, gamma=0.05)
        cache.read_mode = mode
        outputs[mode] = greedy(model, ids, mask, cache)
    assert (outputs["auto"][1] - outputs["model"][1]).abs().max().item() <= 1e-4


# -- what is stored ------------------------------------------------------------------------------
def prefill_kv(model, ids, mask=None):
    cache = dynamic(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **kv(cache), use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def unrotated(model, keys, length):
    """Pre-RoPE keys, by rotating back with transformers' own RoPE (angle −θ)."""
    positions = torch.arange(length)[None]
    cos, sin = model.model.rotary_emb(keys, positions)
    back, _ = apply_rotary_pos_emb(keys, keys, cos, -sin)
    return back


def truncated(matrix, rank):
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("keys", KEYS)
@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_stored_factors_are_the_truncated_svd_of_the_group(keys, solver):
    model = tiny_model("qwen3", "sdpa", kv_heads=2)
    ids, _ = batch_inputs(1, length=80)
    full = prefill_kv(model, ids)
    rank_k, rank_v = 9, 13
    cache = compresskv.XKVCache(model, group_size=2, rank_k=rank_k, rank_v=rank_v, keys=keys, svd_solver=solver)
    with torch.no_grad():
        model(input_ids=ids, **kv(cache), use_cache=True)
    for group, layer_ids in zip(cache.groups, ([0, 1], [2, 3])):
        for kind, rank in (("k", rank_k), ("v", rank_v)):
            cols = []
            for idx in layer_ids:
                x = full[idx][0] if kind == "k" else full[idx][1]
                if kind == "k" and keys == "pre_rope":
                    x = unrotated(model, x, 80)
                cols.append(x[0].transpose(0, 1).reshape(80, -1))
            expected = truncated(torch.cat(cols, dim=-1), rank)
            latent = getattr(group, f"latent_{kind}")
            assert latent.shape == (1, 80, rank)
            factors = [getattr(cache.layers[idx], f"factor_{kind}") for idx in layer_ids]
            assert all(f.shape == (1, rank, 2 * HEAD_DIM) for f in factors)
            got = latent[0].double() @ torch.cat(factors, dim=-1)[0].double()
            assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    for layer in cache.layers:  # no full-size K/V is left behind
        assert layer.keys.shape[-2] == 0 and layer.values.shape[-2] == 0


def test_padding_rows_are_zero_in_the_latent_and_stay_masked():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(3)  # rows padded by 0, 7, 14
    cache = compresskv.XKVCache(model, group_size=2, rank_k=8, rank_v=8)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate() computes them
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, **kv(cache), use_cache=True)
    for group in cache.groups:
        assert group.latent_k[1, :7].abs().max() == 0 and group.latent_v[2, :14].abs().max() == 0
        assert group.latent_k[1, 7:].abs().max() > 0
    for layer in cache.layers:
        assert torch.equal(layer.valid[:, 0], mask.bool())
    # generate's positions are an offset per row: 3 int64 offsets, not a table
    assert cache.positions.table is None and cache.positions.offsets.tolist() == [[0], [-7], [-14]]


def test_positions_that_are_not_an_offset_are_kept_per_token():
    model = tiny_model("llama", "eager")
    ids, _ = batch_inputs(1, length=40)
    positions = torch.cat([torch.arange(20), torch.arange(30, 50)])[None]  # a jump mid-prompt
    results = []
    for cache in (dynamic(model), compresskv.XKVCache(model, group_size=2, **full_rank(2))):
        with torch.no_grad():
            first = model(input_ids=ids, position_ids=positions, **kv(cache), use_cache=True).logits[:, -1]
            token = first.argmax(-1, keepdim=True)
            nxt = model(input_ids=token, position_ids=torch.tensor([[50]]), **kv(cache), use_cache=True)
        results.append(nxt.logits[:, -1])
    assert cache.positions.offsets is None and cache.positions.table.dtype == torch.int32
    assert torch.equal(cache.positions.table, positions.int())
    assert (results[0] - results[1]).abs().max().item() <= 1e-4


# -- memory --------------------------------------------------------------------------------------
def formula_bytes(n_layers, group_size, tokens, kv_heads, rank_k, rank_v, batch, element_size=4):
    """DESIGN.md: [(L/G)·T·(r_k+r_v) + L·H·d·(r_k+r_v)] values, per batch row."""
    values = (n_layers // group_size) * tokens * (rank_k + rank_v) + n_layers * kv_heads * HEAD_DIM * (rank_k + rank_v)
    return batch * values * element_size


@pytest.mark.parametrize("group_size", [1, 2, 4])
@pytest.mark.parametrize("keys", KEYS)
@pytest.mark.parametrize("batch", [1, 3])
def test_nbytes_is_the_formula_plus_decoded_tokens(group_size, keys, batch):
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(batch, length=64)
    rank_k, rank_v = 5, 7
    cache = compresskv.XKVCache(model, group_size=group_size, rank_k=rank_k, rank_v=rank_v, keys=keys)
    greedy(model, ids, mask, cache, new_tokens=6)
    tokens, decoded, kv_heads = 64, 5, 2
    formula = formula_bytes(4, group_size, tokens, kv_heads, rank_k, rank_v, batch)
    decoded_bytes = batch * 4 * decoded * 2 * kv_heads * HEAD_DIM * 4
    positions = 8 * batch if keys == "pre_rope" else 0  # one int64 offset per row
    validity = 4 * batch * kv_heads * (tokens + decoded) if batch > 1 else 0  # bool mask, padded batches only
    assert cache.nbytes() - cache.room_nbytes() == formula + decoded_bytes + positions + validity
    kinds = cache.stats().bytes_by_kind
    assert kinds["shared"] + kinds["per_layer"] == formula
    assert kinds["uncompressed_tokens"] == decoded_bytes
    assert kinds["positions"] == positions and kinds["validity"] == validity
    full = dynamic(model)
    greedy(model, ids, mask, full, new_tokens=6)
    dyn = sum(t.numel() * t.element_size() for layer in full.layers for t in (layer.keys, layer.values))
    assert cache.uncompressed_nbytes() == dyn
    assert cache.stats().ratio == cache.nbytes() / dyn


@pytest.mark.parametrize("group_size", [1, 2, 4])
@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.875])
def test_compression_ratio_derives_ranks_from_the_bytes_formula(group_size, ratio):
    model = tiny_model("llama", "sdpa", layers=4, kv_heads=4)
    ids, _ = batch_inputs(1, length=256)
    cache = compresskv.XKVCache(model, group_size=group_size, compression_ratio=ratio, keys="post_rope")
    with torch.no_grad():
        model(input_ids=ids, **kv(cache), use_cache=True)
    stats = cache.stats()
    rank_k, rank_v = stats.ranks_k[0], stats.ranks_v[0]
    assert rank_k + rank_v >= 3 and rank_v > rank_k  # keys:values about 2:3

    def group_bytes(total):
        return 256 * total + group_size * 4 * HEAD_DIM * total

    budget = (1 - ratio) * 2 * group_size * 4 * HEAD_DIM * 256
    assert group_bytes(rank_k + rank_v) <= budget < group_bytes(rank_k + rank_v + 1)
    assert stats.ratio <= 1 - ratio
    assert stats.ratio == pytest.approx(1 - ratio, abs=0.02)
    assert (rank_k, rank_v) == ranks_for_ratio(ratio, 256, group_size, 4, HEAD_DIM)


def test_minicache_nbytes_and_merge_follow_the_paper():
    model = tiny_model("llama", "sdpa")
    ids, _ = batch_inputs(1, length=64)
    full = prefill_kv(model, ids)
    t, gamma = 0.6, 0.05
    cache = compresskv.MiniCache(model, start_layer=0, t=t, gamma=gamma)
    with torch.no_grad():
        model(input_ids=ids, **kv(cache), use_cache=True)
    expected_bytes = 0
    for group, (a, b) in zip(cache.groups, ([0, 1], [2, 3])):
        for kind, slot in (("k", 0), ("v", 1)):
            xa, xb = full[a][slot][0].double(), full[b][slot][0].double()  # [heads, T, d]
            ua = xa / xa.norm(dim=-1, keepdim=True)
            ub = xb / xb.norm(dim=-1, keepdim=True)
            omega = torch.acos((ua * ub).sum(-1).clamp(-1, 1))
            slerp = (torch.sin((1 - t) * omega)[..., None] * ua + torch.sin(t * omega)[..., None] * ub) / torch.sin(
                omega
            )[..., None]
            distance = omega / math.pi
            threshold = distance.max() - gamma * (distance.max() - distance.min())
            n = int((distance >= threshold).sum(-1).max())
            index = getattr(group, f"index_{kind}")[0].long()
            assert index.shape == (2, n)
            for h in range(2):  # the retained tokens are the head's n most divergent
                kept = set(index[h].tolist())
                assert kept == set(distance[h].topk(n).indices.tolist())
            layer_a, layer_b = cache.layers[a], cache.layers[b]
            rebuilt_a, rebuilt_b = layer_a.rebuild_prefix(ReadCost()), layer_b.rebuild_prefix(
                ReadCost()
            )
            for x, rebuilt in ((xa, rebuilt_a[slot][0]), (xb, rebuilt_b[slot][0])):
                expected = slerp * x.norm(dim=-1, keepdim=True)
                for h in range(2):
                    expected[h, index[h]] = x[h, index[h]]
                assert (rebuilt.double() - expected).abs().max().item() <= 1e-4
            expected_bytes += 2 * 64 * HEAD_DIM * 4  # shared direction
            expected_bytes += 2 * 2 * 64 * 4  # magnitudes of both layers
            expected_bytes += 2 * 2 * n * HEAD_DIM * 4  # retained originals of both layers
            expected_bytes += 2 * n * 2  # int16 indices
    assert cache.nbytes() == expected_bytes
    assert 0.5 < cache.stats().ratio < 0.75


def test_read_costs_are_reported():
    model = tiny_model("llama", "sdpa")
    ids, _ = batch_inputs(1, length=64)
    costs = {}
    for name, cache in (
        ("pre", compresskv.XKVCache(model, group_size=2, rank_k=8, rank_v=8, keys="pre_rope", profile=True)),
        ("post", compresskv.XKVCache(model, group_size=2, rank_k=8, rank_v=8, keys="post_rope", profile=True)),
        ("mini", compresskv.MiniCache(model, start_layer=0, profile=True)),
    ):
        greedy(model, ids, None, cache, new_tokens=3)
        costs[name] = cache.stats()
    key_bytes = 4 * 64 * 2 * HEAD_DIM * 4  # 4 layers' prefix keys, fp32
    assert costs["pre"].last_read["rebuilt_bytes"] == key_bytes  # keys once per layer, never values
    assert costs["post"].last_read["rebuilt_bytes"] == 0
    assert costs["mini"].last_read["rebuilt_bytes"] == 0
    for stats in costs.values():
        assert stats.last_read["reads"] == 4 and stats.total_read["reads"] == 8  # 2 decode forwards
        assert stats.last_read["flops"] > 0 and stats.last_read["transient_bytes"] > 0
        assert stats.compress_seconds > 0
    assert costs["post"].last_read["flops"] < costs["pre"].last_read["flops"]


# -- layer selection, groups, errors ---------------------------------------------------------------
def test_remainder_last_group_and_layer_range():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(3)
    reference = greedy(model, ids, mask, dynamic(model))
    cache = compresskv.XKVCache(model, group_size=3, remainder="last_group", **full_rank(3))
    assert cache.stats().groups == [[0, 1, 2], [3]]
    assert_matches(model, ids, mask, cache, reference)
    assert cache.stats().ranks_k == [48, 48, 48, 32]  # the lone layer's rank scaled 96 -> 32 (full)
    ranged = compresskv.XKVCache(model, group_size=2, start_layer=1, end_layer=2, **full_rank(2))
    assert [type(layer) for layer in ranged.layers] == [KVLayer, XKVLayer, XKVLayer, KVLayer]
    assert_matches(model, ids, mask, ranged, reference)
    mini = compresskv.MiniCache(model)  # default: from the middle layer
    assert mini.stats().groups == [[2, 3]]


@pytest.mark.parametrize("options,words", [
    (dict(rank_k=0, rank_v=8), ["rank_k", "[1, 64]"]),
    (dict(rank_k=8, rank_v=65), ["rank_v", "[1, 64]", "at most 64"]),
    (dict(rank_k=8.0, rank_v=8), ["rank_k"]),
    (dict(rank_k=8), ["rank_k", "rank_v"]),
    (dict(), ["rank_k", "compression_ratio", "exactly one"]),
    (dict(rank_k=8, rank_v=8, compression_ratio=0.5), ["exactly one"]),
    (dict(compression_ratio=1.0), ["compression_ratio", "[0, 1)"]),
    (dict(compression_ratio=-0.1), ["compression_ratio", "[0, 1)"]),
    (dict(group_size=3, rank_k=8, rank_v=8, remainder="error"), ["group_size=3", "4 compressed layers", "[1, 2, 4]", "last_group"]),
    (dict(group_size=8, rank_k=8, rank_v=8), ["group_size=8", "<= 4"]),
    (dict(group_size=0, rank_k=8, rank_v=8), ["group_size", ">= 1"]),
    (dict(rank_k=8, rank_v=8, keys="rope"), ["keys", "pre_rope", "post_rope"]),
    (dict(rank_k=8, rank_v=8, remainder="drop"), ["remainder", "error", "last_group"]),
    (dict(rank_k=8, rank_v=8, start_layer=4), ["start_layer", "[0, 4)"]),
    (dict(rank_k=8, rank_v=8, start_layer=3, end_layer=1), ["start_layer=3", "end_layer=1"]),
    (dict(rank_k=8, rank_v=8, svd_solver="qr"), ["svd_solver", "gram"]),
    (dict(compression_ratio=0.5, key_rank_fraction=1.0), ["key_rank_fraction"]),
])
def test_bad_xkv_options(options, words):
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError) as err:
        compresskv.XKVCache(model, **{"group_size": 2, **options})
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize("cls,options,words", [
    (compresskv.SVDCache, dict(rank_k=33, rank_v=8), ["rank_k", "[1, 32]"]),
    (compresskv.MiniCache, dict(t=1.5), ["t", "[0, 1]"]),
    (compresskv.MiniCache, dict(gamma=-1), ["gamma", "[0, 1]"]),
    (compresskv.MiniCache, dict(start_layer=1), ["start_layer=1", "3 full-attention layers", "last_group"]),
])
def test_bad_baseline_options(cls, options, words):
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError) as err:
        cls(model, **options)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_pre_rope_needs_a_standard_rotary_embedding():
    model = tiny_model("llama", "sdpa")
    del model.model.rotary_emb
    with pytest.raises(ValueError) as err:
        compresskv.XKVCache(model, group_size=2, rank_k=8, rank_v=8)
    assert "post_rope" in str(err.value)
    compresskv.XKVCache(model, group_size=2, rank_k=8, rank_v=8, keys="post_rope")


# -- generate integration --------------------------------------------------------------------------
def test_patch_builds_each_method():
    model = tiny_model("mistral", "sdpa")
    ids, mask = batch_inputs(3)
    ref_seq, _ = greedy(model, ids, mask, dynamic(model))
    assert {"xkv", "svd", "minicache"} <= set(compresskv.available_methods())
    assert "group_size" in compresskv.method_options("xkv") and "gamma" in compresskv.method_options("minicache")
    for method, options in (
        ("xkv", dict(group_size=2, **full_rank(2))),
        ("svd", full_rank(1)),
        ("minicache", dict(start_layer=0, gamma=1.0)),
    ):
        compresskv.patch(model, method, **options)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, pad_token_id=0)
        assert torch.equal(out, ref_seq), method
        compresskv.unpatch(model)


def test_beam_search_and_batch_operations():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(2)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    ref = model.generate(**kv(dynamic(model)), **kwargs)
    out = model.generate(**kv(compresskv.XKVCache(model, group_size=2, **full_rank(2))), **kwargs)
    assert torch.equal(out, ref)
    # repeat then select rows: the shared latents and positions follow the layers
    one, _ = batch_inputs(1)
    cache = compresskv.XKVCache(model, group_size=2, rank_k=8, rank_v=8)
    with torch.no_grad():
        first = model(input_ids=one, **kv(cache), use_cache=True).logits[:, -1:].argmax(-1)
        before = cache.nbytes()
        cache.batch_repeat_interleave(3)
        assert cache.nbytes() == 3 * before
        cache.batch_select_indices(torch.tensor([0, 2]))
        assert cache.nbytes() == 2 * before
        logits = model(input_ids=first.repeat(2, 1), **kv(cache), use_cache=True).logits
    assert (logits[0] - logits[1]).abs().max().item() == 0.0


def test_cache_reset_forgets_everything():
    model = tiny_model("llama", "sdpa")
    ids, _ = batch_inputs(1)
    cache = compresskv.XKVCache(model, group_size=2, rank_k=8, rank_v=8)
    with torch.no_grad():
        model(input_ids=ids, **kv(cache), use_cache=True)
    cache.reset()
    assert cache.nbytes() == 0 and all(not g.compressed for g in cache.groups)
    with torch.no_grad():
        model(input_ids=ids[:, :20], **kv(cache), use_cache=True)
    assert cache.groups[0].latent_k.shape == (1, 20, 8)


# -- the embedded model ----------------------------------------------------------------------------
@pytest.mark.slow
def test_full_rank_on_the_embedded_model():
    from compresskv.eval import make_needle_task

    model, tokenizer = compresskv.load_model()
    ids = make_needle_task(tokenizer, length=300, seed=3).input_ids
    kwargs = dict(input_ids=ids, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(**kv(dynamic(model)), **kwargs)
    width = 2 * 3 * 64
    out = model.generate(**kv(compresskv.XKVCache(model, group_size=2, rank_k=width, rank_v=width)), **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) <= 1e-3
    compresskv.unpatch(model)
