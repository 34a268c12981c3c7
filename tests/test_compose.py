"""Composed caches (tokens × channels × bits) and KIVI quantization (compresskv.compose)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import compresskv
from compresskv.compose import QuantSpec, dequantize, parse, quantize
from compresskv.compose.quant import pack, unpack
from compresskv.core.storage import tensor_bytes

from conftest import VOCAB, batch_inputs, greedy, kv, tiny_model


def _ids(n: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def _projections(model: torch.nn.Module) -> compresskv.Projections:
    return compresskv.calibrate(model, _ids(64, batch=4, seed=5), seq_len=64, progress=False)


def _decode_logits(model, cache, ids: torch.Tensor, steps: int = 12) -> torch.Tensor:
    """Prefill ``ids`` then feed a fixed token sequence one at a time; every step's logits."""
    out = []
    with torch.no_grad():
        model(ids, **kv(cache))
        for token in _ids(steps, batch=ids.shape[0], seed=9).T:
            out.append(model(token[:, None], **kv(cache)).logits[:, -1])
    return torch.stack(out, 1)


# -- quantization ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_quantization_error_is_within_half_a_step(bits, per_channel):
    x = torch.randn(2, 3, 64, 32) * torch.linspace(0.1, 10, 32)  # outlier channels, as keys have
    spec = QuantSpec(bits, 16, per_channel)
    codes, scale, zero = quantize(x, spec)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 32 * bits // 8
    back = dequantize(codes, scale, zero, spec, 32, torch.float32)
    step = scale.float()[:, :, :, None, :].expand(2, 3, 4, 16, 32).reshape(x.shape) if per_channel \
        else scale.float()[..., None].expand(2, 3, 64, 2, 16).reshape(x.shape)
    # half a step, plus what rounding scale and zero to 16 bits moves the grid (relative 2^-11)
    bound = step / 2 + 2e-3 * x.abs().amax() + 1e-6
    assert bool(((x - back).abs() <= bound).all())
    assert (x - back).abs().max() > 0  # it did quantize


def test_per_channel_keys_beat_per_token_on_outlier_channels():
    """KIVI's reason for quantizing keys per channel: one channel far larger than the rest."""
    x = torch.randn(1, 1, 64, 32)
    x[..., 3] *= 50
    errors = {}
    for per_channel in (True, False):
        spec = QuantSpec(4, 32, per_channel)
        error = x - dequantize(*quantize(x, spec), spec, 32, torch.float32)
        errors[per_channel] = error[..., torch.arange(32) != 3].norm()  # the ordinary channels
    assert errors[True] < 0.2 * errors[False]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n", [1, 7, 8, 13])
def test_packing_round_trips(n, bits):
    codes = torch.randint(0, 1 << bits, (3, n), dtype=torch.uint8)
    packed = pack(codes, bits)
    per = 8 // bits
    assert packed.shape[-1] == (n + per - 1) // per
    assert torch.equal(unpack(packed, bits, n), codes)


# -- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["int4", "int8", "snapkv+int4", "pyramidkv+int8"])
def test_exact_while_every_token_is_in_the_residual(method, attn):
    """Nothing compresses (no token evicted, every token within the full-precision residual):
    the same logits as DynamicCache, through prefill and decoding."""
    model = tiny_model("llama", attn)
    ids = _ids(40, batch=2)
    opts = {} if "+" not in method else {"compression_ratio": 0.0}
    cache = compresskv.make_cache(model, method, residual=64, **opts)
    ref = _decode_logits(model, DynamicCache(config=model.config), ids)
    got = _decode_logits(model, cache, ids)
    assert cache.layers[0].n_enc == 0
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), float((got - ref).abs().max())


@pytest.mark.parametrize("stage", ["pca", "matryoshka"])
def test_full_rank_channel_stage_is_exact(stage):
    """A channel stage at full rank and no eviction: every token projected and rebuilt, logits as DynamicCache's."""
    model = tiny_model("llama", "sdpa")
    ids = _ids(48)
    cache = compresskv.make_cache(model, f"snapkv+{stage}", compression_ratio=0.0, rank=16,
                                  projections=_projections(model))
    ref = _decode_logits(model, DynamicCache(config=model.config), ids)
    got = _decode_logits(model, cache, ids)
    assert cache.layers[0].n_enc == 48 + 12  # every token is encoded once its attention has run
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), float((got - ref).abs().max())


def test_generate_gives_dynamic_cache_tokens_when_nothing_compresses():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(2, length=40)
    ref, _ = greedy(model, ids, mask, DynamicCache(config=model.config), new_tokens=8)
    got, _ = greedy(model, ids, mask, compresskv.make_cache(model, "snapkv+int8", compression_ratio=0.0, residual=64),
                    new_tokens=8)
    assert torch.equal(got, ref)


# -- bytes ---------------------------------------------------------------------------------------
def _expected_nbytes(cache) -> int:
    """The product formula: encoded tokens × bytes of an encoded token + the residual at full
    precision, per layer, heads and rows; plus validity and the projection columns."""
    total = 0
    for layer in cache.layers:
        b, h, residual, d = layer.keys.shape
        encoded, full = cache.token_bytes(layer.dtype)
        total += int(b * h * (layer.n_enc * encoded + residual * full))
        total += tensor_bytes(layer.valid) + layer.room_nbytes() + layer.held_nbytes()
    return total


@pytest.mark.parametrize("method,extra", [
    ("int4", {}), ("int8", {}), ("snapkv+int4", {"compression_ratio": 0.8}), ("streamingllm+int8", {"token_ratio": 0.5}),
    ("snapkv+pca", {"compression_ratio": 0.5}), ("pyramidkv+pca+int4", {"compression_ratio": 0.9}),
    ("knorm+matryoshka+int8", {"budget": 100}),
])
def test_nbytes_is_the_product_formula(method, extra):
    model = tiny_model("llama", "sdpa", head_dim=32)
    if "pca" in method or "matryoshka" in method:
        extra = {**extra, "projections": _projections(model), "rank": 12}
    if "int" in method:
        extra = {**extra, "residual": 16, "group_size": 8}
    cache = compresskv.make_cache(model, method, **extra)
    _decode_logits(model, cache, _ids(300, batch=2), steps=13)
    layer = cache.layers[0]
    assert layer.n_enc > 0 and layer.n_enc % cache.group_size == 0
    assert cache.residual <= layer.keys.shape[-2] < cache.residual + cache.group_size
    assert cache.nbytes() == _expected_nbytes(cache)
    assert cache.stats().ratio < 1.0


def test_int2_int4_int8_hold_their_bits_and_less_than_dynamic_cache():
    model = tiny_model("llama", "sdpa", head_dim=64)
    sizes = {}
    for method in ("int2", "int4", "int8"):
        cache = compresskv.make_cache(model, method, residual=0)
        with torch.no_grad():
            model(_ids(256), **kv(cache))
        sizes[method] = cache.nbytes()
        codes = cache.layers[0].k_enc[0]
        assert codes.dtype == torch.uint8 and codes.shape[-1] == 64 * int(method[3:]) // 8
    dynamic = DynamicCache(config=model.config)
    with torch.no_grad():
        model(_ids(256), **kv(dynamic))
    full = sum(tensor_bytes(layer.keys, layer.values) for layer in dynamic.layers)
    # fp32 model: 2/4/8 bits a code plus 16-bit scale and zero per 32 → 3/32, 5/32 and 9/32 of the bytes
    assert sizes["int2"] == pytest.approx(full * 3 / 32, rel=1e-6)
    assert sizes["int4"] == pytest.approx(full * 5 / 32, rel=1e-6)
    assert sizes["int8"] == pytest.approx(full * 9 / 32, rel=1e-6)


@pytest.mark.parametrize("method", ["snapkv+int4", "pyramidkv+int4", "snapkv+int8"])
@pytest.mark.parametrize("ratio", [0.8, 0.9])
def test_compression_ratio_is_the_bytes_removed(method, ratio):
    """The token stage evicts what the other stages leave to reach the byte target."""
    model = tiny_model("llama", "sdpa", head_dim=64)
    cache = compresskv.make_cache(model, method, compression_ratio=ratio, residual=32)
    with torch.no_grad():
        model(_ids(1024), **kv(cache))
    assert cache.stats().token_ratio == pytest.approx(1 - ratio, abs=0.02)
    tokens_only = compresskv.make_cache(model, method.split("+")[0], compression_ratio=ratio)
    with torch.no_grad():
        model(_ids(1024), **kv(tokens_only))
    kept = cache.stats().tokens_stored[0]
    assert kept > 2 * tokens_only.stats().tokens_stored[0]  # the bits stage lets it keep more tokens


def test_quantized_decoding_stays_close_and_int8_is_closer():
    model = tiny_model("llama", "sdpa", head_dim=64)
    ids = _ids(200)
    ref = _decode_logits(model, DynamicCache(config=model.config), ids, steps=40)
    err = {}
    for method in ("int2", "int4", "int8"):
        got = _decode_logits(model, compresskv.make_cache(model, method, residual=16), ids, steps=40)
        err[method] = float((got - ref).abs().max())
    assert 0 < err["int8"] < err["int4"] < err["int2"]
    assert err["int4"] < 0.1 * float(ref.abs().max())


def test_batch_reorder_copy_and_left_padding():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(3, length=60)
    cache = compresskv.make_cache(model, "snapkv+int4", compression_ratio=0.7, residual=8, group_size=8)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, num_beams=2,
                         pad_token_id=0, **kv(cache))
    assert out.shape == (3, 70)
    clone = copy.deepcopy(cache)
    assert clone.nbytes() == cache.nbytes() and clone.layers[0].n_enc == cache.layers[0].n_enc


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["int4+snapkv", "snapkv+snapkv", "snapkv+int3", "pca+int4+", "svd+int4", "pca"])
def test_bad_compositions_name_the_stages(name):
    with pytest.raises(ValueError, match="snapkv.*pca.*int4|not a composition|itself"):
        parse(name) if name != "pca" else compresskv.compose.composed("pca+")


@pytest.mark.parametrize("options,match", [
    (dict(compression_ratio=1.0), "compression_ratio"),
    (dict(compression_ratio=0.5, budget=10), "exactly one"),
    (dict(compression_ratio=0.5, group_size=0), "group_size"),
    (dict(compression_ratio=0.5, residual=-1), "residual"),
    (dict(compression_ratio=0.5, rank=4), "rank"),
])
def test_bad_options_name_the_parameter(options, match):
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match=match):
        compresskv.make_cache(model, "snapkv+int4", **options)


def test_channel_stage_checks_projections_and_rank():
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match="residual= and group_size= belong to a bits stage"):
        compresskv.make_cache(model, "snapkv+pca", compression_ratio=0.5, projections=_projections(model), residual=8)
    with pytest.raises(ValueError, match="projections="):
        compresskv.make_cache(model, "snapkv+pca", compression_ratio=0.5)
    with pytest.raises(ValueError, match=r"rank .* \[1, 16\]"):
        compresskv.make_cache(model, "snapkv+pca", compression_ratio=0.5, projections=_projections(model), rank=17)


def test_bounded_static_and_chunked_prefill_are_refused():
    model = tiny_model("llama", "sdpa")
    with pytest.raises((ValueError, TypeError), match="decode_budget"):
        compresskv.make_cache(model, "snapkv+int4", compression_ratio=0.5, decode_budget=64)
    with pytest.raises((ValueError, TypeError), match="compression_ratio"):
        compresskv.make_cache(model, "int4", compression_ratio=0.5)
    cache = compresskv.make_cache(model, "snapkv+int4", compression_ratio=0.5)
    with torch.no_grad():
        model(_ids(40), **kv(cache))
        with pytest.raises(ValueError, match="chunked prefill"):
            model(_ids(40, seed=3), **kv(cache))


def test_options_and_registry():
    assert {"int2", "int4", "int8"} <= set(compresskv.available_methods())
    options = compresskv.method_options("snapkv+pca+int4")
    assert {"compression_ratio", "token_ratio", "rank", "projections", "group_size", "residual", "kernel_size"} <= set(options)
    assert "decode_budget" not in options
    assert set(compresskv.method_options("int4")) == {"group_size", "residual"}


def test_padding_does_not_widen_a_key_group_range():
    """A padding slot's key (never read) is left out of its group's range: the real tokens'
    keys come back as precisely as without it."""
    x = torch.randn(1, 2, 32, 8)
    spec = QuantSpec(4, 32, per_channel=True)
    valid = torch.ones(1, 2, 32, dtype=torch.bool)
    valid[..., :3] = False
    padded = x.clone()
    padded[..., :3, :] = 1000.0  # padding keys far outside the real ones
    masked = dequantize(*quantize(padded, spec, valid), spec, 8, torch.float32)
    unmasked = dequantize(*quantize(padded, spec), spec, 8, torch.float32)
    error = lambda back: (back[..., 3:, :] - x[..., 3:, :]).abs().max()  # noqa: E731
    assert error(masked) < 0.2 * error(unmasked)
    assert masked.isfinite().all()
