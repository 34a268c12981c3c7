"""Rank allocation: per-(layer, KV head, K/V) ranks under a total cache size, greedily removing,
round after round, the rank steps whose removal costs least (the paper's Algorithm 1 in spirit; the
cost estimate is described in :func:`allocate_ranks`). The ranks are stored with the projections."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .. import compat
from ..calibration import Texts
from ..core.facts import full_attention_layers, model_dims
from .projections import Projections, check_ratio, refuse_removed
from .taps import KVTap, ensure_windows, low_rank, model_device, position_range_for, progress_bar, rank_masks, window_positions


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
        mask = rank_masks(ranks[n], d, x.device)
        proj = (u[n] * mask[:, None, :]) @ u[n].transpose(-1, -2)
        cur[n] = low_rank(x.float(), mu[n], proj, sink_tokens)
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
    *args: Any,
    compression_ratio: float | Sequence[float] = 0.5,
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
    **removed: Any,
) -> Projections:
    """Per-(layer, KV head, K/V) ranks removing ``compression_ratio`` of the full cache in total,
    stored in ``projections``.

    Greedy, from full rank down (the paper's Algorithm 1 in spirit): each round runs the model on
    the calibration windows with the current ranks (every token's keys/values projected, as in
    training), then, for every (layer, KV head, K/V), computes exactly how the layer's attention
    output would change if that head lost ``step`` more dims, and weights the change by the
    squared gradient of the language-model loss with respect to that output (a diagonal
    empirical-Fisher estimate of the loss increase, so that decrements in sensitive layers cost
    more). The ``round_fraction`` of all rank steps with the lowest estimates are removed (at most
    one per head per round), and rounds repeat until the ratio is met exactly (up to one
    ``step``). Keys and values cost the same bytes per dim, so the cheapest error wins.

    Only full-attention layers are allocated (other layers are not compressed).

    Args:
        model: the transformers causal LM the projections belong to.
        projections: PCA or trained projections; the allocations are stored in them.
        texts: calibration text (strings with ``tokenizer=``, or token ids).
        compression_ratio: fraction of the full cache removed, in [0, 1), or a list of them: one
            greedy path serves every ratio on it (the allocation is taken when the path passes
            each one). Keyword-only (``budget=``, the fraction kept, is refused: pass
            ``compression_ratio=1 - budget``).
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
        ``projections`` (modified in place) with an allocation per ratio (stored as
        ``ranks_k@b``/``ranks_v@b``, ``b = 1 − compression_ratio``) and
        ``options["allocation"]`` describing the run.
    """
    refuse_removed("allocate_ranks", args, removed)
    if not isinstance(projections, Projections):
        raise ValueError("allocate_ranks: projections must be a compresskv.Projections (from compresskv.calibrate).")
    projections.check_model(model)
    dims = model_dims(model)
    layers, kv_heads, d = dims["layers"], dims["kv_heads"], dims["head_dim"]
    one = isinstance(compression_ratio, (int, float)) and not isinstance(compression_ratio, bool)
    asked = [compression_ratio] if one or not isinstance(compression_ratio, Sequence) else list(compression_ratio)
    ratios = sorted({check_ratio(r, "allocate_ranks") for r in asked})  # ascending: the greedy path's order
    step = step if step is not None else max(1, d // 8)
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= d:
        raise ValueError(f"allocate_ranks: step must be an int in [1, head_dim={d}], got {step!r}.")
    min_rank = min_rank if min_rank is not None else step
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or not 1 <= min_rank <= d:
        raise ValueError(f"allocate_ranks: min_rank must be an int in [1, head_dim={d}], got {min_rank!r}.")
    if not 0.0 < round_fraction <= 1.0:
        raise ValueError(f"allocate_ranks: round_fraction must be in (0, 1], got {round_fraction!r}.")
    lowest = (d - ((d - min_rank) // step) * step) / d
    if ratios[-1] > 1.0 - lowest + 1e-9:
        raise ValueError(
            f"allocate_ranks: compression_ratio {ratios[-1]} keeps less than the smallest reachable fraction "
            f"({lowest:g}, i.e. compression_ratio {1.0 - lowest:g}: every head at rank {int(lowest * d)} with "
            f"step={step}, min_rank={min_rank}); lower min_rank or step."
        )
    windows = ensure_windows(texts, tokenizer, seq_len, 1, max_windows)
    position_range = position_range_for(model, position_range, seq_len, "allocate_ranks")
    positions = window_positions(windows.shape[0], seq_len, position_range, torch.Generator().manual_seed(seed))
    device = model_device(model)
    full = full_attention_layers(model)
    total_steps = len(full) * kv_heads * 2 * d / step
    ranks = {n: torch.full((layers, kv_heads), d, dtype=torch.long) for n in ("k", "v")}
    u = {n: projections.tensors[f"U_{n}"].to(device, torch.float32) for n in ("k", "v")}
    mu = {n: projections.tensors[f"mu_{n}"].to(device, torch.float32) for n in ("k", "v")}
    targets = {r: int(round(r * total_steps)) for r in ratios}
    per_round = max(1, int(round(round_fraction * total_steps)))
    removed = 0
    rounds = 0
    start = time.perf_counter()
    _register_probe()
    original = model.config._attn_implementation
    saved = [p.requires_grad for p in model.parameters()]
    bar = progress_bar(total=targets[ratios[-1]], desc="allocate ranks", unit="step", disable=not progress)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.set_attn_implementation(_PROBE)
        pending = list(ratios)
        while pending:
            while pending and removed >= targets[pending[0]]:
                projections.add_allocation(compression_ratio=pending[0], ranks_k=ranks["k"].clone(),
                                           ranks_v=ranks["v"].clone())
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
                        mask = rank_masks(ranks[n][layer], d, device)
                        proj[n] = (u[n][layer] * mask[:, None, :]) @ u[n][layer].transpose(-1, -2)
                    return (low_rank(keys, mu["k"][layer], proj["k"], sink_tokens),
                            low_rank(values, mu["v"][layer], proj["v"], sink_tokens))

                def record(layer: int, query: torch.Tensor, out: torch.Tensor, scaling: float):
                    if layer in captured:
                        captured[layer].update(q=query.detach(), out=out, scaling=scaling)

                _probe_state["record"] = record
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=embeds, **compat.cache_kwargs(KVTap(model, tap), model.forward), use_cache=True,
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
            take = min(per_round, targets[pending[0]] - removed)
            chosen = [int(i) for i in flat.argsort()[:take] if torch.isfinite(flat[i])]
            if not chosen:
                raise RuntimeError("allocate_ranks: no rank left to remove (lower the compression_ratio or min_rank).")
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
        "compression_ratios": ratios, "step": step, "min_rank": min_rank, "rounds": rounds,
        "windows": int(windows.shape[0]), "seq_len": seq_len, "tokens": int(windows.numel()),
        "seconds": round(time.perf_counter() - start, 1), "sink_tokens": sink_tokens,
        "position_range": position_range,
    }
    return projections
