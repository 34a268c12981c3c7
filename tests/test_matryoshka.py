"""MatryoshkaKV / PCA: the projected cache, PCA calibration, Matryoshka training, rank allocation."""

from __future__ import annotations

import pytest
import torch

import compresskv
from compresskv.projected.projections import Projections, kept_fraction
from compresskv.projected.training import cayley
from compresskv.projected import ProjectedLayer
from conftest import VOCAB, batch_inputs, dynamic, greedy, tiny_model, kv

MODES = ("latent", "model")
CONFIGS = {
    "llama-gqa": dict(family="llama"),  # 4 query heads on 2 KV heads
    "llama-mha": dict(family="llama", kv_heads=4),  # num_key_value_heads == num_attention_heads
    "qwen3-gqa": dict(family="qwen3"),  # q/k norms, head_dim set explicitly
}


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run many tiny ops; on a busy 2-core machine two OpenMP threads spin-wait on each
    other and run them ~100x slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def calib_ids(n: int = 4, length: int = 48, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, length), generator=g)


def model_and_projections(config: str = "llama-gqa", attn: str = "sdpa", **extra):
    model = tiny_model(attn=attn, **{**CONFIGS[config], **extra})
    return model, compresskv.calibrate(model, calib_ids(), seq_len=48, progress=False)


def uneven_ranks(p: Projections, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (p.num_layers, p.num_kv_heads)
    return torch.randint(1, p.head_dim + 1, shape, generator=g), torch.randint(1, p.head_dim + 1, shape, generator=g)


# -- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("batch", [1, 3])
def test_full_rank_matches_dynamic_cache(config, attn, batch):
    model, p = model_and_projections(config, attn)
    ids, mask = batch_inputs(batch)
    ref_seq, ref_logits = greedy(model, ids, mask, dynamic(model))
    for mode in MODES:
        for options in (dict(compression_ratio=0.0), dict(rank=p.head_dim)):
            cache = compresskv.MatryoshkaKVCache(model, p, read_mode=mode, **options)
            seq, logits = greedy(model, ids, mask, cache)
            assert torch.equal(seq, ref_seq), (mode, options)
            assert (logits - ref_logits).abs().max().item() <= 1e-4, (mode, options)
            assert all(n == seq.shape[1] - 1 for n in cache.stats().tokens_stored)


@pytest.mark.parametrize("config", ["llama-gqa", "llama-mha"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_projected_attention_equals_reconstruct_on_read_at_low_rank(config, attn):
    """Uneven per-head ranks, left padding: attention in the projected space computes what the
    model's own attention computes on the reconstructed keys and values."""
    model, p = model_and_projections(config, attn)
    ids, mask = batch_inputs(3)
    runs = [greedy(model, ids, mask, compresskv.MatryoshkaKVCache(model, p, ranks=uneven_ranks(p), read_mode=mode))
            for mode in MODES]
    assert torch.equal(runs[0][0], runs[1][0])
    assert (runs[0][1] - runs[1][1]).abs().max().item() <= 1e-4
    ref = greedy(model, ids, mask, dynamic(model))[1]
    assert (runs[0][1] - ref).abs().max().item() > 1e-3  # low rank really changed something


def test_stored_latents_are_the_projections_of_the_keys_and_values():
    model, p = model_and_projections()
    ids, mask = batch_inputs(2)
    mask[:] = 1
    rk, rv = uneven_ranks(p, seed=3)
    ref = dynamic(model)
    model(input_ids=ids, attention_mask=mask, **kv(ref), use_cache=True)
    cache = compresskv.MatryoshkaKVCache(model, p, ranks=(rk, rv))
    model(input_ids=ids, attention_mask=mask, **kv(cache), use_cache=True)
    for layer_idx, layer in enumerate(cache.layers):
        for name, ranks, latent, groups in (("k", rk, layer.k_latent, layer.factors.k_groups),
                                            ("v", rv, layer.v_latent, layer.factors.v_groups)):
            full = ref.layers[layer_idx].keys if name == "k" else ref.layers[layer_idx].values
            u, mu = p.tensors[f"U_{name}"][layer_idx], p.tensors[f"mu_{name}"][layer_idx]
            for group, z in zip(groups, latent):
                assert z.shape[-1] == group.rank and z.shape[1] == len(group.heads)
                for j, h in enumerate(group.heads):
                    assert group.rank == int(ranks[layer_idx, h])
                    expected = (full[:, h] - mu[h]) @ u[h][:, : group.rank]
                    assert torch.allclose(z[:, j], expected, atol=1e-5)


def test_load_prefill_equals_prefilling_through_the_cache():
    model, p = model_and_projections()
    ids, _ = batch_inputs(1)
    prompt, rest = ids[:, :40], ids[:, 40:]
    dyn = dynamic(model)
    model(input_ids=prompt, **kv(dyn), use_cache=True)
    for mode in MODES:
        direct = compresskv.MatryoshkaKVCache(model, p, ranks=uneven_ranks(p), read_mode=mode)
        model(input_ids=prompt, **kv(direct), use_cache=True)
        loaded = compresskv.MatryoshkaKVCache(model, p, ranks=uneven_ranks(p), read_mode=mode).load_prefill(dyn)
        assert loaded.nbytes() == direct.nbytes() and loaded.get_seq_length() == 40
        a = model(input_ids=rest, **kv(direct), use_cache=True).logits
        b = model(input_ids=rest, **kv(loaded), use_cache=True).logits
        assert (a - b).abs().max().item() <= 1e-5
    assert dyn.get_seq_length() == 40  # the source is untouched
    with pytest.raises(ValueError, match="fresh cache"):
        loaded.load_prefill(dyn)


def _simulated(model, p, dyn, rk, rv, keep: int):
    """A DynamicCache whose stored keys/values are replaced by their rank-r reconstructions,
    except the first ``keep`` tokens: an independent reference for the projected cache."""
    import copy

    out = copy.deepcopy(dyn)
    for i, layer in enumerate(out.layers):
        for name, ranks, attr in (("k", rk, "keys"), ("v", rv, "values")):
            x = getattr(layer, attr)
            u, mu = p.tensors[f"U_{name}"][i], p.tensors[f"mu_{name}"][i]
            rebuilt = torch.stack([mu[h] + (x[:, h] - mu[h]) @ u[h][:, :r] @ u[h][:, :r].T
                                   for h, r in enumerate(ranks[i].tolist())], dim=1)
            rebuilt[:, :, :keep] = x[:, :, :keep]
            setattr(layer, attr, rebuilt)
    return out


@pytest.mark.parametrize("sink_tokens", [0, 2])
@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_low_rank_matches_an_independent_reconstruction(sink_tokens, mode):
    model, p = model_and_projections()
    ids, _ = batch_inputs(1)
    prompt, rest = ids[:, :40], ids[:, 40:]
    rk, rv = uneven_ranks(p, seed=5)
    dyn = dynamic(model)
    model(input_ids=prompt, **kv(dyn), use_cache=True)
    ref = model(input_ids=rest, **kv(_simulated(model, p, dyn, rk, rv, sink_tokens)), use_cache=True).logits
    cache = compresskv.MatryoshkaKVCache(model, p, ranks=(rk, rv), read_mode=mode, sink_tokens=sink_tokens)
    model(input_ids=prompt, **kv(cache), use_cache=True)
    logits = model(input_ids=rest, **kv(cache), use_cache=True).logits
    assert (logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_sink_tokens_under_left_padding_agree_between_modes(attn):
    model, p = model_and_projections("llama-gqa", attn)
    ids, mask = batch_inputs(3)
    runs = [greedy(model, ids, mask, compresskv.MatryoshkaKVCache(model, p, rank=3, read_mode=mode, sink_tokens=2))
            for mode in MODES]
    assert torch.equal(runs[0][0], runs[1][0]) and (runs[0][1] - runs[1][1]).abs().max().item() <= 1e-4
    cache = compresskv.MatryoshkaKVCache(model, p, rank=3, sink_tokens=2)
    greedy(model, ids, mask, cache)
    first_real = (mask == 0).sum(dim=1)  # left padding: row i starts at 7·i
    assert torch.equal(cache.layers[0].sink_index[:, 0], first_real)


def test_beam_search_at_full_rank_matches_dynamic_cache():
    model, p = model_and_projections()
    ids, mask = batch_inputs(2)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    ref = model.generate(**kv(dynamic(model)), **kwargs)
    out = model.generate(**kv(compresskv.MatryoshkaKVCache(model, p, compression_ratio=0.0)), **kwargs)
    assert torch.equal(out, ref)


# -- memory -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(compression_ratio=0.0), dict(compression_ratio=0.25),
                                     dict(compression_ratio=0.5), dict(compression_ratio=0.625),
                                     dict(compression_ratio=0.75), dict(compression_ratio=0.5), dict(rank=3), "uneven"])
def test_nbytes_is_tokens_times_ranks_plus_projections(options):
    model, p = model_and_projections()
    options = dict(ranks=uneven_ranks(p)) if options == "uneven" else options
    cache = compresskv.MatryoshkaKVCache(model, p, **options)
    ids, mask = batch_inputs(2, length=40)
    mask[:] = 1  # no padding: no validity mask is held
    greedy(model, ids, mask, cache, new_tokens=4)
    tokens, elem, d = 40 + 3, 4, p.head_dim
    rk, rv = cache.ranks_k, cache.ranks_v
    latents = 2 * tokens * int(rk.sum() + rv.sum()) * elem
    factors = (d * int(rk.sum() + rv.sum()) + 2 * p.num_layers * p.num_kv_heads * d) * elem
    assert cache.nbytes() - cache.room_nbytes() == latents + factors  # room: decode-time, not yet filled
    sinks = compresskv.MatryoshkaKVCache(model, p, **options, sink_tokens=2)
    greedy(model, ids, mask, sinks, new_tokens=4)
    assert sinks.nbytes() - sinks.room_nbytes() == latents + factors + p.num_layers * (2 * 2 * 8 + 2 * p.num_kv_heads * 2 * 2 * d * elem)
    assert sum(layer.latent_nbytes() for layer in cache.layers) == latents
    stats = cache.stats()
    assert stats.uncompressed_nbytes == 2 * tokens * p.num_layers * p.num_kv_heads * 2 * d * elem
    assert stats.ratio == pytest.approx(cache.nbytes() / stats.uncompressed_nbytes)
    assert 0 < stats.room_nbytes <= 2 * 16 * int(rk.sum() + rv.sum()) * elem  # at most 16 tokens of room
    assert stats.tokens_stored == [tokens] * p.num_layers and stats.ranks_k[0] == rk[0].tolist()
    if "compression_ratio" in options:
        assert kept_fraction(rk, rv, d) == pytest.approx(1 - options["compression_ratio"], abs=0.5 / d)


# -- calibration artifacts ----------------------------------------------------------------------------
def test_pca_columns_are_orthonormal_and_sorted_by_variance():
    model, p = model_and_projections()
    assert p.orthogonality_error() <= 1e-5
    var = p.tensors["var_k"]
    assert bool((var[..., :-1] >= var[..., 1:] - 1e-6).all())
    assert p.options["tokens"] == 4 * 48 and p.method == "pca"


@torch.no_grad()
def test_position_offsets_rotate_keys_without_changing_the_model_output():
    """Calibration windows get random position offsets (RoPE attention only sees relative
    positions, so the outputs are unchanged and the keys are those of the later positions)."""
    model = tiny_model("llama")
    ids = calib_ids(1)
    plain = model(input_ids=ids).logits
    shifted = model(input_ids=ids, position_ids=torch.arange(48)[None] + 700).logits
    assert (plain - shifted).abs().max().item() <= 1e-4
    spread = compresskv.calibrate(model, calib_ids(), seq_len=48, progress=False)
    at_zero = compresskv.calibrate(model, calib_ids(), seq_len=48, position_range=48, progress=False)
    assert spread.options["position_range"] == 1024 and at_zero.options["position_range"] == 48
    assert (spread.tensors["mu_k"] - at_zero.tensors["mu_k"]).abs().max() > 1e-3  # keys really moved
    assert torch.allclose(spread.tensors["mu_v"], at_zero.tensors["mu_v"], atol=1e-4)  # values did not
    with pytest.raises(ValueError, match="position_range"):
        compresskv.calibrate(model, calib_ids(), seq_len=48, position_range=16, progress=False)


def test_calibration_accepts_strings_with_a_tokenizer():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) % 90 + 3 for c in text]}

    model = tiny_model("llama")
    p = compresskv.calibrate(model, ["the quick brown fox " * 10, "jumps over " * 12], tokenizer=Tok(),
                             seq_len=32, progress=False)
    assert p.options["windows"] == 10


def test_save_and_load_and_refuse_other_models(tmp_path):
    model, p = model_and_projections()
    compresskv.allocate_ranks(model, p, calib_ids(1), compression_ratio=0.5, seq_len=48, progress=False)
    p.save_pretrained(tmp_path / "proj")
    back = compresskv.Projections.from_pretrained(tmp_path / "proj", model)
    assert back.compression_ratios == [0.5] and back.method == "pca"
    for name in ("U_k", "U_v", "mu_k", "mu_v", "ranks_k@0.5"):
        assert torch.equal(back.tensors[name], p.tensors[name])
    deeper = tiny_model("llama", layers=6)
    with pytest.raises(ValueError, match="layers, kv_heads, head_dim"):
        compresskv.Projections.from_pretrained(tmp_path / "proj", deeper)
    other_rope = tiny_model("llama", rope_theta=500.0)
    with pytest.raises(ValueError, match="config hash"):
        compresskv.MatryoshkaKVCache(other_rope, back, compression_ratio=0.5)


# -- training -------------------------------------------------------------------------------------------
def test_training_keeps_u_orthogonal_and_the_model_frozen():
    model, p = model_and_projections()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained = compresskv.train_projections(model, p, calib_ids(4, 48), steps=4, seq_len=48, lr=1e-2, progress=False)
    assert trained.method == "trained" and trained.orthogonality_error() <= 1e-5
    assert (trained.tensors["U_k"] - p.tensors["U_k"]).abs().max() > 1e-4
    assert (trained.tensors["mu_v"] - p.tensors["mu_v"]).abs().max() > 1e-5
    info = trained.options["training"]
    assert info["tokens"] == 4 * 48 and info["steps"] == 4 and len(info["history"]) == 4
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in info["history"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(param.requires_grad for param in model.parameters())
    # Trained projections are still exact at full rank.
    ids, mask = batch_inputs(3)
    ref = greedy(model, ids, mask, dynamic(model))[1]
    logits = greedy(model, ids, mask, compresskv.MatryoshkaKVCache(model, trained, compression_ratio=0.0))[1]
    assert (logits - ref).abs().max().item() <= 1e-4


def test_cayley_is_orthogonal_and_zero_maps_to_identity():
    x = torch.randn(3, 8, 8, dtype=torch.float64)
    q = cayley(x)
    assert torch.allclose(q.transpose(-1, -2) @ q, torch.eye(8, dtype=torch.float64).expand(3, 8, 8), atol=1e-12)
    assert torch.equal(cayley(torch.zeros(8, 8)), torch.eye(8))


# -- rank allocation ---------------------------------------------------------------------------------------
def test_allocation_meets_each_budget_and_is_nested():
    model, p = model_and_projections()
    compresskv.allocate_ranks(model, p, calib_ids(2), compression_ratio=[0.25, 0.5, 0.75], seq_len=48, progress=False)
    assert p.compression_ratios == [0.25, 0.5, 0.75]
    d, step = p.head_dim, p.options["allocation"]["step"]
    previous = None
    for budget in (0.75, 0.5, 0.25):
        rk, rv = p.allocation(compression_ratio=1 - budget)
        assert kept_fraction(rk, rv, d) == pytest.approx(budget)
        for r in (rk, rv):
            assert int(r.min()) >= step and int(r.max()) <= d and bool((r % step == 0).all())
        if previous is not None:  # one greedy path: ranks only go down
            assert bool((rk <= previous[0]).all() and (rv <= previous[1]).all())
        previous = (rk, rv)
    cache = compresskv.MatryoshkaKVCache(model, p, compression_ratio=0.5)
    assert cache.rank_source == "allocated@0.5" and torch.equal(cache.ranks_k, p.allocation(compression_ratio=0.5)[0])
    uniform = compresskv.MatryoshkaKVCache(model, p, compression_ratio=0.5, use_allocation=False)
    assert uniform.rank_source == "uniform@0.5" and int(uniform.ranks_k.max()) == d // 2
    assert model.config._attn_implementation in ("sdpa", "compresskv_sdpa")


def test_training_and_allocation_for_the_sink_option():
    model, p = model_and_projections()
    trained = compresskv.train_projections(model, p, calib_ids(2), steps=2, seq_len=48, sink_tokens=1, progress=False)
    assert trained.options["training"]["sink_tokens"] == 1 and trained.orthogonality_error() <= 1e-5
    compresskv.allocate_ranks(model, trained, calib_ids(1), compression_ratio=0.5, seq_len=48, sink_tokens=1, progress=False)
    assert trained.options["allocation"]["sink_tokens"] == 1
    rk, rv = trained.allocation(compression_ratio=0.5)
    assert kept_fraction(rk, rv, trained.head_dim) == pytest.approx(0.5)


# -- patch and the registry ----------------------------------------------------------------------------------
def test_patch_matryoshka_and_pca():
    model, p = model_and_projections()
    ids, mask = batch_inputs(2)
    compresskv.patch(model, "matryoshka", projections=p, compression_ratio=0.5)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 3)
    compresskv.unpatch(model)
    assert {"matryoshka", "pca"} <= set(compresskv.available_methods())
    assert {"projections", "compression_ratio", "rank", "ranks", "read_mode"} <= set(
        compresskv.method_options("matryoshka"))
    texts = calib_ids(2)
    first = compresskv.make_cache(model, "pca", compression_ratio=0.5, texts=texts, seq_len=48)
    second = compresskv.make_cache(model, "pca", compression_ratio=0.5, texts=texts, seq_len=48)
    assert first.projections is second.projections  # calibrated once per model and texts
    assert first.rank_source == "uniform@0.5"


def test_pca_without_projections_or_texts_is_a_clear_error():
    model, p = model_and_projections()
    with pytest.raises(ValueError) as err:
        compresskv.make_cache(model, "pca", compression_ratio=0.5)
    assert "projections=" in str(err.value) and "--calibration" in str(err.value)
    with pytest.raises(ValueError, match="projections="):
        compresskv.make_cache(model, "matryoshka", compression_ratio=0.5)
    trained = compresskv.train_projections(model, p, calib_ids(1), steps=1, seq_len=48, progress=False)
    with pytest.raises(ValueError, match="matryoshka"):
        compresskv.make_cache(model, "pca", projections=trained, compression_ratio=0.5)


# -- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,words", [
    (dict(rank=0), ["rank", "[1, head_dim=16]"]),
    (dict(rank=17), ["rank", "[1, head_dim=16]"]),
    (dict(compression_ratio=1.0), ["compression_ratio", "[0, 1)"]),
    (dict(compression_ratio=-0.5), ["compression_ratio", "[0, 1)"]),
    (dict(compression_ratio=1.5), ["compression_ratio", "[0, 1)"]),
    (dict(compression_ratio=1.0), ["compression_ratio", "[0, 1)"]),
    (dict(compression_ratio=0.5, rank=4), ["exactly one"]),
    (dict(), ["exactly one", "compression_ratio"]),
    (dict(compression_ratio=0.5, read_mode="fast"), ["read_mode", "latent", "model"]),
    (dict(compression_ratio=0.5, sink_tokens=-1), ["sink_tokens"]),
    (dict(ranks=(torch.full((4, 3), 4), torch.full((4, 3), 4))), ["ranks_k", "[4, 2]"]),
    (dict(ranks=(torch.full((4, 2), 4), torch.full((4, 2), 99))), ["ranks_v", "[1, head_dim=16]"]),
])
def test_bad_cache_options(options, words):
    model, p = model_and_projections()
    with pytest.raises(ValueError) as err:
        compresskv.MatryoshkaKVCache(model, p, **options)
    for word in words:
        assert word in str(err.value)


def test_old_budget_spellings_are_refused_naming_compression_ratio():
    """``budget`` (the fraction kept) was renamed ``compression_ratio`` (the fraction removed, as
    everywhere in compresskv): the old spellings, and a positional value where the budget was,
    raise a TypeError that names the new parameter and the conversion."""
    model, p = model_and_projections()
    calls = {
        "MatryoshkaKVCache(budget=)": lambda: compresskv.MatryoshkaKVCache(model, p, budget=0.5),
        "MatryoshkaKVCache(positional)": lambda: compresskv.MatryoshkaKVCache(model, p, 0.5),
        "PCAKVCache(budget=)": lambda: compresskv.PCAKVCache(model, p, budget=0.5),
        "allocate_ranks(budget=)": lambda: compresskv.allocate_ranks(model, p, calib_ids(1), budget=[0.5], seq_len=48,
                                                                     progress=False),
        "allocate_ranks(positional)": lambda: compresskv.allocate_ranks(model, p, calib_ids(1), 0.5, seq_len=48,
                                                                        progress=False),
        "allocation(positional)": lambda: p.allocation(0.5),
        "allocation(budget=)": lambda: p.allocation(budget=0.5),
        "add_allocation(budget=)": lambda: p.add_allocation(budget=0.5, ranks_k=None, ranks_v=None),
        "uniform_ranks(positional)": lambda: p.uniform_ranks(0.5),
        "patch(budget=)": lambda: compresskv.patch(model, "matryoshka", projections=p, budget=0.5),
        "make_cache(pca, budget=)": lambda: compresskv.make_cache(model, "pca", projections=p, budget=0.5),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError) as err:
            call()
        assert "compression_ratio" in str(err.value) and "1 - budget" in str(err.value), name
    with pytest.raises(AttributeError, match="compression_ratios"):
        p.budgets
    assert "budget" not in compresskv.method_options("matryoshka")
    assert "budget" not in compresskv.method_options("pca")
    # PCAKVCache declares only what it adds and forwards the rest: its options are Matryoshka's too.
    assert set(compresskv.method_options("matryoshka")) < set(compresskv.method_options("pca"))


def test_allocations_saved_by_earlier_versions_still_load(tmp_path):
    """Stored allocations are keyed by the fraction kept (``ranks_k@0.75`` and
    ``options["allocations"] == [0.75]``), as every earlier version wrote them."""
    model, p = model_and_projections()
    rk, rv = uneven_ranks(p)
    p.tensors["ranks_k@0.75"], p.tensors["ranks_v@0.75"] = rk.to(torch.int32), rv.to(torch.int32)
    p.options["allocations"] = [0.75]
    p.save_pretrained(tmp_path / "old")
    back = compresskv.Projections.from_pretrained(tmp_path / "old", model)
    assert back.compression_ratios == [0.25]
    assert torch.equal(back.allocation(compression_ratio=0.25)[0], rk)
    cache = compresskv.MatryoshkaKVCache(model, back, compression_ratio=0.25)
    assert cache.rank_source == "allocated@0.25" and torch.equal(cache.ranks_v, rv)


def test_bad_calibration_training_and_allocation_input():
    model, p = model_and_projections()
    with pytest.raises(ValueError, match="too short.*seq_len=64"):
        compresskv.calibrate(model, torch.arange(3, 50), seq_len=64, progress=False)
    with pytest.raises(ValueError, match="method must be 'pca'"):
        compresskv.calibrate(model, calib_ids(), method="svd", seq_len=48, progress=False)
    with pytest.raises(ValueError, match="too short"):
        compresskv.train_projections(model, p, calib_ids(1), steps=1, seq_len=48, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="steps"):
        compresskv.train_projections(model, p, calib_ids(1), steps=0, seq_len=48, progress=False)
    with pytest.raises(ValueError, match="rank_set"):
        compresskv.train_projections(model, p, calib_ids(1), steps=1, seq_len=48, rank_set=[0, 8], progress=False)
    with pytest.raises(ValueError, match=r"compression_ratio.*\[0, 1\)"):
        compresskv.allocate_ranks(model, p, calib_ids(1), compression_ratio=1.0, seq_len=48, progress=False)
    with pytest.raises(ValueError, match="smallest reachable"):
        compresskv.allocate_ranks(model, p, calib_ids(1), compression_ratio=0.95, seq_len=48, progress=False)
    other = tiny_model("llama", layers=2)
    for call in (lambda: compresskv.train_projections(other, p, calib_ids(1), steps=1, seq_len=48, progress=False),
                 lambda: compresskv.allocate_ranks(other, p, calib_ids(1), seq_len=48, progress=False),
                 lambda: compresskv.MatryoshkaKVCache(other, p, compression_ratio=0.5)):
        with pytest.raises(ValueError, match="Recompute them for this model"):
            call()


@pytest.mark.gpu
def test_calibration_training_and_cache_on_cuda():
    model, _ = model_and_projections()
    model.to("cuda")
    ids = calib_ids().cuda()
    p = compresskv.calibrate(model, ids, seq_len=48, progress=False)
    trained = compresskv.train_projections(model, p, ids, steps=2, seq_len=48, progress=False)
    assert trained.options["training"]["device"].startswith("cuda") and trained.orthogonality_error() <= 1e-5
    compresskv.allocate_ranks(model, trained, ids[:1], compression_ratio=0.5, seq_len=48, progress=False)
    batch, mask = (t.cuda() for t in batch_inputs(3))
    ref = greedy(model, batch, mask, dynamic(model))[1]
    for mode in MODES:
        logits = greedy(model, batch, mask, compresskv.MatryoshkaKVCache(model, trained, compression_ratio=0.0, read_mode=mode))[1]
        assert (logits - ref).abs().max().item() <= 1e-4
    greedy(model, batch, mask, compresskv.MatryoshkaKVCache(model, trained, compression_ratio=0.5, sink_tokens=1))


# -- the embedded model (slow) ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_full_rank_exact_and_half_budget_halves_the_cache():
    from compresskv.eval import make_needle_task

    model, tokenizer = compresskv.load_model()
    task = make_needle_task(tokenizer, length=600, seed=5)
    p = compresskv.calibrate(model, task.input_ids[:, :512], seq_len=512, progress=False)
    ids = task.input_ids[:, :300]
    kwargs = dict(input_ids=ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref = model.generate(**kv(dynamic(model)), **kwargs)
    for mode in MODES:
        out = model.generate(**kv(compresskv.MatryoshkaKVCache(model, p, compression_ratio=0.0, read_mode=mode)), **kwargs)
        assert torch.equal(out.sequences, ref.sequences), mode
        assert max((a - b).abs().max().item() for a, b in zip(out.logits, ref.logits)) <= 1e-4, mode
    cache = compresskv.MatryoshkaKVCache(model, p, compression_ratio=0.5)
    model.generate(**kv(cache), **kwargs)
    stats = cache.stats()
    assert stats.tokens_seen == 305
    # 50% of the per-token bytes plus the projection columns and means (small at this length).
    overhead = sum(layer.factors.nbytes() for layer in cache.layers) / stats.uncompressed_nbytes
    assert stats.token_ratio + stats.fixed_nbytes / stats.uncompressed_nbytes == pytest.approx(0.5 + overhead, abs=1e-6)
    compresskv.unpatch(model)


def test_stats_split_the_per_model_overhead_from_the_per_token_bytes():
    """A short prompt's projected cache can hold more bytes than DynamicCache because of the
    per-model projection columns and means; stats() reports them apart (``fixed_nbytes``) and the
    per-token ratio (``token_ratio``) is the compression itself (#18: reconstruct at ratio=1.9)."""
    model, p = model_and_projections()
    ids, mask = batch_inputs(1, length=8)
    cache = compresskv.MatryoshkaKVCache(model, p, compression_ratio=0.5, read_mode="model")
    greedy(model, ids, mask, cache, new_tokens=1)
    stats = cache.stats()
    factors = sum(layer.factors.nbytes() for layer in cache.layers if isinstance(layer, ProjectedLayer))
    assert stats.fixed_nbytes == factors == cache.held_nbytes() > 0
    assert stats.ratio > 1.0  # a few tokens: the projections dominate
    assert stats.token_ratio == pytest.approx(0.5, abs=1e-6)
    assert stats.as_dict()["token_ratio"] == stats.token_ratio
    evict = compresskv.SnapKVCache(model, budget=6, window_size=2)
    greedy(model, ids, mask, evict, new_tokens=1)
    assert evict.stats().fixed_nbytes == 0 and evict.stats().token_ratio == evict.stats().ratio
