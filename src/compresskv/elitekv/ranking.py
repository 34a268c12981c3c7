"""RoPElite: which RoPE frequency pairs each KV head keeps (EliteKV, arXiv 2503.01586, §3.1).

RoPE pair ``i`` of a head is the pair of dims ``(i, i + d/2)`` (transformers' ``rotate_half``
layout), rotated at frequency ``θ_i``. The logit of query ``m`` and key ``n`` is a sum of one term
per pair, so with a set ``C`` of pairs rotated and the others left un-rotated (position-free)

    logits_C = Σ_{i∈C} A_i + Σ_{i∉C} B_i        (A_i: pair i rotated, B_i: un-rotated)

RoPElite orders the pairs of every (layer, KV head) greedily: start with ``C = ∅``; at each round add
the pair whose rotation brings ``logits_C`` closest, in mean absolute difference over calibration
text, to the fully rotated logits. For GQA the difference is averaged over the KV head's group of
query heads. The authors' code runs one pass over the data per round; here one pass collects, per
window, the per-pair terms ``A_i − B_i`` at a random sample of causal (query, key) positions
(``samples_per_window``; ``None`` takes every causal pair), and all rounds are then run on them.

Also computed in the same pass: the baselines' *contribution* score (mean ``|A_i|``: how much a
pair contributes to the logits' magnitude; higher first) and, for the activation-aware J-LRD, the
second moment ``E[x xᵀ]`` of every attention input. The uniform baselines need no data.
"""

from __future__ import annotations

from typing import Any

import torch

from ..calibration import Artifact, Texts, calibration_windows, config_hash, model_name
from ..core.facts import model_dims
from ..core.rope import rotate_half
from .support import attention_modules, check_supported

SELECTIONS = ("ropelite", "contribution", "uniform", "low_frequency")
"""``ropelite``: the greedy order; ``contribution``: highest mean |pair term| first; ``uniform``:
evenly spaced pairs, the same for every head (``linspace(0, d/2 − 1, r)``, as in the authors'
code); ``low_frequency``: the ``r`` lowest-frequency pairs."""


class FrequencyRanking(Artifact):
    """The result of :func:`rank_frequencies` (save/load with ``save_pretrained`` /
    ``FrequencyRanking.from_pretrained(path, model)``; loading onto another model's config fails).

    Tensors: ``ropelite_order`` ``[layers, kv_heads, d/2]`` (pair indices, first chosen first),
    ``ropelite_distance`` (mean |logit difference| to full RoPE after adding each pair),
    ``contribution`` ``[layers, kv_heads, d/2]`` and, when recorded, ``input_moment``
    ``[layers, hidden, hidden]`` (``E[x xᵀ]`` of each attention input).
    """

    kind = "elitekv_frequency_ranking"

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(layers, kv_heads, pairs per head)``."""
        return tuple(self.tensors["ropelite_order"].shape)  # type: ignore[return-value]

    @property
    def input_moment(self) -> torch.Tensor | None:
        return self.tensors.get("input_moment")

    def order(self, selection: str = "ropelite") -> torch.Tensor:
        """Pairs of every (layer, KV head), most wanted first, for a data-driven selection."""
        if selection == "ropelite":
            return self.tensors["ropelite_order"].long()
        if selection == "contribution":
            return torch.argsort(self.tensors["contribution"], dim=-1, descending=True, stable=True)
        raise ValueError(f"compresskv.elitekv: {selection!r} is not a ranked selection (ropelite, contribution)")

    def select(self, rope_pairs: int, selection: str = "ropelite") -> torch.Tensor:
        """``[layers, kv_heads, rope_pairs]`` pair indices (ascending) of ``selection``."""
        layers, heads, pairs = self.shape
        return select_pairs(layers, heads, pairs, rope_pairs, selection, self)

    def summary(self) -> dict[str, Any]:
        """How often each pair is among the first quarter chosen, and the distance curve."""
        order = self.tensors["ropelite_order"]
        dist = self.tensors["ropelite_distance"]
        return {
            "shape": list(self.shape),
            "tokens": self.options.get("tokens"),
            "mean_distance_by_round": dist.mean(dim=(0, 1)).tolist(),
            "first_pair_histogram": torch.bincount(order[..., 0].flatten(), minlength=order.shape[-1]).tolist(),
        }


def select_pairs(
    layers: int, heads: int, pairs: int, rope_pairs: int, selection: str, ranking: FrequencyRanking | None = None
) -> torch.Tensor:
    """The chosen pair indices ``[layers, heads, rope_pairs]`` (ascending within each head)."""
    if selection not in SELECTIONS:
        raise ValueError(f"compresskv.elitekv: unknown selection {selection!r}; choose one of {list(SELECTIONS)}")
    if selection == "uniform":
        chosen = torch.linspace(0, pairs - 1, rope_pairs).long() if rope_pairs > 1 else torch.zeros(rope_pairs, dtype=torch.long)
        return chosen.expand(layers, heads, rope_pairs).clone()
    if selection == "low_frequency":
        return torch.arange(pairs - rope_pairs, pairs).expand(layers, heads, rope_pairs).clone()
    if ranking is None:
        raise ValueError(
            f"compresskv.elitekv: selection {selection!r} needs a frequency ranking: pass "
            "ranking=compresskv.elitekv.rank_frequencies(model, texts, tokenizer=tok) (or a saved one), or "
            "calibration_texts=... with tokenizer=...; selection='uniform' needs no calibration."
        )
    return ranking.order(selection)[..., :rope_pairs].sort(dim=-1).values


def _causal_samples(seq_len: int, n: int | None, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(query, key) positions with key ≤ query: all of them (``n`` None or too big) or ``n`` drawn
    uniformly over the causal triangle."""
    total = seq_len * (seq_len + 1) // 2
    if n is None or n >= total:
        q, k = torch.tril_indices(seq_len, seq_len)
        return q, k
    flat = torch.randint(0, total, (n,), generator=generator, dtype=torch.long)
    q = ((torch.sqrt(8.0 * flat.double() + 1.0) - 1.0) / 2.0).floor().long()
    # fix rare floating-point misses at row boundaries
    q = torch.where(q * (q + 1) // 2 > flat, q - 1, q)
    q = torch.where((q + 1) * (q + 2) // 2 <= flat, q + 1, q)
    k = flat - q * (q + 1) // 2
    return q, k


class _Collector:
    """Per-layer statistics gathered by forward pre-hooks on the original attention modules."""

    def __init__(self, n_layers: int, moments: bool) -> None:
        self.terms: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.contribution: list[torch.Tensor | None] = [None] * n_layers
        self.moment: list[torch.Tensor | None] = [None] * n_layers
        self.samples = 0
        self.tokens = 0
        self.want_moments = moments
        self.positions: tuple[torch.Tensor, torch.Tensor] | None = None

    def hook(self, layer: int, dims: dict[str, int]):
        def fn(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            x = hidden[0].float()
            seq = x.shape[0]
            if self.want_moments:
                m = (x.T @ x).double()
                self.moment[layer] = m if self.moment[layer] is None else self.moment[layer] + m
            d, hq, hkv = dims["head_dim"], dims["heads"], dims["kv_heads"]
            g, p = hq // hkv, d // 2
            wq, bq = module.q_proj.weight.float(), module.q_proj.bias
            wk, bk = module.k_proj.weight.float(), module.k_proj.bias
            q = torch.nn.functional.linear(x, wq, None if bq is None else bq.float()).view(seq, hq, d)
            k = torch.nn.functional.linear(x, wk, None if bk is None else bk.float()).view(seq, hkv, d)
            c, s = cos[0].float()[:, None, :], sin[0].float()[:, None, :]
            qr, kr = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
            qi, ki = self.positions
            qi, ki = qi.to(x.device), ki.to(x.device)
            kv_of = torch.arange(hq, device=x.device) // g
            scale = d**-0.5
            rot = qr[qi] * kr[ki][:, kv_of]  # [S, hq, d]
            plain = q[qi] * k[ki][:, kv_of]
            a = (rot[..., :p] + rot[..., p:]) * scale  # pair i rotated   [S, hq, P]
            b = (plain[..., :p] + plain[..., p:]) * scale  # pair i un-rotated
            n = a.shape[0]
            diff = (a - b).view(n, hkv, g, p).permute(1, 3, 2, 0).reshape(hkv, p, g * n)
            self.terms[layer].append(diff.cpu())
            contrib = a.abs().view(n, hkv, g, p).sum(dim=(0, 2)).double().cpu()
            prev = self.contribution[layer]
            self.contribution[layer] = contrib if prev is None else prev + contrib

        return fn


def _greedy(terms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPElite rounds on ``terms`` ``[heads, P, N]`` (``A_i − B_i`` at N samples): returns the
    order ``[heads, P]`` and the mean |logits_C − logits_full| after each round."""
    heads, pairs, _ = terms.shape
    residual = -terms.sum(dim=1)  # logits with nothing rotated − fully rotated logits
    chosen = torch.zeros(heads, pairs, dtype=torch.bool)
    order = torch.empty(heads, pairs, dtype=torch.long)
    dist = torch.empty(heads, pairs, dtype=torch.float32)
    rows = torch.arange(heads)
    for t in range(pairs):
        cand = (residual[:, None, :] + terms).abs().mean(dim=-1)
        cand[chosen] = float("inf")
        pick = cand.argmin(dim=-1)
        order[:, t] = pick
        dist[:, t] = cand[rows, pick]
        chosen[rows, pick] = True
        residual += terms[rows, pick]
    return order, dist


@torch.no_grad()
def rank_frequencies(
    model: torch.nn.Module,
    texts: Texts,
    tokenizer: Any = None,
    *,
    seq_len: int = 1024,
    num_windows: int = 8,
    samples_per_window: int | None = 2048,
    activation_stats: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> FrequencyRanking:
    """RoPElite frequency ranking of ``model`` on calibration ``texts`` (strings with
    ``tokenizer=``, or token ids), cut into up to ``num_windows`` windows of ``seq_len`` tokens.

    Returns a :class:`FrequencyRanking` holding the RoPElite order, the contribution scores and
    (``activation_stats``) each attention input's second moment for the activation-aware J-LRD.
    ``samples_per_window`` causal (query, key) positions per window estimate the mean |Δ logits|
    (``None``: all of them, exact but quadratic in ``seq_len``).
    """
    from tqdm.auto import tqdm

    check_supported(model, converting=False)
    dims = model_dims(model)
    modules = attention_modules(model)
    windows = calibration_windows(texts, tokenizer, seq_len=seq_len, min_windows=1, max_windows=num_windows)
    device = next(model.parameters()).device
    base = getattr(model, "model", model)
    collector = _Collector(len(modules), activation_stats)
    generator = torch.Generator().manual_seed(seed)
    handles = [m.register_forward_pre_hook(collector.hook(i, dims), with_kwargs=True) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        for window in tqdm(windows, desc="RoPElite: calibration windows", disable=not progress):
            collector.positions = _causal_samples(window.shape[0], samples_per_window, generator)
            base(input_ids=window[None].to(device), use_cache=False)
            collector.tokens += window.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    orders, dists, contribs, moments = [], [], [], []
    for layer in tqdm(range(len(modules)), desc="RoPElite: greedy rounds", disable=not progress):
        terms = torch.cat(collector.terms[layer], dim=-1)
        collector.terms[layer] = []
        order, dist = _greedy(terms)
        orders.append(order)
        dists.append(dist)
        n = terms.shape[-1]
        contribs.append((collector.contribution[layer] / n).float())
        if activation_stats:
            moments.append((collector.moment[layer] / collector.tokens).float())
    tensors = {
        "ropelite_order": torch.stack(orders),
        "ropelite_distance": torch.stack(dists),
        "contribution": torch.stack(contribs),
    }
    if activation_stats:
        tensors["input_moment"] = torch.stack(moments)
    options = {
        "seq_len": int(windows.shape[1]),
        "num_windows": int(windows.shape[0]),
        "samples_per_window": samples_per_window,
        "seed": seed,
        "tokens": int(collector.tokens),
        "layers": len(modules),
        "kv_heads": dims["kv_heads"],
        "head_dim": dims["head_dim"],
    }
    return FrequencyRanking(tensors, options, model_name(model), config_hash(model))


@torch.no_grad()
def input_moments(
    model: torch.nn.Module, texts: Texts, tokenizer: Any = None, *, seq_len: int = 1024, num_windows: int = 8,
    progress: bool = True,
) -> torch.Tensor:
    """``E[x xᵀ]`` of every attention input ``[layers, hidden, hidden]`` on calibration text (what
    the activation-aware J-LRD whitens with), without ranking."""
    from tqdm.auto import tqdm

    modules = attention_modules(model)
    windows = calibration_windows(texts, tokenizer, seq_len=seq_len, min_windows=1, max_windows=num_windows)
    device = next(model.parameters()).device
    sums: list[torch.Tensor | None] = [None] * len(modules)

    def hook(i: int):
        def fn(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            x = hidden.reshape(-1, hidden.shape[-1]).float()
            m = (x.T @ x).double()
            sums[i] = m if sums[i] is None else sums[i] + m

        return fn

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    base = getattr(model, "model", model)
    try:
        for window in tqdm(windows, desc="EliteKV: activation statistics", disable=not progress):
            base(input_ids=window[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    count = windows.numel()
    return torch.stack([(s / count).float().cpu() for s in sums])  # type: ignore[operator]
