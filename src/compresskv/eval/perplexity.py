"""Long-text perplexity with the prefix held in a (compressed) cache.

A window of real text is split into a prefix of ``length`` tokens and a continuation. The prefix
is prefilled into the cache (which compresses it, as it would a prompt); the continuation is then
fed in chunks on top of that cache and the loss is taken on the continuation's tokens only (the
first one predicted from the prefix's last position). With a ``DynamicCache`` this is ordinary
perplexity on the continuation given the prefix, so the difference between the two measures what
compressing the prefix lost.

Text comes from :func:`load_text`: a file, or a Hugging Face ``datasets`` name when online.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .measure import PeakMemory, _sync, cache_nbytes
from .. import compat


def load_text(source: str | Path, min_chars: int = 0) -> str:
    """Text from ``source``: a file path (UTF-8), or ``hf:NAME[:CONFIG[:SPLIT]]`` for a
    ``datasets`` data set whose ``text`` column is concatenated (needs ``pip install datasets``
    and network access). Stops reading a data set once it has ``min_chars`` characters."""
    text_source = str(source)
    if text_source.startswith("hf:"):
        parts = text_source[3:].split(":")
        name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
        split = parts[2] if len(parts) > 2 and parts[2] else "train"
        try:
            import datasets
        except ImportError as err:
            raise RuntimeError("compresskv: reading a data set needs `pip install datasets`") from err
        data = datasets.load_dataset(name, config, split=split, streaming=True)
        pieces: list[str] = []
        total = 0
        for row in data:
            piece = row.get("text") if isinstance(row, dict) else None
            if not piece:
                continue
            pieces.append(piece)
            total += len(piece)
            if min_chars and total >= min_chars:
                break
        if not pieces:
            raise ValueError(f"compresskv: data set {name!r} has no non-empty 'text' column")
        return "\n\n".join(pieces)
    path = Path(text_source)
    if not path.is_file():
        raise FileNotFoundError(f"compresskv: no text file {text_source!r} (give a path or hf:NAME)")
    return path.read_text(encoding="utf-8", errors="replace")


@dataclass
class PerplexityTask:
    """A window of text: ``prefix`` (``[1, length]`` ids, held in the cache) and ``continuation``
    (``[1, n]`` ids, scored)."""

    prefix: torch.Tensor
    continuation: torch.Tensor
    seed: int
    start: int
    name: str = "perplexity"

    @property
    def length(self) -> int:
        """Tokens in the prefix."""
        return int(self.prefix.shape[-1])

    @property
    def input_ids(self) -> torch.Tensor:
        """The prefix (what a cache holds)."""
        return self.prefix


def tokenize_text(tokenizer: Any, text: str) -> list[int]:
    """All token ids of ``text`` (no special tokens), without the over-length warning."""
    ids: list[int] = []
    step = 200_000  # characters per call; a cut mid-word costs a token or two, not correctness
    for i in range(0, len(text), step):
        ids.extend(tokenizer(text[i : i + step], add_special_tokens=False, verbose=False)["input_ids"])
    return ids


def make_perplexity_task(
    tokenizer: Any, text: str | list[int], length: int = 4096, continuation: int = 512, seed: int = 0
) -> PerplexityTask:
    """Cut a window of ``length + continuation`` tokens out of ``text`` (a string or token ids) at
    a position drawn from ``seed``, skipping the first 2% (title pages)."""
    ids = tokenize_text(tokenizer, text) if isinstance(text, str) else list(text)
    need = length + continuation
    skip = len(ids) // 50
    room = len(ids) - skip - need
    if room < 0:
        raise ValueError(
            f"compresskv: the text has {len(ids)} tokens, fewer than the {need} a perplexity window needs"
        )
    start = skip + random.Random(f"ppl:{seed}").randint(0, room)
    window = torch.tensor([ids[start : start + need]])
    return PerplexityTask(window[:, :length], window[:, length:], seed, start)


@torch.inference_mode()
def continuation_nll(model: Any, cache: Any, last_logits: torch.Tensor, cont: torch.Tensor, chunk_size: int = 128) -> float:
    """Mean NLL (nats) of ``cont`` (``[1, n]``) given what ``cache`` holds, the first token scored
    from ``last_logits`` (the prefix's last position). The continuation is fed with its first token
    alone, then ``chunk_size`` tokens at a time: a compressed cache takes the prompt to be every
    multi-token forward before the first single-token one (a chunked prompt is compressed chunk by
    chunk), so the single-token step ends the prompt at the prefix and the continuation is appended
    as decoded tokens are, whatever ``chunk_size``."""
    from .loglikelihood import continuation_logits

    nll = F.cross_entropy(last_logits.float(), cont[:, 0], reduction="sum")
    feed = cont[:, :-1]  # the last token predicts nothing we score
    for i, end, logits in continuation_logits(model, cache, feed, chunk_size):
        nll = nll + F.cross_entropy(logits, cont[0, i + 1 : end + 1], reduction="sum")
    return float(nll) / cont.shape[-1]


@torch.inference_mode()
def run_perplexity(model: Any, task: PerplexityTask, cache: Any = None, chunk_size: int = 128) -> dict[str, Any]:
    """Prefill ``task.prefix`` into ``cache`` (``None``: ``DynamicCache``), then score
    the continuation with :func:`continuation_nll` (its first token alone, then ``chunk_size``
    tokens at a time, so it is appended, never compressed as more prompt). Returns ``ppl``, ``nll`` (mean, nats),
    ``prefill_s``, ``decode_tok_s`` (continuation tokens per second), ``cache_bytes_prefill``,
    ``cache_bytes``, ``peak_prefill_bytes``, ``peak_decode_bytes`` and ``tokens``."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    cache = cache if cache is not None else DynamicCache(config=model.config)
    prefix, cont = task.prefix.to(device), task.continuation.to(device)
    mem = PeakMemory(device).start()
    with mem.phase() as prefill_mem:
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=prefix, use_cache=True, logits_to_keep=1, **compat.cache_kwargs(cache, model.forward))
        _sync(device)
        prefill = time.perf_counter() - start
    last = out.logits[:, -1].float()
    del out
    bytes_prefill = cache_nbytes(cache)
    with mem.phase() as decode_mem:
        _sync(device)
        start = time.perf_counter()
        n = cont.shape[-1]
        mean = continuation_nll(model, cache, last, cont, chunk_size)
        _sync(device)
        decode = time.perf_counter() - start
    return {
        "ppl": math.exp(mean),
        "nll": mean,
        "prefill_s": prefill,
        "decode_tok_s": (n - 1) / decode if n > 1 and decode > 0 else None,
        "cache_bytes_prefill": bytes_prefill,
        "cache_bytes": cache_nbytes(cache),
        "peak_prefill_bytes": prefill_mem.peak_bytes,
        "peak_decode_bytes": decode_mem.peak_bytes,
        "tokens": task.length,
    }
