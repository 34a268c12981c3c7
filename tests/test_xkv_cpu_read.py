"""xKV's decode read off the fused kernel (the CPU path): pre-RoPE keys rebuilt in pair order and
rotated as complex numbers give the logits of the real-valued rotation; the prefix's RoPE table is
built once per forward and not held between steps; the value latent is read in one product."""

from __future__ import annotations

import pytest
import torch

import compresskv
from compresskv.crosslayer import ReadCost, XKVLayer
from compresskv.core.rope import RotaryTable
from compresskv.crosslayer.xkv import ROPE_HALVES, pair_order
from conftest import batch_inputs, greedy, kv, tiny_model


def prefilled(positions: str = "offsets", dtype: torch.dtype = torch.float32, read_mode: str = "rebuild"):
    model = tiny_model("llama", "sdpa").to(dtype)
    ids, mask = batch_inputs(3, length=40)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    if positions == "table":
        pos[:, 20:] += 10  # positions are no longer an offset per row
    cache = compresskv.XKVCache(model, group_size=2, rank_k=6, rank_v=10, read_mode=read_mode)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, **kv(cache), use_cache=True)
    return model, ids, mask, cache


def real_rotation_logits(layer: XKVLayer, qg: torch.Tensor) -> torch.Tensor:
    """``qg · Kᵀ`` with the keys rebuilt and rotated the real-valued way (``_keys_block``)."""
    return qg @ layer._keys_block(0, layer.prefix_len, None).transpose(-1, -2)


@pytest.mark.parametrize("positions", ["offsets", "table"])
@pytest.mark.parametrize("chunk", [7, 1024])
def test_paired_complex_rotation_equals_the_real_rotation(positions, chunk):
    _, _, _, cache = prefilled(positions)
    cache.read_chunk = chunk
    g = torch.Generator().manual_seed(0)
    for layer in [x for x in cache.layers if isinstance(x, XKVLayer)]:
        qg = torch.randn(3, 2, 2, 16, generator=g)
        got = layer.prefix_logits(qg, ReadCost())
        want = real_rotation_logits(layer, qg)
        assert got.shape == want.shape == (3, 2, 2, layer.prefix_len)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pair_order_moves_each_heads_halves_side_by_side():
    x = torch.arange(2 * 3 * 2 * 8, dtype=torch.float32).view(2, 3, 16)  # [batch, lead, heads·dim], dim 8
    paired = pair_order(x, 3, 2, 8)
    head = x.view(2, 3, 2, 8)
    expected = torch.stack([head[..., :4], head[..., 4:]], dim=-1).reshape(2, 3, 16)
    assert torch.equal(paired, expected)
    q = x.view(2, 3, 2, 8).transpose(1, 2)  # [batch, heads, rows, dim]
    assert torch.equal(pair_order(q, -1, 2, 8), torch.stack([q[..., :4], q[..., 4:]], -1).reshape(2, 2, 3, 8))


def test_half_table_is_the_first_half_of_the_table():
    model = tiny_model("llama", "sdpa")
    rope = RotaryTable(model, "test")
    pos = torch.tensor([[0, 5, 17, 4095]])
    cos, sin = rope.table(pos)
    half_cos, half_sin = rope.half_table(pos)
    assert torch.equal(half_cos, cos[..., :8]) and torch.equal(half_sin, sin[..., :8])
    assert torch.equal(cos[..., :8], cos[..., 8:])


@pytest.mark.parametrize("read_mode", ["auto", "rebuild", "model"])
def test_the_rope_table_is_built_once_per_forward_and_not_held(monkeypatch, read_mode):
    model, ids, mask, cache = prefilled(read_mode=read_mode)
    calls = []
    original = RotaryTable.half_table

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RotaryTable, "half_table", counted)
    token = torch.zeros(3, 1, dtype=torch.long)
    for step in range(3):
        with torch.no_grad():
            model(input_ids=token, attention_mask=torch.cat([mask, torch.ones(3, step + 1, dtype=mask.dtype)], -1),
                  **kv(cache), use_cache=True)
        assert not [k for k in cache.positions._derived if k[0] == ROPE_HALVES]  # dropped after the forward
    assert len(calls) == 3  # one table per forward, shared by the 4 compressed layers


def test_bf16_keys_take_the_real_rotation_and_agree_with_model_mode():
    outputs = {}
    for mode in ("rebuild", "model"):
        model, ids, mask, cache = prefilled(dtype=torch.bfloat16, read_mode=mode)
        with torch.no_grad():
            out = model(input_ids=torch.zeros(3, 1, dtype=torch.long),
                        attention_mask=torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], -1),
                        **kv(cache), use_cache=True)
        outputs[mode] = out.logits.float()
    torch.testing.assert_close(outputs["rebuild"], outputs["model"], rtol=0.05, atol=0.05)


def test_the_value_latent_read_equals_the_per_head_product():
    _, _, _, cache = prefilled(read_mode="latent")
    layer = next(x for x in cache.layers if isinstance(x, XKVLayer))
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(3, 2, 2, layer.prefix_len, generator=g), dim=-1)
    got = layer.prefix_output(probs)
    latent, factor = layer._latent("v"), layer.factor_v
    want = (probs @ latent[:, None]) @ factor.view(3, -1, 2, 16).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # a strided slice of wider probabilities (the tail's columns beside it), as attention passes it
    wide = torch.cat([probs, torch.rand(3, 2, 2, 5, generator=g)], dim=-1)
    torch.testing.assert_close(layer.prefix_output(wide[..., : layer.prefix_len]), want, rtol=1e-5, atol=1e-6)


def test_generate_with_the_cpu_read_matches_model_mode():
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(3, length=64)
    results = {}
    for mode in ("auto", "model"):
        cache = compresskv.XKVCache(model, group_size=2, rank_k=6, rank_v=10, read_mode=mode)
        results[mode] = greedy(model, ids, mask, cache)
    assert torch.equal(results["auto"][0], results["model"][0])
    assert (results["auto"][1] - results["model"][1]).abs().max().item() <= 1e-4
