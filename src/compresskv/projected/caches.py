"""The MatryoshkaKV and PCA caches (arXiv 2410.14731): a :class:`~compresskv.core.cache.CompressedCache`
whose full-attention layers are :class:`~.cache.ProjectedLayer`, with ranks resolved from a
``compression_ratio`` (stored allocation or uniform), one ``rank`` or explicit ``ranks``. PCA
calibrates on the fly when given texts instead of projections."""

from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.cache import CacheStats, CompressedCache, KVLayer
from ..core.facts import refuse_mla
from ..core.readmode import check_read_mode, refuse_renamed_option, renamed_option
from .cache import READ_MODES, RENAMED_READ_MODES, ProjectedLayer
from .pca import calibrate
from .projections import Projections, kept_fraction, refuse_removed


@dataclass
class ProjectedStats(CacheStats):
    """:class:`CacheStats` plus the ranks of every compressed layer (``None`` elsewhere)."""

    read_mode: str = "latent"
    rank_source: str = ""
    ranks_k: list[list[int] | None] = field(default_factory=list)
    ranks_v: list[list[int] | None] = field(default_factory=list)


class MatryoshkaKVCache(CompressedCache):
    """MatryoshkaKV: every token's key and value stored as per-KV-head orthogonal projections.

    Args:
        model: the transformers model (its attention is switched to compresskv's).
        projections: :class:`compresskv.Projections` for this model (``compresskv.calibrate``,
            then optionally ``compresskv.train_projections`` and ``compresskv.allocate_ranks``).
        compression_ratio: fraction of the full cache removed, in [0, 1) (0: full rank): the ranks
            allocated for it when the projections store an allocation for this ratio (and
            ``use_allocation``), otherwise ``round((1 − compression_ratio)·head_dim)`` for every
            head. Keyword-only; the old ``budget=`` (fraction kept) is refused with a
            ``TypeError``: pass ``compression_ratio=1 - budget``.
        rank: instead, one rank in [1, head_dim] for every head's keys and values.
        ranks: instead, ``(ranks_k, ranks_v)``, each ``[layers][kv_heads]``.
        read_mode: how the stored tokens are read (:data:`compresskv.core.readmode.READ_MODES`):
            ``"latent"`` (attention in the projected space; on CUDA through fused kernels where
            they take the shapes), ``"latent_explicit"`` (the same, always by explicit logits and
            softmax: the reference) or ``"model"`` (rebuild the full keys and values on every read
            and run the model's attention). The old ``mode=`` (``"projected"``,
            ``"projected_explicit"``, ``"reconstruct"``) is refused, naming the new spelling.
        use_allocation: ``False`` ignores a stored allocation (uniform ranks for ``compression_ratio``).
        sink_tokens: also keep each row's first ``sink_tokens`` real prompt tokens at full
            precision (an extension, off by default as in the paper: the first token is an
            attention sink whose key and value a low-rank projection fitted to ordinary tokens
            loses, and most heads attend to it heavily). Costs ``sink_tokens·2·d`` values per head.
        decode_tokens: room for that many decoded tokens, made right after the prompt is stored,
            for static, compileable decoding (``torch.compile`` / ``generate(compile_config=...)``;
            see :mod:`compresskv.core.decode`); ``None`` (default): room grown as needed. Not with
            ``read_mode="model"``.
    """

    method = "matryoshka"

    #: old option names and what replaces them (``make_cache``/``patch`` say so)
    renamed_options = {
        **{old: "compression_ratio (the fraction removed: compression_ratio = 1 - budget)" for old in ("budget", "budgets")},
        "mode": renamed_option("mode", RENAMED_READ_MODES),
    }

    def __init__(
        self,
        model: torch.nn.Module,
        projections: Projections | None = None,
        *args: Any,
        compression_ratio: float | None = None,
        rank: int | None = None,
        ranks: Any = None,
        read_mode: str = "latent",
        use_allocation: bool = True,
        sink_tokens: int = 0,
        decode_tokens: int | None = None,
        **removed: Any,
    ) -> None:
        who = type(self).__name__
        if "mode" in removed:
            refuse_renamed_option(who, "mode", RENAMED_READ_MODES)
        refuse_removed(who, args, removed)
        refuse_mla(model, who)
        if not isinstance(projections, Projections):
            raise ValueError(
                f"{who}: needs projections= (compresskv.calibrate(model, texts, tokenizer=tok), optionally "
                f"trained with compresskv.train_projections); got {type(projections).__name__}."
            )
        check_read_mode(who, read_mode, READ_MODES, RENAMED_READ_MODES)
        if isinstance(sink_tokens, bool) or not isinstance(sink_tokens, int) or sink_tokens < 0:
            raise ValueError(f"{who}: sink_tokens must be an int >= 0, got {sink_tokens!r}.")
        self.sink_tokens = sink_tokens
        if decode_tokens is not None and read_mode == "model":
            raise ValueError(f"{who}: decode_tokens= (static decoding) reads in the projected space; "
                             "use read_mode='latent' or 'latent_explicit', not 'model'.")
        self.decode_tokens = decode_tokens  # checked by CompressedCache
        projections.check_model(model)
        rk, rv, source = projections.resolve_ranks(compression_ratio, rank, ranks, use_allocation, who)
        self.projections, self.read_mode = projections, read_mode
        self.ranks_k, self.ranks_v, self.rank_source = rk, rv, source
        super().__init__(model)

    def make_layer(self, index: int, n_full: int) -> KVLayer:
        return ProjectedLayer(self, self.full_layers[index])

    def load_prefill(self, cache: Any) -> "MatryoshkaKVCache":
        """Store, projected, what an uncompressed cache holds (e.g. a ``DynamicCache`` after a
        prefill without padding) and return ``self``.

        Since prefill attention runs on the full keys and values, this leaves exactly the state a
        prefill through this cache would, without running the model again: one prefill can then
        serve several compression ratios or modes (the benchmark does this). The source is not modified.
        """
        if any(isinstance(layer, ProjectedLayer) and layer.is_initialized for layer in self.layers):
            raise ValueError("load_prefill: this cache already holds tokens; use a fresh cache.")
        if len(cache.layers) != len(self.layers):
            raise ValueError(
                f"load_prefill: the source cache has {len(cache.layers)} layers, this one {len(self.layers)}."
            )
        for i, (layer, source) in enumerate(zip(self.layers, cache.layers)):
            if not isinstance(layer, ProjectedLayer):
                self.layers[i] = copy.deepcopy(source)
                continue
            keys, values = getattr(source, "keys", None), getattr(source, "values", None)
            if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[-2] == 0:
                raise ValueError(f"load_prefill: layer {i} of the source cache holds no [batch, heads, tokens, dim] keys.")
            if keys.shape[1] != self.num_kv_heads or keys.shape[-1] != self.head_dim:
                raise ValueError(
                    f"load_prefill: layer {i} holds keys of shape {tuple(keys.shape)}; this cache is for "
                    f"{self.num_kv_heads} KV heads of dim {self.head_dim}."
                )
            layer.lazy_initialization(keys, values)
            if layer.sink_tokens:
                layer._keep_sinks(keys, values, None)
            layer._store(*layer.centre(keys, values))
            layer.seen = keys.shape[-2]
            layer.stored_before = 0
            layer.prefilled = True
        return self

    # -- measurement ----------------------------------------------------------------------------
    def kept_fraction(self) -> float:
        """Fraction of the full per-token cache the ranks keep, over the compressed layers."""
        return kept_fraction(self.ranks_k, self.ranks_v, self.head_dim, self.full_layers)

    def stats(self) -> ProjectedStats:
        projected = [isinstance(layer, ProjectedLayer) for layer in self.layers]
        return ProjectedStats(
            **self.stats_fields(),
            read_mode=self.read_mode,
            rank_source=self.rank_source,
            ranks_k=[list(layer.ranks_k) if p else None for layer, p in zip(self.layers, projected)],
            ranks_v=[list(layer.ranks_v) if p else None for layer, p in zip(self.layers, projected)],
        )


# -- PCA (calibrated on the fly when given texts) -----------------------------------------------------
_calibrated: "weakref.WeakKeyDictionary[torch.nn.Module, dict[Any, Projections]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _texts_key(texts: Any) -> Any:
    if isinstance(texts, torch.Tensor):
        return ("tensor", tuple(texts.shape), hash(texts.cpu().numpy().tobytes()))
    if isinstance(texts, str):
        return ("str", hash(texts))
    try:
        return ("seq", hash(tuple(t if isinstance(t, str) else tuple(t) for t in texts)))
    except TypeError:
        return ("id", id(texts))


def _calibrated_for(model: torch.nn.Module, texts: Any, tokenizer: Any, seq_len: int, max_windows: int | None) -> Projections:
    """PCA projections of ``model`` on ``texts``, computed once per model and texts."""
    key = (_texts_key(texts), seq_len, max_windows)
    with _lock:
        per_model = _calibrated.setdefault(model, {})
        if key not in per_model:
            per_model[key] = calibrate(model, texts, tokenizer=tokenizer, seq_len=seq_len, max_windows=max_windows,
                                       progress=False)
        return per_model[key]


class PCAKVCache(MatryoshkaKVCache):
    """Plain PCA projections (MatryoshkaKV's initialisation, untrained) in a projected cache.

    Without ``projections=``, the cache calibrates on the fly on ``texts`` (computed once per
    model and texts). Every other option is :class:`MatryoshkaKVCache`'s, forwarded as is.

    Args:
        model: the transformers model (its attention is switched to compresskv's).
        projections: PCA :class:`compresskv.Projections` (trained ones are refused: use
            :class:`MatryoshkaKVCache`); ``None`` to calibrate on ``texts``.
        texts: calibration text for on-the-fly PCA (strings with ``tokenizer=``, or token ids).
        tokenizer: needed when ``texts`` are strings.
        seq_len: calibration window length.
        max_windows: calibration windows used at most.
        **kwargs: :class:`MatryoshkaKVCache`'s options: ``compression_ratio`` (fraction of the full
            cache removed, in [0, 1): stored allocation or uniform ranks; ``budget=``, the fraction
            kept, is refused: ``compression_ratio=1 - budget``), or instead ``rank`` (one rank in
            [1, head_dim] for every head) or ``ranks`` (``(ranks_k, ranks_v)``, each
            ``[layers][kv_heads]``); ``read_mode`` (``"latent"`` (default), ``"latent_explicit"``
            or ``"model"``; ``mode=`` is refused); ``use_allocation`` (``False`` ignores a stored
            allocation); ``sink_tokens`` (each row's first prompt tokens also kept at full precision);
            ``decode_tokens`` (room for static, compileable decoding).
    """

    method = "pca"

    def __init__(
        self,
        model: torch.nn.Module,
        projections: Projections | None = None,
        *args: Any,
        texts: Any = None,
        tokenizer: Any = None,
        seq_len: int = 512,
        max_windows: int | None = 32,
        **kwargs: Any,
    ) -> None:
        refuse_removed(type(self).__name__, args, {k: v for k, v in kwargs.items() if k in ("budget", "budgets")})
        if "mode" in kwargs:  # before calibrating
            refuse_renamed_option(type(self).__name__, "mode", RENAMED_READ_MODES)
        refuse_mla(model, type(self).__name__)  # before calibrating on it
        if projections is None:
            if texts is None:
                raise ValueError(
                    "PCAKVCache: needs projections= (compresskv.calibrate(model, texts, tokenizer=tok)) or "
                    "calibration texts= (strings with tokenizer=, or token ids) to calibrate on the fly "
                    "(`compresskv bench --calibration FILE` does this for you)."
                )
            projections = _calibrated_for(model, texts, tokenizer, seq_len, max_windows)
        elif isinstance(projections, Projections) and projections.method != "pca":
            raise ValueError(
                f"PCAKVCache: these projections are {projections.method!r}, not plain PCA; use "
                "MatryoshkaKVCache (method 'matryoshka') for trained projections."
            )
        super().__init__(model, projections, **kwargs)
