"""Fused xKV decode (compresskv.kernels.xkv_decode): the PyTorch reference equals the exact xKV
attention and a plain softmax, ``read_mode="fused"`` generates what the other read modes do, and
the Triton kernel equals the reference (in Triton's interpreter on CPU, natively on a GPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compresskv
from compresskv.crosslayer import ReadCost, XKVLayer
from compresskv.kernels import PrefixRope, merge_with_tail, tail_mask, xkv_decode, xkv_decode_reference
from conftest import batch_inputs, dynamic, greedy, tiny_model, kv

KEYS = ("pre_rope", "post_rope")
HAS_TRITON = importlib.util.find_spec("triton") is not None
SRC = str(Path(__file__).resolve().parents[1] / "src")


def prefilled(keys: str, positions: str = "offsets", batch: int = 3, length: int = 40, **options):
    """A tiny GQA llama (4 query heads, 2 KV heads, head_dim 16) and an xKV cache holding its
    left-padded prompt compressed at a low rank."""
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(batch, length=length)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    if positions == "table":
        pos[:, 20:] += 10  # a jump: positions are no longer an offset per row
    cache = compresskv.XKVCache(model, group_size=2, rank_k=6, rank_v=10, keys=keys, **options)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, **kv(cache), use_cache=True)
    if keys == "pre_rope":  # positions are kept only to re-rotate pre-RoPE keys
        assert (cache.positions.table is not None) == (positions == "table")
    return model, ids, mask, pos, cache


# -- the reference against the existing exact read -----------------------------------------------
@pytest.mark.parametrize("keys", KEYS)
@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("positions", ["offsets", "table"])
def test_reference_equals_the_exact_xkv_attention(keys, q_len, positions):
    _, _, mask, _, cache = prefilled(keys, positions, read_mode="rebuild")
    cache.read_chunk = 7
    layer = cache.layers[1]
    assert isinstance(layer, XKVLayer) and layer.valid is not None  # left padding is in play
    g = torch.Generator().manual_seed(3)
    qg = (torch.randn(3, 4, q_len, 16, generator=g) * 2).reshape(3, 2, 2 * q_len, 16)
    scaling = 16**-0.5
    valid = layer.valid[:, :, : layer.prefix_len]
    cost = ReadCost()
    logits = (layer.prefix_logits(qg, cost) * scaling).masked_fill(~valid[:, :, None, :], float("-inf"))
    expected = layer.prefix_output(torch.softmax(logits, dim=-1), cost)
    expected_lse = torch.logsumexp(logits, dim=-1)

    group, rope = layer.group, cache.prefix_rope()
    assert (rope is None) == (keys == "post_rope")
    args = (qg, group.latent_k, layer.factor_k, group.latent_v, layer.factor_v)
    for key_mask in (valid, mask.bool()):  # per KV head, or per row
        out, lse = xkv_decode_reference(*args, rope, key_mask, scaling, chunk=7)
        assert (out - expected).abs().max().item() <= 1e-5
        assert (lse - expected_lse).abs().max().item() <= 1e-5
    # the dispatcher runs the reference on CPU
    info: dict = {}
    out2, _ = xkv_decode(*args, rope, valid, scaling, info=info)
    assert info["backend"] == "reference" and (out2 - expected).abs().max().item() <= 1e-5
    if rope is not None:  # the test can fail: keys left unrotated give other outputs
        wrong, _ = xkv_decode_reference(*args, None, valid, scaling)
        assert (wrong - expected).abs().max().item() > 1e-2


def test_an_automatically_chosen_kernel_that_fails_falls_back_to_the_reference(monkeypatch):
    """On a GPU/Triton the kernel does not build on, decoding goes on through the reference (one
    warning, not retried); a kernel asked for explicitly raises."""
    kernel = importlib.import_module("compresskv.kernels.xkv_decode")  # the package's name is the function

    _, _, _, _, cache = prefilled("pre_rope", read_mode="rebuild")
    layer = cache.layers[1]
    qg = torch.randn(3, 2, 2, 16, generator=torch.Generator().manual_seed(4))
    args = (qg, layer.group.latent_k, layer.factor_k, layer.group.latent_v, layer.factor_v, cache.prefix_rope(),
            layer.valid[:, :, : layer.prefix_len], 0.25)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(kernel, "xkv_decode_triton", broken)
    monkeypatch.setattr(kernel, "_TRITON_FAILED", [])
    monkeypatch.setattr(kernel, "_triton_usable", lambda latent: not kernel._TRITON_FAILED)  # as on a GPU
    expected, _ = xkv_decode_reference(*args)
    with pytest.warns(RuntimeWarning, match="PassManager"):
        out, _ = xkv_decode(*args)
    assert torch.equal(out, expected) and len(calls) == 1
    out, _ = xkv_decode(*args)  # not retried
    assert torch.equal(out, expected) and len(calls) == 1
    with pytest.raises(RuntimeError, match="PassManager"):
        xkv_decode(*args, backend="triton")


def full_softmax(qg, keys, values, mask, scaling):
    logits = (qg @ keys.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1) @ values


def rotate(keys, pos, inv_freq, scaling):
    """Pre-RoPE ``[B, T, H, d]`` keys rotated the way transformers does (cat(freqs, freqs), rotate_half)."""
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = (emb.cos() * scaling)[:, :, None], (emb.sin() * scaling)[:, :, None]
    k1, k2 = keys.chunk(2, dim=-1)
    return keys * cos + torch.cat([-k2, k1], dim=-1) * sin


@pytest.mark.parametrize("q_len", [1, 4])
def test_prefix_and_tail_merge_into_one_exact_softmax(q_len):
    """Prefix (reference) + tail (merge_with_tail) equals one softmax over the rebuilt keys and
    values followed by the tail, with padding in both, causal new tokens and a position table."""
    g = torch.Generator().manual_seed(0)
    bsz, n_kv, groups, dim, length, rank_k, rank_v, n_tail = 2, 3, 2, 8, 19, 5, 7, 6
    rows = groups * q_len
    qg = torch.randn(bsz, n_kv, rows, dim, generator=g)
    latent_k, latent_v = torch.randn(bsz, length, rank_k, generator=g), torch.randn(bsz, length, rank_v, generator=g)
    factor_k = torch.randn(bsz, rank_k, n_kv * dim, generator=g)
    factor_v = torch.randn(bsz, rank_v, n_kv * dim, generator=g)
    table = torch.randint(0, 500, (bsz, length), generator=g)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    rope = PrefixRope(inv_freq, table=table, scaling=1.1)
    prefix_valid = torch.ones(bsz, length, dtype=torch.bool)
    prefix_valid[1, :6] = False
    tail_valid = torch.ones(bsz, n_tail + q_len, dtype=torch.bool)
    tail_valid[0, 2] = False
    tail_k = torch.randn(bsz, n_kv, n_tail + q_len, dim, generator=g)
    tail_v = torch.randn(bsz, n_kv, n_tail + q_len, dim, generator=g)

    keys = rotate((latent_k @ factor_k).view(bsz, length, n_kv, dim), table, inv_freq, 1.1).transpose(1, 2)
    values = (latent_v @ factor_v).view(bsz, length, n_kv, dim).transpose(1, 2)
    causal = torch.ones(q_len, q_len, dtype=torch.bool).tril().repeat(groups, 1)  # row r is query r % q_len
    new_mask = torch.cat([torch.ones(rows, n_tail, dtype=torch.bool), causal], dim=-1)
    mask = torch.cat(
        [prefix_valid[:, None, None, :].expand(-1, 1, rows, -1), new_mask[None, None] & tail_valid[:, None, None, :]],
        dim=-1,
    )
    expected = full_softmax(qg, torch.cat([keys, tail_k], 2), torch.cat([values, tail_v], 2), mask, 0.3)

    out, lse = xkv_decode_reference(qg, latent_k, factor_k, latent_v, factor_v, rope, prefix_valid, 0.3, chunk=4)
    merged = merge_with_tail(out, lse, qg, tail_k, tail_v, 0.3, q_len, tail_valid)
    assert (merged - expected).abs().max().item() <= 1e-5
    built = tail_mask(tail_valid, n_tail + q_len, q_len, groups)
    assert torch.equal(built.expand(bsz, 1, rows, -1), mask[..., length:])
    # a row that may see no prefix token: lse -inf, zero output, and the merge is the tail alone
    none = torch.zeros_like(prefix_valid)
    out0, lse0 = xkv_decode_reference(qg, latent_k, factor_k, latent_v, factor_v, rope, none, 0.3)
    assert torch.isinf(lse0).all() and out0.abs().max() == 0
    tail_only = full_softmax(qg, tail_k, tail_v, mask[..., length:], 0.3)
    assert (merge_with_tail(out0, lse0, qg, tail_k, tail_v, 0.3, q_len, tail_valid) - tail_only).abs().max() <= 1e-5


# -- read_mode="fused" end to end ----------------------------------------------------------------
@pytest.mark.parametrize("keys", KEYS)
def test_fused_generate_matches_the_other_read_modes(keys):
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(3)
    outputs, stats = {}, {}
    for mode in ("auto", "fused"):
        cache = compresskv.XKVCache(model, group_size=2, rank_k=6, rank_v=10, keys=keys, read_mode=mode, profile=True)
        outputs[mode] = greedy(model, ids, mask, cache)
        stats[mode] = cache.stats()
    assert torch.equal(outputs["fused"][0], outputs["auto"][0])
    assert (outputs["fused"][1] - outputs["auto"][1]).abs().max().item() <= 1e-4
    fused, auto = stats["fused"].last_read, stats["auto"].last_read
    assert fused["fused_reads"] == 4 and auto["fused_reads"] == 0  # CPU "auto" keeps the old read
    assert fused["rebuilt_bytes"] == 0
    # every layer streams its group's latents (2 layers per group) and its own factors
    kinds = stats["fused"].bytes_by_kind
    assert fused["compressed_bytes"] == auto["compressed_bytes"] == 2 * kinds["shared"] + kinds["per_layer"]
    assert stats["fused"].total_read["compressed_bytes"] == 5 * fused["compressed_bytes"]  # 5 decode forwards


@pytest.mark.parametrize("keys", KEYS)
def test_fused_at_full_rank_equals_dynamic_cache(keys):
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(3)
    ref_seq, ref_logits = greedy(model, ids, mask, dynamic(model))
    cache = compresskv.XKVCache(model, group_size=2, rank_k=64, rank_v=64, keys=keys, read_mode="fused", profile=True)
    seq, logits = greedy(model, ids, mask, cache)
    assert torch.equal(seq, ref_seq)
    assert (logits - ref_logits).abs().max().item() <= 1e-4
    assert cache.stats().last_read["fused_reads"] == 4


@pytest.mark.parametrize("keys", KEYS)
def test_fused_several_new_tokens_at_once(keys):
    """q_len > 1 after compression: causal among the new tokens, padding in the prefix and tail.
    (After one decode step: a multi-token forward right after the prompt's would be chunked
    prefill, which xKV refuses.)"""
    logits = {}
    for mode in ("rebuild", "fused"):
        model, ids, mask, pos, cache = prefilled(keys, read_mode=mode, profile=True)
        new = torch.randint(3, 90, (3, 3), generator=torch.Generator().manual_seed(5))
        out = []
        with torch.no_grad():
            for chunk in (new[:, :1], new, new[:, :2]):  # one decode step, 3 new tokens, then 2 more
                mask = torch.cat([mask, torch.ones_like(chunk)], dim=-1)
                pos = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(chunk.shape[1])], dim=-1)
                step = model(
                    input_ids=chunk, attention_mask=mask, position_ids=pos[:, -chunk.shape[1] :],
                    **kv(cache), use_cache=True,
                )
                out.append(step.logits)
        logits[mode] = torch.cat(out, dim=1)
        assert cache.stats().last_read["fused_reads"] == (4 if mode == "fused" else 0)
    assert (logits["fused"] - logits["rebuild"]).abs().max().item() <= 1e-4


def test_fused_falls_back_where_it_cannot_run():
    """Eager attention returns attention weights, which the fused read never forms: the cache
    reads the old way there (same result); a bad read_mode is refused."""
    model = tiny_model("llama", "eager")
    ids, mask = batch_inputs(3)
    fused = compresskv.XKVCache(model, group_size=2, rank_k=6, rank_v=10, read_mode="fused", profile=True)
    seq, logits = greedy(model, ids, mask, fused)
    ref_seq, ref_logits = greedy(model, ids, mask, compresskv.XKVCache(model, group_size=2, rank_k=6, rank_v=10))
    assert torch.equal(seq, ref_seq) and (logits - ref_logits).abs().max().item() <= 1e-5
    assert fused.stats().total_read["fused_reads"] == 0
    with pytest.raises(ValueError, match="read_mode"):
        compresskv.XKVCache(model, group_size=2, rank_k=6, rank_v=10, read_mode="fast")
    assert compresskv.SVDCache(model, rank_k=4, rank_v=4, read_mode="fused").read_mode == "fused"


# -- triton stays optional -----------------------------------------------------------------------
NO_TRITON = """
import sys
import transformers.generation.utils, transformers.modeling_utils  # transformers >= 5.24 imports triton itself
by_transformers = "triton" in sys.modules
import compresskv, compresskv.kernels
assert by_transformers or "triton" not in sys.modules, "importing compresskv imported triton"
sys.modules["triton"] = None  # from here on `import triton` fails, as on a machine without it
import torch
from compresskv.kernels import triton_available, xkv_decode
assert not triton_available()
q, lk, fk = torch.randn(1, 1, 2, 4), torch.randn(1, 5, 3), torch.randn(1, 3, 4)
lv, fv = torch.randn(1, 5, 2), torch.randn(1, 2, 4)
info = {}
out, lse = xkv_decode(q, lk, fk, lv, fv, info=info)
assert info["backend"] == "reference" and out.shape == (1, 1, 2, 4)
print("ok")
"""


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=environ)


def test_the_package_imports_and_decodes_without_triton():
    proc = run_python(NO_TRITON)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# -- the Triton kernel in Triton's interpreter (CPU) -----------------------------------------------
# TRITON_INTERPRET must be set before triton is imported, hence a fresh interpreter.
INTERPRETED = r"""
import json
import torch
torch.set_num_threads(1)
from compresskv.kernels import PrefixRope, xkv_decode_reference, xkv_decode_triton

def case(name, dtype, rope_kind, mask_kind, dim=16, rank_k=12, rank_v=20, rows=3, length=37, **kw):
    g = torch.Generator().manual_seed(len(name))
    bsz, n_kv = 2, 2
    qg = torch.randn(bsz, n_kv, rows, dim, generator=g)
    lk, lv = torch.randn(bsz, length, rank_k, generator=g) * 0.5, torch.randn(bsz, length, rank_v, generator=g)
    fk, fv = torch.randn(bsz, rank_k, n_kv * dim, generator=g) * 0.5, torch.randn(bsz, rank_v, n_kv * dim, generator=g)
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    rope = None
    if rope_kind == "offsets":
        rope = PrefixRope(inv, offsets=torch.tensor([[3], [-5]]))
    elif rope_kind == "table":
        rope = PrefixRope(inv, table=torch.randint(0, 3000, (bsz, length), generator=g), scaling=1.2)
    mask = None
    if mask_kind == "rows":
        mask = torch.ones(bsz, length, dtype=torch.bool)
        mask[1, :5] = False
        lk[1, :5] = 0
        lv[1, :5] = 0
    elif mask_kind == "heads":
        mask = torch.rand(bsz, n_kv, length, generator=g) > 0.3
    elif mask_kind == "empty_row":
        mask = torch.ones(bsz, length, dtype=torch.bool)
        mask[0] = False
    args = [x.to(dtype) for x in (qg, lk, fk, lv, fv)]
    ref_out, ref_lse = xkv_decode_reference(*args, rope, mask, 0.3)
    info = {}
    out, lse = xkv_decode_triton(*args, rope, mask, 0.3, info=info, **kw)
    seen = torch.isfinite(ref_lse)
    return name, dict(
        out=(out - ref_out).abs().max().item() / ref_out.abs().max().clamp_min(1e-6).item(),
        lse=(lse[seen] - ref_lse[seen]).abs().max().item() if seen.any() else 0.0,
        same_inf=bool(torch.equal(torch.isinf(lse), torch.isinf(ref_lse))),
        empty_zero=bool(out[~seen].abs().max() == 0) if (~seen).any() else True,
        info=info,
    )

results = dict([
    case("pre_offsets_rows", torch.float32, "offsets", "rows", block_t=16, block_rv=16, splits=3),
    case("pre_table_heads", torch.float32, "table", "heads", dim=24, rank_k=70, block_t=16),
    case("post_rows", torch.float32, None, "rows", rows=6, block_t=16, max_rows=4, splits=2),
    case("pre_fp16", torch.float16, "offsets", "rows", block_t=16, splits=2),
    case("pre_empty_row", torch.float32, "offsets", "empty_row", block_t=16, splits=3),
])
print(json.dumps(results))
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install 'compresskv[gpu]')")
def test_triton_kernel_in_the_interpreter_equals_the_reference():
    proc = run_python(INTERPRETED, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, res in results.items():
        tol = 5e-3 if "fp16" in name else 1e-5
        assert res["out"] <= tol and res["lse"] <= tol * 10, (name, res)
        assert res["same_inf"] and res["empty_zero"], (name, res)
        assert res["info"]["backend"] == "triton", (name, res)
    # the cases really exercise the splits, the value blocks and the row chunks
    assert results["pre_offsets_rows"]["info"]["splits"] == 3
    assert results["pre_offsets_rows"]["info"]["config"]["value_blocks"] == 2
    assert results["post_rows"]["info"]["splits"] == 2


# -- on a GPU ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("keys", KEYS)
@pytest.mark.parametrize(
    "size",
    [
        dict(n_kv=3, groups=3, dim=64, length=1500, rank_k=96, rank_v=160),  # SmolLM2-like
        dict(n_kv=8, groups=4, dim=128, length=4096, rank_k=512, rank_v=768),  # the paper's Llama-3.1-8B ranks
    ],
)
def test_triton_equals_the_reference_on_gpu(dtype, keys, size):
    pytest.importorskip("triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    bsz, n_kv, dim, length = 2, size["n_kv"], size["dim"], size["length"]
    rows = size["groups"]
    rank_k, rank_v = size["rank_k"], size["rank_v"]
    dev = dict(device="cuda", dtype=torch.float32)
    qg = torch.randn(bsz, n_kv, rows, dim, generator=g, **dev)
    lk = torch.randn(bsz, length, rank_k, generator=g, **dev) / rank_k**0.25
    fk = torch.randn(bsz, rank_k, n_kv * dim, generator=g, **dev) / rank_k**0.25
    lv = torch.randn(bsz, length, rank_v, generator=g, **dev)
    fv = torch.randn(bsz, rank_v, n_kv * dim, generator=g, **dev) / rank_v**0.5
    mask = torch.ones(bsz, length, dtype=torch.bool, device="cuda")
    mask[1, :100] = False
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, device="cuda").float() / dim)
    rope = PrefixRope(inv, offsets=torch.tensor([[0], [-100]], device="cuda")) if keys == "pre_rope" else None
    args = [x.to(dtype) for x in (qg, lk, fk, lv, fv)]
    ref_out, ref_lse = xkv_decode_reference(*args, rope, mask, dim**-0.5)
    info: dict = {}
    out, lse = xkv_decode(*args, rope, mask, dim**-0.5, info=info)
    assert info["backend"] == "triton"
    tol = 1e-2 if dtype == torch.float16 else 3e-2
    assert (out - ref_out).abs().max().item() <= tol * ref_out.abs().max().item()
    assert (lse - ref_lse).abs().max().item() <= tol * 5


@pytest.mark.gpu
@pytest.mark.parametrize("keys", KEYS)
def test_generate_on_gpu_uses_the_kernel(keys):
    pytest.importorskip("triton")
    model = tiny_model("llama", "sdpa").cuda()
    ids, mask = batch_inputs(3)
    ids, mask = ids.cuda(), mask.cuda()
    outputs = {}
    for mode in ("auto", "rebuild"):
        cache = compresskv.XKVCache(model, group_size=2, rank_k=6, rank_v=10, keys=keys, read_mode=mode, profile=True)
        outputs[mode] = greedy(model, ids, mask, cache)
        if mode == "auto":
            assert cache.stats().last_read["fused_reads"] == 4
    assert torch.equal(outputs["auto"][0], outputs["rebuild"][0])
    assert (outputs["auto"][1] - outputs["rebuild"][1]).abs().max().item() <= 1e-3
