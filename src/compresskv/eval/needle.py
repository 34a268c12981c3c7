"""A needle-in-a-haystack question at a target token length, in the spirit of RULER's niah_single.

The haystack is RULER's "noise" filler (repeated plain sentences) by default, or any text the
user gives; the needle is a random 7-digit number at a chosen depth. The prompt goes through the
model's chat template when it has one.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from .. import compat

NOISE = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."


@dataclass
class NeedleTask:
    """One generated question: ``input_ids`` ([1, T]) and the expected ``answer``."""

    input_ids: torch.Tensor
    answer: str
    depth: float

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[-1])

    def score(self, text: str) -> bool:
        """True when the model's answer contains the needle's number."""
        return self.answer in re.sub(r"[\s,]", "", text)


def _prompt_ids(tokenizer: Any, context: str) -> list[int]:
    content = f"{context}\n\n{QUESTION}"
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(content)["input_ids"]


def make_needle_task(
    tokenizer: Any, length: int = 4096, depth: float = 0.5, seed: int = 0, haystack: str | None = None
) -> NeedleTask:
    """A prompt of about ``length`` tokens (chat template included) hiding one needle at ``depth``
    (0 = start, 1 = end of the haystack)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth!r}")
    rng = random.Random(seed)
    answer = str(rng.randint(1_000_000, 9_999_999))
    needle = f" The special magic number is {answer}. "
    filler = haystack if haystack is not None else NOISE * (length // 8 + 8)
    sentences = re.split(r"(?<=[.!?])\s+", filler)
    overhead = len(_prompt_ids(tokenizer, needle))
    budget = max(length - overhead, 16)
    # Grow the haystack sentence by sentence (token counts measured on the joined text).
    words: list[str] = []
    count = 0
    for sentence in sentences:
        n = len(tokenizer(" " + sentence, add_special_tokens=False)["input_ids"])
        if count + n > budget:
            break
        words.append(sentence)
        count += n
    cut = int(round(depth * len(words)))
    context = " ".join(words[:cut]) + needle + " ".join(words[cut:])
    ids = torch.tensor([_prompt_ids(tokenizer, context)])
    return NeedleTask(ids, answer, depth)


@torch.no_grad()
def run_needle(
    model: Any, tokenizer: Any, task: NeedleTask, cache: Any = None, max_new_tokens: int = 16
) -> dict[str, Any]:
    """Answer ``task`` greedily with ``cache`` (``None``: DynamicCache). Returns the
    answer text, correctness, prefill seconds, decode tokens/s and the cache's measured bytes."""
    from transformers import DynamicCache

    cache = cache if cache is not None else DynamicCache(config=model.config)
    ids = task.input_ids.to(model.device)
    start = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, **compat.cache_kwargs(cache, model.forward))
    prefill = time.perf_counter() - start
    token = out.logits[:, -1:].argmax(-1)
    generated = [token]
    start = time.perf_counter()
    eos = tokenizer.eos_token_id
    for _ in range(max_new_tokens - 1):
        if eos is not None and int(token) == eos:
            break
        out = model(input_ids=token, use_cache=True, **compat.cache_kwargs(cache, model.forward))
        token = out.logits[:, -1:].argmax(-1)
        generated.append(token)
    decode = time.perf_counter() - start
    text = tokenizer.decode(torch.cat(generated, dim=-1)[0], skip_special_tokens=True)
    steps = len(generated) - 1
    nbytes = cache.nbytes() if hasattr(cache, "nbytes") else dynamic_cache_nbytes(cache)
    return {
        "answer": text.strip(),
        "correct": task.score(text),
        "prefill_s": prefill,
        "decode_tok_s": steps / decode if steps and decode > 0 else float("nan"),
        "cache_bytes": nbytes,
    }


def dynamic_cache_nbytes(cache: Any) -> int:
    """Bytes held by a transformers ``DynamicCache``."""
    from ..core.cache import tensor_bytes

    return sum(tensor_bytes(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers)
