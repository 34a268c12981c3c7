"""EliteKV dimension allocation (arXiv 2503.01586, the authors' ``allocation_ppl.py``): for one cache
budget, how much goes to the rotated key dims and how much to the joint K/V latent.

With ``cache_ratio`` the budget per token and layer is ``B = round(cache_ratio · 2·H_kv·d)``
elements (:func:`~compresskv.elitekv.resolve_sizes`): ``r`` RoPE pairs per KV head take
``2·r·H_kv`` of them, the latent the rest (``kv_dim = B − 2·r·H_kv``). More rotated pairs keep more
of RoPE's position information; a larger latent reconstructs the position-free keys and the values
better. :func:`allocate` sweeps ``r`` on held-out text and keeps the one of lowest perplexity, in
place of the fixed rule (:func:`~compresskv.elitekv.default_rope_pairs`, about 3/8 of the budget
to the rotated dims). The result, an :class:`Allocation`, is a small JSON artifact saved next to
the RoPElite ranking.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..calibration import Texts, calibration_windows, config_hash, model_name
from ..core.facts import model_dims
from .cache import EliteKVCache
from .conversion import convert, revert
from .factorization import SVD_MODES, joint_rank, resolve_sizes
from .ranking import SELECTIONS, FrequencyRanking, input_moments, rank_frequencies
from .support import check_supported

KIND = "elitekv_allocation"
FILENAME = "allocation.json"


@dataclass
class Allocation:
    """The result of :func:`allocate`: one row per ``rope_pairs`` tried and the chosen sizes.

    ``table`` rows are ``{"rope_pairs", "kv_dim", "ppl", "nll"}`` (sorted by ``rope_pairs``);
    ``rope_pairs`` / ``kv_dim`` are the row of lowest perplexity; ``rule_rope_pairs`` is what the
    fixed rule (:func:`~compresskv.elitekv.default_rope_pairs`) gives for the same budget (always
    among the rows); ``reference_ppl`` is the original model's perplexity on the same windows.
    Save it with ``save_pretrained(path)`` (a directory holding ``allocation.json``) and read it back
    with ``Allocation.from_pretrained(path, model)`` (with ``model``: refused when measured on
    another model config).

    ```python
    allocation = elitekv.allocate(model, texts, cache_ratio=0.5, tokenizer=tok)
    allocation.save_pretrained("smollm2-allocation-0.5")
    compresskv.patch(model, "elitekv", allocation="smollm2-allocation-0.5", ranking="smollm2-ranking")
    ```
    """

    cache_ratio: float
    rope_pairs: int
    kv_dim: int
    table: list[dict[str, Any]]
    rule_rope_pairs: int
    reference_ppl: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    config_hash: str = ""

    @property
    def ppl(self) -> float:
        """The chosen row's perplexity."""
        return self.row(self.rope_pairs)["ppl"]

    def row(self, rope_pairs: int) -> dict[str, Any]:
        """The table row of ``rope_pairs`` (``KeyError`` when it was not tried)."""
        for row in self.table:
            if row["rope_pairs"] == rope_pairs:
                return row
        raise KeyError(f"rope_pairs={rope_pairs} was not tried; tried {[r['rope_pairs'] for r in self.table]}")

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-able (what ``save_pretrained`` writes, with ``kind``)."""
        return {"kind": KIND, **asdict(self)}

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``allocation.json`` under the directory ``path`` (made if needed); return the file."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        out = path / FILENAME
        out.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, model: Any = None) -> Allocation:
        """Read an allocation saved by ``save_pretrained`` (the directory, or the JSON file itself);
        with ``model``, refuse one measured on another model config."""
        path = Path(path)
        file = path / FILENAME if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"compresskv.elitekv: no saved allocation at {str(path)!r} (expected {FILENAME})")
        data = json.loads(file.read_text())
        if data.pop("kind", None) != KIND:
            raise ValueError(f"compresskv.elitekv: {file} does not hold an EliteKV allocation")
        allocation = cls(**data)
        if model is not None:
            allocation.check_model(model)
        return allocation

    def check_model(self, model: Any) -> None:
        """Raise ``ValueError`` when ``model``'s config differs from the one this was measured on."""
        have = config_hash(model)
        if self.config_hash and have != self.config_hash:
            raise ValueError(
                f"compresskv.elitekv: this allocation was measured on {self.model_name!r} (config hash "
                f"{self.config_hash}); the model given is {model_name(model)!r} (config hash {have}). Recompute it."
            )


def sweep_range(dims: dict[str, int], cache_ratio: float) -> tuple[int, int]:
    """The ``rope_pairs`` :func:`allocate` tries for ``cache_ratio``: from the first that leaves the
    latent no more than its joint rank (so every row uses the whole budget; at least 1) to the last
    that leaves the latent at least one dim (at most ``head_dim / 2``)."""
    _check_ratio(cache_ratio)
    hkv, half = dims["kv_heads"], dims["head_dim"] // 2
    budget = int(round(cache_ratio * 2 * hkv * dims["head_dim"]))
    hi = min(half, (budget - 1) // (2 * hkv))
    lo = 0
    while lo < hi and budget - 2 * lo * hkv > joint_rank(dims, lo):
        lo += 1
    lo = max(lo, 1)
    if hi < lo:
        raise ValueError(
            f"compresskv.elitekv: cache_ratio={cache_ratio:g} leaves {budget} elements per token and layer: too few "
            f"for one RoPE pair per KV head (2·H_kv = {2 * hkv}) and a latent; raise cache_ratio"
        )
    return lo, hi


def split_windows(
    texts: Texts, tokenizer: Any = None, *, eval_texts: Texts | None = None, seq_len: int = 512, num_windows: int = 4,
    eval_windows: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(calibration, evaluation)`` token windows ``[n, seq_len]``, never overlapping.

    With ``eval_texts``: up to ``num_windows`` windows of ``texts`` and up to ``eval_windows`` of
    ``eval_texts``. Without: ``texts`` is cut into windows, the last ``eval_windows`` (at most all
    but one) are held out for evaluation and up to ``num_windows`` of the others calibrate."""
    for name, value, low in (("seq_len", seq_len, 4), ("num_windows", num_windows, 1), ("eval_windows", eval_windows, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"compresskv.elitekv.allocate: {name} must be an int >= {low}, got {value!r}")
    try:
        if eval_texts is not None:
            calib = calibration_windows(texts, tokenizer, seq_len=seq_len, max_windows=num_windows)
            held = calibration_windows(eval_texts, tokenizer, seq_len=seq_len, max_windows=eval_windows)
            return calib, held
        windows = calibration_windows(texts, tokenizer, seq_len=seq_len, min_windows=2)
    except ValueError as err:
        raise ValueError(f"compresskv.elitekv.allocate: texts: {err}") from None
    n_eval = min(eval_windows, windows.shape[0] - 1)
    return windows[: min(num_windows, windows.shape[0] - n_eval)], windows[windows.shape[0] - n_eval :]


def _check_ratio(cache_ratio: Any) -> None:
    bad = isinstance(cache_ratio, bool) or not isinstance(cache_ratio, (int, float))
    if bad or not 0.0 < cache_ratio <= 1.0:
        raise ValueError(
            f"compresskv.elitekv.allocate: cache_ratio must be a number in (0, 1] (the fraction of the original "
            f"cache kept), got {cache_ratio!r}"
        )


def _heldout_nll(model: torch.nn.Module, windows: torch.Tensor, dynamic: bool = False) -> float:
    """Mean NLL (nats) of the second half of each window, its first half prefilled into a fresh
    :class:`EliteKVCache` (``dynamic``: a ``DynamicCache``, for the original model), as
    ``compresskv.eval.run_perplexity`` measures it."""
    from ..eval.perplexity import PerplexityTask, run_perplexity

    half = windows.shape[1] // 2
    nll = []
    for i, window in enumerate(windows):
        task = PerplexityTask(window[None, :half], window[None, half:], seed=i, start=0, name="allocation")
        cache = None if dynamic else EliteKVCache(model)
        nll.append(run_perplexity(model, task, cache, chunk_size=windows.shape[1])["nll"])
    return sum(nll) / len(nll)


def _coarse(lo: int, hi: int, grid: int, rule: int) -> list[int]:
    points = {lo + round(i * (hi - lo) / (grid - 1)) for i in range(grid)} if grid > 1 else {(lo + hi) // 2}
    return sorted(points | {rule})


def _next_points(ppl: dict[int, float]) -> list[int]:
    """Around the best ``r`` so far: the midpoint of each gap to its evaluated neighbours that is
    wider than 1 (each round halves the gaps; an empty list ends the search)."""
    best = min(ppl, key=lambda r: (ppl[r], r))
    left = max((r for r in ppl if r < best), default=None)
    right = min((r for r in ppl if r > best), default=None)
    out = []
    if left is not None and best - left > 1:
        out.append((left + best + 1) // 2)
    if right is not None and right - best > 1:
        out.append((best + right) // 2)
    return out


@torch.no_grad()
def allocate(
    model: torch.nn.Module,
    texts: Texts,
    *,
    cache_ratio: float,
    tokenizer: Any = None,
    eval_texts: Texts | None = None,
    ranking: FrequencyRanking | str | Path | None = None,
    selection: str = "ropelite",
    svd: str = "auto",
    seq_len: int = 512,
    num_windows: int = 4,
    eval_windows: int = 2,
    grid: int = 5,
    progress: bool = True,
) -> Allocation:
    """Choose ``rope_pairs`` (and so ``kv_dim``) for ``cache_ratio`` by held-out perplexity.

    ``texts`` (strings with ``tokenizer=``, token ids, or a ``pathlib.Path``) are cut into windows
    of ``seq_len`` tokens (:func:`split_windows`): without ``eval_texts`` the last ``eval_windows``
    are held out for evaluation and up to ``num_windows`` of the others calibrate; with
    ``eval_texts`` those are evaluated instead. The RoPElite ranking (with activation statistics,
    for ``svd="auto"``) is computed once on the calibration windows unless ``ranking=`` is given.
    A ``ranking`` given should not have been computed on the evaluation windows.

    For each ``r`` tried the model is converted (:func:`~compresskv.elitekv.convert` with
    ``keep_original=True``, training-free, ``kv_dim = budget − 2·r·H_kv``) and reverted afterwards,
    also on error, so ``model`` is left as it was (it must not be converted already). The score is
    the perplexity of the second half of each evaluation window with its first half in the
    :class:`EliteKVCache` (``compresskv.eval.run_perplexity``).

    **Cost.** The valid ``r`` run from the first that uses the whole budget to the last that leaves
    the latent one dim (:func:`sweep_range`; 1–31 for SmolLM2-135M at half the cache). A coarse pass
    tries ``grid`` evenly spaced ``r`` (ends included) and the fixed rule's ``r``; then, around the
    best so far, the midpoints of the gaps to its tried neighbours, until they are adjacent. That is
    ``grid + 1`` conversions plus about ``2·log2(spacing)``: 9 per cache ratio on SmolLM2-135M at
    0.25 and 0.5 (each a J-LRD of every layer plus ``eval_windows`` forward passes: about 20 s on 2
    CPU cores with 1024-token windows).
    The search assumes the perplexity is roughly unimodal in ``r``; the table holds every ``r`` tried.

    ```python
    from compresskv import elitekv

    allocation = elitekv.allocate(model, texts, cache_ratio=0.5, tokenizer=tok)
    print(allocation.rope_pairs, allocation.kv_dim, allocation.ppl)
    allocation.save_pretrained("smollm2-allocation-0.5")
    ```

    Raises ``ValueError`` naming the parameter for a ``cache_ratio`` outside (0, 1] or too small
    for one pair and a latent, missing or too little text, strings without ``tokenizer``, an
    unknown ``selection`` / ``svd`` and ``grid`` < 2.
    """
    from tqdm.auto import tqdm

    _check_ratio(cache_ratio)
    if selection not in SELECTIONS:
        raise ValueError(f"compresskv.elitekv.allocate: selection must be one of {list(SELECTIONS)}, got {selection!r}")
    if svd not in SVD_MODES:
        raise ValueError(f"compresskv.elitekv.allocate: svd must be one of {list(SVD_MODES)}, got {svd!r}")
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"compresskv.elitekv.allocate: grid must be an int >= 2 (coarse points), got {grid!r}")
    if isinstance(texts, str) and tokenizer is None:
        raise ValueError("compresskv.elitekv.allocate: texts are strings: pass tokenizer= (or give token ids)")
    check_supported(model, converting=False)
    dims = model_dims(model)
    lo, hi = sweep_range(dims, cache_ratio)
    rule, _ = resolve_sizes(dims, cache_ratio=float(cache_ratio))
    calib, held = split_windows(texts, tokenizer, eval_texts=eval_texts, seq_len=seq_len, num_windows=num_windows,
                                eval_windows=eval_windows)
    if isinstance(ranking, (str, Path)):
        ranking = FrequencyRanking.from_pretrained(ranking, model)
    if ranking is None and (selection in ("ropelite", "contribution") or svd != "weight"):
        ranking = rank_frequencies(model, calib, seq_len=seq_len, num_windows=num_windows,
                                   activation_stats=svd != "weight", progress=progress)
    elif ranking is not None and svd != "weight" and ranking.input_moment is None:  # computed once, not per r
        moment = input_moments(model, calib, seq_len=seq_len, num_windows=num_windows, progress=progress)
        ranking = FrequencyRanking({**ranking.tensors, "input_moment": moment}, ranking.options, ranking.model_name,
                                   ranking.config_hash)
    was_training = model.training
    model.eval()
    ppl: dict[int, float] = {}
    rows: dict[int, dict[str, Any]] = {}
    todo = _coarse(lo, hi, grid, rule)
    bar = tqdm(total=len(todo), desc=f"EliteKV allocation ({cache_ratio:g} of the cache)", unit="conversion",
               disable=not progress)
    try:
        reference = math.exp(_heldout_nll(model, held, dynamic=True))
        while todo:
            for r in todo:
                r_, c = resolve_sizes(dims, rope_pairs=r, cache_ratio=float(cache_ratio))
                convert(model, rope_pairs=r_, kv_dim=c, ranking=ranking, selection=selection, svd=svd,
                        keep_original=True, progress=False)
                try:
                    nll = _heldout_nll(model, held)
                finally:
                    revert(model)
                ppl[r] = math.exp(nll)
                rows[r] = {"rope_pairs": r, "kv_dim": c, "ppl": ppl[r], "nll": nll}
                bar.set_postfix(r=r, ppl=f"{ppl[r]:.2f}")
                bar.update(1)
            todo = [r for r in _next_points(ppl) if r not in ppl]
            bar.total += len(todo)
    finally:
        bar.close()
        model.train(was_training)
    best = min(ppl, key=lambda r: (ppl[r], r))
    options = {
        "selection": selection, "svd": svd, "seq_len": int(held.shape[1]), "calibration_windows": int(calib.shape[0]),
        "eval_windows": int(held.shape[0]), "eval_texts": eval_texts is not None, "grid": grid, "range": [lo, hi],
        "conversions": len(rows), "scored_tokens": int(held.shape[0] * (held.shape[1] - held.shape[1] // 2)),
    }
    return Allocation(
        cache_ratio=float(cache_ratio), rope_pairs=best, kv_dim=rows[best]["kv_dim"],
        table=[rows[r] for r in sorted(rows)], rule_rope_pairs=rule, reference_ppl=reference, options=options,
        model_name=model_name(model), config_hash=config_hash(model),
    )


def allocation_markdown(allocations: Sequence[Allocation]) -> str:
    """The tables of several allocations (one per cache ratio) as Markdown: every ``r`` tried, the
    chosen row in bold, the fixed rule's marked."""
    out = []
    for a in allocations:
        ref = f"; original model {a.reference_ppl:.2f}" if a.reference_ppl is not None else ""
        out.append(f"**cache ratio {a.cache_ratio:g}** (chosen r = {a.rope_pairs}, kv_dim = {a.kv_dim}, ppl "
                   f"{a.ppl:.2f}; fixed rule r = {a.rule_rope_pairs}, ppl {a.row(a.rule_rope_pairs)['ppl']:.2f}{ref})\n")
        out.append("| rope_pairs r | kv_dim | perplexity | |\n|---:|---:|---:|---|")
        for row in a.table:
            marks = [m for m, on in (("chosen", row["rope_pairs"] == a.rope_pairs),
                                     ("fixed rule", row["rope_pairs"] == a.rule_rope_pairs)) if on]
            cell = f"**{row['ppl']:.2f}**" if row["rope_pairs"] == a.rope_pairs else f"{row['ppl']:.2f}"
            out.append(f"| {row['rope_pairs']} | {row['kv_dim']} | {cell} | {', '.join(marks)} |")
        out.append("")
    return "\n".join(out)


def allocate_ratios(
    model: torch.nn.Module,
    texts: Texts,
    cache_ratios: Sequence[float],
    *,
    tokenizer: Any = None,
    eval_texts: Texts | None = None,
    seq_len: int = 512,
    num_windows: int = 4,
    eval_windows: int = 2,
    progress: bool = True,
    **options: Any,
) -> tuple[FrequencyRanking, list[Allocation]]:
    """:func:`allocate` at several cache ratios on the same windows, ranking once: returns the
    RoPElite ranking (computed on the calibration windows) and one :class:`Allocation` per ratio.
    ``options`` go to :func:`allocate` (``selection``, ``svd``, ``grid``)."""
    if not cache_ratios:
        raise ValueError("compresskv.elitekv.allocate: cache_ratios is empty; give at least one ratio in (0, 1]")
    for ratio in cache_ratios:
        _check_ratio(ratio)
    calib, held = split_windows(texts, tokenizer, eval_texts=eval_texts, seq_len=seq_len, num_windows=num_windows,
                                eval_windows=eval_windows)
    ranking = rank_frequencies(model, calib, seq_len=seq_len, num_windows=num_windows,
                               activation_stats=options.get("svd", "auto") != "weight", progress=progress)
    allocations = [
        allocate(model, calib, eval_texts=held, cache_ratio=ratio, ranking=ranking, seq_len=seq_len,
                 num_windows=num_windows, eval_windows=eval_windows, progress=progress, **options)
        for ratio in cache_ratios
    ]
    for a in allocations:  # the windows were split here, not by allocate
        a.options["eval_texts"] = eval_texts is not None
    return ranking, allocations


def report_markdown(result: dict[str, Any]) -> str:
    """The Markdown of an allocation run (``compresskv elitekv-allocate``): how it was measured,
    then :func:`allocation_markdown`'s tables."""
    allocations = [Allocation(**{k: v for k, v in a.items() if k != "kind"}) for a in result["allocations"]]
    first = allocations[0].options if allocations else {}
    machine = result.get("machine") or {}
    lines = [
        "# EliteKV dimension allocation: perplexity vs rotated pairs r",
        "",
        f"Model `{result.get('model', '?')}`, training-free conversion ({first.get('selection')} pairs, "
        f"svd={first.get('svd')}), for each cache ratio a sweep of r (RoPE pairs per KV head; kv_dim = budget − "
        f"2·r·H_kv). Perplexity of the second half of {first.get('eval_windows')} held-out windows of "
        f"{first.get('seq_len')} tokens ({first.get('scored_tokens')} scored tokens; {result.get('eval_source', '')}), "
        f"the first half in the EliteKV cache; ranking on {first.get('calibration_windows')} windows of "
        f"{result.get('calibration_source', 'the calibration text')}.",
        "",
        f"Command: `{result.get('command', '')}`. Machine: {machine.get('device', '?')}, torch "
        f"{machine.get('torch', '?')}, {machine.get('threads', '?')} threads of {machine.get('cpus', '?')} CPUs, "
        f"load {machine.get('loadavg_1_5_15')}; {result.get('seconds', 0):.0f} s in all.",
        "",
        allocation_markdown(allocations),
    ]
    return "\n".join(lines)
