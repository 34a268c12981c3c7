"""How ``compresskv bench`` builds each method at a compression ratio.

Most methods take ``compression_ratio`` directly. Three need calibration first, which the bench
does once per model and calibration text and keeps on disk (``$COMPRESSKV_CACHE/bench/...``):

- ``pca``: PCA projections of the keys and values (uniform ranks: the MatryoshkaKV paper's
  baseline);
- ``matryoshka``: those projections trained with the Matryoshka objective, then ranks allocated
  per (layer, head, K/V) for every asked ratio, as the paper publishes the method;
- ``elitekv``: the RoPElite frequency ranking with activation statistics; each ratio converts the
  model (keeping the original weights), and :meth:`MethodBuilder.release` reverts it, so that the
  ``DynamicCache`` baseline always runs the model as loaded.

Methods with no ``compression_ratio`` at all (``minicache``: its saving is fixed by its layer
pairing; ``int4``/``int8``) run once at their default settings, under the ratio
:data:`DEFAULT_SETTINGS`; the table and the plot then use the saving they measured.

A composition (``snapkv+int4``, ``snapkv+pca+int4``: stages joined by ``+``, resolved by
``compresskv.patching``) is a method like the others; one with a ``pca`` or ``matryoshka`` stage is
calibrated as that method is. Two bench-only baselines are not compresskv methods at all:
``quantizedcache_int4`` and ``quantizedcache_int2``, transformers' own ``QuantizedCache`` (quanto
backend) at its default settings, with the bytes of the tensors it really holds (:func:`quantized_cache`).

Calibration, training and allocation read disjoint token ranges of the calibration text, and the
text should not be the one the benchmark evaluates on.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Sequence

#: The ratio under which a method without ``compression_ratio`` is recorded.
DEFAULT_SETTINGS = -1.0
#: Methods that need a calibration text, and why (shown when none is given).
CALIBRATED = {
    "pca": "PCA projections",
    "matryoshka": "trained projections and rank allocations",
    "elitekv": "a RoPElite frequency ranking and activation-aware J-LRD",
}
#: Token budget of each calibration stage (windows x length), read from disjoint ranges.
CALIB_SEQ_LEN, CALIB_WINDOWS = 1024, 8
TRAIN_SEQ_LEN, TRAIN_STEPS = 512, 32
ALLOC_SEQ_LEN, ALLOC_WINDOWS = 512, 2


#: Bench-only baselines: transformers' ``QuantizedCache`` (quanto backend) at these bits.
BASELINES = {"quantizedcache_int4": 4, "quantizedcache_int2": 2}
#: Its settings: transformers' defaults (per-channel groups of 64, the last 128 tokens unquantized).
QUANTIZED_GROUP, QUANTIZED_RESIDUAL = 64, 128


def takes_ratio(method: str) -> bool:
    """Whether ``method`` (a registered name or a composition) has a ``compression_ratio`` option;
    the bench-only baselines (:data:`BASELINES`) have none."""
    from ..patching import method_options

    return method not in BASELINES and "compression_ratio" in method_options(method)


def calibration_need(method: str) -> str | None:
    """What ``method`` must calibrate (see :data:`CALIBRATED`), or ``None``: a composition needs
    what its ``pca`` or ``matryoshka`` stage needs."""
    needs = [CALIBRATED[part] for part in method.split("+") if part in CALIBRATED]
    return needs[0] if needs else None


def resolves(method: str) -> bool:
    """Whether ``compresskv.patching`` builds ``method`` (a registered name or a composition)."""
    try:
        _factory(method)
    except ValueError:
        return False
    return True


def quanto_missing() -> bool:
    """Whether optimum-quanto (the ``QuantizedCache`` baselines' backend) cannot be imported."""
    import importlib.util

    try:
        return importlib.util.find_spec("optimum.quanto") is None
    except (ImportError, ValueError):  # no ``optimum`` package at all
        return True


def qtensor_nbytes(tensor: Any) -> int:
    """Bytes of the plain tensors behind ``tensor``: a tensor subclass (optimum-quanto's quantized
    tensors, their packed data) is flattened recursively with ``__tensor_flatten__``; ``None`` is 0."""
    if tensor is None:
        return 0
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(qtensor_nbytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


@functools.cache
def _measured_quantized_cache() -> type:
    # Made on first use: importing transformers here would slow ``compresskv --help``.
    from transformers import QuantizedCache

    class MeasuredQuantizedCache(QuantizedCache):
        """transformers' ``QuantizedCache`` with ``nbytes()``: every tensor it holds, the quantized
        keys/values (data, scales, shifts) and the full-precision residual."""

        def nbytes(self) -> int:
            return sum(
                qtensor_nbytes(getattr(layer, name, None))
                for layer in self.layers
                for name in ("_quantized_keys", "_quantized_values", "keys", "values")
            )

    return MeasuredQuantizedCache


def quantized_cache(model: Any, nbits: int = 4, q_group_size: int = QUANTIZED_GROUP,
                    residual_length: int = QUANTIZED_RESIDUAL) -> Any:
    """transformers' ``QuantizedCache(backend="quanto")`` for ``model`` (KIVI-style: per-channel
    groups, the newest ``residual_length`` tokens kept in full precision), with an ``nbytes()`` that
    sums the tensors it holds, so the bench measures it as any other cache. The keyword arguments
    are the same from transformers 5.4 on. Needs optimum-quanto."""
    if nbits not in (2, 4):
        raise ValueError(f"quantized_cache: nbits must be 2 or 4 (quanto's integer types), got {nbits!r}")
    return _measured_quantized_cache()(backend="quanto", config=model.config, nbits=nbits,
                                       q_group_size=q_group_size, residual_length=residual_length)


def ratio_label(ratio: float) -> str:
    """How a ratio is shown: ``"default"`` for :data:`DEFAULT_SETTINGS`, else ``f"{ratio:g}"``."""
    return "default" if ratio == DEFAULT_SETTINGS else f"{ratio:g}"


class MethodBuilder:
    """Builds ``(method, ratio)`` caches for one model, calibrating lazily and once.

    Args:
        model: the model (an EliteKV conversion happens in place and is undone by :meth:`release`).
        tokenizer: its tokenizer (for the calibration text).
        calibration: a text file or ``hf:NAME[:CONFIG[:SPLIT]]`` (see
            :func:`compresskv.eval.load_text`), or ``None`` (calibrated methods then raise).
        ratios: every compression ratio that will be asked (Matryoshka allocates ranks for all of
            them at once).
        work_dir: where artifacts are kept (default ``$COMPRESSKV_CACHE/bench``).
        log: where progress notes go.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        calibration: str | None = None,
        ratios: Sequence[float] = (),
        work_dir: Path | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        from ..models import cache_root

        self.model, self.tokenizer, self.calibration = model, tokenizer, calibration
        self.ratios = sorted({float(r) for r in ratios if r != DEFAULT_SETTINGS})
        self.work_dir = Path(work_dir) if work_dir is not None else cache_root() / "bench"
        self.log = log
        self._ids: list[int] | None = None
        self._text_hash: str | None = None
        self._artifacts: dict[str, Any] = {}

    # -- what each method needs ----------------------------------------------------------------
    def ratios_for(self, method: str, ratios: Sequence[float]) -> list[float]:
        """The ratios ``method`` is run at: the asked ones, or :data:`DEFAULT_SETTINGS` alone."""
        return [float(r) for r in ratios] if takes_ratio(method) else [DEFAULT_SETTINGS]

    def unusable(self, method: str) -> str | None:
        """Why ``method`` cannot be benchmarked here, or ``None`` when it can."""
        from ..patching import available_methods

        if method in BASELINES:
            return "needs optimum-quanto (pip install optimum-quanto)" if quanto_missing() else None
        if not resolves(method):
            return (f"not a registered method or composition (available: {available_methods()}, "
                    f"compositions joined by '+', and {sorted(BASELINES)})")
        need = calibration_need(method)
        if need and not self.calibration:
            return f"needs {need}: give a calibration text (--calibration FILE)"
        return None

    def source(self, method: str) -> str | None:
        """What a method's rows depend on beyond the model and the task (part of the row key)."""
        return f"calibration={self.calibration}" if calibration_need(method) else None

    # -- building ------------------------------------------------------------------------------
    def build(self, method: str, ratio: float, **options: Any) -> Any:
        """A fresh cache for ``method`` at ``ratio`` (:data:`DEFAULT_SETTINGS`: its defaults), with
        the cache's further ``options`` (e.g. ``decode_tokens=``)."""
        from ..patching import make_cache

        if method in BASELINES:
            if ratio != DEFAULT_SETTINGS or options:
                raise ValueError(f"compresskv bench: {method!r} runs at its default settings only; got ratio "
                                 f"{ratio_label(ratio)} and options {sorted(options)}")
            self.release()  # transformers' own cache, on the model as loaded
            return quantized_cache(self.model, nbits=BASELINES[method])
        if ratio == DEFAULT_SETTINGS:
            if "remainder" in inspect.signature(_factory(method)).parameters:
                options["remainder"] = "last_group"  # any layer count, not only a multiple of the group
            return make_cache(self.model, method, **options)
        why = self.unusable(method)
        if why:
            raise ValueError(f"compresskv bench: {method!r} {why}")
        parts = method.split("+")
        if "pca" in parts:  # "pca" or a composition with a PCA stage
            return make_cache(self.model, method, projections=self._pca(), compression_ratio=ratio, **options)
        if "matryoshka" in parts:
            return make_cache(self.model, method, projections=self._trained(), compression_ratio=ratio, **options)
        if method == "elitekv":
            return make_cache(
                self.model, "elitekv", compression_ratio=ratio, ranking=self._ranking(),
                calibration_texts=self._windows("calib"), seq_len=CALIB_SEQ_LEN, num_windows=CALIB_WINDOWS,
                keep_original=True, **options,
            )
        return make_cache(self.model, method, compression_ratio=ratio, **options)

    def release(self) -> None:
        """Give the model back as loaded (reverts an EliteKV conversion; uninstalls compresskv's
        attention)."""
        from ..core.attention import uninstall
        from ..elitekv import is_converted, revert

        if is_converted(self.model):
            revert(self.model)
        uninstall(self.model)

    # -- calibration artifacts -----------------------------------------------------------------
    def _token_ids(self) -> list[int]:
        if self._ids is None:
            from .perplexity import load_text, tokenize_text

            need = CALIB_SEQ_LEN * CALIB_WINDOWS + TRAIN_SEQ_LEN * TRAIN_STEPS + ALLOC_SEQ_LEN * ALLOC_WINDOWS
            ids = tokenize_text(self.tokenizer, load_text(self.calibration, min_chars=need * 8))  # type: ignore[arg-type]
            if len(ids) < need:
                raise ValueError(
                    f"compresskv bench: the calibration text {self.calibration!r} has {len(ids)} tokens; "
                    f"calibration, training and rank allocation need {need}."
                )
            self._ids = ids
        return self._ids

    def _windows(self, stage: str) -> list[list[int]]:
        """Disjoint token windows: ``calib`` (PCA, RoPElite, J-LRD), ``train``, ``alloc``."""
        ids = self._token_ids()
        sizes = {"calib": (CALIB_SEQ_LEN, CALIB_WINDOWS), "train": (TRAIN_SEQ_LEN, TRAIN_STEPS),
                 "alloc": (ALLOC_SEQ_LEN, ALLOC_WINDOWS)}
        start = 0
        for name, (length, count) in sizes.items():
            if name == stage:
                return [ids[start + i * length : start + (i + 1) * length] for i in range(count)]
            start += length * count
        raise KeyError(stage)

    def _dir(self, name: str) -> Path:
        from ..calibration import config_hash

        if self._text_hash is None:
            self._text_hash = hashlib.sha256(json.dumps(self._token_ids()).encode()).hexdigest()[:12]
        return self.work_dir / f"{config_hash(self.model)}-{self._text_hash}" / name

    def _cached(self, name: str, kind: Any, make: Callable[[], Any]) -> Any:
        if name in self._artifacts:
            return self._artifacts[name]
        path = self._dir(name)
        if (path / "meta.json").exists():
            self.log(f"bench: reusing {name} from {path}")
            artifact = kind.from_pretrained(path, self.model)
        else:
            self.log(f"bench: computing {name} on {self.calibration} (kept in {path})")
            artifact = make()
            artifact.save_pretrained(path)
        self._artifacts[name] = artifact
        return artifact

    def _pca(self) -> Any:
        from ..projected import Projections, calibrate

        return self._cached("pca", Projections, lambda: calibrate(
            self.model, self._windows("calib"), seq_len=CALIB_SEQ_LEN, batch_size=1))

    def _trained(self) -> Any:
        from ..projected import Projections, allocate_ranks, train_projections

        trained = self._cached("matryoshka", Projections, lambda: train_projections(
            self.model, self._pca(), self._windows("train"), steps=TRAIN_STEPS, seq_len=TRAIN_SEQ_LEN))
        missing = [r for r in self.ratios if 0.0 < r < 1.0 and trained.allocation(compression_ratio=r) is None]
        if missing:
            self.log(f"bench: allocating Matryoshka ranks for compression ratios {[round(r, 4) for r in missing]}")
            allocate_ranks(self.model, trained, self._windows("alloc"), compression_ratio=missing,
                           seq_len=ALLOC_SEQ_LEN, max_windows=ALLOC_WINDOWS)
            trained.save_pretrained(self._dir("matryoshka"))
        return trained

    def _ranking(self) -> Any:
        from ..elitekv import FrequencyRanking, rank_frequencies

        return self._cached("ropelite", FrequencyRanking, lambda: rank_frequencies(
            self.model, self._windows("calib"), seq_len=CALIB_SEQ_LEN, num_windows=CALIB_WINDOWS,
            activation_stats=True))


def _factory(method: str) -> Any:
    from ..patching import _factory as registered

    return registered(method)
