"""Orthogonal low-rank projection of every key and value per KV head: MatryoshkaKV (trained
projections, allocated ranks) and its PCA baseline, with their calibration, training and rank
allocation."""

from .cache import MatryoshkaKVCache, PCAKVCache, ProjectedLayer, ProjectedStats
from .projections import Projections, allocate_ranks, calibrate, kept_fraction, train_projections

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
