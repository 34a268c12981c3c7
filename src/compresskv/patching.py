"""``compresskv.patch`` / ``compresskv.unpatch`` and the registry of method names."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import attention as _attention

CacheFactory = Callable[..., Any]

_METHODS: dict[str, CacheFactory] = {}


def register_method(name: str, factory: CacheFactory) -> None:
    """Make ``patch(model, name, **options)`` build caches with ``factory(model, **options)``."""
    if name != name.lower():
        raise ValueError(f"method names are lower-case, got {name!r}")
    _METHODS[name] = factory


def available_methods() -> list[str]:
    """The method names ``patch`` accepts."""
    return sorted(_METHODS)


def method_options(method: str) -> list[str]:
    """The keyword options ``patch(model, method, ...)`` accepts for ``method``."""
    params = inspect.signature(_factory(method)).parameters
    return [n for n, p in list(params.items())[1:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _factory(method: str) -> CacheFactory:
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"compresskv: unknown method {method!r}; choose one of {available_methods()}.")
    return _METHODS[method]


def make_cache(model: torch.nn.Module, method: str, **options: Any) -> Any:
    """Build the cache of ``method`` for ``model``, checking the option names first."""
    factory = _factory(method)
    allowed = method_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"compresskv: method {method!r} does not take {unknown}; its options are {allowed}.")
    return factory(model, **options)


@dataclass
class _PatchState:
    method: str
    options: dict[str, Any]


def patch(model: torch.nn.Module, method: str, **options: Any) -> torch.nn.Module:
    """Make ``model.generate`` (and pipelines built on the model) use ``method``'s cache.

    Every ``generate`` call that is not given ``past_key_values`` gets a fresh cache of ``method``
    built with ``options``; a cache passed explicitly is used as is. The options are checked now
    (a cache is built once), so a bad budget fails here rather than at generation time. Call
    :func:`unpatch` to restore the model. Returns ``model``.

    Example:
        >>> compresskv.patch(model, "pyramidkv", budget=256)  # doctest: +SKIP
        >>> model.generate(**inputs, max_new_tokens=32)  # doctest: +SKIP
    """
    make_cache(model, method, **options)
    if "_compresskv_patch" in model.__dict__:
        unpatch(model, keep_attention=True)
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("past_key_values") is None:
            kwargs["past_key_values"] = make_cache(model, method, **options)
        try:
            return original(*args, **kwargs)
        except BaseException:
            _attention.clear_pending()
            raise

    model.generate = generate  # type: ignore[method-assign]
    model._compresskv_patch = _PatchState(method, dict(options))
    return model


def unpatch(model: torch.nn.Module, keep_attention: bool = False) -> torch.nn.Module:
    """Undo :func:`patch` (and the attention switch any compresskv cache made): ``generate`` and
    the attention implementation are the model's own again. Returns ``model``."""
    model.__dict__.pop("generate", None)
    model.__dict__.pop("_compresskv_patch", None)
    if not keep_attention:
        _attention.uninstall(model)
    return model


def patched_method(model: torch.nn.Module) -> str | None:
    """The method ``model`` is patched with, or ``None``."""
    state = model.__dict__.get("_compresskv_patch")
    return state.method if state is not None else None
