"""compresskv.eval.score_continuation: lm-eval's (logprob, is_greedy) of a continuation, the context
prefilled into a (compressed) cache and the continuation fed as decode steps."""

from __future__ import annotations

import pytest
import torch

import compresskv
from compresskv.eval import score_continuation, score_continuations
from conftest import VOCAB, tiny_model

CONTEXT = 64


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "sdpa")


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Scored in one forward of context + continuation, without a cache."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + continuation]), use_cache=False).logits[0].float()
    scores = logits[len(context) - 1 : -1]
    target = torch.tensor(continuation)
    logprob = scores.log_softmax(-1).gather(-1, target[:, None]).sum()
    return float(logprob), bool((scores.argmax(-1) == target).all())


def greedy_continuation(model, context: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([context]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(context):].tolist()


CALIBRATION = torch.randint(3, VOCAB, (4, 48), generator=torch.Generator().manual_seed(2))
UNCOMPRESSED = {
    "dynamic": lambda m: None,
    "snapkv": lambda m: compresskv.make_cache(m, "snapkv", compression_ratio=0.0),
    "pyramidkv": lambda m: compresskv.make_cache(m, "pyramidkv", compression_ratio=0.0),
    "streamingllm": lambda m: compresskv.make_cache(m, "streamingllm", compression_ratio=0.0),
    "pca": lambda m: compresskv.PCAKVCache(m, texts=CALIBRATION, seq_len=48, compression_ratio=0.0),
}


@pytest.mark.parametrize("name", sorted(UNCOMPRESSED))
def test_without_compression_it_equals_one_forward_without_a_cache(model, name):
    context = ids(CONTEXT, seed=1)
    greedy = greedy_continuation(model, context, 5)
    other = greedy[:2] + [(greedy[2] + 1 - 3) % (VOCAB - 3) + 3] + greedy[3:]  # one token not the argmax
    for continuation, expect_greedy in ((greedy, True), (other, False), (ids(6, seed=9), False)):
        ref = reference(model, context, continuation)
        assert ref[1] is expect_greedy
        got = score_continuation(model, context, continuation, UNCOMPRESSED[name](model))
        assert got[1] is ref[1]
        assert got[0] == pytest.approx(ref[0], abs=1e-4)


@pytest.mark.parametrize("method", ["snapkv", "streamingllm"])
def test_a_high_compression_ratio_changes_the_score(model, method):
    context, continuation = ids(CONTEXT, seed=1), ids(6, seed=4)
    full, _ = reference(model, context, continuation)
    cache = compresskv.make_cache(model, method, compression_ratio=0.9)
    logprob, _ = score_continuation(model, context, continuation, cache)
    assert abs(logprob - full) > 1e-3
    stats = cache.stats()
    assert stats.tokens_seen == CONTEXT + len(continuation) - 1  # the last token predicts nothing
    # The context was compressed once (to a tenth) and the fed continuation tokens appended.
    assert all(s == round(CONTEXT * 0.1) + len(continuation) - 1 for s in stats.tokens_stored)


@pytest.mark.parametrize("method,options", [("snapkv", dict(compression_ratio=0.75)),
                                            ("xkv", dict(compression_ratio=0.5, group_size=2))])
def test_chunks_after_the_first_token_are_appended_as_decode_steps(model, method, options):
    context, continuation = ids(CONTEXT, seed=1), ids(9, seed=5)
    one = compresskv.make_cache(model, method, **options)
    chunked = compresskv.make_cache(model, method, **options)
    a = score_continuation(model, context, continuation, one)
    b = score_continuation(model, context, continuation, chunked, chunk_size=4)
    assert b[1] is a[1] and b[0] == pytest.approx(a[0], abs=1e-4)
    assert chunked.stats().tokens_stored == one.stats().tokens_stored  # no second eviction


def test_many_requests_each_against_a_fresh_cache(model):
    context = ids(CONTEXT, seed=1)
    pairs = [(context, ids(3, seed=6)), (torch.tensor(ids(40, seed=2)), ids(5, seed=7)), (context, ids(1, seed=8))]
    by_name = score_continuations(model, pairs, "snapkv", compression_ratio=0.5)
    made = []
    by_factory = score_continuations(model, pairs, lambda: made.append(compresskv.SnapKVCache(model, compression_ratio=0.5))
                                or made[-1])
    one_by_one = [score_continuation(model, c, x, compresskv.SnapKVCache(model, compression_ratio=0.5)) for c, x in pairs]
    assert by_name == by_factory == one_by_one and len(made) == len(pairs)
    full = score_continuations(model, pairs)
    assert [f[0] for f in full] == pytest.approx([reference(model, list(map(int, c)), x)[0] for c, x in pairs], abs=1e-4)
    with pytest.raises(TypeError, match="method name"):
        score_continuations(model, pairs, lambda: None, compression_ratio=0.5)


def test_bad_requests_are_refused(model):
    context = ids(CONTEXT, seed=1)
    with pytest.raises(ValueError, match="context is empty"):
        score_continuation(model, [], [5, 6])
    cache = compresskv.make_cache(model, "snapkv", compression_ratio=0.5)
    score_continuation(model, context, [5, 6], cache)
    with pytest.raises(ValueError, match="fresh cache"):
        score_continuation(model, context, [5, 6], cache)
    with pytest.raises(ValueError, match="one sequence"):
        score_continuation(model, torch.tensor([context, context]), [5])
    assert score_continuation(model, context, []) == (0.0, True)
