"""PCA calibration (MatryoshkaKV's initialisation): the principal axes of each (layer, KV head)'s
post-RoPE keys and of its values on calibration text, from a streaming fp64 mean and covariance
(activations are never all held)."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..calibration import Texts, config_hash, model_name
from ..core.facts import model_dims
from .projections import Projections
from .taps import KVTap, ensure_windows, forward, model_device, position_range_for, progress_bar, window_positions


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
    windows = ensure_windows(texts, tokenizer, seq_len, 1, max_windows)
    position_range = position_range_for(model, position_range, seq_len, "calibrate")
    positions = window_positions(windows.shape[0], seq_len, position_range, torch.Generator().manual_seed(seed))
    dims = model_dims(model)
    layers, kv_heads, head_dim = dims["layers"], dims["kv_heads"], dims["head_dim"]
    device = model_device(model)
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
    tap = KVTap(model, record)
    batches = list(zip(windows.split(batch_size), positions.split(batch_size)))
    for batch, pos in progress_bar(batches, desc="calibrate (PCA)", unit="batch", disable=not progress):
        forward(model, batch.to(device), tap, logits_to_keep=1, position_ids=pos.to(device))
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
