"""EliteKV (arXiv 2503.01586): RoPElite frequency selection, joint low-rank K/V (J-LRD), a real
latent cache, uptraining.

One call (ranks on your text, converts, and makes ``generate()`` use the latent cache):

```python
compresskv.patch(model, "elitekv", cache_ratio=0.25, calibration_texts=texts, tokenizer=tok)
```

or step by step:

```python
from compresskv import elitekv
ranking = elitekv.rank_frequencies(model, texts, tokenizer=tok)      # RoPElite (+ baselines)
allocation = elitekv.allocate(model, texts, cache_ratio=0.25, tokenizer=tok, ranking=ranking, eval_texts=other)
elitekv.convert(model, rope_pairs=allocation.rope_pairs, kv_dim=allocation.kv_dim, ranking=ranking)  # J-LRD
elitekv.uptrain(model, texts, teacher=original, tokenizer=tok, steps=200)
model.save_pretrained("converted"); model = elitekv.load_converted("converted")
```

A conversion changes the model's weights and class: ``compresskv.unpatch`` does not undo it (only
:func:`revert` does, for a model converted with ``keep_original=True``).
"""

from __future__ import annotations

from ..core.facts import model_dims
from .allocation import Allocation, allocate
from .attention import READ_MODES, EliteKVAttention, additive_mask
from .cache import EliteKVCache, EliteKVLayer, elitekv_spec
from .conversion import conversion_info, convert, converted_class, load_converted, make_cache, revert
from .factorization import SVD_MODES, default_rope_pairs, factorize, jlrd_weights, joint_rank, resolve_sizes
from .ranking import SELECTIONS, FrequencyRanking, input_moments, rank_frequencies, select_pairs
from .support import SUPPORTED_FAMILIES, check_supported, is_converted
from .uptrain import UptrainConfig, uptrain

__all__ = [
    "READ_MODES",
    "SELECTIONS",
    "SUPPORTED_FAMILIES",
    "SVD_MODES",
    "Allocation",
    "EliteKVAttention",
    "EliteKVCache",
    "EliteKVLayer",
    "FrequencyRanking",
    "UptrainConfig",
    "additive_mask",
    "allocate",
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
