"""MatryoshkaKV (arXiv 2410.14731): the :class:`Projections` artifact, orthogonal per-head
projections of keys and values, and the rank checks every caller shares.

Per layer and KV head the method keeps two orthogonal ``head_dim × head_dim`` matrices
``U_k``, ``U_v`` (columns by decreasing importance) and means ``μ_k``, ``μ_v``. A cache of rank
``r`` stores ``(k − μ_k)·U_k[:, :r]`` and ``(v − μ_v)·U_v[:, :r]`` per token
(:class:`compresskv.MatryoshkaKVCache`). They are made by :func:`compresskv.calibrate` (PCA,
:mod:`.pca`), refined by :func:`compresskv.train_projections` (:mod:`.training`) and given rank
allocations by :func:`compresskv.allocate_ranks` (:mod:`.allocation`); all three work on any model
whose attention modules call the cache's ``update`` (Llama, Mistral, Qwen2, Qwen3, ...).

How much is compressed is a ``compression_ratio``: the fraction of the full cache removed, in
[0, 1) (0: full rank). Stored allocations keep the key they always had, the fraction kept
(``ranks_k@0.75`` is the allocation for ``compression_ratio=0.25``), so artifacts saved by every
version load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..calibration import Artifact, model_name
from ..core.facts import model_dims

KIND = "matryoshka_projections"
_TENSORS = ("U_k", "U_v", "mu_k", "mu_v")


def _kept_key(compression_ratio: float) -> str:
    """The stored allocation key of ``compression_ratio``: the fraction kept, ``1 − ratio``."""
    return f"{1.0 - float(compression_ratio):.6g}"


def _ratio_of_key(key: Any) -> float:
    return float(f"{1.0 - float(key):.6g}")


def _ratio_text(compression_ratio: float) -> str:
    return f"{float(compression_ratio):.6g}"


def check_ratio(compression_ratio: Any, who: str) -> float:
    """``compression_ratio`` as a float in [0, 1), or a ``ValueError`` saying what it means."""
    if (isinstance(compression_ratio, bool) or not isinstance(compression_ratio, (int, float))
            or not 0.0 <= float(compression_ratio) < 1.0):
        raise ValueError(
            f"{who}: compression_ratio is the fraction of the full cache removed and must be in [0, 1) "
            f"(0: full rank), got {compression_ratio!r}."
        )
    return float(compression_ratio)


#: Spellings of earlier versions: the fraction of the cache *kept*.
REMOVED = {"budget": "compression_ratio", "budgets": "compression_ratio"}


def refuse_removed(who: str, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
                   positional: str = "compression_ratio") -> None:
    """Raise a ``TypeError`` for the old ``budget=`` / ``budgets=`` spellings (or for a positional
    value where one used to be a budget), naming ``compression_ratio`` and how to convert."""
    kwargs = kwargs or {}
    old = [name for name in kwargs if name in REMOVED]
    if old:
        raise TypeError(
            f"{who}: {old[0]}= (the fraction of the cache kept) was renamed compression_ratio= (the fraction "
            f"removed): pass compression_ratio=1 - {old[0]}, e.g. budget=0.75 -> compression_ratio=0.25."
        )
    if kwargs:
        raise TypeError(f"{who}: unexpected keyword argument(s) {sorted(kwargs)}.")
    if args:
        raise TypeError(
            f"{who}: {positional} is keyword-only (earlier versions took the fraction of the cache kept, "
            f"budget, here): pass {positional}=1 - budget, e.g. {positional}=0.25 to keep 75%."
        )


# -- the artifact --------------------------------------------------------------------------------
class Projections(Artifact):
    """Per-(layer, KV head) orthogonal projections and means, plus any rank allocations.

    Tensors (fp32): ``U_k``, ``U_v`` ``[layers, kv_heads, d, d]`` (columns by decreasing
    importance), ``mu_k``, ``mu_v`` ``[layers, kv_heads, d]``, optionally ``var_k``/``var_v`` (the
    PCA eigenvalues) and, per stored allocation, ``ranks_k@b``/``ranks_v@b`` ``[layers, kv_heads]``
    where ``b = 1 − compression_ratio`` is the fraction of the cache it keeps (the stored format).
    ``options`` records how they were made (``method`` is ``"pca"`` or ``"trained"``).

    Save with :meth:`save_pretrained`, load with ``Projections.from_pretrained(path, model)``,
    which refuses projections computed on a model of another shape or config. Made by
    :func:`calibrate`, :func:`train_projections` and :func:`allocate_ranks`.

    Args:
        tensors: the tensors above, by name.
        options: JSON-able record of how they were made.
        model_name: the model's name or path.
        config_hash: :func:`compresskv.calibration.config_hash` of the model's config.
    """

    kind = KIND

    def __init__(
        self, tensors: dict[str, torch.Tensor], options: dict[str, Any], model_name: str, config_hash: str
    ) -> None:
        missing = [name for name in _TENSORS if name not in tensors]
        if missing:
            raise ValueError(f"Projections: missing tensors {missing}; this is not a MatryoshkaKV projection set.")
        super().__init__(tensors, options, model_name, config_hash)
        u = tensors["U_k"]
        if u.dim() != 4 or u.shape[-1] != u.shape[-2] or tensors["U_v"].shape != u.shape:
            raise ValueError(f"Projections: U_k/U_v must be [layers, kv_heads, d, d], got {tuple(u.shape)}.")
        options.setdefault("allocations", [])

    # -- facts ----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.tensors["U_k"].shape[0])

    @property
    def num_kv_heads(self) -> int:
        return int(self.tensors["U_k"].shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.tensors["U_k"].shape[-1])

    @property
    def method(self) -> str:
        """``"pca"`` or ``"trained"``."""
        return str(self.options.get("method", "pca"))

    @property
    def compression_ratios(self) -> list[float]:
        """The compression ratios for which a rank allocation is stored, ascending."""
        return sorted(_ratio_of_key(b) for b in self.options.get("allocations", []))

    @property
    def budgets(self) -> list[float]:
        raise AttributeError(
            "Projections.budgets (fractions kept) was renamed compression_ratios (fractions removed, "
            "compression_ratio = 1 - budget)."
        )

    def __repr__(self) -> str:
        return (
            f"Projections(method={self.method!r}, model={self.model_name!r}, layers={self.num_layers}, "
            f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, allocations={self.compression_ratios})"
        )

    def copy(self) -> "Projections":
        import copy

        return type(self)(
            {k: v.clone() for k, v in self.tensors.items()}, copy.deepcopy(self.options), self.model_name, self.config_hash
        )

    def orthogonality_error(self) -> float:
        """``max`` over heads and K/V of the Frobenius norm ``‖UᵀU − I‖`` (computed in fp64)."""
        eye = torch.eye(self.head_dim, dtype=torch.float64)
        worst = 0.0
        for name in ("U_k", "U_v"):
            u = self.tensors[name].double()
            err = torch.linalg.matrix_norm(u.transpose(-1, -2) @ u - eye).max().item()
            worst = max(worst, err)
        return worst

    # -- checks ----------------------------------------------------------------------------
    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` when ``model``'s shapes or config hash differ from the ones these
        projections were computed on."""
        dims = model_dims(model)
        layers, kv_heads, head_dim = dims["layers"], dims["kv_heads"], dims["head_dim"]
        mine = (self.num_layers, self.num_kv_heads, self.head_dim)
        if (layers, kv_heads, head_dim) != mine:
            raise ValueError(
                f"these projections were computed on {self.model_name!r} with (layers, kv_heads, head_dim) = "
                f"{mine}; the model given is {model_name(model)!r} with {(layers, kv_heads, head_dim)}. "
                "Recompute them for this model (compresskv.calibrate)."
            )
        super().check_model(model)

    # -- ranks -----------------------------------------------------------------------------
    def allocation(self, *args: Any, compression_ratio: float | None = None,
                   **removed: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored ``(ranks_k, ranks_v)`` (``[layers, kv_heads]``) for ``compression_ratio``, or
        ``None`` when none is stored for it."""
        refuse_removed("Projections.allocation", args, removed)
        key = _kept_key(check_ratio(compression_ratio, "Projections.allocation"))
        if f"ranks_k@{key}" not in self.tensors:
            return None
        return self.tensors[f"ranks_k@{key}"].long(), self.tensors[f"ranks_v@{key}"].long()

    def add_allocation(self, *args: Any, compression_ratio: float | None = None, ranks_k: Any = None,
                       ranks_v: Any = None, **removed: Any) -> None:
        """Store a rank allocation for ``compression_ratio`` (replacing one stored for it)."""
        refuse_removed("add_allocation", args, removed)
        key = _kept_key(check_ratio(compression_ratio, "add_allocation"))
        rk, rv = self._check_ranks(ranks_k, ranks_v, "add_allocation")
        self.tensors[f"ranks_k@{key}"] = rk.to(torch.int32)
        self.tensors[f"ranks_v@{key}"] = rv.to(torch.int32)
        stored = {f"{float(b):.6g}" for b in self.options.get("allocations", [])}
        if key not in stored:
            self.options["allocations"] = sorted([*self.options.get("allocations", []), float(key)])

    def uniform_ranks(self, *args: Any, compression_ratio: float | None = None,
                      **removed: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head gets ``round((1 − compression_ratio) · head_dim)`` (at least 1) for keys and
        for values."""
        refuse_removed("Projections.uniform_ranks", args, removed)
        kept = 1.0 - check_ratio(compression_ratio, "Projections.uniform_ranks")
        r = min(self.head_dim, max(1, int(round(kept * self.head_dim))))
        full = torch.full((self.num_layers, self.num_kv_heads), r, dtype=torch.long)
        return full, full.clone()

    def _check_ranks(self, ranks_k: Any, ranks_v: Any, who: str) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_layers, self.num_kv_heads)
        out = []
        for name, ranks in (("ranks_k", ranks_k), ("ranks_v", ranks_v)):
            try:
                t = torch.as_tensor(ranks)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{who}: {name} must be [layers][kv_heads] integers, got {type(ranks).__name__}") from err
            if tuple(t.shape) != shape or t.is_floating_point() or t.dtype == torch.bool:
                raise ValueError(
                    f"{who}: {name} must be integers of shape [layers, kv_heads] = {list(shape)}, "
                    f"got {t.dtype} of shape {list(t.shape)}."
                )
            t = t.long()
            if int(t.min()) < 1 or int(t.max()) > self.head_dim:
                raise ValueError(f"{who}: every rank must be in [1, head_dim={self.head_dim}], got {name} in "
                                 f"[{int(t.min())}, {int(t.max())}].")
            out.append(t)
        return out[0], out[1]

    def resolve_ranks(
        self,
        compression_ratio: float | None = None,
        rank: int | None = None,
        ranks: Any = None,
        use_allocation: bool = True,
        who: str = "MatryoshkaKVCache",
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """``(ranks_k, ranks_v, source)`` from exactly one of the three ways to ask for ranks.

        ``compression_ratio`` (fraction of the full cache removed, in [0, 1)) uses the allocation
        stored for it when there is one (and ``use_allocation``), uniform ranks otherwise; ``rank``
        is one rank for every head; ``ranks`` is ``(ranks_k, ranks_v)``. ``source`` is
        ``"allocated@<ratio>"``, ``"uniform@<ratio>"``, ``"rank=<r>"`` or ``"explicit"``.
        """
        given = [n for n, v in (("compression_ratio", compression_ratio), ("rank", rank), ("ranks", ranks))
                 if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"{who}: give exactly one of compression_ratio= (fraction of the full cache removed, in [0, 1)), "
                "rank= (one rank for every head) or ranks= ((ranks_k, ranks_v), each [layers][kv_heads]); "
                f"got {given or 'none of them'}."
            )
        if compression_ratio is not None:
            ratio = check_ratio(compression_ratio, who)
            stored = self.allocation(compression_ratio=ratio) if use_allocation else None
            if stored is not None:
                return stored[0], stored[1], f"allocated@{_ratio_text(ratio)}"
            rk, rv = self.uniform_ranks(compression_ratio=ratio)
            return rk, rv, f"uniform@{_ratio_text(ratio)}"
        if rank is not None:
            if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.head_dim:
                raise ValueError(f"{who}: rank must be an int in [1, head_dim={self.head_dim}], got {rank!r}.")
            full = torch.full((self.num_layers, self.num_kv_heads), rank, dtype=torch.long)
            return full, full.clone(), f"rank={rank}"
        if not isinstance(ranks, (tuple, list)) or len(ranks) != 2:
            raise ValueError(f"{who}: ranks must be a pair (ranks_k, ranks_v), each [layers][kv_heads].")
        rk, rv = self._check_ranks(ranks[0], ranks[1], who)
        return rk, rv, "explicit"


def kept_fraction(ranks_k: torch.Tensor, ranks_v: torch.Tensor, head_dim: int, layers: Sequence[int] | None = None) -> float:
    """Fraction of the full per-token cache that ranks keep (over ``layers``, default all)."""
    idx = list(layers) if layers is not None else list(range(ranks_k.shape[0]))
    kept = ranks_k[idx].sum() + ranks_v[idx].sum()
    return float(kept) / (len(idx) * ranks_k.shape[1] * 2 * head_dim)
