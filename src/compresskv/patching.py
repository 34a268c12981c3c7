"""``compresskv.patch`` / ``compresskv.unpatch`` and the registry of method names."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import types
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from .core import attention as _attention
from . import compat

if TYPE_CHECKING:
    from .core.cache import CacheStats

CacheFactory = Callable[..., Any]

_METHODS: dict[str, CacheFactory] = {}


_builtins_loaded = False


def _registry() -> dict[str, CacheFactory]:
    """The method names and their factories, the built-in ones registered on first use (so that
    ``import compresskv`` loads no method)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        from . import elitekv
        from .crosslayer import MiniCache, SVDCache, XKVCache
        from .eviction import ExpectedAttentionCache, KnormCache, PyramidKVCache, SnapKVCache, StreamingLLMCache
        from .compose import composed
        from .projected import MatryoshkaKVCache, PCAKVCache

        builtins = {"pyramidkv": PyramidKVCache, "snapkv": SnapKVCache, "knorm": KnormCache,
                    "streamingllm": StreamingLLMCache, "matryoshka": MatryoshkaKVCache, "pca": PCAKVCache,
                    "xkv": XKVCache, "svd": SVDCache, "minicache": MiniCache, "elitekv": elitekv.make_cache,
                    "expected_attention": ExpectedAttentionCache, **{name: composed(name) for name in ("int2", "int4", "int8")}}
        for name, factory in builtins.items():
            _METHODS.setdefault(name, factory)  # a method the user registered first keeps its factory
    return _METHODS


def register_method(name: str, factory: CacheFactory) -> None:
    """Make ``patch(model, name, **options)`` build caches with ``factory(model, **options)``."""
    if name != name.lower():
        raise ValueError(f"method names are lower-case, got {name!r}")
    _registry()
    _METHODS[name] = factory


def available_methods() -> list[str]:
    """The method names ``patch`` accepts."""
    return sorted(_registry())


def method_options(method: str) -> list[str]:
    """The keyword options ``patch(model, method, ...)`` accepts for ``method``."""
    return factory_options(_factory(method))


def factory_options(factory: Any) -> list[str]:
    """Keyword options of a cache factory after ``model``. A class whose ``__init__`` forwards
    ``**kwargs`` to its parent's (a method declares only what it adds) gets its parents' too."""
    targets = [c.__init__ for c in factory.__mro__ if "__init__" in vars(c)] if isinstance(factory, type) else [factory]
    found: list[list[str]] = []
    for fn in targets:
        params = list(inspect.signature(fn).parameters.values())
        params = params[2:] if isinstance(factory, type) else params[1:]  # self, model
        found.append([p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)])
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    fixed = set(getattr(factory, "fixed_options", ()))  # a parent's options the subclass sets itself
    return [n for n in dict.fromkeys(name for names in reversed(found) for name in names) if n not in fixed]


def _factory(method: str) -> CacheFactory:
    methods = _registry()
    if isinstance(method, str) and "+" in method and method not in methods:
        from .compose import composed

        return composed(method)  # stages joined by "+": compresskv.compose
    if not isinstance(method, str) or method not in methods:
        raise ValueError(f"compresskv: unknown method {method!r}; choose one of {available_methods()}.")
    return methods[method]


def make_cache(model: torch.nn.Module, method: str, **options: Any) -> Any:
    """Build the cache of ``method`` for ``model``, checking the option names first."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(
            "compresskv: model must be a transformers model (e.g. from AutoModelForCausalLM.from_pretrained), "
            f"got {type(model).__name__} {str(model)[:60]!r}; the method name comes second: patch(model, method, ...)."
        )
    factory = _factory(method)
    allowed = method_options(method)
    unknown = sorted(set(options) - set(allowed))
    renamed = getattr(factory, "renamed_options", {})
    if set(unknown) & set(renamed):
        said = "; ".join(f"{old}= is now {renamed[old]}" for old in unknown if old in renamed)
        raise TypeError(f"compresskv: method {method!r}: {said}. Its options are {allowed}.")
    if unknown:
        raise TypeError(f"compresskv: method {method!r} does not take {unknown}; its options are {allowed}.")
    return factory(model, **options)


@dataclass
class _PatchState:
    method: str
    options: dict[str, Any]
    cache_implementation: Any = None  # the model's generation_config value, restored by unpatch
    # The cache the latest generate() built (see last_cache): one reference, replaced by the next
    # generate() and dropped by unpatch, so at most one cache is kept alive after generate returns.
    last_cache: Any = None

    def __deepcopy__(self, memo: dict[int, Any]) -> "_PatchState":
        """A copy of the model is patched the same way but starts with no latest cache (its
        ``generate`` builds its own; copying the held one would double its memory)."""
        return _PatchState(self.method, copy.deepcopy(self.options, memo), self.cache_implementation)


def _generate_setting(self: Any, kwargs: dict[str, Any], name: str) -> Any:
    """What ``generate(**kwargs)`` will use for ``name``: the call's keyword, else the
    ``generation_config`` it passes, else the model's."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    config = kwargs.get("generation_config") or getattr(self, "generation_config", None)
    return getattr(config, name, None)


def _patched_generate(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``generate`` of a patched model: a fresh cache of the patched method unless the call brings
    its own, asks for none (``use_cache=False``) or names a transformers ``cache_implementation``.
    Bound to the model as a method, so ``copy.deepcopy`` rebinds it to the copy."""
    state: _PatchState = self.__dict__["_compresskv_patch"]
    state.last_cache = None  # release the previous call's cache before this call allocates
    original = functools.partial(type(self).generate, self)
    if compat.get_cache(kwargs) is not None or _generate_setting(self, kwargs, "use_cache") is False:
        return original(*args, **kwargs)
    impl = _generate_setting(self, kwargs, "cache_implementation")
    if impl is not None:
        warnings.warn(
            f"compresskv.patch({state.method!r}): generate(cache_implementation={impl!r}) asks for transformers' "
            "own cache, so this call runs uncompressed; leave cache_implementation unset to use the patch.",
            stacklevel=2,
        )
        return original(*args, **kwargs)
    state.last_cache = make_cache(self, state.method, **state.options)
    compat.set_cache(kwargs, state.last_cache)
    try:
        return original(*args, **kwargs)
    except BaseException:
        _attention.clear_pending()
        raise


def patch(model: torch.nn.Module, method: str, **options: Any) -> torch.nn.Module:
    """Make ``model.generate`` (and pipelines built on the model) use ``method``'s cache.

    Every ``generate`` call that is not given a cache (``cache=``; ``past_key_values=`` on
    transformers < 5.24) gets a fresh cache of ``method`` built with ``options``; a cache passed
    explicitly is used as is, ``use_cache=False`` uses none, and a call that names a
    ``cache_implementation`` gets transformers' cache (with a warning). A ``cache_implementation``
    in the model's own ``generation_config`` is set aside while patched. The options are checked
    now (a cache is built once), so a bad budget fails here rather than at generation time. The
    cache the latest call built stays readable through :func:`last_cache` / :func:`last_stats`
    (also after a ``pipeline(...)`` call). Call :func:`unpatch` to restore the model. Returns ``model``.

    Example:
        >>> compresskv.patch(model, "pyramidkv", budget=256)  # doctest: +SKIP
        >>> model.generate(**inputs, max_new_tokens=32)  # doctest: +SKIP
    """
    make_cache(model, method, **options)
    if "_compresskv_patch" in model.__dict__:
        unpatch(model, keep_attention=True)
    generation_config = getattr(model, "generation_config", None)
    impl = getattr(generation_config, "cache_implementation", None)
    if impl is not None:
        generation_config.cache_implementation = None  # transformers refuses it next to a cache object
    model.generate = types.MethodType(_patched_generate, model)  # type: ignore[method-assign]
    model._compresskv_patch = _PatchState(method, dict(options), impl)
    return model


def unpatch(model: torch.nn.Module, keep_attention: bool = False) -> torch.nn.Module:
    """Undo :func:`patch` (and the attention switch any compresskv cache made): ``generate`` and
    the attention implementation are the model's own again, and the cache :func:`last_cache`
    held is dropped. Returns ``model``."""
    model.__dict__.pop("generate", None)
    state = model.__dict__.pop("_compresskv_patch", None)
    if state is not None:
        state.last_cache = None
    if state is not None and state.cache_implementation is not None:
        model.generation_config.cache_implementation = state.cache_implementation
    if not keep_attention:
        _attention.uninstall(model)
    return model


@contextlib.contextmanager
def patched(model: torch.nn.Module, method: str, **options: Any) -> Iterator[torch.nn.Module]:
    """:func:`patch` for the length of a ``with`` block; on leaving it, also on an error, the model
    is as it was: its earlier patch (if any) back, its own attention implementation back if it had
    it, and an EliteKV conversion made for the block reverted (``keep_original=True`` is the
    default here, so the original weights are kept during the block).

    Example:
        >>> with compresskv.patched(model, "snapkv", compression_ratio=0.5):  # doctest: +SKIP
        ...     model.generate(**inputs, max_new_tokens=32)
    """
    from .elitekv import is_converted, revert

    before = model.__dict__.get("_compresskv_patch")
    attention_before = getattr(model.config, "_attn_implementation", None)
    converted_before = is_converted(model)
    if not converted_before and "keep_original" in method_options(method):
        options = {"keep_original": True, **options}  # a method that converts the model keeps what to restore
    patch(model, method, **options)
    try:
        yield model
    finally:
        unpatch(model, keep_attention=True)
        if is_converted(model) and not converted_before:
            revert(model)
        if before is not None:
            patch(model, before.method, **before.options)
            model._compresskv_patch.cache_implementation = before.cache_implementation
        elif getattr(model.config, "_attn_implementation", None) != attention_before:
            _attention.uninstall(model)


def last_cache(model: torch.nn.Module) -> Any:
    """The cache the latest ``generate()`` of the patched ``model`` built, or ``None``.

    ``None`` when ``model`` is not patched, has not generated since it was patched, or its latest
    call used no cache of the patch (it brought its own cache, set ``use_cache=False`` or named a
    ``cache_implementation``). Only the latest cache is kept: it stays alive (with its memory)
    until the next ``generate()`` on the model, which releases it first, or :func:`unpatch`, which
    drops it. A pipeline called on several texts runs ``generate()`` once per batch, so this is
    the last batch's cache.

    Example:
        ```python
        compresskv.patch(model, "snapkv", compression_ratio=0.5)
        pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
        pipe("A long document ...", max_new_tokens=32)
        cache = compresskv.last_cache(model)   # the SnapKVCache that generate() used
        ```
    """
    state = model.__dict__.get("_compresskv_patch")
    return state.last_cache if state is not None else None


def last_stats(model: torch.nn.Module) -> CacheStats | None:
    """``stats()`` of :func:`last_cache` (tokens seen, tokens stored per layer, bytes, ratios),
    or ``None`` when there is no latest cache or it has no ``stats()`` (a registered factory's
    own cache type). Measured now, from the tensors the cache holds after ``generate()`` returned.

    Example:
        ```python
        compresskv.patch(model, "pyramidkv", budget=256)
        pipe("A long document ...", max_new_tokens=32)
        print(compresskv.last_stats(model).tokens_stored)
        ```
    """
    stats = getattr(last_cache(model), "stats", None)
    return stats() if callable(stats) else None


def patched_method(model: torch.nn.Module) -> str | None:
    """The method ``model`` is patched with, or ``None``."""
    state = model.__dict__.get("_compresskv_patch")
    return state.method if state is not None else None
