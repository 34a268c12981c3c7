"""compresskv.core.ops (small products and softmax that keep the CPU thread pool asleep) and the
exact softmax merge of compresskv.core.lse built on them."""

from __future__ import annotations

import pytest
import torch

from compresskv.core import ops
from compresskv.core.lse import merge_softmax


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("a_shape, b_shape", [
    ((1, 3, 3, 64), (3, 64, 32)),  # the grouped query through per-head projections
    ((2, 3, 1, 64), (1, 3, 64, 1)),  # broadcast batch dims both ways
    ((4, 1, 5, 8), (2, 8, 7)),
    ((2, 3, 9, 64), (2, 3, 64, 300)),  # over the grain size: torch.matmul
])
def test_small_matmul_equals_matmul(threads, a_shape, b_shape):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(*a_shape, generator=g), torch.randn(*b_shape, generator=g)
    got = ops.small_matmul(a, b)
    assert got.shape == torch.matmul(a, b).shape
    torch.testing.assert_close(got, torch.matmul(a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bsz", [1, 3])
def test_heads_matmul_equals_a_chain_of_matmuls(threads, bsz):
    """Per-head matrices ``[heads, k, n]`` and per-row ones ``[batch, heads, k, n]``, chained, with
    non-contiguous operands (a room's first tokens, transposed) as the projected caches pass them."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(bsz, 3, 3, 64, generator=g)
    proj = torch.randn(3, 64, 32, generator=g)
    latents = torch.randn(bsz, 3, 40, 32, generator=g)[:, :, :25]  # a view of a larger room
    got = ops.heads_matmul(q, proj, latents.mT)
    want = torch.matmul(torch.matmul(q, proj), latents.mT)
    assert got.shape == want.shape == (bsz, 3, 3, 25)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # values ~100: fp32 summation order
    torch.testing.assert_close(ops.heads_matmul(q, proj), torch.matmul(q, proj), rtol=1e-5, atol=1e-5)


def test_heads_matmul_is_one_bmm_per_product_with_one_thread(monkeypatch):
    bmm, matmul = [], []
    real_bmm, real_matmul = torch.bmm, torch.matmul
    monkeypatch.setattr(torch, "bmm", lambda *a: bmm.append(1) or real_bmm(*a))
    monkeypatch.setattr(torch, "matmul", lambda *a: matmul.append(1) or real_matmul(*a))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ops.heads_matmul(torch.ones(2, 3, 3, 64), torch.ones(3, 64, 32), torch.ones(2, 3, 32, 10))
        assert (len(bmm), len(matmul)) == (2, 0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_add_product_and_product_for_equal_their_plain_forms(monkeypatch, threads):
    """``add_product(c, a, b) == c + a @ b`` (``c`` broadcast over the rows) and ``product_for``'s
    product equals ``torch.bmm``: one ``baddbmm``/``bmm`` with one thread, written out with a
    thread pool to keep asleep (no ``baddbmm``)."""
    g = torch.Generator().manual_seed(1)
    a, b, c = torch.randn(6, 3, 25, generator=g), torch.randn(6, 25, 64, generator=g), torch.randn(6, 1, 64, generator=g)
    fused = []
    real = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *x, **k: fused.append(1) or real(*x, **k))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        torch.testing.assert_close(ops.add_product(c, a, b, ops.product_for(a)), c + torch.bmm(a, b), rtol=1e-5, atol=1e-5)
        assert (ops.product_for(a) is torch.bmm) == (threads == 1)
        torch.testing.assert_close(ops.product_for(a)(a, b), torch.bmm(a, b), rtol=1e-5, atol=1e-5)
        assert len(fused) == (threads == 1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_scaled_product_equals_the_scaled_product_with_no_kernel_for_the_scale(threads):
    """``scaled_product(a, b, s) == s · (a @ b)``; with one thread one ``baddbmm`` (beta 0: its
    input, never read, may hold anything) and no multiply; with a pool to keep asleep the
    written-out product, then the multiply."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(6, 3, 64, generator=g), torch.randn(6, 25, 64, generator=g)[:, :20].mT  # a room's view, transposed
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        ops._UNREAD.clear()
        ops._UNREAD[(a.dtype, a.device)] = torch.tensor(float("nan"))  # not read: no NaN may come out
        with Ops() as seen:
            got = ops.scaled_product(a, b, 0.125, ops.product_for(a))
        torch.testing.assert_close(got, 0.125 * torch.bmm(a, b), rtol=1e-5, atol=1e-5)
        if threads == 1:
            assert seen.names == ["baddbmm"]
        else:
            assert "baddbmm" not in seen.names and seen.names[-1] == "mul"
    finally:
        torch.set_num_threads(before)
        ops._UNREAD.clear()


def test_small_matmul_is_written_out_only_when_small_and_threaded(monkeypatch):
    calls = []
    real = torch.matmul
    monkeypatch.setattr(torch, "matmul", lambda *a: calls.append(1) or real(*a))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ops.small_matmul(torch.ones(1, 3, 3, 64), torch.ones(3, 64, 32))  # 18432 products
        assert calls == []
        ops.small_matmul(torch.ones(1, 3, 3, 64), torch.ones(3, 64, 64))  # 36864: over the grain
        assert calls == [1]
        torch.set_num_threads(1)  # no pool to keep asleep: ATen's kernel
        ops.small_matmul(torch.ones(1, 3, 3, 64), torch.ones(3, 64, 32))
        assert calls == [1, 1]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(1, 3, 3, 2), (2, 4, 3, 1031), (1, 2, 2, 20000)])
def test_small_softmax_equals_softmax(threads, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 8
    x[..., 0] = torch.finfo(x.dtype).min  # masked entries, as the caches mask them
    torch.testing.assert_close(ops.small_softmax(x.clone()), x.softmax(-1), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("tail", [1, 3])  # one new token (a decode step: a sigmoid) or several (a softmax)
def test_merge_softmax_equals_one_softmax_over_both_parts(threads, tail):
    g = torch.Generator().manual_seed(2)
    prefix_logits, tail_logits = torch.randn(2, 3, 4, 50, generator=g), torch.randn(2, 3, 4, tail, generator=g)
    prefix_v, tail_v = torch.randn(2, 3, 50, 8, generator=g), torch.randn(2, 3, tail, 8, generator=g)
    tail_logits[0, 0, 0, -1] = float("-inf")  # a masked new token
    tail_logits[0, 1, 0, -1] = torch.finfo(torch.float32).min
    both = torch.cat([prefix_logits, tail_logits], -1).softmax(-1)
    expected = both @ torch.cat([prefix_v, tail_v], -2)
    prefix_out = prefix_logits.softmax(-1) @ prefix_v
    got = merge_softmax(prefix_out, prefix_logits.logsumexp(-1), tail_logits, tail_v)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", [1, 2])
def test_merge_softmax_keeps_a_row_with_every_key_masked_finite(tail):
    lse = torch.tensor([[float("-inf")]])
    logits = torch.full((1, 1, tail), float("-inf"))
    out = merge_softmax(torch.zeros(1, 1, 4), lse, logits, torch.ones(1, tail, 4))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("layout", ["contiguous", "room-view", "transposed", "one-row"])
def test_take_tokens_is_gather(layout):
    g = torch.Generator().manual_seed(0)
    if layout == "room-view":  # the first 20 of 32 slots of a room, as a bounded layer holds them
        t = torch.randn(2, 3, 32, 8, generator=g)[:, :, :20]
    elif layout == "transposed":  # heads and tokens swapped: not token rows, gather's path
        t = torch.randn(2, 20, 3, 8, generator=g).transpose(1, 2)
    elif layout == "one-row":
        t = torch.randn(1, 3, 32, 8, generator=g)[:, :, :20]
    else:
        t = torch.randn(2, 3, 20, 8, generator=g)
    index = torch.sort(torch.rand(t.shape[0], 3, 20, generator=g).argsort(-1)[..., :12], dim=-1).values
    want = t.gather(2, index[..., None].expand(-1, -1, -1, 8))
    assert torch.equal(ops.take_tokens(t, index), want)


# -- one thread for a small decode-step read ----------------------------------------------------------
def test_serial_when_small_runs_on_one_thread_and_puts_the_count_back(monkeypatch):
    seen = []

    def record(x):
        seen.append(torch.get_num_threads())
        return x

    torch.set_num_threads(2)
    small, large = ops.SERIAL_READ_BYTES, ops.SERIAL_READ_BYTES + 1
    cpu = torch.device("cpu")
    assert ops.serial_when_small(1, small, cpu, record, 5) == 5
    ops.serial_when_small(1, large, cpu, record, 5)
    ops.serial_when_small(4, small, cpu, record, 5)  # a prompt or chunk: its query blocks use the threads
    ops.serial_when_small(1, small, torch.device("meta"), record, 5)  # not a CPU: the caller's count
    assert seen == [1, 2, 2, 2] and torch.get_num_threads() == 2

    def fail():
        raise RuntimeError("kernel refused")

    with pytest.raises(RuntimeError, match="refused"):
        ops.serial_when_small(1, small, cpu, fail)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("method", ["snapkv", "matryoshka"])
def test_decode_steps_read_on_one_thread_with_the_same_tokens(monkeypatch, method):
    """With two threads, every decode step's attention (SnapKV: the model's sdpa over the kept keys;
    Matryoshka: the explicit latent read) runs on one thread, the prompt's on both; tokens and logits
    are those of the same run with the rule off (Matryoshka's decode steps then take the fused read,
    on both threads; logits to rounding: kernels may block differently by thread count)."""
    from conftest import batch_inputs, greedy, tiny_model

    import compresskv
    from compresskv.projected import cache as projected_cache

    torch.set_num_threads(2)
    model = tiny_model("llama", "sdpa")
    ids, mask = batch_inputs(2)
    reads: list[tuple[int, int]] = []  # (query rows, threads) of each attention read
    if method == "matryoshka":
        calib = torch.randint(3, 96, (4, 48), generator=torch.Generator().manual_seed(2))
        p = compresskv.calibrate(model, calib, seq_len=48, progress=False)
        make = lambda: compresskv.MatryoshkaKVCache(model, p, rank=6)  # noqa: E731
        module, name = projected_cache, "attention_with_lse"  # decode steps only: the prompt has nothing stored
    else:
        make = lambda: compresskv.SnapKVCache(model, compression_ratio=0.5)  # noqa: E731
        module, name = torch.nn.functional, "scaled_dot_product_attention"
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda query, *a, **k: reads.append((query.shape[-2], torch.get_num_threads()))
                        or real(query, *a, **k))
    if method == "matryoshka":  # decode steps read explicitly (small reads), or fused with the rule off
        explicit = projected_cache.ProjectedLayer.projected_attention
        monkeypatch.setattr(projected_cache.ProjectedLayer, "projected_attention", lambda layer, call: reads.append(
            (call.query.shape[-2], torch.get_num_threads())) or explicit(layer, call))
    stores: list[tuple[int, int]] = []  # (tokens, threads) of each projected store: a step's in its read's region
    store = projected_cache.ProjectedLayer._store
    monkeypatch.setattr(projected_cache.ProjectedLayer, "_store", lambda layer, k, v: stores.append(
        (k.shape[-2], torch.get_num_threads())) or store(layer, k, v))
    seq, logits = greedy(model, ids, mask, make())
    # a decode step's rows: 1 token, or its 2 query heads per KV head where they are grouped; the
    # prompt's: its 48 tokens
    assert {t for rows, t in reads if rows <= 2} == {1}
    assert {t for rows, t in reads if rows > 2} <= {2}
    if method == "matryoshka":
        assert {t for n, t in stores if n == 1} == {1} and {t for n, t in stores if n > 1} == {2}
    monkeypatch.setattr(ops, "SERIAL_READ_BYTES", -1)
    reads.clear()
    stores.clear()
    ref_seq, ref_logits = greedy(model, ids, mask, make())
    assert reads and {t for _, t in reads} == {2}
    if method == "matryoshka":
        assert stores and {t for _, t in stores} == {2}
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
