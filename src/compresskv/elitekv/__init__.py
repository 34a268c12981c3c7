"""EliteKV (arXiv 2503.01586): RoPElite frequency selection, joint low-rank K/V (J-LRD), a real
latent cache, uptraining.

One call (ranks on your text, converts, and makes ``generate()`` use the latent cache)::

    compresskv.patch(model, "elitekv", cache_ratio=0.25, calibration_texts=texts, tokenizer=tok)

or step by step::

    from compresskv import elitekv
    ranking = elitekv.rank_frequencies(model, texts, tokenizer=tok)      # RoPElite (+ baselines)
    elitekv.convert(model, rope_pairs=6, kv_dim=60, ranking=ranking)      # J-LRD, in place
    elitekv.uptrain(model, texts, teacher=original, tokenizer=tok, steps=200)
    model.save_pretrained("converted"); model = elitekv.load_converted("converted")

A conversion changes the model's weights and class: ``compresskv.unpatch`` does not undo it (only
:func:`revert` does, for a model converted with ``keep_original=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..core.cache import refuse_mla
from .cache import EliteKVCache, EliteKVLayer, elitekv_spec
from .jlrd import (
    ATTENTION_MODES,
    SVD_MODES,
    EliteKVAttention,
    additive_mask,
    conversion_info,
    convert,
    converted_class,
    default_rope_pairs,
    factorize,
    joint_rank,
    jlrd_weights,
    load_converted,
    resolve_sizes,
    revert,
)
from .ranking import SELECTIONS, FrequencyRanking, input_moments, rank_frequencies, select_pairs
from ..core.facts import model_dims
from .support import SUPPORTED_FAMILIES, check_supported, is_converted
from .uptrain import UptrainConfig, uptrain


def make_cache(
    model: torch.nn.Module,
    rope_pairs: int | None = None,
    kv_dim: int | None = None,
    cache_ratio: float | None = None,
    compression_ratio: float | None = None,
    ranking: Any = None,
    selection: str = "ropelite",
    svd: str = "auto",
    calibration_texts: Any = None,
    tokenizer: Any = None,
    seq_len: int = 1024,
    num_windows: int = 8,
    attention: str = "auto",
    keep_original: bool = False,
    progress: bool = True,
) -> EliteKVCache:
    """The ``compresskv.patch(model, "elitekv", ...)`` factory: ranks (when a ranked selection has no
    ``ranking`` but has ``calibration_texts``), converts ``model`` in place (once), and returns a
    fresh :class:`EliteKVCache`.

    Sizes: ``kv_dim`` or ``cache_ratio`` (fraction of the original cache kept) or
    ``compression_ratio`` (= 1 − cache_ratio), with ``rope_pairs`` (default: about 3/8 of the
    budget goes to the rotated key dims; ``compression_ratio=0`` keeps every pair and the full joint
    rank, the original attention exactly, and needs no ranking). ``svd="auto"``: activation-aware J-LRD when calibration
    data is at hand (``calibration_texts``, or a ranking with activation statistics), else the
    paper's weight-only SVD. On an already converted model: no size options, or the same
    ones, just give a new cache; other sizes re-convert from the original weights when the model was
    converted with ``keep_original=True`` and raise otherwise.
    """
    refuse_mla(model, "compresskv.elitekv")
    dims = model_dims(model)
    sized = any(v is not None for v in (rope_pairs, kv_dim, cache_ratio, compression_ratio))
    if is_converted(model):
        if not sized:
            return EliteKVCache(model)
        spec = elitekv_spec(model)
        r, c = resolve_sizes(dims, rope_pairs, kv_dim, cache_ratio, compression_ratio)
        same = (r, c, selection) == (spec["rope_pairs"], spec["kv_dim"], spec["selection"]) and svd in ("auto", spec["svd"])
        if same and isinstance(ranking, FrequencyRanking) and spec.get("ranking"):
            same = ranking.config_hash == spec["ranking"]["config_hash"] and ranking.options == spec["ranking"]["options"]
        if same:
            if attention != spec.get("attention", "auto"):
                spec["attention"] = attention
                for module in model.modules():
                    if isinstance(module, EliteKVAttention):
                        module.attention_mode = attention
            return EliteKVCache(model)
        stash = model.__dict__.get("_elitekv_original")
        if stash is None:
            raise ValueError(
                f"compresskv.elitekv: this model is already converted (rope_pairs={spec['rope_pairs']}, "
                f"kv_dim={spec['kv_dim']}, selection={spec['selection']!r}, svd={spec['svd']!r}); converting it to "
                f"rope_pairs={r}, kv_dim={c}, selection={selection!r}, svd={svd!r} needs the original weights: reload "
                "the model, or convert with keep_original=True so that compresskv can revert it first."
            )
        if ranking is None and calibration_texts is None:
            ranking = stash[2]
        keep_original = True
        revert(model)
    r, c = resolve_sizes(dims, rope_pairs, kv_dim, cache_ratio, compression_ratio)
    if isinstance(ranking, (str, Path)):
        ranking = FrequencyRanking.from_pretrained(ranking, model)
    if selection in ("ropelite", "contribution") and ranking is None and r < dims["head_dim"] // 2:
        if calibration_texts is None:
            raise ValueError(
                f"compresskv.elitekv: selection={selection!r} needs a frequency ranking: pass ranking=... "
                "(compresskv.elitekv.rank_frequencies(model, texts, tokenizer=tok), or the path of a saved one) "
                "or calibration_texts=... with tokenizer=...; selection='uniform' needs no calibration."
            )
        ranking = rank_frequencies(
            model, calibration_texts, tokenizer, seq_len=seq_len, num_windows=num_windows,
            activation_stats=svd in ("auto", "activation"), progress=progress,
        )
    convert(
        model, r, c, ranking=ranking, selection=selection, svd=svd, calibration_texts=calibration_texts,
        tokenizer=tokenizer, seq_len=seq_len, num_windows=num_windows, attention=attention,
        keep_original=keep_original, progress=progress,
    )
    return EliteKVCache(model)


__all__ = [
    "ATTENTION_MODES",
    "SELECTIONS",
    "SUPPORTED_FAMILIES",
    "SVD_MODES",
    "EliteKVAttention",
    "EliteKVCache",
    "EliteKVLayer",
    "FrequencyRanking",
    "UptrainConfig",
    "additive_mask",
    "check_supported",
    "conversion_info",
    "convert",
    "converted_class",
    "default_rope_pairs",
    "factorize",
    "input_moments",
    "is_converted",
    "jlrd_weights",
    "joint_rank",
    "load_converted",
    "make_cache",
    "model_dims",
    "rank_frequencies",
    "resolve_sizes",
    "revert",
    "select_pairs",
    "uptrain",
]
