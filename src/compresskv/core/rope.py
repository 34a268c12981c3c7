"""RoPE helpers matching transformers' layout: ``rotate_half`` and the model's rotary embedding as
a table of frequencies (:class:`RotaryTable`: xKV un-rotates keys with it; any method that needs
the rotation at other positions can use it)."""

from __future__ import annotations

import torch

from .storage import tensor_bytes


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The ``rotate_half`` of transformers' RoPE: ``[x1, x2] -> [-x2, x1]`` on the last dim (pair
    ``i`` is dims ``i`` and ``i + d/2``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryTable:
    """The model's rotary embedding, as needed to un-rotate keys once and re-rotate them on read.

    Un-rotation uses exactly the ``cos``/``sin`` the model's ``rotary_emb`` returns for the prefill
    positions (it carries rope scaling). Re-rotation recomputes ``cos``/``sin`` for a block of
    stored positions from the embedding's ``inv_freq`` and ``attention_scaling`` (checked against the
    model's own output at compression time); for rope types whose frequencies change with the
    length (``dynamic``, ``longrope``) the prefill's ``inv_freq`` is snapshotted and held.

    A rotary embedding shared by several layer types, each with its own frequencies (Gemma3: one
    ``rotary_emb`` with ``sliding_attention_inv_freq`` and ``full_attention_inv_freq``, called with
    ``layer_type=``), is used for ``layer_type``: the type of the compressed layers.
    """

    def __init__(self, model: torch.nn.Module, owner: str, layer_type: str | None = None,
                 needs: str = "keys='pre_rope'", instead: str = "use keys='post_rope'") -> None:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
        rotary = getattr(decoder, "rotary_emb", None)
        if rotary is None:
            rotary = getattr(model, "rotary_emb", None)
        self.layer_type: str | None = None
        if (rotary is not None and not isinstance(getattr(rotary, "inv_freq", None), torch.Tensor)
                and layer_type is not None and isinstance(getattr(rotary, f"{layer_type}_inv_freq", None), torch.Tensor)):
            self.layer_type = layer_type  # one embedding, frequencies per layer type
        if rotary is None or not isinstance(getattr(rotary, self._prefix + "inv_freq", None), torch.Tensor):
            per_type = sorted(getattr(rotary, "layer_types", None) or []) if rotary is not None else []
            found = f" (it has frequencies for layer types {per_type}, not {layer_type!r})" if per_type else ""
            raise ValueError(
                f"{owner}: {needs} needs the model's rotary embedding (a `rotary_emb` module with "
                f"`inv_freq`, or `<layer_type>_inv_freq` for the compressed layers' type), and "
                f"{type(model).__name__} has none{found}; {instead}."
            )
        self.rotary = rotary
        self.scaling = float(getattr(rotary, self._prefix + "attention_scaling", 1.0) or 1.0)
        rope_type = getattr(rotary, "rope_type", "default")
        if isinstance(rope_type, dict):
            rope_type = rope_type.get(self.layer_type, "default")
        rope_type = str(rope_type)
        self.length_dependent = "dynamic" in rope_type or rope_type == "longrope"
        self.frozen_inv_freq: torch.Tensor | None = None
        self.owner = owner

    @property
    def _prefix(self) -> str:
        return f"{self.layer_type}_" if self.layer_type is not None else ""

    def _model_inv_freq(self) -> torch.Tensor:
        return getattr(self.rotary, self._prefix + "inv_freq")

    def inv_freq(self) -> torch.Tensor:
        return self.frozen_inv_freq if self.frozen_inv_freq is not None else self._model_inv_freq()

    def prefill_table(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos``/``sin`` ``[batch, T, d]`` of the prefill, from the model's own embedding,
        after checking that :meth:`table` reproduces them."""
        # The rotary module may sit on another device than the calling layer (device_map).
        home = self._model_inv_freq().device
        probe = torch.empty(0, dtype=torch.float32, device=home)
        if self.layer_type is not None:
            cos, sin = self.rotary(probe, position_ids.to(home), layer_type=self.layer_type)
        else:
            cos, sin = self.rotary(probe, position_ids.to(home))
        cos, sin = cos.to(position_ids.device, torch.float32), sin.to(position_ids.device, torch.float32)
        if self.length_dependent:
            self.frozen_inv_freq = self._model_inv_freq().detach().clone()
        mine_cos, mine_sin = self.table(position_ids)
        if mine_cos.shape != cos.shape or not (
            torch.allclose(mine_cos, cos, atol=1e-5, rtol=1e-5) and torch.allclose(mine_sin, sin, atol=1e-5, rtol=1e-5)
        ):
            raise ValueError(
                f"{self.owner}: the model's rotary embedding ({type(self.rotary).__name__}) is not the standard "
                "rotate-half RoPE over the whole head (partial or multimodal rotary?), so keys cannot be "
                "re-rotated on read; use keys='post_rope'."
            )
        return cos, sin

    def table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos``/``sin`` ``[..., d]`` for integer ``positions``."""
        inv = self.inv_freq().to(device=positions.device, dtype=torch.float32)
        freqs = positions[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.scaling, emb.sin() * self.scaling

    def half_table(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``/``sin`` ``[..., d/2]`` for integer ``positions``: the first half of :meth:`table`
        (its two halves are equal), bit for bit, in ``dtype``."""
        inv = self.inv_freq().to(device=positions.device, dtype=torch.float32)
        freqs = positions[..., None].float() * inv
        cos, sin = freqs.cos(), freqs.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos.to(dtype), sin.to(dtype)

    def unrotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE keys from rotated ones: ``(k·cos − rotate_half(k)·sin) / scaling²``."""
        out = keys * cos - rotate_half(keys) * sin
        return out / (self.scaling**2) if self.scaling != 1.0 else out

    def nbytes(self) -> int:
        return tensor_bytes(self.frozen_inv_freq)
