"""Compress a context once, ask many questions (#17, part 1): compresskv.prefill closes the prompt,
compresskv.ask answers from a deep copy; copies answer independently, the cache is not changed, and
a question's tokens are appended uncompressed."""

from __future__ import annotations

import pytest
import torch

import compresskv
from compresskv.core.cache import KVLayer
from conftest import VOCAB, batch_inputs, dynamic, kv, tiny_model

METHODS = {
    "snapkv": dict(compression_ratio=0.5),
    "pyramidkv": dict(compression_ratio=0.5),
    "streamingllm": dict(compression_ratio=0.5),
    "knorm": dict(compression_ratio=0.5),
    "xkv": dict(compression_ratio=0.5),
    "svd": dict(compression_ratio=0.5),
}
GREEDY = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=0)


def _questions(batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, VOCAB, (batch, n), generator=g) for n in (6, 9)]


def _snapshot(cache):
    return cache.nbytes(), int(cache.get_seq_length()), [t.clone() for layer in cache.layers
                                                         if isinstance(layer, KVLayer) for t in layer.tensors()]


@pytest.mark.parametrize("method", list(METHODS))
def test_copies_answer_independently_and_leave_the_cache_as_it_was(method):
    model = tiny_model("llama", "sdpa", layers=4)
    ctx, mask = batch_inputs(2, length=48)  # left padding
    make = lambda: compresskv.make_cache(model, method, **METHODS[method])  # noqa: E731
    cache = compresskv.prefill(model, ctx, make(), attention_mask=mask)
    before = _snapshot(cache)
    first, second = (compresskv.ask(model, cache, ctx, q, attention_mask=mask, **GREEDY) for q in _questions(2))
    after = _snapshot(cache)
    assert before[:2] == after[:2] and all(torch.equal(a, b) for a, b in zip(before[2], after[2]))
    # the second question from a cache nothing else was asked of: the same answer
    alone = compresskv.ask(model, compresskv.prefill(model, ctx, make(), attention_mask=mask), ctx, _questions(2)[1],
                           attention_mask=mask, **GREEDY)
    assert torch.equal(second.sequences, alone.sequences)
    torch.testing.assert_close(torch.stack(second.logits), torch.stack(alone.logits), rtol=1e-5, atol=1e-5)
    assert first.sequences.shape[-1] == 48 + 6 + 5


def test_without_compression_an_answer_is_the_full_caches():
    model = tiny_model("llama", "sdpa", layers=3)
    ctx, mask = batch_inputs(2, length=40)
    for q in _questions(2):
        full_mask = torch.cat([mask, torch.ones_like(q)], -1)
        expected = model.generate(input_ids=torch.cat([ctx, q], -1), attention_mask=full_mask, **kv(dynamic(model)),
                                  **GREEDY)
        cache = compresskv.prefill(model, ctx, compresskv.SnapKVCache(model, budget=64), attention_mask=mask)
        got = compresskv.ask(model, cache, ctx, q, attention_mask=mask, **GREEDY)
        assert torch.equal(got.sequences, expected.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decode_tokens", [None, 32])
def test_the_questions_tokens_are_appended_uncompressed(decode_tokens):
    model = tiny_model("llama", "sdpa", layers=2)
    ctx, _ = batch_inputs(1, length=48)
    cache = compresskv.prefill(model, ctx, compresskv.SnapKVCache(model, budget=16, window_size=8,
                                                                   decode_tokens=decode_tokens))
    question = _questions(1)[1]  # 9 tokens
    copy_ = __import__("copy").deepcopy(cache)
    with torch.no_grad():
        model(input_ids=question, position_ids=torch.arange(48, 57)[None], use_cache=True, **kv(copy_))
    assert [layer.stored() for layer in copy_.layers] == [16 + 9] * 2
    assert copy_.get_seq_length() == 57 and cache.get_seq_length() == 48
    if decode_tokens is not None:  # written into the static buffers, then answered the room way's
        room = compresskv.prefill(model, ctx, compresskv.SnapKVCache(model, budget=16, window_size=8))
        a = compresskv.ask(model, room, ctx, question, **GREEDY)
        b = compresskv.ask(model, cache, ctx, question, **GREEDY)
        assert torch.equal(a.sequences, b.sequences)


def test_prefill_closes_the_prompt_a_plain_forward_leaves_open():
    """xKV compresses the prompt once: a second multi-token forward is refused as chunked prefill
    unless the prompt was closed (what compresskv.prefill does), and then it is a question."""
    model = tiny_model("llama", "sdpa", layers=4)
    ctx, _ = batch_inputs(1, length=48)
    question = _questions(1)[0]
    position = torch.arange(48, 54)[None]
    plain = compresskv.XKVCache(model, compression_ratio=0.5)
    with torch.no_grad():
        model(input_ids=ctx, use_cache=True, **kv(plain))
        with pytest.raises(ValueError, match="chunked prefill"):
            model(input_ids=question, position_ids=position, use_cache=True, **kv(plain))
        closed = compresskv.prefill(model, ctx, compresskv.XKVCache(model, compression_ratio=0.5))
        model(input_ids=question, position_ids=position, use_cache=True, **kv(closed))
    assert closed.get_seq_length() == 54


def test_bad_inputs_are_refused_by_name():
    model = tiny_model("llama", "sdpa", layers=2)
    ctx, _ = batch_inputs(2, length=32)
    cache = compresskv.prefill(model, ctx, compresskv.SnapKVCache(model, compression_ratio=0.5))
    with pytest.raises(ValueError, match="context_ids"):
        compresskv.ask(model, cache, ctx[:, :20], _questions(2)[0])
    with pytest.raises(ValueError, match="question_ids"):
        compresskv.ask(model, cache, ctx, _questions(1)[0])
    with pytest.raises(ValueError, match="fresh cache"):
        compresskv.prefill(model, ctx, cache)
    with pytest.raises(ValueError, match="input_ids"):
        compresskv.prefill(model, ctx[0], compresskv.SnapKVCache(model, compression_ratio=0.5))


def test_a_projected_cache_answers_from_copies_too():
    model = tiny_model("llama", "sdpa", layers=2)
    p = compresskv.calibrate(model, torch.randint(3, VOCAB, (4, 48), generator=torch.Generator().manual_seed(2)),
                             seq_len=48, progress=False)
    ctx, mask = batch_inputs(2, length=40)
    cache = compresskv.prefill(model, ctx, compresskv.PCAKVCache(model, p, rank=6), attention_mask=mask)
    before = _snapshot(cache)
    answers = [compresskv.ask(model, cache, ctx, q, attention_mask=mask, **GREEDY).sequences for q in _questions(2)]
    assert all(torch.equal(a, b) for a, b in zip(before[2], _snapshot(cache)[2]))
    fresh = compresskv.prefill(model, ctx, compresskv.PCAKVCache(model, p, rank=6), attention_mask=mask)
    assert torch.equal(compresskv.ask(model, fresh, ctx, _questions(2)[1], attention_mask=mask, **GREEDY).sequences,
                       answers[1])
