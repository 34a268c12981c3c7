"""EliteKV conversion: the converted model class (default cache, save/reload), :func:`convert`
(J-LRD, in place), :func:`revert`, :func:`load_converted`, :func:`conversion_info`, and
:func:`make_cache`, the ``compresskv.patch(model, "elitekv", ...)`` factory.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import compat
from ..core.facts import model_dims, refuse_mla, text_config
from ..core.readmode import check_read_mode, refuse_renamed_option, renamed_option
from .attention import READ_MODES, RENAMED_READ_MODES, EliteKVAttention, spec_read_mode
from .cache import EliteKVCache, elitekv_spec
from .factorization import SVD_MODES, jlrd_weights, resolve_sizes
from .ranking import SELECTIONS, FrequencyRanking, input_moments, rank_frequencies, select_pairs
from .support import attention_modules, check_supported, decoder_layers, is_converted

FORMAT = 1


# -- the converted model class ---------------------------------------------------------------------
class _EliteKVModelMixin:
    """Mixed into the model's own class on conversion: builds the EliteKV attention from
    ``config.elitekv`` (so ``from_pretrained`` works) and makes ``EliteKVCache`` the default cache."""

    _elitekv_base: type

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        spec = getattr(config, "elitekv", None)
        if spec:
            for i, layer in enumerate(decoder_layers(self)):  # type: ignore[arg-type]
                layer.self_attn = EliteKVAttention(text_config(self), i, spec)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if compat.get_cache(kwargs) is None and len(args) < 4:
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = bool(getattr(self.config, "use_cache", False)) and not self.training  # type: ignore[attr-defined]
            if use_cache:
                compat.set_cache(kwargs, EliteKVCache(self), super().forward)  # type: ignore[arg-type, misc]
        return super().forward(*args, **kwargs)  # type: ignore[misc]

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any) -> Any:
        if compat.get_cache(model_kwargs) is None and generation_config.use_cache is not False:
            impl = generation_config.cache_implementation
            if impl not in (None, "dynamic"):
                raise ValueError(
                    f"compresskv.elitekv: cache_implementation={impl!r} cannot hold an EliteKV latent; leave it unset "
                    "(the converted model uses compresskv.EliteKVCache)."
                )
            compat.set_cache(model_kwargs, EliteKVCache(self))  # type: ignore[arg-type]
            return None
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)  # type: ignore[misc]


_CLASSES: dict[type, type] = {}


def converted_class(base: type) -> type:
    """The EliteKV subclass of a transformers model class (``EliteKVLlamaForCausalLM``, ...)."""
    if getattr(base, "_elitekv_base", None) is not None:
        return base
    cls = _CLASSES.get(base)
    if cls is None:
        name = f"EliteKV{base.__name__}"
        cls = type(name, (_EliteKVModelMixin, base), {"__module__": __name__, "_elitekv_base": base})
        _CLASSES[base] = cls
        setattr(sys.modules[__name__], name, cls)  # importable by name (pickling)
    return cls


# -- conversion ------------------------------------------------------------------------------------
def _resolve_ranking(model: nn.Module, ranking: Any) -> FrequencyRanking | None:
    if ranking is None:
        return None
    if isinstance(ranking, (str, Path)):
        return FrequencyRanking.from_pretrained(ranking, model)
    if not isinstance(ranking, FrequencyRanking):
        raise ValueError(
            f"compresskv.elitekv: ranking must be a FrequencyRanking or the path of a saved one, got {type(ranking).__name__}"
        )
    ranking.check_model(model)
    dims = model_dims(model)
    want = (dims["layers"], dims["kv_heads"], dims["head_dim"] // 2)
    if ranking.shape != want:
        raise ValueError(f"compresskv.elitekv: this ranking has shape {ranking.shape}, the model needs {want}")
    return ranking


@torch.no_grad()
def convert(
    model: nn.Module,
    rope_pairs: int | None = None,
    kv_dim: int | None = None,
    *,
    cache_ratio: float | None = None,
    compression_ratio: float | None = None,
    ranking: Any = None,
    selection: str = "ropelite",
    svd: str = "auto",
    pairs: Any = None,
    calibration_texts: Any = None,
    tokenizer: Any = None,
    seq_len: int = 1024,
    num_windows: int = 8,
    read_mode: str = "auto",
    keep_original: bool = False,
    damping: float = 1e-6,
    progress: bool = True,
    **removed: Any,
) -> nn.Module:
    """Convert ``model`` in place to EliteKV attention and return it.

    ``rope_pairs`` (r) RoPE pairs are kept per KV head, chosen by ``selection`` (``ropelite`` /
    ``contribution`` from ``ranking``, a :class:`FrequencyRanking` or its path; ``uniform`` /
    ``low_frequency`` need none) or given explicitly as ``pairs`` (``[layers, kv_heads, r]``). The
    joint K_nope/V latent has ``kv_dim`` (c) dims, or is sized from ``cache_ratio`` (or
    ``compression_ratio`` = 1 − cache_ratio; see :func:`resolve_sizes`). ``svd``:
    ``weight`` (the paper) or ``activation`` (whitened by calibration inputs: from the ranking's
    ``input_moment``, else computed from ``calibration_texts``); ``auto`` (default) is
    ``activation`` when such data is given and ``weight`` otherwise. ``read_mode``
    (:data:`compresskv.core.readmode.READ_MODES`): ``auto`` (per call, the fewer multiply-adds),
    ``latent`` (attend in the latent space with ``W_up`` absorbed, through
    ``scaled_dot_product_attention`` where a fused kernel takes it), ``latent_explicit`` (the same by
    explicit matmuls and softmax: the reference) or ``model`` (rebuild K/V and run the model's own
    attention; see the module notes). The old ``attention=`` and its values (``absorb``,
    ``absorb_explicit``, ``reconstruct``) are refused, naming the new spelling.
    ``keep_original`` keeps the original attention modules so that :func:`revert` (and
    re-conversion to other sizes) can restore them.

    After conversion ``generate()`` and ``forward(use_cache=True)`` use an :class:`EliteKVCache`;
    ``save_pretrained`` writes the sizes and chosen pairs into the config
    (:func:`load_converted` reads it back). ``compresskv.unpatch`` does not undo a conversion.
    """
    from tqdm.auto import tqdm

    check_supported(model)
    dims = model_dims(model)
    r, c = resolve_sizes(dims, rope_pairs, kv_dim, cache_ratio, compression_ratio)
    if selection not in SELECTIONS:
        raise ValueError(f"compresskv.elitekv: unknown selection {selection!r}; choose one of {list(SELECTIONS)}")
    if svd not in SVD_MODES:
        raise ValueError(f"compresskv.elitekv: svd must be one of {list(SVD_MODES)}, got {svd!r}")
    _refuse_renamed(removed)
    check_read_mode("compresskv.elitekv.convert", read_mode, READ_MODES, RENAMED_READ_MODES)
    rank = _resolve_ranking(model, ranking)
    if svd == "auto":
        has_data = (rank is not None and rank.input_moment is not None) or calibration_texts is not None
        svd = "activation" if has_data else "weight"
    shape = (dims["layers"], dims["kv_heads"], r)
    if pairs is not None:
        chosen = torch.as_tensor(pairs, dtype=torch.long).cpu()
        if tuple(chosen.shape) != shape or (r and (chosen.min() < 0 or chosen.max() >= dims["head_dim"] // 2)):
            raise ValueError(f"compresskv.elitekv: pairs must be {list(shape)} pair indices in [0, {dims['head_dim'] // 2})")
        if any(len(set(h.tolist())) != r for h in chosen.view(-1, r)) if r else False:
            raise ValueError("compresskv.elitekv: pairs repeat a pair within a head")
        chosen = chosen.sort(dim=-1).values
        selection = "explicit"
    elif r == dims["head_dim"] // 2:  # every pair: no selection (nor ranking) to make
        chosen = torch.arange(r).expand(shape).clone()
    else:
        chosen = select_pairs(dims["layers"], dims["kv_heads"], dims["head_dim"] // 2, r, selection, rank)
    moments = None
    if svd == "activation":
        if rank is not None and rank.input_moment is not None:
            moments = rank.input_moment
        elif calibration_texts is not None:
            moments = input_moments(model, calibration_texts, tokenizer, seq_len=seq_len, num_windows=num_windows, progress=progress)
        else:
            raise ValueError(
                "compresskv.elitekv: svd='activation' needs calibration activations: pass a ranking computed with "
                "activation_stats=True, or calibration_texts=... (with tokenizer=...)"
            )
    modules = attention_modules(model)
    config = text_config(model)
    first = modules[0]
    spec: dict[str, Any] = {
        "format": FORMAT,
        "rope_pairs": r,
        "kv_dim": c,
        "selection": selection,
        "svd": svd,
        "read_mode": read_mode,
        "pairs": chosen.tolist(),
        "bias": {
            "q": first.q_proj.bias is not None, "k": first.k_proj.bias is not None,
            "v": first.v_proj.bias is not None, "o": first.o_proj.bias is not None,
        },
        "base_class": type(model).__name__,
        "eager_module": type(first).__module__,
        "cache_ratio": (c + 2 * r * dims["kv_heads"]) / (2 * dims["kv_heads"] * dims["head_dim"]),
        "ranking": None if rank is None else {
            "model_name": rank.model_name, "config_hash": rank.config_hash, "options": rank.options,
        },
    }
    errors: list[dict[str, float]] = []
    originals = []
    for i, layer in enumerate(tqdm(decoder_layers(model), desc="EliteKV: J-LRD conversion", disable=not progress)):
        attn = layer.self_attn
        weight = attn.q_proj.weight
        moment = None if moments is None else moments[i]
        new_weights, err = jlrd_weights(attn, chosen[i], c, dims, moment, damping)
        errors.append(err)
        # Built on the meta device and given the decomposed weights: no random init to overwrite.
        new = EliteKVAttention(config, i, spec, device="meta", dtype=weight.dtype)
        state = {k: v.to(weight.device, weight.dtype) for k, v in new_weights.items() if v is not None}
        new.load_state_dict(state, strict=True, assign=True)
        new.train(attn.training)
        layer.self_attn = new
        if keep_original:
            originals.append(attn)
    spec["reconstruction_error"] = {
        key: [round(e[key], 6) for e in errors] for key in errors[0]
    }
    config.elitekv = spec
    if config is not model.config:
        model.config.elitekv = spec
    original_class = type(model)
    model.__class__ = converted_class(original_class)
    if keep_original:
        model.__dict__["_elitekv_original"] = (original_class, originals, rank)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Give a model converted with ``keep_original=True`` its original attention back (in place)."""
    stash = model.__dict__.get("_elitekv_original")
    if stash is None:
        if is_converted(model):
            raise ValueError(
                "compresskv.elitekv: this model was converted without keep_original=True, so its original attention "
                "weights are gone; reload the original model."
            )
        return model
    original_class, originals, _ = stash
    for layer, attn in zip(decoder_layers(model), originals):
        layer.self_attn = attn.to(device=next(layer.parameters()).device)  # each layer's own device (device_map)
    for config in {id(c): c for c in (model.config, text_config(model))}.values():
        if hasattr(config, "elitekv"):
            delattr(config, "elitekv")
    model.__class__ = original_class
    del model.__dict__["_elitekv_original"]
    return model


def load_converted(path: str | Path, **kwargs: Any) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after :func:`convert` (keyword arguments go to
    ``from_pretrained``: ``dtype``, ``device_map``, ``attn_implementation``, ...)."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    spec = getattr(config, "elitekv", None)
    if not spec:
        raise ValueError(f"compresskv.elitekv: {path} is not an EliteKV-converted model (its config has no 'elitekv')")
    if spec.get("format", 1) > FORMAT:
        raise ValueError(f"compresskv.elitekv: {path} was saved by a newer compresskv (format {spec['format']})")
    base = getattr(transformers, spec["base_class"], None)
    if base is None:
        raise ValueError(f"compresskv.elitekv: unknown model class {spec['base_class']!r} in {path}")
    model = converted_class(base).from_pretrained(path, **kwargs)
    return model.eval()


def conversion_info(model: nn.Module) -> dict[str, Any]:
    """The sizes, selection and per-layer reconstruction errors of a converted model."""
    spec = elitekv_spec(model)
    return {k: v for k, v in spec.items() if k != "pairs"}


# -- the patch factory -----------------------------------------------------------------------------
#: :func:`convert`'s options that :func:`make_cache` does not take (explicit ``pairs``, the SVD's
#: ``damping``): every other option is :func:`convert`'s, with its default, declared there once.
_CONVERT_ONLY = ("pairs", "damping")


def make_cache(model: nn.Module, *args: Any, **options: Any) -> EliteKVCache:
    """The ``compresskv.patch(model, "elitekv", ...)`` factory: ranks (when a ranked selection has no
    ``ranking`` but has ``calibration_texts``), chooses the sizes, converts ``model`` in place (once),
    and returns a fresh :class:`EliteKVCache`. Takes :func:`convert`'s options (its signature, less
    ``pairs`` and ``damping``) and ``allocation``.

    Sizes: ``kv_dim`` or ``cache_ratio`` (fraction of the original cache kept) or
    ``compression_ratio`` (= 1 − cache_ratio), with ``rope_pairs``. Given only a ratio below 1,
    how the budget is split between rotated key dims and the latent depends on ``allocation``:

    - ``None`` (default): with ``calibration_texts``, measured by
      :func:`~compresskv.elitekv.allocate` (a sweep of ``rope_pairs`` scored by perplexity on
      windows of ``seq_len`` held out of the calibration text: the last 2, at most all but one; the
      ranking uses up to ``num_windows`` of the others; about ten training-free conversions);
      without, the fixed rule below;
    - an :class:`~compresskv.elitekv.Allocation` or the path of a saved one: its ``rope_pairs`` and
      ``kv_dim`` (its cache ratio, which a ``cache_ratio`` given must match);
    - ``False``: the fixed rule, about 3/8 of the budget to the rotated key dims
      (:func:`~compresskv.elitekv.default_rope_pairs`).

    ``compression_ratio=0`` keeps every pair and the full joint rank, the original attention
    exactly, and needs no ranking. The allocation used is recorded in the converted config
    (``config.elitekv["allocation"]``), so later calls with the same options (every ``generate()``
    of a patched model) reuse it. ``svd="auto"``: activation-aware J-LRD when calibration
    data is at hand (``calibration_texts``, or a ranking with activation statistics), else the
    paper's weight-only SVD. On an already converted model: no size options, or the same
    ones, just give a new cache; other sizes re-convert from the original weights when the model was
    converted with ``keep_original=True`` and raise otherwise.
    """
    _refuse_renamed({k: v for k, v in options.items() if k != "allocation"})
    bound = make_cache.__signature__.bind(model, *args, **options)  # type: ignore[attr-defined]
    bound.apply_defaults()
    opts = {k: v for k, v in bound.arguments.items() if k != "model"}
    allocation = opts.pop("allocation")
    sizes = {k: opts[k] for k in ("rope_pairs", "kv_dim", "cache_ratio", "compression_ratio")}
    selection, svd, read_mode = opts["selection"], opts["svd"], opts["read_mode"]
    ranking, texts = opts["ranking"], opts["calibration_texts"]
    check_read_mode("compresskv.elitekv.make_cache", read_mode, READ_MODES, RENAMED_READ_MODES)
    refuse_mla(model, "compresskv.elitekv")
    dims = model_dims(model)
    ratio = _asked_ratio(sizes)
    given = _given_allocation(model, allocation, sizes, ratio)
    # a ratio alone, below 1, and allocation not refused: the split of the budget is allocated
    by_allocation = allocation is not False and ratio is not None and ratio < 1 and sizes["rope_pairs"] is None \
        and sizes["kv_dim"] is None
    if is_converted(model):
        if all(v is None for v in sizes.values()) and given is None:
            return EliteKVCache(model)
        spec = elitekv_spec(model)
        recorded = spec.get("allocation") or {}
        if given is not None:
            r, c = given.rope_pairs, given.kv_dim
        elif by_allocation and recorded and abs(recorded["cache_ratio"] - ratio) < 1e-9:
            r, c = recorded["rope_pairs"], recorded["kv_dim"]
        elif by_allocation and texts is not None:
            r, c = None, None  # to be allocated: not the same as what is there
        else:
            r, c = resolve_sizes(dims, **sizes)
        same = (r, c, selection) == (spec["rope_pairs"], spec["kv_dim"], spec["selection"]) and svd in ("auto", spec["svd"])
        if same and isinstance(ranking, FrequencyRanking) and spec.get("ranking"):
            same = ranking.config_hash == spec["ranking"]["config_hash"] and ranking.options == spec["ranking"]["options"]
        if same:
            if read_mode != spec_read_mode(spec):
                spec.pop("attention", None)  # the old key (a model converted before the rename)
                spec["read_mode"] = read_mode
                for module in model.modules():
                    if isinstance(module, EliteKVAttention):
                        module.read_mode = read_mode
            return EliteKVCache(model)
        stash = model.__dict__.get("_elitekv_original")
        if stash is None:
            target = f"an allocation at cache_ratio={ratio:g}" if r is None else f"rope_pairs={r}, kv_dim={c}"
            raise ValueError(
                f"compresskv.elitekv: this model is already converted (rope_pairs={spec['rope_pairs']}, "
                f"kv_dim={spec['kv_dim']}, selection={spec['selection']!r}, svd={spec['svd']!r}); converting it to "
                f"{target}, selection={selection!r}, svd={svd!r} needs the original weights: reload "
                "the model, or convert with keep_original=True so that compresskv can revert it first."
            )
        if ranking is None and texts is None:
            ranking = stash[2]
        opts["keep_original"] = True
        revert(model)
    if isinstance(ranking, (str, Path)):
        ranking = FrequencyRanking.from_pretrained(ranking, model)
    allocating = given is None and by_allocation and texts is not None
    calib = texts
    if allocating:
        from .allocation import split_windows

        try:
            calib, held = split_windows(texts, opts["tokenizer"], seq_len=opts["seq_len"], num_windows=opts["num_windows"])
        except ValueError as err:
            raise ValueError(f"{err}; or pass allocation=False to size by the fixed rule (no held-out text needed)") from None
    r, c = (given.rope_pairs, given.kv_dim) if given is not None else resolve_sizes(dims, **sizes)
    if selection in ("ropelite", "contribution") and ranking is None and (r < dims["head_dim"] // 2 or allocating):
        if texts is None:
            raise ValueError(
                f"compresskv.elitekv: selection={selection!r} needs a frequency ranking: pass ranking=... "
                "(compresskv.elitekv.rank_frequencies(model, texts, tokenizer=tok), or the path of a saved one) "
                "or calibration_texts=... with tokenizer=...; selection='uniform' needs no calibration."
            )
        ranking = rank_frequencies(
            model, calib, opts["tokenizer"], seq_len=opts["seq_len"], num_windows=opts["num_windows"],
            activation_stats=svd in ("auto", "activation"), progress=opts["progress"],
        )
    if allocating:
        from .allocation import allocate

        given = allocate(model, calib, eval_texts=held, cache_ratio=ratio, ranking=ranking, selection=selection,
                         svd=svd, seq_len=opts["seq_len"], num_windows=opts["num_windows"], progress=opts["progress"])
        r, c = given.rope_pairs, given.kv_dim
    opts.update(rope_pairs=r, kv_dim=c, cache_ratio=None, compression_ratio=None, ranking=ranking)
    convert(model, **opts)
    if given is not None:
        elitekv_spec(model)["allocation"] = {
            "cache_ratio": given.cache_ratio, "rope_pairs": r, "kv_dim": c, "ppl": given.ppl,
            "rule_rope_pairs": given.rule_rope_pairs,
        }
    return EliteKVCache(model)


def _asked_ratio(sizes: dict[str, Any]) -> float | None:
    """The fraction of the cache kept that ``sizes`` ask for (``None``: sized by ``kv_dim``)."""
    if sizes["cache_ratio"] is not None:
        return sizes["cache_ratio"]
    if isinstance(sizes["compression_ratio"], (int, float)) and not isinstance(sizes["compression_ratio"], bool):
        return 1.0 - float(sizes["compression_ratio"])
    return None


def _given_allocation(model: nn.Module, allocation: Any, sizes: dict[str, Any], ratio: float | None) -> Any:
    """The :class:`~compresskv.elitekv.Allocation` passed as ``allocation=`` (loaded from its path),
    checked against the model and the sizes asked; ``None`` for ``None`` / ``False``."""
    if allocation is None or allocation is False:
        return None
    from .allocation import Allocation

    if isinstance(allocation, (str, Path)):
        allocation = Allocation.from_pretrained(allocation, model)
    elif not isinstance(allocation, Allocation):
        raise ValueError(
            "compresskv.elitekv: allocation must be None (allocate when calibration_texts are given), False (the "
            f"fixed rule), an elitekv.Allocation or the path of a saved one; got {allocation!r}"
        )
    allocation.check_model(model)
    both = [k for k in ("rope_pairs", "kv_dim") if sizes[k] is not None]
    if both:
        raise ValueError(f"compresskv.elitekv: give allocation= or {' and '.join(both)}=, not both")
    if ratio is not None and abs(ratio - allocation.cache_ratio) > 1e-9:
        raise ValueError(
            f"compresskv.elitekv: allocation= was measured at cache_ratio={allocation.cache_ratio:g}, but "
            f"cache_ratio={ratio:g} was asked; leave the ratio out or allocate for it"
        )
    return allocation


def _refuse_renamed(options: dict[str, Any]) -> None:
    """The old ``attention=`` (renamed ``read_mode=``) and, for :func:`convert`, unknown options."""
    if "attention" in options:
        refuse_renamed_option("compresskv.elitekv", "attention", RENAMED_READ_MODES)
    other = sorted(k for k in options if k not in inspect.signature(convert).parameters)
    if other:
        raise TypeError(f"compresskv.elitekv: unexpected keyword argument(s) {other}.")


def _factory_signature() -> inspect.Signature:
    sig = inspect.signature(convert)
    params = [p for name, p in sig.parameters.items() if name not in _CONVERT_ONLY and p.kind is not p.VAR_KEYWORD]
    params.append(inspect.Parameter("allocation", inspect.Parameter.KEYWORD_ONLY, default=None))
    return sig.replace(parameters=params, return_annotation="EliteKVCache")


make_cache.__signature__ = _factory_signature()  # type: ignore[attr-defined]
#: old option names and what replaces them (``compresskv.make_cache``/``patch`` say so)
make_cache.renamed_options = {"attention": renamed_option("attention", RENAMED_READ_MODES)}  # type: ignore[attr-defined]
