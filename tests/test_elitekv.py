"""EliteKV: RoPElite ranking, J-LRD conversion, the latent cache, save/reload, uptraining, patch()."""

from __future__ import annotations

import copy

import pytest
import torch

import compresskv
from compresskv import elitekv
from compresskv.compat import output_cache
from conftest import ATTENTIONS, batch_inputs, dynamic, greedy, tiny_model, kv

FAMILIES = ("llama", "qwen2", "mistral")


def model_with_biases(family: str = "qwen2", attn: str = "sdpa", **kwargs):
    """A tiny model whose q/k/v biases (Qwen2 has them) are non-zero, so they are really tested."""
    model = tiny_model(family, attn, **kwargs)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if lin.bias is not None:
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.5)
    return model


def set_mode(model, mode: str) -> None:
    for module in model.modules():
        if isinstance(module, elitekv.EliteKVAttention):
            module.read_mode = mode


def calibration_ids(n: int = 4, length: int = 32, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 96, (n, length), generator=torch.Generator().manual_seed(seed))


# -- exactness -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("batch", [1, 3])
def test_all_pairs_full_rank_matches_original(family, attn, batch):
    model = model_with_biases(family, attn)
    ids, mask = batch_inputs(batch)
    ref_seq, ref_logits = greedy(model, ids, mask, dynamic(model))
    with torch.no_grad():
        ref_forward = model(input_ids=ids, attention_mask=mask).logits
    dims = elitekv.model_dims(model)
    half = dims["head_dim"] // 2
    elitekv.convert(model, rope_pairs=half, kv_dim=elitekv.joint_rank(dims, half), selection="uniform", progress=False)
    for mode in ("auto", "latent", "model"):
        set_mode(model, mode)
        seq, logits = greedy(model, ids, mask, None)
        assert torch.equal(seq, ref_seq), mode
        assert (logits - ref_logits).abs().max().item() <= 1e-4, mode
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert (out.logits - ref_forward)[real].abs().max().item() <= 1e-4
    assert isinstance(output_cache(out), compresskv.EliteKVCache)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_partial_rope_layer_matches_reference(family):
    """r < d/2 and full joint rank: the layer equals the original projections with RoPE kept only on
    the chosen pairs (per KV head), for both attention paths."""
    model = model_with_biases(family, "eager")
    attn = model.model.layers[1].self_attn
    original = copy.deepcopy(attn)
    dims = elitekv.model_dims(model)
    d, hq, hkv = dims["head_dim"], dims["heads"], dims["kv_heads"]
    pairs = torch.tensor([[[0, 3, 6], [1, 2, 7]]] * dims["layers"])
    elitekv.convert(model, 3, elitekv.joint_rank(dims, 3), pairs=pairs, progress=False)
    new = model.model.layers[1].self_attn
    torch.manual_seed(0)
    x = torch.randn(2, 10, dims["hidden"])
    pos = torch.arange(10)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        q = original.q_proj(x).view(2, 10, hq, d).transpose(1, 2)
        k = original.k_proj(x).view(2, 10, hkv, d).transpose(1, 2)
        v = original.v_proj(x).view(2, 10, hkv, d).transpose(1, 2)

        def rope(t, heads_pairs):
            out = t.clone()
            rot = t * cos[:, None] + torch.cat([-t[..., d // 2:], t[..., : d // 2]], -1) * sin[:, None]
            for h, ps in enumerate(heads_pairs):
                for p in ps:
                    out[:, h, :, p], out[:, h, :, p + d // 2] = rot[:, h, :, p], rot[:, h, :, p + d // 2]
            return out

        qr = rope(q, [pairs[1][j // (hq // hkv)].tolist() for j in range(hq)])
        kr = rope(k, pairs[1].tolist())
        kr, v = kr.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
        scores = (qr @ kr.transpose(-1, -2)) * d**-0.5
        scores = scores.masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf"))
        ref = original.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, -1))
        causal = torch.zeros(1, 1, 10, 10).masked_fill(~torch.ones(10, 10, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
        for mode in ("latent", "model"):
            new.read_mode = mode
            got, _ = new(x, position_embeddings=(cos, sin), attention_mask=causal)
            assert (got - ref).abs().max().item() <= 1e-5, mode


@pytest.mark.parametrize("attn", ATTENTIONS)
def test_low_rank_attention_paths_agree(attn):
    model = model_with_biases("qwen2", attn)
    elitekv.convert(model, 2, 10, selection="uniform", progress=False)
    ids, mask = batch_inputs(3)
    set_mode(model, "latent")
    a = greedy(model, ids, mask, None)
    set_mode(model, "model")
    b = greedy(model, ids, mask, None)
    assert torch.equal(a[0], b[0])
    assert (a[1] - b[1]).abs().max().item() <= 1e-4


# -- the cache -------------------------------------------------------------------------------------
def test_cache_bytes_are_exactly_the_latent_and_rope_dims():
    model = tiny_model("llama", "sdpa")
    elitekv.convert(model, 2, 12, selection="low_frequency", progress=False)
    ids, mask = batch_inputs(3)
    cache = compresskv.make_cache(model, "elitekv")
    seq, _ = greedy(model, ids, mask, cache, new_tokens=5)
    tokens = seq.shape[1] - 1  # the last generated token is never fed back
    layers, hkv, d = 4, 2, 16
    assert cache.nbytes() - cache.room_nbytes() == 3 * tokens * layers * (12 + 2 * 2 * hkv) * 4
    stats = cache.stats()
    assert stats.tokens_seen == tokens and stats.tokens_stored == [tokens] * layers
    assert stats.uncompressed_nbytes == 3 * tokens * layers * 2 * hkv * d * 4
    assert stats.token_ratio == pytest.approx((12 + 4 * hkv) / (2 * hkv * d))
    assert cache.bytes_per_token() == layers * (12 + 4 * hkv) * 4
    k_rope, latent = cache.layers[0].keys, cache.layers[0].values
    assert k_rope.shape == (3, hkv, tokens, 4) and latent.shape == (3, 1, tokens, 12)


def test_converted_model_builds_its_cache_and_accepts_dynamic_cache():
    model = tiny_model("llama", "eager")
    elitekv.convert(model, 3, 16, selection="uniform", progress=False)
    ids, mask = batch_inputs(3)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    assert isinstance(output_cache(out), compresskv.EliteKVCache)
    with torch.no_grad():
        assert isinstance(output_cache(model(input_ids=ids, attention_mask=mask, use_cache=True)), compresskv.EliteKVCache)
        assert output_cache(model(input_ids=ids, attention_mask=mask, use_cache=False)) is None
    a = greedy(model, ids, mask, None)
    b = greedy(model, ids, mask, dynamic(model))  # a DynamicCache stores the same two tensors
    assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max().item() == 0.0
    beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    assert beams.shape == (3, ids.shape[1] + 3)
    with pytest.raises(ValueError, match="cannot use a SnapKVCache"):
        greedy(model, ids, mask, compresskv.SnapKVCache(model, budget=16, window_size=4))
    compresskv.core.attention.clear_pending()


# -- RoPElite ----------------------------------------------------------------------------------------
def _brute_force_order(model, windows, layer: int, head: int) -> list[int]:
    """The greedy order from explicit logit matrices over every causal (query, key) pair."""
    attn = model.model.layers[layer].self_attn
    dims = elitekv.model_dims(model)
    d, hq, hkv = dims["head_dim"], dims["heads"], dims["kv_heads"]
    g, half = hq // hkv, d // 2
    captured = []
    hook = attn.register_forward_pre_hook(
        lambda m, a, kw: captured.append((kw["hidden_states"], kw["position_embeddings"])), with_kwargs=True
    )
    with torch.no_grad():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    hook.remove()

    def logits(rotated: set[int]) -> torch.Tensor:
        out = []
        for x, (cos, sin) in captured:
            t = x.shape[1]
            q = attn.q_proj(x).view(t, hq, d)[:, head * g: (head + 1) * g]
            k = attn.k_proj(x).view(t, hkv, d)[:, head]
            c, s = cos[0], sin[0]
            rot = lambda z: z * c[:, None] + torch.cat([-z[..., half:], z[..., :half]], -1) * s[:, None]  # noqa: E731
            qr, kr = rot(q), rot(k[:, None])[:, 0]
            dims_on = [i for p in rotated for i in (p, p + half)]
            qm, km = q.clone(), k.clone()
            qm[..., dims_on], km[..., dims_on] = qr[..., dims_on], kr[..., dims_on]
            full = torch.einsum("qgd,kd->gqk", qm, km) * d**-0.5
            out.append(full[:, torch.ones(t, t, dtype=torch.bool).tril()].flatten())
        return torch.cat(out)

    with torch.no_grad():
        target = logits(set(range(half)))
        chosen: list[int] = []
        for _ in range(half):
            dist = {p: (logits(set(chosen) | {p}) - target).abs().mean().item() for p in range(half) if p not in chosen}
            chosen.append(min(dist, key=dist.get))
    return chosen


def test_ropelite_greedy_matches_brute_force_and_roundtrips(tmp_path):
    model = model_with_biases("qwen2", "sdpa")
    windows = calibration_ids(2, 24)
    ranking = elitekv.rank_frequencies(model, windows, seq_len=24, num_windows=2, samples_per_window=None, progress=False)
    assert ranking.shape == (4, 2, 8)
    for layer, head in [(0, 0), (2, 1)]:
        assert ranking.tensors["ropelite_order"][layer, head].tolist() == _brute_force_order(model, windows, layer, head)
    dist = ranking.tensors["ropelite_distance"]
    assert dist[..., -1].abs().max() < 1e-5  # all pairs rotated = the original logits
    assert ranking.tensors["input_moment"].shape == (4, 64, 64)
    ranking.save_pretrained(tmp_path / "rank")
    back = elitekv.FrequencyRanking.from_pretrained(tmp_path / "rank", model)
    assert torch.equal(back.select(3), ranking.select(3))
    with pytest.raises(ValueError, match="config hash"):
        elitekv.FrequencyRanking.from_pretrained(tmp_path / "rank", tiny_model("qwen2", layers=2))
    with pytest.raises(ValueError, match="config hash"):
        elitekv.convert(tiny_model("llama"), 2, 8, ranking=ranking, progress=False)


def test_sampled_ranking_and_baselines():
    model = tiny_model("llama", "sdpa")
    ranking = elitekv.rank_frequencies(model, calibration_ids(), seq_len=32, samples_per_window=64, progress=False)
    order = ranking.tensors["ropelite_order"]
    assert torch.equal(order.sort(-1).values, torch.arange(8).expand(4, 2, 8))  # a permutation per head
    assert elitekv.select_pairs(4, 2, 8, 3, "uniform")[0, 0].tolist() == [0, 3, 7]
    assert elitekv.select_pairs(4, 2, 8, 2, "low_frequency")[3, 1].tolist() == [6, 7]
    contrib = ranking.tensors["contribution"]
    top = ranking.select(1, "contribution")[..., 0]
    assert torch.equal(top, contrib.argmax(-1))
    with pytest.raises(ValueError, match="needs a frequency ranking"):
        elitekv.convert(model, 2, 8, selection="contribution", progress=False)


def test_activation_aware_svd_beats_weight_svd_on_activations():
    model = tiny_model("llama", "sdpa")
    ranking = elitekv.rank_frequencies(model, calibration_ids(), seq_len=32, progress=False)
    moment = ranking.input_moment[0]
    attn = model.model.layers[0].self_attn
    dims = elitekv.model_dims(model)
    pairs = ranking.select(2)[0]
    _, w_err = elitekv.jlrd_weights(attn, pairs, 8, dims, moment)
    from compresskv.elitekv.factorization import factorize

    joint = torch.cat([attn.k_proj.weight, attn.v_proj.weight]).double()
    up_w, down_w = factorize(joint, 8)
    up_a, down_a = factorize(joint, 8, moment)

    def act_err(up, down):
        diff = joint - up @ down
        return torch.einsum("oi,ij,oj->", diff, moment.double(), diff).item()

    assert act_err(up_a, down_a) <= act_err(up_w, down_w) * (1 + 1e-9)
    assert (joint - up_w @ down_w).norm() <= (joint - up_a @ down_a).norm() * (1 + 1e-9)
    up_f, down_f = factorize(joint, 64, moment)  # full rank: exact either way
    assert (joint - up_f @ down_f).abs().max() < 1e-6
    assert "activation" in w_err and w_err["activation"] > 0
    elitekv.convert(model, 2, 8, ranking=ranking, svd="activation", progress=False)
    assert elitekv.conversion_info(model)["svd"] == "activation"


# -- save / reload -----------------------------------------------------------------------------------
def test_save_pretrained_and_load_converted(tmp_path):
    model = model_with_biases("qwen2", "sdpa")
    ranking = elitekv.rank_frequencies(model, calibration_ids(), seq_len=32, progress=False)
    elitekv.convert(model, 3, 20, ranking=ranking, progress=False)
    ids, mask = batch_inputs(3)
    before = greedy(model, ids, mask, None)
    model.save_pretrained(tmp_path / "m")
    back = elitekv.load_converted(tmp_path / "m")
    assert back.config.elitekv["pairs"] == model.config.elitekv["pairs"]
    assert back.config.elitekv["rope_pairs"] == 3 and back.config.elitekv["kv_dim"] == 20
    after = greedy(back, ids, mask, None)
    assert torch.equal(before[0], after[0]) and (before[1] - after[1]).abs().max().item() <= 1e-5
    eager = elitekv.load_converted(tmp_path / "m", attn_implementation="eager")
    assert torch.equal(greedy(eager, ids, mask, None)[0], before[0])
    with pytest.raises(ValueError, match="not an EliteKV"):
        tiny_model("llama").save_pretrained(tmp_path / "plain")
        elitekv.load_converted(tmp_path / "plain")


# -- patch -----------------------------------------------------------------------------------------
def test_patch_ranks_converts_and_wires_the_cache():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(3)
    compresskv.patch(model, "elitekv", cache_ratio=0.5, rope_pairs=2, calibration_texts=calibration_ids(), seq_len=32,
                     progress=False)
    spec = model.config.elitekv
    assert (spec["rope_pairs"], spec["kv_dim"], spec["selection"], spec["svd"]) == (2, 24, "ropelite", "activation")
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    cache = output_cache(out)
    assert isinstance(cache, compresskv.EliteKVCache) and cache.stats().token_ratio == pytest.approx(0.5)
    compresskv.unpatch(model)  # does not un-convert
    assert elitekv.is_converted(model)
    with pytest.raises(ValueError, match="already converted"):
        compresskv.make_cache(model, "elitekv", cache_ratio=0.25)


def test_patch_by_compression_ratio_and_revert():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(3)
    ref = greedy(model, ids, mask, dynamic(model))
    with pytest.raises(ValueError, match="needs a frequency ranking"):
        compresskv.make_cache(model, "elitekv", compression_ratio=0.5)
    ranking = elitekv.rank_frequencies(model, calibration_ids(), seq_len=32, progress=False)
    cache = compresskv.make_cache(model, "elitekv", compression_ratio=0.5, ranking=ranking, keep_original=True)
    assert cache.kv_dim + 2 * cache.rope_pairs * 2 == 32
    again = compresskv.make_cache(model, "elitekv", compression_ratio=0.5, ranking=ranking)
    assert again is not cache and isinstance(again, compresskv.EliteKVCache)
    smaller = compresskv.make_cache(model, "elitekv", compression_ratio=0.75)  # re-converted from the original
    assert smaller.kv_dim + 2 * smaller.rope_pairs * 2 == 16
    elitekv.revert(model)
    assert not elitekv.is_converted(model) and type(model).__name__ == "LlamaForCausalLM"
    seq, logits = greedy(model, ids, mask, dynamic(model))
    assert torch.equal(seq, ref[0]) and (logits - ref[1]).abs().max().item() == 0.0
    cache = compresskv.make_cache(model, "elitekv", compression_ratio=0.5, selection="uniform")
    assert model.config.elitekv["selection"] == "uniform"


# -- bad input -------------------------------------------------------------------------------------
def test_bad_inputs_are_clear_errors():
    model = tiny_model("llama", "sdpa")
    for r in (-1, 9, 2.5):
        with pytest.raises(ValueError, match=r"rope_pairs must be an int in \[0, head_dim/2 = 8\]"):
            elitekv.convert(model, r, 8, selection="uniform", progress=False)
    for c in (0, -3, 57):
        with pytest.raises(ValueError, match=r"kv_dim must be an int in \[1, 56\]"):
            elitekv.convert(model, 2, c, selection="uniform", progress=False)
    with pytest.raises(ValueError, match="cache_ratio must be in"):
        elitekv.convert(model, 2, cache_ratio=1.5, selection="uniform", progress=False)
    with pytest.raises(ValueError, match="lower rope_pairs"):
        elitekv.convert(model, 8, cache_ratio=0.25, selection="uniform", progress=False)
    with pytest.raises(ValueError, match="unknown selection"):
        elitekv.convert(model, 2, 8, selection="random", progress=False)
    with pytest.raises(ValueError, match="svd must be"):
        elitekv.convert(model, 2, 8, selection="uniform", svd="qr", progress=False)
    with pytest.raises(ValueError, match="svd='activation' needs"):
        elitekv.convert(model, 2, 8, selection="uniform", svd="activation", progress=False)
    with pytest.raises(ValueError, match="'qwen3'.*q_norm/k_norm"):
        elitekv.convert(tiny_model("qwen3"), 2, 8, selection="uniform", progress=False)
    with pytest.raises(ValueError, match="'qwen3'"):
        elitekv.rank_frequencies(tiny_model("qwen3"), calibration_ids(), seq_len=32, progress=False)
    with pytest.raises(ValueError, match="sliding"):
        elitekv.convert(tiny_model("mistral", sliding_window=16), 2, 8, selection="uniform", progress=False)
    with pytest.raises(ValueError, match="not an EliteKV-converted"):
        compresskv.EliteKVCache(model)
    with pytest.raises(TypeError, match="does not take"):
        compresskv.make_cache(model, "elitekv", budget=3)
    assert not elitekv.is_converted(model)  # nothing above converted it
    elitekv.convert(model, 2, 8, selection="uniform", progress=False)
    with pytest.raises(ValueError, match="already EliteKV-converted"):
        elitekv.convert(model, 2, 8, selection="uniform", progress=False)
    with pytest.raises(ValueError, match="without keep_original"):
        elitekv.revert(model)


# -- uptraining ------------------------------------------------------------------------------------
def test_uptrain_lowers_the_loss_and_resumes(tmp_path):
    teacher = tiny_model("llama", "sdpa")
    texts = calibration_ids(6, 33, seed=11)
    base = copy.deepcopy(teacher)
    elitekv.convert(base, 1, 6, selection="uniform", progress=False)
    straight = copy.deepcopy(base)
    result = elitekv.uptrain(straight, texts, teacher=teacher, steps=8, seq_len=32, lr=3e-3, progress=False)
    losses = [h["loss"] for h in result["history"]]
    assert result["tokens"] == 8 * 32 and result["device"] == "cpu" and len(losses) == 8
    assert min(losses[-3:]) < losses[0]
    assert not straight.training and all(p.requires_grad for p in straight.parameters())
    # Stop after 5 of 8 steps (as if interrupted), then resume: the same weights as one run.
    resumed = copy.deepcopy(base)
    part = elitekv.uptrain(resumed, texts, teacher=teacher, steps=8, seq_len=32, lr=3e-3, checkpoint=tmp_path,
                           stop_at=5, progress=False)
    assert len(part["history"]) == 5
    with pytest.raises(ValueError, match="another setting"):
        elitekv.uptrain(copy.deepcopy(base), texts, teacher=teacher, steps=8, seq_len=32, lr=1e-3, checkpoint=tmp_path,
                        progress=False)
    again = copy.deepcopy(base)
    out = elitekv.uptrain(again, texts, teacher=teacher, steps=8, seq_len=32, lr=3e-3, checkpoint=tmp_path, progress=False)
    assert [h["step"] for h in out["history"]] == list(range(1, 9))
    for (n, a), (_, b) in zip(straight.named_parameters(), again.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n
    with pytest.raises(ValueError, match="teacher="):
        elitekv.uptrain(copy.deepcopy(base), texts, steps=2, seq_len=32, progress=False)


# -- the embedded model --------------------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_exact_at_full_size_and_patch_at_half():
    from compresskv.eval import make_needle_task

    model, tokenizer = compresskv.load_model()
    task = make_needle_task(tokenizer, length=160, seed=2)
    kwargs = dict(input_ids=task.input_ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(**kv(dynamic(model)), **kwargs)
    original = copy.deepcopy(model)
    elitekv.convert(model, rope_pairs=32, kv_dim=192, selection="uniform", progress=False)
    out = model.generate(**kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) <= 1e-4
    assert output_cache(out).stats().token_ratio == pytest.approx(1.0)
    text = tokenizer.decode(make_needle_task(tokenizer, length=600, seed=5).input_ids[0])
    compresskv.patch(original, "elitekv", cache_ratio=0.5, calibration_texts=text, tokenizer=tokenizer, seq_len=256,
                     num_windows=2, progress=False)
    half = original.generate(**kwargs)
    assert output_cache(half).stats().token_ratio == pytest.approx(0.5)
    kept = output_cache(half)
    assert kept.nbytes() - kept.room_nbytes() == (task.length + 5) * 30 * 192 * 4  # c + 2·r·H_kv = 192 of 384
    compresskv.unpatch(original)


def test_patched_block_reverts_the_conversion_it_made():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(2)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with compresskv.patched(model, "elitekv", cache_ratio=0.5, rope_pairs=2, calibration_texts=calibration_ids(),
                            seq_len=32, progress=False):
        assert elitekv.is_converted(model)
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert not elitekv.is_converted(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    again = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(again, plain)
