"""MatryoshkaKV (arXiv 2410.14731): orthogonal per-head projections of keys and values.

Per layer and KV head the method keeps two orthogonal ``head_dim × head_dim`` matrices
``U_k``, ``U_v`` (columns by decreasing importance) and means ``μ_k``, ``μ_v``. A cache of rank
``r`` stores ``(k − μ_k)·U_k[:, :r]`` and ``(v − μ_v)·U_v[:, :r]`` per token
(:class:`compresskv.MatryoshkaKVCache`). This module computes the projections:

* :func:`calibrate` — PCA of the post-RoPE keys and of the values on calibration text, from a
  streaming fp64 mean and covariance per (layer, KV head) (activations are never all held).
* :func:`train_projections` — the paper's contribution: ``U = U_pca · cayley(A)`` with ``A``
  skew-symmetric, so ``U`` stays exactly orthogonal; the model is frozen; each step samples a rank
  per (layer, KV head, K/V) from a nested set (Matryoshka) and minimises
  ``0.25·KL(teacher ‖ student) + 0.75·CE`` where the teacher is the model with its full cache.
* :func:`allocate_ranks` — per-head ranks under a total cache budget, greedily removing, round
  after round, the rank steps whose removal costs least (the paper's Algorithm 1 in spirit; the
  cost estimate is described in :func:`allocate_ranks`). The ranks are stored with the projections.

All three work on any model whose attention goes through transformers' ``AttentionInterface``
and whose attention modules call the cache's ``update`` (Llama, Mistral, Qwen2, Qwen3, ...):
keys and values are taken, and replaced, at that call, so no model-specific code is needed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .. import compat
from ..calibration import Artifact, Texts, calibration_windows, config_hash, model_name
from ..core.facts import full_attention_layers, model_dims, text_config
from ..distill import Distiller

KIND = "matryoshka_projections"
_TENSORS = ("U_k", "U_v", "mu_k", "mu_v")


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _budget_key(budget: float) -> str:
    return f"{float(budget):.6g}"


def _check_budget(budget: Any, who: str) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"{who}: budget is the fraction of the full cache kept and must be in (0, 1], got {budget!r}.")
    return float(budget)


def _progress(iterable: Any = None, **kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


# -- the artifact --------------------------------------------------------------------------------
class Projections(Artifact):
    """Per-(layer, KV head) orthogonal projections and means, plus any rank allocations.

    Tensors (fp32): ``U_k``, ``U_v`` ``[layers, kv_heads, d, d]`` (columns by decreasing
    importance), ``mu_k``, ``mu_v`` ``[layers, kv_heads, d]``, optionally ``var_k``/``var_v`` (the
    PCA eigenvalues) and, per stored budget ``b``, ``ranks_k@b``/``ranks_v@b`` ``[layers, kv_heads]``.
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
    def budgets(self) -> list[float]:
        """The budgets for which a rank allocation is stored."""
        return sorted(float(b) for b in self.options.get("allocations", []))

    def __repr__(self) -> str:
        return (
            f"Projections(method={self.method!r}, model={self.model_name!r}, layers={self.num_layers}, "
            f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, allocations={self.budgets})"
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
    def allocation(self, budget: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored ``(ranks_k, ranks_v)`` (``[layers, kv_heads]``) for ``budget``, or ``None``."""
        key = _budget_key(budget)
        if f"ranks_k@{key}" not in self.tensors:
            return None
        return self.tensors[f"ranks_k@{key}"].long(), self.tensors[f"ranks_v@{key}"].long()

    def add_allocation(self, budget: float, ranks_k: torch.Tensor, ranks_v: torch.Tensor) -> None:
        """Store a rank allocation for ``budget`` (replacing one stored for the same budget)."""
        budget = _check_budget(budget, "add_allocation")
        rk, rv = self._check_ranks(ranks_k, ranks_v, "add_allocation")
        key = _budget_key(budget)
        self.tensors[f"ranks_k@{key}"] = rk.to(torch.int32)
        self.tensors[f"ranks_v@{key}"] = rv.to(torch.int32)
        stored = {_budget_key(b) for b in self.options.get("allocations", [])}
        if key not in stored:
            self.options["allocations"] = sorted([*self.options.get("allocations", []), float(key)])

    def uniform_ranks(self, budget: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head gets ``round(budget · head_dim)`` (at least 1) for keys and for values."""
        r = min(self.head_dim, max(1, int(round(budget * self.head_dim))))
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
        budget: float | None = None,
        compression_ratio: float | None = None,
        rank: int | None = None,
        ranks: Any = None,
        use_allocation: bool = True,
        who: str = "MatryoshkaKVCache",
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """``(ranks_k, ranks_v, source)`` from exactly one of the four ways to ask for ranks.

        ``budget`` (fraction of the full cache kept, in (0, 1]) uses the allocation stored for it
        when there is one (and ``use_allocation``), uniform ranks otherwise; ``compression_ratio``
        is ``1 − budget``; ``rank`` is one rank for every head; ``ranks`` is ``(ranks_k, ranks_v)``.
        """
        given = [n for n, v in (("budget", budget), ("compression_ratio", compression_ratio), ("rank", rank),
                                ("ranks", ranks)) if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"{who}: give exactly one of budget= (fraction of the full cache kept, in (0, 1]), "
                "compression_ratio= (1 − budget, in [0, 1)), rank= (one rank for every head) or "
                f"ranks= ((ranks_k, ranks_v), each [layers][kv_heads]); got {given or 'none of them'}."
            )
        if compression_ratio is not None:
            if (isinstance(compression_ratio, bool) or not isinstance(compression_ratio, (int, float))
                    or not 0.0 <= float(compression_ratio) < 1.0):
                raise ValueError(
                    f"{who}: compression_ratio is the fraction of the cache removed (1 − budget) and must be "
                    f"in [0, 1), got {compression_ratio!r}."
                )
            budget = 1.0 - float(compression_ratio)
        if budget is not None:
            budget = _check_budget(budget, who)
            stored = self.allocation(budget) if use_allocation else None
            if stored is not None:
                return stored[0], stored[1], f"allocated@{_budget_key(budget)}"
            rk, rv = self.uniform_ranks(budget)
            return rk, rv, f"uniform@{_budget_key(budget)}"
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


# -- taps on the cache's update ----------------------------------------------------------------
class _KVTap(DynamicCache):
    """A cache that stores nothing: each layer's new post-RoPE keys and values go to ``fn``, and
    what ``fn`` returns is what that layer's attention uses. Every call is a fresh forward."""

    def __init__(self, model: Any, fn: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(config=model.config)
        self._fn = fn

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return self._fn(layer_idx, key_states, value_states)


def _forward(model: Any, ids: torch.Tensor, tap: _KVTap | None = None, **kwargs: Any) -> Any:
    if tap is None:
        return model(input_ids=ids, use_cache=False, **kwargs)
    return model(input_ids=ids, use_cache=True, **compat.cache_kwargs(tap, model.forward), **kwargs)


def _position_range(model: Any, position_range: int | None, seq_len: int, who: str) -> int:
    """The positions calibration windows are spread over (see :func:`calibrate`)."""
    if position_range is None:
        position_range = int(getattr(text_config(model), "max_position_embeddings", 0) or seq_len)
    if isinstance(position_range, bool) or not isinstance(position_range, int) or position_range < seq_len:
        raise ValueError(f"{who}: position_range must be an int >= seq_len={seq_len}, got {position_range!r}.")
    return position_range


def _positions(n: int, seq_len: int, position_range: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, seq_len]`` position ids: each window at a random offset in ``[0, position_range − seq_len]``."""
    offsets = torch.randint(0, position_range - seq_len + 1, (n, 1), generator=generator)
    return offsets + torch.arange(seq_len)


def _ensure_windows(texts: Texts, tokenizer: Any, seq_len: int, min_windows: int, max_windows: int | None) -> torch.Tensor:
    return calibration_windows(texts, tokenizer=tokenizer, seq_len=seq_len, min_windows=min_windows, max_windows=max_windows)


# -- PCA calibration ------------------------------------------------------------------------------
@torch.no_grad()
def calibrate(
    model: Any,
    texts: Texts,
    method: str = "pca",
    *,
    tokenizer: Any = None,
    seq_len: int = 512,
    max_windows: int | None = 64,
    batch_size: int = 4,
    position_range: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Projections:
    """PCA projections of ``model``'s post-RoPE keys and values on ``texts``.

    Mean and covariance are accumulated per (layer, KV head) in fp64 over all tokens, batch by
    batch (activations are never all held), then eigendecomposed in fp64.

    Post-RoPE keys depend on the absolute position (slow RoPE frequencies barely turn within a
    short window, so PCA of short windows at positions ``0..seq_len`` misses how those dims move
    at position 4000). Each window is therefore given a random position offset so that the
    windows cover positions ``[0, position_range)`` (default: the model's
    ``max_position_embeddings``). With RoPE, attention depends only on relative positions, so a
    window's hidden states are unchanged by the offset: its keys are exactly the keys those tokens
    would have at those positions. ``position_range=seq_len`` puts every window at position 0.

    Args:
        model: a transformers causal LM (its attention must call the cache's ``update``).
        texts: a string or list of strings (with ``tokenizer=``), or token ids (a tensor or a list
            of lists); long texts are cut into windows of ``seq_len`` tokens.
        method: ``"pca"`` (MatryoshkaKV's initialisation; the only one here).
        tokenizer: needed when ``texts`` are strings.
        seq_len: tokens per calibration window.
        max_windows: use at most this many windows (``None``: all).
        batch_size: windows per forward pass.
        position_range: the windows' random position offsets cover ``[0, position_range)``
            (default: the model's ``max_position_embeddings``).
        seed: seed of the position offsets.
        progress: show a progress bar.

    Returns:
        :class:`Projections` with ``U`` the eigenvectors of each head's covariance by decreasing
        eigenvalue, ``μ`` the head's mean and ``var`` the eigenvalues.

    Raises:
        ValueError: a method other than ``"pca"``, or texts too short for one window.
    """
    if method != "pca":
        raise ValueError(f"calibrate: method must be 'pca' (MatryoshkaKV's initialisation), got {method!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"calibrate: batch_size must be an int >= 1, got {batch_size!r}.")
    windows = _ensure_windows(texts, tokenizer, seq_len, 1, max_windows)
    position_range = _position_range(model, position_range, seq_len, "calibrate")
    positions = _positions(windows.shape[0], seq_len, position_range, torch.Generator().manual_seed(seed))
    dims = model_dims(model)
    layers, kv_heads, head_dim = dims["layers"], dims["kv_heads"], dims["head_dim"]
    device = _device(model)
    f64 = torch.float64
    sums = {n: torch.zeros(layers, kv_heads, head_dim, dtype=f64, device=device) for n in ("k", "v")}
    outer = {n: torch.zeros(layers, kv_heads, head_dim, head_dim, dtype=f64, device=device) for n in ("k", "v")}
    counts = torch.zeros(layers, dtype=f64)

    def record(layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for name, x in (("k", keys), ("v", values)):
            x64 = x.detach().to(f64)
            sums[name][layer] += x64.sum(dim=(0, 2))
            outer[name][layer] += torch.einsum("bhtd,bhte->hde", x64, x64)
        counts[layer] += keys.shape[0] * keys.shape[2]
        return keys, values

    start = time.perf_counter()
    tap = _KVTap(model, record)
    batches = list(zip(windows.split(batch_size), positions.split(batch_size)))
    for batch, pos in _progress(batches, desc="calibrate (PCA)", unit="batch", disable=not progress):
        _forward(model, batch.to(device), tap, logits_to_keep=1, position_ids=pos.to(device))
    if bool((counts == 0).any()):
        raise RuntimeError(
            "calibrate: some layers never called the cache's update(), so their keys could not be "
            "collected; this model's attention is not supported."
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in ("k", "v"):
        n = counts.to(device)[:, None, None]
        mean = sums[name] / n
        cov = outer[name] / n[..., None] - mean[..., :, None] * mean[..., None, :]
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        evals, evecs = torch.linalg.eigh(cov)
        evals, evecs = evals.flip(-1), evecs.flip(-1)
        # A deterministic sign: the largest entry of each column is positive.
        idx = evecs.abs().argmax(dim=-2, keepdim=True)
        sign = torch.sign(evecs.gather(-2, idx))
        sign[sign == 0] = 1
        evecs = evecs * sign
        tensors[f"U_{name}"] = evecs.float().cpu().contiguous()
        tensors[f"mu_{name}"] = mean.float().cpu().contiguous()
        tensors[f"var_{name}"] = evals.clamp_min(0).float().cpu().contiguous()
    options = {
        "method": "pca",
        "seq_len": seq_len,
        "windows": int(windows.shape[0]),
        "tokens": int(windows.numel()),
        "position_range": position_range,
        "calibration_seconds": round(time.perf_counter() - start, 2),
        "allocations": [],
    }
    return Projections(tensors, options, model_name(model), config_hash(model))


# -- Cayley map ------------------------------------------------------------------------------------
def cayley(x: torch.Tensor) -> torch.Tensor:
    """The Cayley map of the skew-symmetric part ``A = X − Xᵀ``: ``(I − A/2)⁻¹ (I + A/2)``, an
    orthogonal matrix with determinant 1 (batched over leading dimensions)."""
    a = x - x.transpose(-1, -2)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device).expand_as(a)
    return torch.linalg.solve(eye - 0.5 * a, eye + 0.5 * a)


def default_rank_set(head_dim: int) -> list[int]:
    """The nested ranks sampled in training and stepped through by allocation: multiples of
    ``head_dim / 8`` (e.g. 8, 16, ..., 64 for ``head_dim = 64``)."""
    return sorted({max(1, int(round(head_dim * i / 8))) for i in range(1, 9)})


def _rank_masks(ranks: torch.Tensor, head_dim: int, device: torch.device) -> torch.Tensor:
    """``[..., d]`` float masks keeping the first ``ranks`` projected dims."""
    return (torch.arange(head_dim, device=device) < ranks.to(device)[..., None]).float()


def _low_rank(x: torch.Tensor, mu: torch.Tensor, proj: torch.Tensor, sink_tokens: int = 0) -> torch.Tensor:
    """``μ + (x − μ)·P`` per head, with ``x``: ``[B, H, T, d]``, ``μ``: ``[H, d]``,
    ``P = U_r U_rᵀ``: ``[H, d, d]`` (or ``[B, H, d, d]``), computed in fp32; the first
    ``sink_tokens`` tokens are left exact (as the cache's ``sink_tokens`` option does)."""
    xf = x.float() - mu[:, None, :]
    out = (torch.matmul(xf, proj) + mu[:, None, :]).to(x.dtype)
    if sink_tokens:
        out = torch.cat([x[:, :, :sink_tokens], out[:, :, sink_tokens:]], dim=2)
    return out


# -- Matryoshka training ---------------------------------------------------------------------------
def _lr_factor(step: int, steps: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_projections(
    model: Any,
    projections: Projections,
    texts: Texts,
    steps: int = 50,
    *,
    tokenizer: Any = None,
    seq_len: int = 512,
    batch_size: int = 1,
    lr: float = 1e-3,
    rank_set: Sequence[int] | None = None,
    train_means: bool = True,
    kl_weight: float = 0.25,
    ce_weight: float = 0.75,
    warmup: int | None = None,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    sink_tokens: int = 0,
    position_range: int | None = None,
    progress: bool = True,
) -> Projections:
    """Matryoshka training of ``projections`` (usually from :func:`calibrate`) on ``texts``.

    ``U = U_init · cayley(A)`` with a trainable ``A`` per (layer, KV head, K/V), initialised at 0
    (so training starts exactly at ``U_init``) and the means trainable too (``train_means``). The
    model's own weights are frozen (their ``requires_grad`` is restored afterwards). Each step
    samples, independently for every (layer, KV head, K/V), a rank from ``rank_set`` (default
    :func:`default_rank_set`: multiples of ``head_dim/8``), keeps that many projected dims of every
    token's key/value (all tokens, as in the paper), and minimises
    ``kl_weight·KL(teacher ‖ student) + ce_weight·CE`` where the teacher is the unmodified model.
    AdamW at ``lr`` with linear warm-up (default 10% of steps) and cosine decay, gradient norm
    clipped at ``max_grad_norm``. Runs on the model's device. As in :func:`calibrate`, each
    window gets a random position offset so that training sees keys at every position up to
    ``position_range``.

    Args:
        model: the transformers causal LM the projections belong to (frozen during training).
        projections: the starting point, usually PCA from :func:`calibrate`.
        texts: training text (strings with ``tokenizer=``, or token ids), cut into ``seq_len`` windows.
        steps: optimisation steps (one batch each).
        tokenizer: needed when ``texts`` are strings.
        seq_len: tokens per window.
        batch_size: windows per step.
        lr: AdamW learning rate of the skew-symmetric parameters and the means.
        rank_set: the nested ranks sampled per (layer, KV head, K/V) at each step.
        train_means: also train ``μ_k`` and ``μ_v``.
        kl_weight: weight of ``KL(teacher ‖ student)`` (per token, in nats).
        ce_weight: weight of the next-token cross-entropy.
        warmup: linear warm-up steps (default: 10% of ``steps``).
        max_grad_norm: gradient-norm clipping (0 disables it).
        seed: seed of the window order and of the rank sampling.
        sink_tokens: keep each window's first ``sink_tokens`` tokens exact, to train for a cache
            used with the same ``sink_tokens`` option (0, as in the paper, projects every token).
        position_range: the windows' random position offsets cover ``[0, position_range)``
            (default: the model's ``max_position_embeddings``; ``seq_len``: no offsets).
        progress: show a progress bar (with the running loss).

    Returns:
        New :class:`Projections` with ``method="trained"`` (stored allocations are dropped: an
        allocation belongs to one set of projections) and ``options["training"]`` recording
        steps, tokens, seconds and the loss curve.
    """
    if not isinstance(projections, Projections):
        raise ValueError("train_projections: projections must be a compresskv.Projections (from compresskv.calibrate).")
    projections.check_model(model)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"train_projections: steps must be an int >= 1, got {steps!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"train_projections: batch_size must be an int >= 1, got {batch_size!r}.")
    dims = model_dims(model)
    layers, kv_heads, d = dims["layers"], dims["kv_heads"], dims["head_dim"]
    ranks = sorted(set(rank_set if rank_set is not None else default_rank_set(d)))
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= d for r in ranks):
        raise ValueError(f"train_projections: rank_set must be ints in [1, head_dim={d}], got {rank_set!r}.")
    windows = _ensure_windows(texts, tokenizer, seq_len, batch_size, None)
    position_range = _position_range(model, position_range, seq_len, "train_projections")
    device = _device(model)
    full = full_attention_layers(model)
    warmup = max(1, steps // 10) if warmup is None else warmup

    u0 = {n: projections.tensors[f"U_{n}"].to(device, torch.float32) for n in ("k", "v")}
    skew = {n: torch.zeros(layers, kv_heads, d, d, device=device, requires_grad=True) for n in ("k", "v")}
    means = {n: projections.tensors[f"mu_{n}"].to(device, torch.float32).clone().requires_grad_(train_means)
             for n in ("k", "v")}
    distiller = Distiller(list(skew.values()) + ([*means.values()] if train_means else []), lr=lr,
                          schedule=lambda step: _lr_factor(step, steps, warmup), kl_weight=kl_weight,
                          ce_weight=ce_weight, max_grad_norm=max_grad_norm)
    rank_table = torch.tensor(ranks)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(windows.shape[0], generator=gen)
    history: list[dict[str, float]] = []

    def batch(step: int) -> dict[str, torch.Tensor]:
        pick = torch.arange(step * batch_size, (step + 1) * batch_size) % windows.shape[0]
        ids = windows[order[pick]].to(device)
        return {"input_ids": ids, "position_ids": _positions(batch_size, seq_len, position_range, gen).to(device)}

    def teacher(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return _forward(model, b["input_ids"], position_ids=b["position_ids"]).logits

    def student(b: dict[str, torch.Tensor]) -> torch.Tensor:
        # One rank per (layer, KV head, K/V), drawn afresh each step from the nested set.
        proj = {}
        for n in ("k", "v"):
            u = u0[n] @ cayley(skew[n])
            sampled = rank_table[torch.randint(len(ranks), (layers, kv_heads), generator=gen)]
            mask = _rank_masks(sampled, d, device)
            proj[n] = (u * mask[..., None, :]) @ u.transpose(-1, -2)

        def student_kv(layer: int, keys: torch.Tensor, values: torch.Tensor):
            if layer not in full:
                return keys, values
            return (_low_rank(keys, means["k"][layer], proj["k"][layer], sink_tokens),
                    _low_rank(values, means["v"][layer], proj["v"][layer], sink_tokens))

        return _forward(model, b["input_ids"], _KVTap(model, student_kv), position_ids=b["position_ids"]).logits

    start = time.perf_counter()
    distiller.run(model, steps, batch, student, teacher, desc="train projections", progress=progress,
                  on_step=lambda s: history.append({"step": s.step, "loss": s.loss, "kl": s.kl, "ce": s.ce}))
    seconds = time.perf_counter() - start
    tensors = {}
    with torch.no_grad():
        for n in ("k", "v"):
            u = projections.tensors[f"U_{n}"].double() @ cayley(skew[n].detach().double().cpu())
            tensors[f"U_{n}"] = u.float().contiguous()
            tensors[f"mu_{n}"] = means[n].detach().float().cpu().contiguous()
            if f"var_{n}" in projections.tensors:
                tensors[f"var_{n}"] = projections.tensors[f"var_{n}"].clone()
    options = {k: v for k, v in projections.options.items() if k not in ("allocations", "allocation")}
    options.update({
        "method": "trained",
        "allocations": [],
        "training": {
            "steps": steps, "batch_size": batch_size, "seq_len": seq_len, "tokens": steps * batch_size * seq_len,
            "seconds": round(seconds, 1), "lr": lr, "rank_set": ranks, "train_means": train_means,
            "kl_weight": kl_weight, "ce_weight": ce_weight, "warmup": warmup, "seed": seed,
            "device": str(device), "windows": int(windows.shape[0]), "sink_tokens": sink_tokens,
            "position_range": position_range,
            "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"],
            "history": [{k: round(v, 5) for k, v in h.items()} for h in history],
        },
    })
    return Projections(tensors, options, projections.model_name, projections.config_hash)


# -- rank allocation --------------------------------------------------------------------------------
_PROBE = "compresskv_matryoshka_probe"
_probe_state: dict[str, Any] = {}


def _register_probe() -> None:
    """An attention function that records each layer's query and output, then runs sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _PROBE in ALL_ATTENTION_FUNCTIONS:
        return

    def probe(module, query, key, value, attention_mask, **kwargs):
        out, weights = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)
        record = _probe_state.get("record")
        if record is not None:
            record(module.layer_idx, query, out, kwargs.get("scaling") or query.shape[-1] ** -0.5)
        return out, weights

    AttentionInterface.register(_PROBE, probe)
    AttentionMaskInterface.register(_PROBE, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _candidate_errors(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, scaling: float,
    u: dict[str, torch.Tensor], mu: dict[str, torch.Tensor], ranks: dict[str, torch.Tensor], step: int, min_rank: int,
    sink_tokens: int = 0,
) -> dict[str, torch.Tensor]:
    """Estimated loss increase of removing ``step`` more dims from each head's K, and from its V.

    ``q``: ``[B, Hq, T, d]``; ``k``, ``v``: ``[B, H, T, d]`` (exact, post-RoPE); ``grad``:
    ``∂loss/∂(attention output)`` ``[B, T, Hq, d]``; ``u``/``mu``/``ranks`` per ``"k"``/``"v"``
    for this layer. The change Δo of the layer's attention output is computed exactly (all other
    heads at their current ranks) and weighted by the diagonal empirical Fisher:
    ``error = Σ grad² · Δo²``. Returns ``{"k": [H], "v": [H]}`` (``inf`` where the rank is at
    ``min_rank``).
    """
    bsz, n_q, seq, d = q.shape
    n_kv = k.shape[1]
    groups = n_q // n_kv
    q = q.float().view(bsz, n_kv, groups, seq, d)
    g2 = grad.float().permute(0, 2, 1, 3).reshape(bsz, n_kv, groups, seq, d).square()
    cur = {}
    for n, x in (("k", k), ("v", v)):
        mask = _rank_masks(ranks[n], d, x.device)
        proj = (u[n] * mask[:, None, :]) @ u[n].transpose(-1, -2)
        cur[n] = _low_rank(x.float(), mu[n], proj, sink_tokens)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    logits = torch.einsum("bhgtd,bhsd->bhgts", q, cur["k"]) * scaling
    logits = logits.masked_fill(~causal, float("-inf"))
    probs = logits.softmax(dim=-1)
    errors = {"k": torch.full((n_kv,), float("inf")), "v": torch.full((n_kv,), float("inf"))}
    for h in range(n_kv):
        for n, x in (("k", k), ("v", v)):
            r = int(ranks[n][h])
            if r - step < min_rank:
                continue
            cols = u[n][h][:, r - step : r]
            removed = ((x[:, h].float() - mu[n][h]) @ cols) @ cols.T  # [B, T, d]
            removed[:, :sink_tokens] = 0
            if n == "k":
                shifted = logits[:, h] - torch.einsum("bgtd,bsd->bgts", q[:, h], removed) * scaling
                delta = (shifted.softmax(dim=-1) - probs[:, h]) @ cur["v"][:, h][:, None]
            else:
                delta = -(probs[:, h] @ removed[:, None])
            errors[n][h] = float((g2[:, h] * delta.square()).sum())
    return errors


def allocate_ranks(
    model: Any,
    projections: Projections,
    texts: Texts,
    budget: float | Sequence[float] = 0.5,
    *,
    tokenizer: Any = None,
    seq_len: int = 512,
    max_windows: int = 2,
    step: int | None = None,
    min_rank: int | None = None,
    round_fraction: float = 0.025,
    sink_tokens: int = 0,
    position_range: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Projections:
    """Per-(layer, KV head, K/V) ranks under a total cache ``budget``, stored in ``projections``.

    Greedy, from full rank down (the paper's Algorithm 1 in spirit): each round runs the model on
    the calibration windows with the current ranks (every token's keys/values projected, as in
    training), then, for every (layer, KV head, K/V), computes exactly how the layer's attention
    output would change if that head lost ``step`` more dims, and weights the change by the
    squared gradient of the language-model loss with respect to that output (a diagonal
    empirical-Fisher estimate of the loss increase, so that decrements in sensitive layers cost
    more). The ``round_fraction`` of all rank steps with the lowest estimates are removed (at most
    one per head per round), and rounds repeat until the budget is met exactly (up to one
    ``step``). Keys and values cost the same bytes per dim, so the cheapest error wins.

    Only full-attention layers are allocated (other layers are not compressed).

    Args:
        model: the transformers causal LM the projections belong to.
        projections: PCA or trained projections; the allocations are stored in them.
        texts: calibration text (strings with ``tokenizer=``, or token ids).
        budget: fraction of the full cache kept, in (0, 1], or a list of them: one greedy path
            serves every budget on it (the allocation is taken when the path passes each one).
        tokenizer: needed when ``texts`` are strings.
        seq_len: tokens per calibration window.
        max_windows: windows used per round.
        step: rank removed per decrement (default ``head_dim / 8``).
        min_rank: no rank goes below this (default ``step``).
        round_fraction: fraction of all rank steps removed per round (smaller: more rounds, each a
            forward and backward pass, and finer choices).
        sink_tokens: keep each window's first ``sink_tokens`` tokens exact, to allocate for a
            cache used with the same ``sink_tokens`` option.
        position_range: the windows' random position offsets (fixed for the whole run) cover
            ``[0, position_range)`` (default: the model's ``max_position_embeddings``).
        seed: seed of the position offsets.
        progress: show a progress bar.

    Returns:
        ``projections`` (modified in place) with ``ranks_k@b``/``ranks_v@b`` per budget and
        ``options["allocation"]`` describing the run.
    """
    if not isinstance(projections, Projections):
        raise ValueError("allocate_ranks: projections must be a compresskv.Projections (from compresskv.calibrate).")
    projections.check_model(model)
    dims = model_dims(model)
    layers, kv_heads, d, n_q = dims["layers"], dims["kv_heads"], dims["head_dim"], dims["heads"]
    budgets = [budget] if isinstance(budget, (int, float)) and not isinstance(budget, bool) else list(budget)
    budgets = sorted({_check_budget(b, "allocate_ranks") for b in budgets}, reverse=True)
    step = step if step is not None else max(1, d // 8)
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= d:
        raise ValueError(f"allocate_ranks: step must be an int in [1, head_dim={d}], got {step!r}.")
    min_rank = min_rank if min_rank is not None else step
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or not 1 <= min_rank <= d:
        raise ValueError(f"allocate_ranks: min_rank must be an int in [1, head_dim={d}], got {min_rank!r}.")
    if not 0.0 < round_fraction <= 1.0:
        raise ValueError(f"allocate_ranks: round_fraction must be in (0, 1], got {round_fraction!r}.")
    lowest = (d - ((d - min_rank) // step) * step) / d
    if budgets[-1] < lowest - 1e-9:
        raise ValueError(
            f"allocate_ranks: budget {budgets[-1]} is below the smallest reachable ({lowest:g}: every head at "
            f"rank {int(lowest * d)} with step={step}, min_rank={min_rank}); lower min_rank or step."
        )
    windows = _ensure_windows(texts, tokenizer, seq_len, 1, max_windows)
    position_range = _position_range(model, position_range, seq_len, "allocate_ranks")
    positions = _positions(windows.shape[0], seq_len, position_range, torch.Generator().manual_seed(seed))
    device = _device(model)
    full = full_attention_layers(model)
    total_steps = len(full) * kv_heads * 2 * d / step
    ranks = {n: torch.full((layers, kv_heads), d, dtype=torch.long) for n in ("k", "v")}
    u = {n: projections.tensors[f"U_{n}"].to(device, torch.float32) for n in ("k", "v")}
    mu = {n: projections.tensors[f"mu_{n}"].to(device, torch.float32) for n in ("k", "v")}
    targets = {b: int(round((1.0 - b) * total_steps)) for b in budgets}
    per_round = max(1, int(round(round_fraction * total_steps)))
    removed = 0
    rounds = 0
    start = time.perf_counter()
    _register_probe()
    original = model.config._attn_implementation
    saved = [p.requires_grad for p in model.parameters()]
    bar = _progress(total=targets[budgets[-1]], desc="allocate ranks", unit="step", disable=not progress)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.set_attn_implementation(_PROBE)
        pending = [b for b in budgets]
        while pending:
            while pending and removed >= targets[pending[0]]:
                projections.add_allocation(pending[0], ranks["k"].clone(), ranks["v"].clone())
                pending.pop(0)
            if not pending:
                break
            errors = {n: torch.full((layers, kv_heads), float("inf")) for n in ("k", "v")}
            for start_w in range(windows.shape[0]):
                ids = windows[start_w : start_w + 1].to(device)
                captured: dict[int, dict[str, Any]] = {}

                def tap(layer: int, keys: torch.Tensor, values: torch.Tensor):
                    if layer not in full:
                        return keys, values
                    captured[layer] = {"k": keys.detach(), "v": values.detach()}
                    proj = {}
                    for n in ("k", "v"):
                        mask = _rank_masks(ranks[n][layer], d, device)
                        proj[n] = (u[n][layer] * mask[:, None, :]) @ u[n][layer].transpose(-1, -2)
                    return (_low_rank(keys, mu["k"][layer], proj["k"], sink_tokens),
                            _low_rank(values, mu["v"][layer], proj["v"], sink_tokens))

                def record(layer: int, query: torch.Tensor, out: torch.Tensor, scaling: float):
                    if layer in captured:
                        captured[layer].update(q=query.detach(), out=out, scaling=scaling)

                _probe_state["record"] = record
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, **compat.cache_kwargs(_KVTap(model, tap), model.forward), use_cache=True,
                               position_ids=positions[start_w : start_w + 1].to(device)).logits
                _probe_state.pop("record", None)
                loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                order = sorted(captured)
                grads = torch.autograd.grad(loss, [captured[i]["out"] for i in order])
                del logits, loss
                for layer, grad in zip(order, grads):
                    c = captured[layer]
                    errs = _candidate_errors(
                        c["q"], c["k"], c["v"], grad, c["scaling"],
                        {n: u[n][layer] for n in u}, {n: mu[n][layer] for n in mu},
                        {n: ranks[n][layer] for n in ranks}, step, min_rank, sink_tokens,
                    )
                    for n in ("k", "v"):
                        first = torch.isinf(errors[n][layer])
                        errors[n][layer] = torch.where(first, errs[n], errors[n][layer] + errs[n])
                captured.clear()
            flat = torch.cat([errors["k"].flatten(), errors["v"].flatten()])
            budget_left = targets[pending[0]] - removed
            take = min(per_round, budget_left)
            chosen = [int(i) for i in flat.argsort()[:take] if torch.isfinite(flat[i])]
            if not chosen:
                raise RuntimeError("allocate_ranks: no rank left to remove (raise the budget or lower min_rank).")
            for i in chosen:
                name = "k" if i < layers * kv_heads else "v"
                j = i % (layers * kv_heads)
                ranks[name][j // kv_heads, j % kv_heads] -= step
            removed += len(chosen)
            rounds += 1
            bar.update(len(chosen))
    finally:
        _probe_state.pop("record", None)
        model.set_attn_implementation(original)
        for p, flag in zip(model.parameters(), saved):
            p.requires_grad_(flag)
        bar.close()
    projections.options["allocation"] = {
        "error": "diagonal empirical Fisher x exact change of the layer's attention output",
        "budgets": budgets, "step": step, "min_rank": min_rank, "rounds": rounds,
        "windows": int(windows.shape[0]), "seq_len": seq_len, "tokens": int(windows.numel()),
        "seconds": round(time.perf_counter() - start, 1), "sink_tokens": sink_tokens,
        "position_range": position_range,
    }
    return projections
