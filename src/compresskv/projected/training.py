"""Matryoshka training (the paper's contribution): ``U = U_pca · cayley(A)`` with ``A``
skew-symmetric, so ``U`` stays exactly orthogonal; the model is frozen; each step samples a rank
per (layer, KV head, K/V) from a nested set and minimises ``0.25·KL(teacher ‖ student) + 0.75·CE``
(the loop is :class:`compresskv.distill.Distiller`, shared with EliteKV's uptraining)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..calibration import Texts
from ..core.facts import full_attention_layers, model_dims
from ..distill import Distiller
from .projections import Projections
from .taps import KVTap, ensure_windows, forward, low_rank, model_device, position_range_for, rank_masks, window_positions


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
    windows = ensure_windows(texts, tokenizer, seq_len, batch_size, None)
    position_range = position_range_for(model, position_range, seq_len, "train_projections")
    device = model_device(model)
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
        return {"input_ids": ids, "position_ids": window_positions(batch_size, seq_len, position_range, gen).to(device)}

    def teacher(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return forward(model, b["input_ids"], position_ids=b["position_ids"]).logits

    def student(b: dict[str, torch.Tensor]) -> torch.Tensor:
        # One rank per (layer, KV head, K/V), drawn afresh each step from the nested set.
        proj = {}
        for n in ("k", "v"):
            u = u0[n] @ cayley(skew[n])
            sampled = rank_table[torch.randint(len(ranks), (layers, kv_heads), generator=gen)]
            mask = rank_masks(sampled, d, device)
            proj[n] = (u * mask[..., None, :]) @ u.transpose(-1, -2)

        def student_kv(layer: int, keys: torch.Tensor, values: torch.Tensor):
            if layer not in full:
                return keys, values
            return (low_rank(keys, means["k"][layer], proj["k"][layer], sink_tokens),
                    low_rank(values, means["v"][layer], proj["v"][layer], sink_tokens))

        return forward(model, b["input_ids"], KVTap(model, student_kv), position_ids=b["position_ids"]).logits

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
