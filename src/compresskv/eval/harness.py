"""lm-evaluation-harness with a compressed KV cache: the ``compresskv`` model of ``lm_eval``.

Importing this module registers :class:`CompressKVLM` under the name ``compresskv`` in lm-eval's
model registry (it needs ``pip install 'compresskv[lm-eval]'``; nothing else in compresskv imports
lm-eval). lm-eval 0.4 discovers models only in its own registry (it reads no plugin entry points),
so the model is registered by importing this module first; three ways do that:

```bash
compresskv lm-eval --model compresskv --model_args method=snapkv,compression_ratio=0.5 --tasks hellaswag
python -m compresskv.eval.harness --model compresskv --model_args method=snapkv,compression_ratio=0.5 --tasks hellaswag
```

(both are lm-eval's own command line, every option included), or in Python:

```python
import lm_eval
import compresskv.eval.harness  # registers "compresskv"

results = lm_eval.simple_evaluate(model="compresskv", model_args="method=snapkv,compression_ratio=0.5",
                                  tasks=["hellaswag"], limit=20)
```

``model_args``: ``pretrained`` (a hub id or a local path; omitted: the embedded
SmolLM2-135M-Instruct), ``method`` (a compresskv method; omitted or ``full``: a plain
``DynamicCache``), the method's options (``compression_ratio=0.5``, ``budget=256``, ...),
``device``, ``dtype``, ``max_length`` (tokens; default: the model's context length),
``max_gen_toks`` (256), ``chunk_size`` (1; see below) and ``rolling_context``.

Every request gets a fresh cache of the method:

* ``loglikelihood``: the context is prefilled (and compressed, as a prompt is), then the
  continuation is scored as decode steps, by :func:`compresskv.eval.score_continuation`
  (``chunk_size`` continuation tokens per forward after the first; 1 is what a generation sees);
* ``loglikelihood_rolling`` (perplexity tasks): the text is cut into pieces of
  ``max_length - rolling_context`` tokens; each piece is scored the same way with the
  ``rolling_context`` tokens before it as the compressed context (default ``max_length // 2``;
  the first piece from the model's prefix token alone), so every token is scored once;
* ``generate_until``: ``generate`` with the method's cache, stopping at the request's ``until``
  strings or after ``max_gen_toks`` tokens; greedy unless the request asks for sampling.

Requests run one at a time (``batch_size`` is accepted and ignored). What the caches held is
reported in the results' ``config["compresskv"]`` (caches built, mean tokens seen and stored).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError("compresskv.eval.harness needs lm-evaluation-harness: pip install 'compresskv[lm-eval]'") from err

from .. import compat

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FULL = (None, "", "full", "none", "dynamic")


@register_model("compresskv")
class CompressKVLM(LM):
    """An lm-eval ``LM`` that answers every request with a compressed KV cache (see the module's
    docstring for the arguments and how each kind of request is run)."""

    def __init__(
        self,
        pretrained: str | None = None,
        method: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        chunk_size: int = 1,
        rolling_context: int | None = None,
        batch_size: Any = 1,
        max_batch_size: Any = None,
        model: Any = None,
        tokenizer: Any = None,
        **options: Any,
    ) -> None:
        super().__init__()
        from ..models import load_model

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if model is None:
            if dtype not in _DTYPES:
                raise ValueError(f"compresskv: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
            model, tokenizer = load_model(pretrained, dtype=_DTYPES[dtype], device=device)
        elif tokenizer is None:
            raise ValueError("compresskv: a model object needs its tokenizer (tokenizer=...)")
        self.model, self.tokenizer = model, tokenizer
        self.method = None if method in _FULL else str(method)
        self.options = dict(options)
        if self.method is None and self.options:
            raise ValueError(f"compresskv: options {sorted(self.options)} need a method (method=snapkv, ...)")
        if self.method is not None:  # check the method and its options now, not at the first request
            from ..patching import make_cache

            make_cache(self.model, self.method, **self.options)
        config_length = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length or config_length)
        self.max_gen_toks = int(max_gen_toks)
        self.chunk_size = int(chunk_size)
        self.rolling_context = int(rolling_context if rolling_context is not None else self.max_length // 2)
        if not 0 <= self.rolling_context < self.max_length:
            raise ValueError(f"compresskv: rolling_context must be in [0, max_length={self.max_length}), "
                             f"got {self.rolling_context}")
        self._device = next(model.parameters()).device
        self.pretrained = pretrained
        self._caches = 0
        self._seen: list[int] = []
        self._stored: list[float] = []

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is scored from (BOS, else EOS)."""
        tok = self.tokenizer
        value = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if value is None:
            raise ValueError("compresskv: the tokenizer has neither a BOS nor an EOS token to start an empty context")
        return int(value)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context move to the continuation; the
        continuation's tokens are those of ``context + continuation`` after the context's."""
        if not context:
            return [self.prefix_token_id], self._encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return ctx, whole[len(ctx):]

    def _new_cache(self) -> Any:
        from ..patching import make_cache

        self._caches += 1
        return None if self.method is None else make_cache(self.model, self.method, **self.options)

    def _note(self, cache: Any) -> None:
        if cache is not None and hasattr(cache, "stats"):
            stats = cache.stats()
            stored = [n for n in stats.tokens_stored if n is not None]
            self._seen.append(int(stats.tokens_seen))
            if stored:
                self._stored.append(sum(stored) / len(stored))

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        from .loglikelihood import score_continuation

        budget = self.max_length
        if len(continuation) >= budget:  # keep the end, at least one context token
            continuation = continuation[-(budget - 1):]
        context = context[-(budget - len(continuation)):]
        cache = self._new_cache()
        result = score_continuation(self.model, context, continuation, cache, chunk_size=self.chunk_size)
        self._note(cache)
        return result

    # -- lm-eval's interface --------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log P(continuation | context), is_greedy)`` of each ``(context, continuation)`` request."""
        out = []
        for req in requests:
            context, continuation = req.args
            result = self._score(*self._encode_pair(context, continuation))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
            out.append(result)
        return out

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int]]]:
        """``(context, piece)`` pairs covering ``tokens`` once: pieces of ``max_length -
        rolling_context`` tokens, each after the ``rolling_context`` tokens before it (the first
        after the prefix token alone)."""
        step = self.max_length - self.rolling_context
        windows = []
        for start in range(0, len(tokens), step):
            context = tokens[max(0, start - self.rolling_context):start] or [self.prefix_token_id]
            windows.append((context, tokens[start:start + step]))
        return windows

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """The total log-likelihood of each request's text, scored in :meth:`rolling_windows`."""
        out = []
        for req in requests:
            (text,) = req.args[:1]
            total = sum(self._score(ctx, piece)[0] for ctx, piece in self.rolling_windows(self._encode(text)))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Generate from each request's context with the method's cache until one of its
        ``until`` strings (cut off) or ``max_gen_toks`` tokens."""
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else [s for s in until if s]
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            do_sample = bool(kwargs.pop("do_sample", False)) and temperature > 0
            ids = (self._encode(context) or [self.prefix_token_id])[-max(1, self.max_length - max_new):]
            input_ids = torch.tensor([ids], device=self._device)
            cache = self._new_cache()
            sampling = {"do_sample": True, "temperature": temperature, **kwargs} if do_sample else {"do_sample": False}
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.prefix_token_id
            generated = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new,
                pad_token_id=pad, stop_strings=until or None, tokenizer=self.tokenizer, **sampling,
                **(compat.cache_kwargs(cache, self.model.generate) if cache is not None else {}),
            )
            self._note(cache)
            text = self.tokenizer.decode(generated[0, len(ids):], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template applied to ``chat_history`` (lm-eval's ``--apply_chat_template``)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name (lm-eval keys its request caches on it)."""
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records in ``results["config"]``: the method, its options and what the
        caches held (mean tokens seen and stored per layer, over the caches that report stats)."""
        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        return {"compresskv": {
            "pretrained": self.pretrained, "method": self.method or "full", "options": self.options,
            "caches": self._caches, "mean_tokens_seen": mean(self._seen), "mean_tokens_stored": mean(self._stored),
        }}


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's command line (``lm_eval ARGS``) with the ``compresskv`` model registered; returns
    its exit status."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
