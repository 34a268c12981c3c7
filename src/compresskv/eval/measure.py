"""Running one task with one cache and measuring it: answer and score, cache bytes, peak memory,
prefill time and decode tokens/s.

Peak memory is what the run added on top of what the process held before it (the model's
weights are not counted):

* on CUDA, ``torch.cuda.max_memory_allocated()`` minus the memory allocated at the start (the
  peak statistics are reset at the start of each phase);
* on CPU, the process's peak resident set size (Linux ``VmHWM``) minus its resident size at the
  start. Before each phase, freed heap memory is handed back to the OS (glibc ``malloc_trim``)
  and the peak counter is reset (writing ``5`` to ``/proc/self/clear_refs``), so the number
  belongs to this run and not to an earlier, larger one. Where that is unavailable (not Linux),
  peaks are reported as ``None`` rather than guessed. ``tracemalloc`` would not see torch's
  tensors (they are not allocated through Python's allocator), hence RSS.

Two peaks are reported: during prefill (dominated by activations on long prompts) and during
decoding (where the cache's size matters: it is held, the prefill's temporaries are gone).
"""

from __future__ import annotations

import ctypes
import gc
import time
from dataclasses import dataclass
from typing import Any

import torch

from .needle import dynamic_cache_nbytes
from .. import compat


def cache_nbytes(cache: Any) -> int:
    """Bytes held by a compresskv cache (``cache.nbytes()``) or a transformers ``DynamicCache``."""
    return int(cache.nbytes()) if hasattr(cache, "nbytes") else dynamic_cache_nbytes(cache)


def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


_libc: Any = None


def _trim() -> None:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim(0)
        except (OSError, AttributeError):
            _libc = False
            return
    if _libc:
        _libc.malloc_trim(0)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Measures the peak memory a block of work adds (see the module's notes).

    Use :meth:`start` once (the reference point) and :meth:`phase` around each phase:

    ```python
    mem = PeakMemory(device).start()
    with mem.phase() as prefill: ...
    prefill.peak_bytes  # peak during the phase minus the memory at start()
    ```
    """

    device: torch.device | str = "cpu"
    start_bytes: int | None = None
    peak_bytes: int | None = None

    @property
    def cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"

    def start(self) -> "PeakMemory":
        """Take the reference point: memory in use now (after collecting garbage)."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            _trim()
            rss = _rss_kib("VmRSS")
            self.start_bytes = rss * 1024 if rss is not None else None
        return self

    def phase(self) -> "_Phase":
        """A context manager measuring the peak of one phase against :meth:`start`'s reference."""
        return _Phase(self)


class _Phase:
    def __init__(self, owner: PeakMemory) -> None:
        self.owner = owner
        self.peak_bytes: int | None = None
        self._ok = False

    def __enter__(self) -> "_Phase":
        if self.owner.cuda:
            torch.cuda.synchronize(self.owner.device)
            torch.cuda.reset_peak_memory_stats(self.owner.device)
            self._ok = self.owner.start_bytes is not None
        else:
            _trim()
            self._ok = self.owner.start_bytes is not None and _reset_peak_rss()
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._ok or self.owner.start_bytes is None:
            return
        if self.owner.cuda:
            torch.cuda.synchronize(self.owner.device)
            peak = torch.cuda.max_memory_allocated(self.owner.device)
        else:
            hwm = _rss_kib("VmHWM")
            if hwm is None:
                return
            peak = hwm * 1024
        self.peak_bytes = max(0, peak - self.owner.start_bytes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every token id that ends an answer (the tokenizer's EOS and the generation config's)."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@torch.inference_mode()
def run_task(model: Any, tokenizer: Any, task: Any, cache: Any = None, max_new_tokens: int | None = None,
             question_after: bool = False) -> dict[str, Any]:
    """Answer ``task`` (a :class:`~compresskv.eval.tasks.Task` or :class:`~compresskv.eval.NeedleTask`)
    greedily with ``cache`` (``None``: a fresh ``DynamicCache``) and measure the run.

    ``question_after``: prefill the context alone (the prompt up to ``task.context_length``: a
    compressed cache compresses it without the question), close the prompt
    (:meth:`~compresskv.CompressedCache.end_prompt`), then feed the question and the answer prefix
    in one more forward, appended uncompressed; both forwards are the prefill's time.

    Decoding always runs ``max_new_tokens`` steps (default: the task's), so decode speed is taken
    over the same number of steps for every cache; the answer is cut at the first end-of-turn
    token. Returns ``answer``, ``score`` (in [0, 1]), ``prefill_s``, ``decode_tok_s``,
    ``cache_bytes_prefill`` (right after prefill: the compressed prompt), ``cache_bytes`` (at
    the end), ``peak_prefill_bytes``, ``peak_decode_bytes`` and ``tokens``.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    steps = int(max_new_tokens or getattr(task, "max_new_tokens", 16))
    ids = task.input_ids.to(device)
    mem = PeakMemory(device).start()
    cache = cache if cache is not None else DynamicCache(config=model.config)
    split = getattr(task, "context_length", None) if question_after else None
    if question_after and not split:
        raise ValueError(f"compresskv: task {getattr(task, 'name', task)!r} does not say where its question starts "
                         "(context_length); it cannot be asked after the context (needs a fast tokenizer)")
    with mem.phase() as prefill_mem:
        _sync(device)
        start = time.perf_counter()
        if split:
            model(input_ids=ids[:, :split], use_cache=True, logits_to_keep=1, **compat.cache_kwargs(cache, model.forward))
            if hasattr(cache, "end_prompt"):
                cache.end_prompt()
            ids = ids[:, split:]
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **compat.cache_kwargs(cache, model.forward))
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        prefill = time.perf_counter() - start
    del out
    bytes_prefill = cache_nbytes(cache)
    generated = [token]
    with mem.phase() as decode_mem:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps - 1):
            out = model(input_ids=token, use_cache=True, **compat.cache_kwargs(cache, model.forward))
            token = out.logits[:, -1:].argmax(-1)
            generated.append(token)
        _sync(device)
        decode = time.perf_counter() - start
    tokens = torch.cat(generated, dim=-1)[0].tolist()
    stop = eos_token_ids(model, tokenizer)
    cut = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
    text = tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
    score = task.score(text)
    return {
        "answer": text,
        "score": float(score),
        "prefill_s": prefill,
        "decode_tok_s": (steps - 1) / decode if steps > 1 and decode > 0 else None,
        "cache_bytes_prefill": bytes_prefill,
        "cache_bytes": cache_nbytes(cache),
        "peak_prefill_bytes": prefill_mem.peak_bytes,
        "peak_decode_bytes": decode_mem.peak_bytes,
        "tokens": task.length,
    }
