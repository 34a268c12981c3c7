"""``compresskv demo``: needle questions answered with a full ``DynamicCache`` and with compressed
caches, a table of what each kept and cost, and a conclusion a person can act on.

The questions are the bench's ``niah_single`` prompts (:func:`~compresskv.eval.make_task`: one
7-digit number hidden at a random depth of RULER's noise text, the same prompt for the same length
and seed), several seeds so that a score is a count of needles found rather than one coin flip;
methods are built as the bench builds them (:class:`~compresskv.eval.methods.MethodBuilder`), the
calibrated ones on the bundled novel unless told otherwise. Times are the measured prefill and
decode of each question: building a cache, calibrating and a first warm-up forward are not in them.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .methods import DEFAULT_SETTINGS, ratio_label

FULL = "full"
#: What the demo runs by default, sized to finish in under 3 minutes on 2 CPU cores: one method of
#: each kind the bench compares (token eviction, an eviction baseline, cross-layer low rank, one
#: calibrated projection) at the bench's highest ratio, 8x fewer bytes, on 3 questions of 2k tokens
#: (4k tokens or a second ratio doubles the time; `--length 4096 --ratios 0.5,0.875` runs them).
DEFAULT_METHODS = ("snapkv", "pyramidkv", "streamingllm", "xkv", "pca")
DEFAULT_RATIOS = (0.875,)
DEFAULT_LENGTH = 2048


@dataclass
class DemoRun:
    """One (method, ratio) over every question: ``found`` needles out of ``asked``."""

    method: str
    ratio: float | None
    answers: list[str] = field(default_factory=list)
    found: int = 0
    asked: int = 0
    cache_bytes: list[int] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    setup_s: float = 0.0
    error: str | None = None

    @property
    def mean_bytes(self) -> float:
        return statistics.fmean(self.cache_bytes) if self.cache_bytes else float("nan")

    @property
    def mean_decode(self) -> float:
        return statistics.fmean(self.decode_tok_s) if self.decode_tok_s else float("nan")


def demo_runs(
    model: Any,
    tokenizer: Any,
    methods: Sequence[str] = DEFAULT_METHODS,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    length: int = DEFAULT_LENGTH,
    seeds: Sequence[int] = (0, 1, 2),
    calibration: str | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> tuple[list[DemoRun], list[Any]]:
    """Answer ``niah_single`` at ``length`` tokens for every seed with ``DynamicCache``, then with
    every method at every ratio (a method without a ratio option once, at its defaults). The
    calibrated methods calibrate on ``calibration`` (a file or ``hf:NAME``; default: the bundled
    novel, :func:`compresskv.sample_text`).

    Returns the runs (the full cache first) and the questions. A method that fails to build or
    run is kept with its ``error`` rather than ending the demo.
    """
    from tqdm.auto import tqdm

    from .bench import usable_methods
    from .measure import run_task
    from .methods import MethodBuilder
    from .tasks import make_task

    if calibration is None:
        from ..data import sample_text_path

        calibration = str(sample_text_path())
    tasks = [make_task("niah_single", tokenizer, length=length, seed=s) for s in seeds]
    builder = MethodBuilder(model, tokenizer, calibration, list(ratios), log=log)
    usable = usable_methods(model, list(methods), list(ratios), log=log, builder=builder)
    plan: list[tuple[str, float | None]] = [(FULL, None)]
    plan += [(m, r) for m in usable for r in builder.ratios_for(m, ratios)]
    run_task(model, tokenizer, make_task("niah_single", tokenizer, length=256, seed=0))  # warm-up, not timed
    runs: list[DemoRun] = []
    bar = tqdm(total=len(plan) * len(tasks), unit="question", disable=not progress or None)
    try:
        for method, ratio in plan:
            run = DemoRun(method, ratio)
            runs.append(run)
            label = "DynamicCache" if method == FULL else f"{method} @ {ratio_label(ratio)}"
            bar.set_description(f"{label} (~{length} tokens)")
            for task in tasks:
                try:
                    start = time.perf_counter()
                    builder.release()  # e.g. revert an EliteKV conversion: every run starts from the model as loaded
                    cache = None if method == FULL else builder.build(method, ratio)
                    run.setup_s += time.perf_counter() - start
                    result = run_task(model, tokenizer, task, cache)
                except Exception as err:  # noqa: BLE001 - one failing method must not end the demo
                    run.error = f"{type(err).__name__}: {err}"
                    log(f"note: {label} failed: {run.error}")
                    bar.update(len(tasks) - run.asked)
                    break
                run.asked += 1
                run.found += int(result["score"] == 1.0)
                run.answers.append(result["answer"])
                run.cache_bytes.append(result["cache_bytes_prefill"])
                run.prefill_s.append(result["prefill_s"])
                if result["decode_tok_s"]:
                    run.decode_tok_s.append(result["decode_tok_s"])
                bar.update(1)
    finally:
        bar.close()
        builder.release()
    return runs, tasks


def _setting(run: DemoRun) -> str:
    return "-" if run.ratio is None else ratio_label(run.ratio)


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f}"


def format_table(runs: Sequence[DemoRun]) -> str:
    """The demo's table; the legend under it says what each column is."""
    full = runs[0]
    header = (f"{'method':<14}{'removed':>9}{'cache MiB':>11}{'kept':>7}{'found':>8}"
              f"{'prefill s':>11}{'decode tok/s':>14}{'decode vs full':>16}")
    lines = [header, "-" * len(header)]
    for run in runs:
        name = "DynamicCache" if run.method == FULL else run.method
        removed = "-" if run.ratio is None else ratio_label(run.ratio)
        if run.error or not run.asked:
            lines.append(f"{name:<14}{removed:>9}   failed: {run.error}")
            continue
        kept = run.mean_bytes / full.mean_bytes
        lines.append(
            f"{name:<14}{removed:>9}{_mib(run.mean_bytes):>11}{kept:>7.1%}{f'{run.found}/{run.asked}':>8}"
            f"{statistics.fmean(run.prefill_s):>11.1f}{run.mean_decode:>14.1f}{run.mean_decode / full.mean_decode:>15.2f}x"
        )
    lines += [
        "",
        "removed: compression ratio asked, the fraction of the prompt's cache to remove ('default': a method",
        "without one, at its settings); cache MiB: measured bytes held after the prompt, mean over the",
        "questions; kept: those bytes as a share of DynamicCache's; found: needles answered right; prefill s",
        "and decode tok/s: measured per question, without building the cache, calibration or warm-up.",
    ]
    return "\n".join(lines)


def conclusion(runs: Sequence[DemoRun], tasks: Sequence[Any]) -> str:
    """One paragraph drawn from the runs: which method kept every needle the full cache found at
    the fewest bytes, what that saved and how fast it decoded; which ones lost needles."""
    full = runs[0]
    n = full.asked
    depths = ", ".join(f"{t.info['depths'][0]:.0%}" for t in tasks)
    tokens = round(statistics.fmean(t.length for t in tasks))
    text = [f"Over {n} needle questions of ~{tokens} tokens (needles at depths {depths}), the full "
            f"DynamicCache ({_mib(full.mean_bytes)} MiB) found {full.found}/{n}."]
    done = [r for r in runs[1:] if not r.error and r.asked]
    keepers = sorted((r for r in done if r.found >= full.found), key=lambda r: r.mean_bytes)
    if full.found == 0:
        text.append("The model itself misses these needles, so no method can be judged on them; try a "
                    "shorter --length or a larger --model.")
    elif keepers:
        # of the caches within 2% of the fewest bytes, the fastest to decode leads; the rest tie
        fewest = keepers[0].mean_bytes
        close = sorted((r for r in keepers if r.mean_bytes <= 1.02 * fewest), key=lambda r: -r.mean_decode)
        best = close[0]
        keepers = [best] + [r for r in keepers if r is not best]
        ties = [r.method for r in close[1:] if r.method != best.method]
        who = best.method + (f" (and {', '.join(dict.fromkeys(ties))})" if ties else "")
        setting = "its default settings" if best.ratio == DEFAULT_SETTINGS else f"compression ratio {_setting(best)}"
        text.append(
            f"{who} kept all {full.found} at {setting}: {best.mean_bytes / full.mean_bytes:.1%} of the cache "
            f"bytes ({_mib(best.mean_bytes)} MiB, {_mib(full.mean_bytes - best.mean_bytes)} MiB saved per "
            f"sequence, {full.mean_bytes / best.mean_bytes:.1f}x more sequences or context in the same memory), "
            f"decoding at {best.mean_decode / full.mean_decode:.2f}x DynamicCache's speed."
        )
        others = [r for r in keepers[1:] if r.method not in ties and r.method != best.method]
        if others:
            firsts = {}
            for r in others:  # the smallest setting each other method kept every needle at
                firsts.setdefault(r.method, r)
            text.append("Also keeping every needle: " + "; ".join(
                f"{r.method} at {r.mean_bytes / full.mean_bytes:.1%} of the bytes" for r in firsts.values()) + ".")
    else:
        text.append("No compressed cache kept every needle the full cache found.")
    losers: dict[str, list[DemoRun]] = {}
    for r in done:
        if r.found < full.found:
            losers.setdefault(r.method, []).append(r)
    if losers:
        text.append("Lost needles: " + "; ".join(
            f"{m} ({', '.join(f'{r.found}/{r.asked} at {_setting(r)}' for r in rs)})" for m, rs in losers.items()) + ".")
    failed = [r.method for r in runs if r.error]
    if failed:
        text.append(f"Failed to run: {', '.join(dict.fromkeys(failed))}.")
    text.append("`compresskv bench` measures more tasks, seeds and ratios (benchmarks/results/bench.md).")
    return " ".join(text)
