"""The former home of J-LRD, the EliteKV attention and conversion, now split into
:mod:`.factorization` (sizes, J-LRD weights), :mod:`.attention` (:class:`EliteKVAttention`) and
:mod:`.conversion` (the converted model class, convert/revert/load, the patch factory). Kept so that
``from compresskv.elitekv import jlrd`` still finds these names; import them from
:mod:`compresskv.elitekv` instead.
"""

from __future__ import annotations

from torch import nn  # noqa: F401  (jlrd.nn.functional is patched by tests)

from .attention import ATTENTION_MODES, EliteKVAttention, additive_mask  # noqa: F401
from .conversion import FORMAT, conversion_info, convert, converted_class, load_converted, revert  # noqa: F401
from .factorization import (  # noqa: F401
    SVD_MODES,
    check_sizes,
    default_rope_pairs,
    factorize,
    jlrd_weights,
    joint_rank,
    resolve_sizes,
)
