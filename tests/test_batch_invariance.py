"""Batching does not change a row's result: with compression on, every row of a left-padded batch
gets the tokens and logits it gets when generated alone.

This holds because each method compresses a row as if it were alone: eviction budgets (and
PyramidKV's schedule) and xKV/SVD ranks from a ratio follow the row's own number of real tokens,
ties in eviction scores go to the earlier token, and MiniCache's spare retention slots read as
merged. Storage is shaped by the longest row, as padding already is.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import compresskv
from compresskv import elitekv
from conftest import VOCAB, batch_inputs, greedy, tiny_model

LENGTH = 64  # rows have 64, 57 and 50 real tokens
NEW_TOKENS = 6


def _projections(model: torch.nn.Module) -> compresskv.Projections:
    ids = torch.randint(3, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(2))
    return compresskv.calibrate(model, ids, seq_len=LENGTH, progress=False)


# variant -> (registered method, options from the model); every setting compresses.
SETTINGS: dict[str, tuple[str, Callable[[torch.nn.Module], dict[str, Any]]]] = {
    "snapkv-budget": ("snapkv", lambda m: dict(budget=24, window_size=8)),
    # 50 real tokens: the shortest row keeps everything while the others evict.
    "snapkv-budget-mixed": ("snapkv", lambda m: dict(budget=52, window_size=8)),
    "snapkv-ratio": ("snapkv", lambda m: dict(compression_ratio=0.5, window_size=8)),
    "snapkv-avgpool": ("snapkv", lambda m: dict(compression_ratio=0.6, window_size=4, pooling="avgpool")),
    "pyramidkv-budget": ("pyramidkv", lambda m: dict(budget=24, window_size=4)),
    "pyramidkv-ratio": ("pyramidkv", lambda m: dict(compression_ratio=0.75, window_size=4)),
    "streamingllm-window": ("streamingllm", lambda m: dict(sink=4, window=16)),
    "streamingllm-ratio": ("streamingllm", lambda m: dict(compression_ratio=0.5)),
    "knorm-ratio": ("knorm", lambda m: dict(compression_ratio=0.5)),
    "knorm-budget-window": ("knorm", lambda m: dict(budget=20, window_size=4)),
    "expected-attention-ratio": ("expected_attention", lambda m: dict(compression_ratio=0.5)),
    "expected-attention-budget-window": ("expected_attention", lambda m: dict(budget=20, window_size=4)),
    "matryoshka": ("matryoshka", lambda m: dict(projections=_projections(m), compression_ratio=0.5)),
    "pca": ("pca", lambda m: dict(projections=_projections(m), compression_ratio=0.5)),
    "xkv-ratio": ("xkv", lambda m: dict(compression_ratio=0.5)),
    "xkv-ranks": ("xkv", lambda m: dict(rank_k=16, rank_v=24)),
    "xkv-post_rope": ("xkv", lambda m: dict(compression_ratio=0.5, keys="post_rope")),
    "xkv-gram": ("xkv", lambda m: dict(compression_ratio=0.75, svd_solver="gram")),
    "svd-ratio": ("svd", lambda m: dict(compression_ratio=0.5)),
    "minicache": ("minicache", lambda m: dict(start_layer=0)),
    "elitekv": ("elitekv", lambda m: {}),
    "int2": ("int2", lambda m: dict(residual=8, group_size=8)),
    "int4": ("int4", lambda m: dict(residual=8, group_size=8)),
    "int8": ("int8", lambda m: dict(residual=8, group_size=8)),
    "snapkv-int4": ("snapkv+int4", lambda m: dict(compression_ratio=0.75, residual=8, group_size=8, window_size=8)),
}
#: Quantizing caches group a row's tokens by slot (KIVI's groups of ``group_size`` tokens), so a
#: left-padded row is grouped differently batched and alone: its logits then agree to the
#: quantization noise (relative to the largest logit), not exactly. The first token, from prefill
#: attention on the full keys, is exact.
QUANTIZED_NOISE = {"int2": 0.3, "int4": 0.1, "int8": 0.01, "snapkv+int4": 0.1}


def test_every_registered_method_is_covered():
    covered = {method for method, _ in SETTINGS.values()}
    assert set(compresskv.available_methods()) <= covered


def _model_and_cache(variant: str, attn: str) -> tuple[torch.nn.Module, Callable[[], Any]]:
    method, options = SETTINGS[variant]
    model = tiny_model("llama", attn, kv_heads=2)
    if method == "elitekv":
        elitekv.convert(model, cache_ratio=0.5, selection="uniform", progress=False)
        return model, lambda: compresskv.make_cache(model, "elitekv")
    opts = options(model)
    return model, lambda: compresskv.make_cache(model, method, **opts)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", sorted(SETTINGS))
def test_a_row_generates_the_same_batched_or_alone(variant, attn):
    model, make_cache = _model_and_cache(variant, attn)
    ids, mask = batch_inputs(3, length=LENGTH)
    batch_cache = make_cache()
    sequences, logits = greedy(model, ids, mask, batch_cache, new_tokens=NEW_TOKENS)
    assert batch_cache.stats().token_ratio < 0.9, f"{variant}: nothing was compressed"
    for row in range(3):
        alone = ids[row][mask[row] == 1][None]
        alone_seq, alone_logits = greedy(model, alone, torch.ones_like(alone), make_cache(), new_tokens=NEW_TOKENS)
        if SETTINGS[variant][0] in QUANTIZED_NOISE:
            same = int((alone_seq[0, alone.shape[1]:] == sequences[row, LENGTH:]).cumprod(0).sum())
            assert same >= 1 and (alone_logits[0, 0] - logits[row, 0]).abs().max() <= 1e-4, f"row {row}"
            err = (alone_logits[0, :same] - logits[row, :same]).abs().max() / logits[row].abs().max()
            assert err <= QUANTIZED_NOISE[SETTINGS[variant][0]], f"row {row}: relative logit error {err:.3g}"
            continue
        assert torch.equal(alone_seq[0, alone.shape[1]:], sequences[row, LENGTH:]), f"row {row}"
        err = (alone_logits[0] - logits[row]).abs().max().item()
        assert err <= 1e-4, f"row {row}: logits differ by {err:.3g} between batched and alone"


def test_eviction_ties_go_to_the_earlier_token():
    """Max pooling makes plateaus of equal scores; which of them are kept must depend neither on
    the device's top-k nor on the padding before the row."""
    model = tiny_model("llama", "sdpa", kv_heads=2)
    cache = compresskv.SnapKVCache(model, budget=7, window_size=4)  # 3 scored tokens + the window
    layer = cache.layers[0]
    keys = torch.randn(1, 2, 12, 16)
    layer.keys, layer.values, layer.is_initialized = keys, keys.clone(), True
    prefix_scores = torch.tensor([1.0, 3.0, 3.0, 3.0, 2.0, 3.0, 0.5, 0.5])  # four tokens tie at 3.0
    cache.scores = lambda *args, **kwargs: prefix_scores.expand(1, 2, 8)  # type: ignore[method-assign]

    class Call:  # what compress() reads of an attention call
        pad2d = None
        query = torch.zeros(1, 4, 12, 16)
        scaling = 0.25

    layer.compress(Call())  # type: ignore[arg-type]
    for head in range(2):
        kept = [int((keys[0, head] == row).all(-1).nonzero()) for row in layer.keys[0, head]]
        assert kept == [1, 2, 3, 8, 9, 10, 11]
    assert layer.valid is None
