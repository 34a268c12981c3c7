"""MiniCache (arXiv 2405.14366): adjacent layers merged, storing the merged form for real.

Layers ``(l, l+1)`` from the middle of the model on are merged per token and KV head, once, right
after prefill attention: both vectors are split into magnitude and direction, the directions are
SLERP'd (``t = 0.6``) into one shared unit direction, each layer keeps its own magnitudes, and the
most divergent token pairs (angular distance in the top ``gamma`` of the observed range) keep both
original vectors. Tokens decoded afterwards are appended uncompressed. Attention is computed from
the shared direction without rebuilding anything.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..core.attention import AttentionCall
from ..core.cache import KVLayer
from ..core.facts import full_attention_layers, text_config
from ..core.storage import tensor_bytes
from .factors import REMAINDERS, _is_int, _is_number
from .group import ReadCost, _Group, _GroupedCache, _PrefixLayer

#: MiniCache's ``read_mode`` values (see :data:`compresskv.core.readmode.READ_MODES`): ``"auto"`` and
#: ``"latent"`` both attend from the merged form directly (there is no rebuilt alternative to weigh).
READ_MODES = ("auto", "latent", "model")


def slerp_merge(
    xa: torch.Tensor, xb: torch.Tensor, t: float, real: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge two layers' vectors (``[batch, heads, T, d]``, fp32) per token and head.

    Returns ``(direction, norm_a, norm_b, distance)``: the SLERP at ``t`` of the two unit
    directions (renormalised; linear interpolation where they are parallel), each layer's norms,
    and the angular distance ``arccos(cos)/π`` in [0, 1] (``-inf`` at padding tokens).
    """
    norm_a, norm_b = xa.norm(dim=-1), xb.norm(dim=-1)
    ua = xa / norm_a.clamp_min(1e-12)[..., None]
    ub = xb / norm_b.clamp_min(1e-12)[..., None]
    cos = (ua * ub).sum(dim=-1).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    near = sin < 1e-6
    safe = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * theta) / safe)
    wb = torch.where(near, torch.full_like(sin, t), torch.sin(t * theta) / safe)
    direction = wa[..., None] * ua + wb[..., None] * ub
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    distance = theta / math.pi
    if real is not None:
        distance = distance.masked_fill(~real[:, None, :], float("-inf"))
    return direction, norm_a, norm_b, distance


def retention_index(distance: torch.Tensor, gamma: float, real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens kept unmerged: per batch row, those whose angular distance lies in the top ``gamma``
    of the row's observed range (``d ≥ d_max − gamma·(d_max − d_min)``, over KV heads and real
    tokens). Every head of a row keeps the same number ``n_row`` of tokens, its ``n_row`` most
    divergent, ``n_row`` being the largest count above the threshold among the row's heads.

    Storage needs the same number ``n`` (the largest ``n_row``) of slots in every row. Returns
    ``(index, retained)``, both ``[batch, heads, n]``: the ``n`` most divergent tokens in ascending
    order, and whether each is retained (``False``: a slot only the batch needs, whose token is
    read as merged, so that a row's result does not depend on its batch)."""
    bsz, n_kv, length = distance.shape
    finite = torch.isfinite(distance)
    hi = distance.masked_fill(~finite, float("-inf")).amax(dim=(1, 2))
    lo = distance.masked_fill(~finite, float("inf")).amin(dim=(1, 2))
    threshold = hi - gamma * (hi - lo)
    above = (distance >= threshold[:, None, None]) & finite
    per_row = above.sum(dim=-1).amax(dim=1).clamp_min(1)  # [batch]
    count = max(1, min(int(per_row.max()) if above.numel() else 0, length))
    top = distance.topk(count, dim=-1).indices  # most divergent first
    retained = torch.arange(count, device=distance.device)[None, None, :] < per_row[:, None, None]
    index, order = top.sort(dim=-1)
    return index, retained.expand(bsz, n_kv, count).gather(-1, order)


class _MiniGroup(_Group):
    storage = ("direction_k", "direction_v", "index_k", "index_v")

    def __init__(self, cache: "MiniCache", layer_ids: list[int]) -> None:
        super().__init__(cache, layer_ids)
        self.direction_k: torch.Tensor | None = None
        self.direction_v: torch.Tensor | None = None
        self.index_k: torch.Tensor | None = None
        self.index_v: torch.Tensor | None = None

    def compress(self, call: AttentionCall) -> None:
        cache: MiniCache = self.cache  # type: ignore[assignment]
        layer_a, layer_b = self.layers
        length = layer_a.keys.shape[-2]
        dtype, device = layer_a.keys.dtype, layer_a.keys.device  # shared tensors live with the first layer
        real = call.pad2d[:, -length:].to(device, torch.bool) if call.pad2d is not None else None
        index_dtype = torch.int16 if length <= 2**15 else torch.int32
        for kind in ("k", "v"):
            xa = (layer_a.keys if kind == "k" else layer_a.values).float()
            xb = (layer_b.keys if kind == "k" else layer_b.values).to(device).float()
            direction, norm_a, norm_b, distance = slerp_merge(xa, xb, cache.t, real)
            index, retained = retention_index(distance, cache.gamma, real)
            gather = index[..., None].expand(-1, -1, -1, xa.shape[-1])
            if real is not None:
                direction = direction * real[:, None, :, None]
            direction = direction.to(dtype)
            setattr(self, f"direction_{kind}", direction.contiguous())
            setattr(self, f"index_{kind}", index.to(index_dtype).contiguous())
            for layer, x, norm in ((layer_a, xa, norm_a), (layer_b, xb, norm_b)):
                # A filler slot holds the merged vector, as stored (direction and magnitude in dtype).
                merged = direction.gather(2, gather).float() * norm.to(dtype).float().gather(2, index)[..., None]
                kept = torch.where(retained[..., None], x.gather(2, gather), merged)
                # Magnitudes are zero in the slots, so the merged term vanishes there.
                home = layer.keys.device
                setattr(layer, f"magnitude_{kind}", norm.scatter(2, index, 0.0).to(home, dtype).contiguous())
                setattr(layer, f"retained_{kind}", kept.to(home, dtype).contiguous())


class MiniCacheLayer(_PrefixLayer):
    """One layer of a MiniCache pair: per-token magnitudes (``[batch, kv_heads, T]``) and the
    original vectors of the retained tokens (``[batch, kv_heads, n, head_dim]``)."""

    group: _MiniGroup
    storage = ("keys", "values", "magnitude_k", "magnitude_v", "retained_k", "retained_v")

    def __init__(self, cache: "MiniCache", group: _MiniGroup) -> None:
        super().__init__(cache, group)
        self.magnitude_k: torch.Tensor | None = None
        self.magnitude_v: torch.Tensor | None = None
        self.retained_k: torch.Tensor | None = None
        self.retained_v: torch.Tensor | None = None

    def prefix_logits(self, qg: torch.Tensor, cost: ReadCost | None = None) -> torch.Tensor:
        device = self.magnitude_k.device
        direction, index = self.group.on(self.group.direction_k, device), self.group.on(self.group.index_k, device).long()
        bsz, n_kv, rows, dim = qg.shape
        logits = (qg @ direction.transpose(-1, -2)) * self.magnitude_k[:, :, None, :]
        kept = qg @ self.retained_k.transpose(-1, -2)
        logits.scatter_add_(-1, index[:, :, None, :].expand(-1, -1, rows, -1), kept)
        if cost is not None:
            cost.flops += bsz * n_kv * rows * (direction.shape[-2] + index.shape[-1]) * dim
        return logits

    def prefix_output(self, probs: torch.Tensor, cost: ReadCost | None = None) -> torch.Tensor:
        device = self.magnitude_v.device
        direction, index = self.group.on(self.group.direction_v, device), self.group.on(self.group.index_v, device).long()
        bsz, n_kv, rows, _ = probs.shape
        weighted = probs * self.magnitude_v[:, :, None, :]
        kept = probs.gather(-1, index[:, :, None, :].expand(-1, -1, rows, -1))
        if cost is not None:
            cost.transient_bytes = max(cost.transient_bytes, tensor_bytes(weighted))
            cost.flops += bsz * n_kv * rows * (direction.shape[-2] + index.shape[-1]) * direction.shape[-1]
        return weighted @ direction + kept @ self.retained_v

    def rebuild_prefix(self, cost: ReadCost | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for kind in ("k", "v"):
            magnitude = getattr(self, f"magnitude_{kind}")
            direction = self.group.on(getattr(self.group, f"direction_{kind}"), magnitude.device)
            index = self.group.on(getattr(self.group, f"index_{kind}"), magnitude.device).long()
            full = direction * getattr(self, f"magnitude_{kind}")[..., None]
            full = full.scatter(2, index[..., None].expand(-1, -1, -1, full.shape[-1]), getattr(self, f"retained_{kind}"))
            if cost is not None:
                cost.rebuilt_bytes += tensor_bytes(full)
            out.append(full)
        return out[0], out[1]


class MiniCache(_GroupedCache):
    """MiniCache (arXiv 2405.14366): merge the K/V of adjacent layer pairs ``(l, l+1)``, from the
    middle of the model to ``end_layer``, into one shared direction per token and KV head.

    Per token and KV head, both layers' vectors are split into magnitude and direction; the
    directions are interpolated by SLERP at ``t`` into one unit direction shared by the pair; each
    layer keeps its magnitudes; tokens whose two vectors diverge most (angular distance
    ``arccos(cos)/π`` in the top ``gamma`` of the row's range) keep both originals, unmerged.
    Keys are merged post-RoPE (a rotation preserves norms and angles, so merging before or after
    RoPE is the same). Attention is computed from the merged form directly.

    Args:
        model: the transformers model the cache is for.
        start_layer: first merged layer (default: the middle layer ``L // 2``, moved one layer
            deeper when that leaves an odd number of layers).
        end_layer: last merged layer (inclusive, default the last).
        t: SLERP interpolation weight towards the deeper layer of a pair (paper: 0.6).
        gamma: retention threshold in [0, 1] (paper: 0.05); ``1`` retains every token (exact).
        remainder: ``"error"`` when the range has an odd number of layers, or ``"last_group"`` to
            leave the last one unmerged.
        read_mode: how the merged prompt is read at decode (same result): ``"auto"`` (default) or
            ``"latent"`` (attention from the merged form directly), or ``"model"`` (rebuild the
            pair's K/V and call the model's own attention function).
        profile: account every read of the merged prompt (bytes, multiply-adds, host time) in
            ``stats().last_read``/``total_read`` (default ``False``: no accounting on the decode path).

    Stored per pair and per K/V: the shared direction ``[batch, kv_heads, T, d]`` and the retained
    token indices ``[batch, kv_heads, n]`` (int16); per layer: magnitudes ``[batch, kv_heads, T]``
    and retained originals ``[batch, kv_heads, n, d]``. A pair stores a little over half of what
    its two layers held, so MiniCache alone cannot compress beyond about 2×.
    """

    method = "minicache"

    def __init__(
        self,
        model: torch.nn.Module,
        start_layer: int | None = None,
        end_layer: int = -1,
        t: float = 0.6,
        gamma: float = 0.05,
        remainder: str = "error",
        read_mode: str = "auto",
        profile: bool = False,
    ) -> None:
        owner = self._check_reading(model, read_mode, READ_MODES, profile)
        if not (_is_number(t) and 0.0 <= t <= 1.0):
            raise ValueError(f"{owner}: t is the SLERP weight and must be in [0, 1], got {t!r}.")
        if not (_is_number(gamma) and 0.0 <= gamma <= 1.0):
            raise ValueError(f"{owner}: gamma is the retention threshold and must be in [0, 1], got {gamma!r}.")
        if remainder not in REMAINDERS:
            raise ValueError(f"{owner}: remainder must be one of {list(REMAINDERS)}, got {remainder!r}.")
        start = self._pair_range(model, start_layer, end_layer, remainder)
        self.t, self.gamma = float(t), float(gamma)
        self.keys_mode = "post_rope"
        self._setup_groups(model, start, end_layer, 2, remainder)
        super().__init__(model)

    def _pair_range(self, model: torch.nn.Module, start_layer: Any, end_layer: Any, remainder: str) -> int:
        """The first merged layer, after checking that ``start_layer..end_layer`` holds layers to
        pair; errors name MiniCache's own options (it has no ``group_size``: pairs are fixed)."""
        owner = type(self).__name__
        n_layers = text_config(model).num_hidden_layers
        for name, value in (("start_layer", start_layer), ("end_layer", end_layer)):
            if name == "start_layer" and value is None:
                continue
            if not _is_int(value) or not -n_layers <= value < n_layers:
                raise ValueError(
                    f"{owner}: {name} must be a layer index in [0, {n_layers}) (negative counts from the end)"
                    f"{' or None (the middle layer)' if name == 'start_layer' else ''}, got {value!r}."
                )
        end = end_layer % n_layers
        end_name = f"end_layer={end_layer}" + (f" (layer {end})" if end_layer < 0 else "")
        full = full_attention_layers(model)
        upto = [i for i in full if i <= end]
        if len(upto) < 2:
            raise ValueError(
                f"{owner}: {end_name} leaves {len(upto)} full-attention layer{'' if len(upto) == 1 else 's'} "
                f"{upto} up to it, and layers are merged in pairs: choose an end_layer in [{full[1] if len(full) > 1 else n_layers}, "
                f"{n_layers}) (layer indices; negative counts from the end)."
            )
        if start_layer is None:
            middle = n_layers // 2
            start = middle
            chosen = [i for i in full if middle <= i <= end]
            if len(chosen) % 2 and len(chosen) >= 3:
                start = chosen[1]  # an even number of layers from just past the middle
            elif len(chosen) < 2:
                start = upto[-2]  # the last pair up to end_layer
                if len(chosen) == 0:  # end_layer before the middle: say so rather than move that far
                    raise ValueError(
                        f"{owner}: {end_name} comes before the default start_layer, the middle layer ({middle}; "
                        f"MiniCache merges from the middle of the model on): pass start_layer <= {start} too, or "
                        f"an end_layer >= {middle}."
                    )
            where = f"start_layer={start} (the default) to {end_name}"
        else:
            start = start_layer % n_layers
            if start > end:
                raise ValueError(
                    f"{owner}: start_layer={start_layer} comes after end_layer={end_layer}; choose "
                    f"start_layer < end_layer (layer indices in [0, {n_layers}))."
                )
            where = f"start_layer={start_layer} to {end_name}"
        chosen = [i for i in full if start <= i <= end]
        if len(chosen) < 2:
            raise ValueError(
                f"{owner}: layers are merged in pairs, and {where} holds only {len(chosen)} "
                f"full-attention layer{'' if len(chosen) == 1 else 's'} {chosen}; widen the range with "
                f"start_layer/end_layer (layer indices in [0, {n_layers}), at least two full-attention layers)."
            )
        if len(chosen) % 2 and remainder == "error":
            raise ValueError(
                f"{owner}: layers are merged in pairs, and {where} holds {len(chosen)} "
                f"full-attention layers ({chosen[0]}..{chosen[-1]}), an odd number; choose start_layer/end_layer "
                f"covering an even number (e.g. start_layer={chosen[1]} or end_layer={chosen[-2]}), or pass "
                "remainder='last_group' to leave the last one unmerged."
            )
        return start

    def _new_group(self, layer_ids: list[int]) -> _Group:
        return _MiniGroup(self, layer_ids)

    def _new_layer(self, group: _Group) -> KVLayer:
        if len(group.layer_ids) < 2:
            return KVLayer()  # the odd layer out of remainder="last_group" has nothing to merge with
        return MiniCacheLayer(self, group)  # type: ignore[arg-type]

    def _extra_stats(self) -> dict[str, Any]:
        retained = []
        for group in self.groups:
            if isinstance(group, _MiniGroup) and group.index_k is not None:
                retained.append((int(group.index_k.shape[-1]), int(group.index_v.shape[-1])))
            else:
                retained.append(None)
        return {"t": self.t, "gamma": self.gamma, "retained_tokens_kv": retained, "read_mode": self.read_mode}
