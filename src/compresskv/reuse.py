"""Compress a context once and ask many questions of it.

A chat history, a document or a RAG prefix is prefilled once into a compressed cache and reused for
several questions, each answered from a copy of it (``copy.deepcopy``: every compresskv cache
copies). Each question's tokens are appended as decoded tokens are, never compressed: the cache
was compressed from the context alone (SnapKV/PyramidKV score its tokens with the context's last
tokens as their window, not the question, which is the hard case the question-agnostic scorers
address). In transformers' idiom:

```python
cache = compresskv.prefill(model, context_ids, compresskv.SnapKVCache(model, compression_ratio=0.5))
for question_ids in questions:
    out = compresskv.ask(model, cache, context_ids, question_ids, max_new_tokens=64)
```

which is ``model.generate(input_ids=cat(context, question), cache=copy.deepcopy(cache), ...)``:
generate feeds only the tokens the cache has not seen.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from . import compat


def prefill(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any,
            attention_mask: torch.Tensor | None = None) -> Any:
    """Prefill ``input_ids`` (``[batch, tokens]``, left padding under ``attention_mask``) into
    ``cache``, where a compressed cache compresses it, then close its prompt
    (:meth:`compresskv.CompressedCache.end_prompt`) so that later multi-token forwards are appended
    uncompressed. Returns ``cache``; ask from copies of it (:func:`ask`)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[-1] == 0:
        raise ValueError(f"compresskv.prefill: input_ids must be a [batch, tokens] tensor of token ids, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}.")
    if cache.get_seq_length() != 0:
        raise ValueError("compresskv.prefill: the cache already holds tokens; give a fresh cache.")
    extra = {}
    if attention_mask is not None:  # positions counted over real tokens, as generate() counts them
        extra["position_ids"] = (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 1)
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **compat.cache_kwargs(cache), **extra)
    if hasattr(cache, "end_prompt"):
        cache.end_prompt()
    return cache


def ask(model: torch.nn.Module, cache: Any, context_ids: torch.Tensor, question_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None, **generate_kwargs: Any) -> Any:
    """Answer ``question_ids`` (``[batch, tokens]``) about the context that :func:`prefill` put in
    ``cache``: ``model.generate`` on the context followed by the question, from a deep copy of
    ``cache`` (the cache itself is not changed, so it answers the next question the same way).

    ``context_ids`` are the ids given to :func:`prefill` (generate needs the whole sequence, and
    feeds only the question and the answer through the model); ``attention_mask`` is the context's
    (the question's tokens are real). ``generate_kwargs`` go to ``generate`` as they are. Returns
    what ``generate`` returns."""
    seen = int(cache.get_seq_length())
    if context_ids.dim() != 2 or context_ids.shape[-1] != seen:
        raise ValueError(f"compresskv.ask: context_ids must be the [batch, {seen}] ids prefilled into the cache, "
                         f"got shape {tuple(context_ids.shape)}.")
    if question_ids.dim() != 2 or question_ids.shape[0] != context_ids.shape[0] or question_ids.shape[-1] == 0:
        raise ValueError(f"compresskv.ask: question_ids must be [{context_ids.shape[0]}, tokens] (the context's "
                         f"batch), got shape {tuple(question_ids.shape)}.")
    question_ids = question_ids.to(context_ids.device)
    ids = torch.cat([context_ids, question_ids], dim=-1)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, torch.ones_like(question_ids, dtype=attention_mask.dtype)], dim=-1)
    return model.generate(input_ids=ids, attention_mask=attention_mask, **compat.cache_kwargs(copy.deepcopy(cache)),
                          **generate_kwargs)
