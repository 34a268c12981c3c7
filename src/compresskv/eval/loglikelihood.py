"""Scoring continuations against a compressed cache of the context: lm-evaluation-harness's
``loglikelihood`` requests, which ``compresskv.patch`` does not reach (they never call ``generate``).

A request is a ``(context, continuation)`` pair; the answer is ``(log P(continuation | context),
is_greedy)``, the sum of the continuation tokens' log-probabilities and whether each of them is
the model's greedy (argmax) token at its position (lm-eval's ``LM.loglikelihood`` contract; the
harness model tokenizes, and gives its prefix token as the context of an empty context string).

**How the cache is fed.** The context is the prompt: one forward of all its tokens into the cache,
after which a compressed cache compresses (evicts, projects) as it does a prompt in ``generate``.
The continuation is then appended as decoded tokens are, never compressed as more prompt. In
compresskv the prompt is every multi-token forward before the first single-token one (a further
multi-token forward would be another prompt chunk: eviction evicts again, xKV, SVD and MiniCache
refuse it), so by default the continuation goes in one token per forward, exactly the decode steps
``generate`` would run had it produced these tokens: the last context position's logits score the
first continuation token, each fed token's logits score the next, and the last continuation token
is never fed (it predicts nothing scored). The supported shortcut is ``chunk_size=n``: the first
token alone (a decode step, which closes the prompt), then ``n`` tokens per forward, which after a
decode step is a new turn, appended (docs/contracts.md; :mod:`compresskv.eval.perplexity` feeds
its continuation so). It gives the same result for an uncompressed cache and for the methods that
store decoded tokens as they come (eviction, xKV, SVD, MiniCache), but not for those that compress
every token as it is stored (PCA, MatryoshkaKV): within one forward the tokens attend to each
other's keys and values as computed, not as the cache then holds them (a projection's
reconstruction). One token per forward is what a generation would see, and continuations are
short (a few to tens of tokens), so it is the default.

With a ``DynamicCache``, or any method at ``compression_ratio=0``, the result equals scoring
``context + continuation`` in one forward without a cache (within float tolerance).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .. import compat
from ..core import attention as _attention

TokenIds = Sequence[int] | torch.Tensor


def _ids(tokens: TokenIds, what: str, device: torch.device) -> torch.Tensor:
    """``[1, n]`` long ids on ``device`` from a list of ints or a 1-D / ``[1, n]`` tensor."""
    ids = torch.as_tensor(tokens, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"compresskv: {what} must be one sequence of token ids, got shape {tuple(ids.shape)}")
    return ids.to(device)[None]


def _forward(model: torch.nn.Module, ids: torch.Tensor, cache: Any, last_only: bool = False) -> torch.Tensor:
    """Float logits of ``ids`` fed on top of ``cache`` (``last_only``: of the last position only)."""
    kwargs: dict[str, Any] = {}
    if last_only and "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # a long context's full-vocabulary logits are never needed
    try:
        out = model(input_ids=ids, use_cache=True, **compat.cache_kwargs(cache, model.forward), **kwargs)
    except BaseException:
        _attention.clear_pending()  # a layer left pending would fail the next forward (contracts)
        raise
    logits = out.logits[0].float()
    return logits[-1:] if last_only else logits


def continuation_logits(
    model: torch.nn.Module, cache: Any, feed: torch.Tensor, chunk_size: int = 1
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Feed ``feed`` (``[1, n]``) on top of what ``cache`` holds: its first token alone (a decode
    step, which closes the prompt), then ``chunk_size`` tokens per forward (appended as a new turn,
    never compressed as more prompt). Yields ``(start, end, float logits [end - start, vocab])``."""
    n = feed.shape[-1]
    bounds = [0, *range(1, n, chunk_size), n] if n else []
    for start, end in zip(bounds, bounds[1:]):
        yield start, end, _forward(model, feed[:, start:end], cache)


@torch.no_grad()
def score_continuation(
    model: torch.nn.Module,
    context_ids: TokenIds,
    continuation_ids: TokenIds,
    cache: Any = None,
    chunk_size: int = 1,
) -> tuple[float, bool]:
    """Log-likelihood of ``continuation_ids`` given ``context_ids`` held in ``cache``, and whether
    every continuation token is the greedy one (lm-eval's ``(logprob, isgreedy)``).

    The context is prefilled into ``cache`` in one forward (compressed there, as a prompt), then
    the continuation is fed as decode steps (see the module's docstring). ``cache`` must be fresh:
    it holds the context and the continuation afterwards, so ``cache.stats()`` measures it.

    Args:
        model: a transformers causal LM.
        context_ids: the context's token ids (at least one: lm-eval gives its prefix token, BOS or
            EOS, for an empty context).
        continuation_ids: the scored tokens (an empty one scores ``(0.0, True)``).
        cache: a fresh cache, e.g. ``compresskv.make_cache(model, "snapkv", compression_ratio=0.5)``;
            ``None``: a ``DynamicCache`` (no compression).
        chunk_size: continuation tokens per forward after the first one, fed alone. ``1`` runs
            exactly the decode steps of a generation; more is faster and the same for eviction
            and cross-layer methods, not for projected ones (the module's docstring says why).

    Returns:
        ``(sum of the continuation tokens' log-probabilities (nats), is_greedy)``.

    Example:
        ```python
        cache = compresskv.make_cache(model, "snapkv", compression_ratio=0.5)
        ctx = tokenizer("The capital of France is").input_ids
        cont = tokenizer("The capital of France is Paris").input_ids[len(ctx):]
        logprob, is_greedy = compresskv.eval.score_continuation(model, ctx, cont, cache)
        ```
    """
    from transformers import DynamicCache

    if chunk_size < 1:
        raise ValueError(f"compresskv: chunk_size must be at least 1, got {chunk_size}")
    device = next(model.parameters()).device
    context, cont = _ids(context_ids, "context_ids", device), _ids(continuation_ids, "continuation_ids", device)
    if context.shape[-1] == 0:
        raise ValueError(
            "compresskv: the context is empty; give at least one token (lm-eval scores an empty context "
            "from the model's prefix token, BOS or EOS)."
        )
    cache = DynamicCache(config=model.config) if cache is None else cache
    if cache.get_seq_length() > 0:
        raise ValueError(
            f"compresskv: the cache already holds {cache.get_seq_length()} tokens; score each request "
            "with a fresh cache (the context must be its prompt)."
        )
    # Row t of `logits` predicts continuation token t: the context's last position, then each fed token.
    logits = [_forward(model, context, cache, last_only=True)]
    feed = cont[:, :-1]  # the last continuation token predicts nothing scored
    logits += [rows for _, _, rows in continuation_logits(model, cache, feed, chunk_size)]
    target = cont[0]
    if target.numel() == 0:
        return 0.0, True
    scores = torch.cat(logits)
    logprob = F.log_softmax(scores, dim=-1).gather(-1, target[:, None]).sum()
    return float(logprob), bool((scores.argmax(-1) == target).all())


def score_continuations(
    model: torch.nn.Module,
    requests: Iterable[tuple[TokenIds, TokenIds]],
    method: str | Callable[[], Any] | None = None,
    *,
    chunk_size: int = 1,
    **options: Any,
) -> list[tuple[float, bool]]:
    """:func:`score_continuation` of many ``(context_ids, continuation_ids)`` pairs, each against a
    fresh cache of its own context.

    Args:
        model: a transformers causal LM.
        requests: the ``(context_ids, continuation_ids)`` pairs, in order.
        method: a method name (each request gets ``compresskv.make_cache(model, method,
            **options)``), a callable returning a fresh cache, or ``None`` (a ``DynamicCache``).
        chunk_size: as in :func:`score_continuation`.
        **options: the method's options (only with a method name).

    Returns:
        One ``(logprob, is_greedy)`` per request, in order.

    Example:
        ```python
        pairs = [(ctx, cont_a), (ctx, cont_b)]
        scores = compresskv.eval.score_continuations(model, pairs, "pyramidkv", compression_ratio=0.75)
        best = max(range(len(pairs)), key=lambda i: scores[i][0])
        ```
    """
    if isinstance(method, str):
        from ..patching import make_cache

        def factory() -> Any:
            return make_cache(model, method, **options)
    elif options:
        raise TypeError(f"compresskv: options {sorted(options)} need a method name, not {method!r}")
    else:
        factory = method if method is not None else (lambda: None)
    return [score_continuation(model, ctx, cont, factory(), chunk_size=chunk_size) for ctx, cont in requests]
