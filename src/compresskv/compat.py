"""The one place that knows how transformers releases differ (compresskv supports 5.4 to the newest 5.x).

transformers 5.24 renamed the cache argument: ``generate()``/``forward()`` take ``cache=``, decoder
layers pass ``cache=`` to attention and outputs carry ``.cache``. ``past_key_values=`` still works
there with a FutureWarning (until 5.40 for ``forward``, 6.0 for ``generate``); older releases know
only ``past_key_values``. Everything in compresskv that passes, reads or forwards a cache goes
through these helpers, so there is no version check anywhere else.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from transformers.generation import utils as _generation

NEW_NAME = "cache"
OLD_NAME = "past_key_values"
# transformers lists the name generate() holds the cache under first (5.24+: "cache").
CACHE_ARG: str = NEW_NAME if NEW_NAME in getattr(_generation, "ALL_CACHE_NAMES", ()) else OLD_NAME
"""The name this transformers release uses for the cache argument of ``generate``/``forward``."""

_NAMES = (NEW_NAME, OLD_NAME)
_ARG_OF: dict[Any, str] = {}


def cache_arg(fn: Callable[..., Any] | None = None) -> str:
    """The cache argument's name for ``fn`` (a model's ``forward``, say): the one in its signature,
    else this release's :data:`CACHE_ARG` (models written for older releases keep the old name)."""
    if fn is None:
        return CACHE_ARG
    key = getattr(fn, "__func__", fn)
    if key not in _ARG_OF:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        _ARG_OF[key] = next((n for n in (CACHE_ARG, *_NAMES) if n in params), CACHE_ARG)
    return _ARG_OF[key]


def cache_kwargs(cache: Any, fn: Callable[..., Any] | None = None) -> dict[str, Any]:
    """``{name: cache}`` under the name ``fn`` (default: ``generate``/``forward`` of this release) takes."""
    return {cache_arg(fn): cache}


def get_cache(kwargs: dict[str, Any]) -> Any:
    """The cache in ``kwargs`` under either name (``None`` if neither is set)."""
    for name in _NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove both names from ``kwargs`` and return the cache they held (``None`` if none)."""
    found = [kwargs.pop(n) for n in _NAMES if n in kwargs]
    given = [c for c in found if c is not None]
    if len(given) > 1 and given[0] is not given[1]:
        raise ValueError("compresskv: both cache= and past_key_values= were given; pass one (cache= on transformers >= 5.24).")
    return given[0] if given else None


def set_cache(kwargs: dict[str, Any], cache: Any, fn: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Put ``cache`` into ``kwargs`` under the name ``fn`` takes, dropping the other name. Returns ``kwargs``."""
    pop_cache(kwargs)
    kwargs[cache_arg(fn)] = cache
    return kwargs


def output_cache(output: Any) -> Any:
    """The cache a model output carries (``.cache`` on 5.24+, ``.past_key_values`` before)."""
    for name in _NAMES:
        if isinstance(output, dict) and output.get(name) is not None:
            return output[name]
    return None
