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
pairing) run once at their default settings, under the ratio :data:`DEFAULT_SETTINGS`; the table
and the plot then use the saving they measured.

Calibration, training and allocation read disjoint token ranges of the calibration text, and the
text should not be the one the benchmark evaluates on.
"""

from __future__ import annotations

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


def takes_ratio(method: str) -> bool:
    """Whether ``method`` (a registered name) has a ``compression_ratio`` option."""
    from ..patching import method_options

    return "compression_ratio" in method_options(method)


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

        if method not in available_methods():
            return f"not a registered method (available: {available_methods()})"
        if method in CALIBRATED and not self.calibration:
            return f"needs {CALIBRATED[method]}: give a calibration text (--calibration FILE)"
        return None

    def source(self, method: str) -> str | None:
        """What a method's rows depend on beyond the model and the task (part of the row key)."""
        return f"calibration={self.calibration}" if method in CALIBRATED else None

    # -- building ------------------------------------------------------------------------------
    def build(self, method: str, ratio: float, **options: Any) -> Any:
        """A fresh cache for ``method`` at ``ratio`` (:data:`DEFAULT_SETTINGS`: its defaults), with
        the cache's further ``options`` (e.g. ``decode_tokens=``)."""
        from ..patching import make_cache

        if ratio == DEFAULT_SETTINGS:
            if "remainder" in inspect.signature(_factory(method)).parameters:
                options["remainder"] = "last_group"  # any layer count, not only a multiple of the group
            return make_cache(self.model, method, **options)
        why = self.unusable(method)
        if why:
            raise ValueError(f"compresskv bench: {method!r} {why}")
        if method == "pca":
            return make_cache(self.model, "pca", projections=self._pca(), compression_ratio=ratio, **options)
        if method == "matryoshka":
            return make_cache(self.model, "matryoshka", projections=self._trained(), compression_ratio=ratio, **options)
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
