"""Orthogonal low-rank projection of every key and value per KV head: MatryoshkaKV (trained
projections, allocated ranks) and its PCA baseline, with their calibration, training and rank
allocation.

Modules: :mod:`.projections` (the :class:`Projections` artifact, :func:`kept_fraction`, rank and
ratio checks), :mod:`.pca` (:func:`calibrate`), :mod:`.training` (:func:`train_projections`),
:mod:`.allocation` (:func:`allocate_ranks`), :mod:`.taps` (what those three share), :mod:`.cache`
(:class:`ProjectedLayer`: storage and the read paths) and :mod:`.caches` (the two caches).
How much is compressed is always a ``compression_ratio``: the fraction of the full cache removed."""

from .allocation import allocate_ranks
from .cache import ProjectedLayer
from .caches import MatryoshkaKVCache, PCAKVCache, ProjectedStats
from .pca import calibrate
from .projections import Projections, kept_fraction
from .training import train_projections

__all__ = [
    "MatryoshkaKVCache",
    "PCAKVCache",
    "ProjectedLayer",
    "ProjectedStats",
    "Projections",
    "allocate_ranks",
    "calibrate",
    "kept_fraction",
    "train_projections",
]
