"""``compresskv bench``: every method at every compression ratio on every task, against an
uncompressed ``DynamicCache`` in the same run; resumable JSON lines, a Markdown table and a plot.

One *row* is one (task, seed, method, ratio) run; the ``full`` method is the plain model with a
transformers ``DynamicCache`` (compresskv's attention uninstalled), run first for every
(task, seed). Rows are appended to ``<out>.jsonl`` as soon as they finish; rerunning the same
command skips the rows already there (rows that failed are retried). Every ratio in the table is
taken pairwise against the full-cache row of the same task and seed.

Methods are built by :class:`compresskv.eval.methods.MethodBuilder`: from ``compression_ratio``
(the fraction of the prompt's cache removed), after a one-off calibration on ``calibration`` for
``pca``, ``matryoshka`` and ``elitekv`` (and compositions with a ``pca`` or ``matryoshka`` stage),
or at their default settings when they have no ratio (``minicache``, ``int4``, the
``quantizedcache_*`` baselines: transformers' own ``QuantizedCache``). A method that cannot be
built is skipped with a printed note. Runs go method by method (an EliteKV conversion happens once
per ratio and is reverted before anything else runs).

With ``frontier`` (``compresskv bench --frontier``) the page also gets a "Quality per byte" section,
and ``<out>_frontier.json`` and ``<out>_frontier.png`` are written (:mod:`compresskv.eval.frontier`).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .results import DEFAULT_OUT
from .methods import DEFAULT_SETTINGS, ratio_label
from .plots import plot, plot_ratio  # noqa: F401 - the figure lives in plots.py; kept importable from here

FULL = "full"
PERPLEXITY = "perplexity"
#: a task name ending in this asks the task's question after the context alone was compressed
#: (``niah_single:after``; ``compresskv bench --question-after`` adds it for every task)
AFTER = ":after"


@dataclass
class BenchConfig:
    """What to run. ``tasks`` are names from :func:`~compresskv.eval.available_tasks` plus
    ``"perplexity"`` (which needs ``text``); ``out`` is the output stem (``.jsonl``, ``.md``,
    ``.png`` are added); ``calibration`` is the text (file or ``hf:NAME``) the calibrated methods
    (``pca``, ``matryoshka``, ``elitekv``) calibrate on; keep it apart from ``text``."""

    methods: list[str]
    ratios: list[float]
    tasks: list[str]
    length: int = 4096
    seeds: list[int] = field(default_factory=lambda: [0])
    out: Path = DEFAULT_OUT
    model: str = "smollm2-135m-instruct"
    text: str | None = None
    haystack: str | None = None
    continuation: int = 512
    calibration: str | None = None
    command: str = ""
    #: folder of LongBench ``<task>.jsonl`` files for ``longbench:TASK`` tasks (``None``:
    #: ``$COMPRESSKV_LONGBENCH_DIR``, else the hub); see :mod:`compresskv.eval.longbench`
    longbench_dir: str | None = None
    #: also pick the best row per share of the full cache's bytes (:mod:`compresskv.eval.frontier`)
    frontier: bool = False


def row_key(model: str, length: int, task: str, seed: int, method: str, ratio: float, source: str | None) -> str:
    """The identity of a row: a rerun skips rows whose key is already in the JSON lines."""
    return json.dumps([model, length, task, seed, method, round(float(ratio), 6), source])


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (a missing file has none; a torn last line is ignored)."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _machine(device: torch.device) -> dict[str, Any]:
    from .machine import machine_info

    info = machine_info(device)
    info["loadavg_1min"] = info["loadavg_1_5_15"][0] if info.get("loadavg_1_5_15") else None
    return info


def usable_methods(
    model: Any, methods: Sequence[str], ratios: Sequence[float], log: Callable[[str], None] = print,
    builder: Any = None,
) -> list[str]:
    """The methods that can be benchmarked: registered (or compositions, or the bench's
    ``quantizedcache_*`` baselines), and either calibrated (given a calibration
    text; built lazily, their failures are recorded per row) or buildable at every ratio right
    away. A note is logged for each one skipped."""
    from .methods import MethodBuilder, calibration_need

    builder = builder or MethodBuilder(model, None, None, ratios, log=log)
    ok = []
    for method in methods:
        why = builder.unusable(method)
        if why is None and not calibration_need(method):
            try:
                for ratio in builder.ratios_for(method, ratios):
                    builder.build(method, ratio)
            except Exception as err:  # noqa: BLE001 - any failure to build means: not benchmarkable this way
                why = f"cannot be built ({type(err).__name__}: {err})"
        if why:
            log(f"note: skipping {method!r}: {why}")
            continue
        ok.append(method)
    builder.release()
    return ok


def run_bench(
    model: Any, tokenizer: Any, config: BenchConfig, log: Callable[[str], None] | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) the benchmark described by ``config``; write ``<out>.jsonl``, ``<out>.md``
    and ``<out>.png`` (the plot needs matplotlib: ``pip install 'compresskv[bench]'``), and with
    ``config.frontier`` ``<out>_frontier.json`` and ``<out>_frontier.png``. Returns
    ``{"rows", "table", "skipped", "paths"}``."""
    from tqdm.auto import tqdm

    from .longbench import ENV_DIR, HUB_REPO, PREFIX as LONGBENCH, is_longbench, make_longbench_task
    from .methods import MethodBuilder
    from .perplexity import load_text, make_perplexity_task, tokenize_text
    from .tasks import available_tasks, make_task

    say = log or tqdm.write
    unknown = [t for t in config.tasks
               if t != PERPLEXITY and t.removesuffix(AFTER) not in available_tasks() and not is_longbench(t)]
    if unknown:
        raise ValueError(f"compresskv bench: unknown tasks {unknown}; choose from {available_tasks() + [PERPLEXITY]}, "
                         f"or {LONGBENCH}TASK (LongBench), a task name with {AFTER!r} asks its question after the "
                         "context was compressed")
    longbench_dir = config.longbench_dir or os.environ.get(ENV_DIR) or None
    if PERPLEXITY in config.tasks and not config.text:
        raise ValueError("compresskv bench: the perplexity task needs a text (--text PATH or hf:NAME)")
    device = next(model.parameters()).device
    builder = MethodBuilder(model, tokenizer, config.calibration, config.ratios, log=say)
    methods = usable_methods(model, config.methods, config.ratios, log=say, builder=builder)
    skipped = [f"{m} ({builder.unusable(m) or 'could not be built; see the log'})" for m in config.methods if m not in methods]
    # Method-major, the baseline first: a method's setup (an EliteKV conversion) happens once per ratio.
    runs = [(FULL, 0.0)] + [(m, r) for m in methods for r in builder.ratios_for(m, config.ratios)]

    jsonl = Path(str(config.out) + ".jsonl")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    done = {r["key"] for r in read_rows(jsonl) if not r.get("error")}
    haystack_text = Path(config.haystack).read_text(encoding="utf-8", errors="replace") if config.haystack else None
    text_ids: list[int] | None = None

    def source(task: str, method: str) -> str | None:
        base = f"{config.text}+{config.continuation}" if task == PERPLEXITY else config.haystack
        if is_longbench(task):
            base = longbench_dir or f"hub:{HUB_REPO}"
        extra = builder.source(method)
        return base if extra is None else f"{base}|{extra}"

    plan = [(task, seed, method, ratio) for method, ratio in runs for task in config.tasks for seed in config.seeds]
    keys = {p: row_key(config.model, config.length, p[0], p[1], p[2], p[3], source(p[0], p[2])) for p in plan}
    pending = [p for p in plan if keys[p] not in done]
    bar = tqdm(total=len(plan), initial=len(plan) - len(pending), desc="bench", unit="run", disable=not progress)
    if pending:
        with torch.inference_mode():  # warm-up, so that the first timed run is not penalised
            model(input_ids=torch.ones(1, 32, dtype=torch.long, device=device))
    tasks: dict[tuple[str, int], Any] = {}

    def task_for(task: str, seed: int) -> Any:
        nonlocal text_ids
        if (task, seed) not in tasks:
            if task == PERPLEXITY:
                if text_ids is None:
                    need = (config.length + config.continuation) * 8
                    text_ids = tokenize_text(tokenizer, load_text(config.text, min_chars=need))  # type: ignore[arg-type]
                tasks[task, seed] = make_perplexity_task(tokenizer, text_ids, config.length, config.continuation, seed)
            elif is_longbench(task):  # the seed is the record's index; the length, the truncation length
                tasks[task, seed] = make_longbench_task(task.removesuffix(AFTER), tokenizer, config.length, seed,
                                                        longbench_dir)
            else:  # (the ":after" variant is the same prompt, split at its question)
                tasks[task, seed] = make_task(task.removesuffix(AFTER), tokenizer, config.length, seed=seed,
                                              haystack=haystack_text)
        return tasks[task, seed]

    current: tuple[str, float] | None = None
    try:
        for p in pending:
            task, seed, method, ratio = p
            bar.set_postfix_str(f"{method} {ratio_label(ratio)} {task} seed={seed}")
            if current is not None and current[0] != method:
                builder.release()  # e.g. revert an EliteKV conversion before the next method
            current = (method, ratio)
            row: dict[str, Any] = {
                "key": keys[p], "model": config.model, "length": config.length, "task": task, "seed": seed,
                "method": method, "ratio": ratio, "source": source(task, method),
            }
            row.update(_run_one(model, tokenizer, builder, task_for(task, seed), task, method, ratio))
            row["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            row["machine"] = _machine(device)
            with jsonl.open("a") as f:
                f.write(json.dumps(row) + "\n")
            label = f"{task} seed={seed} {method:>13} {ratio_label(ratio):<7}"
            if row.get("error"):
                say(f"{label}: ERROR {row['error']}")
            elif task == PERPLEXITY:
                say(f"{label} ppl={row['ppl']:.3f} prefill={row['prefill_s']:.1f}s")
            else:
                say(f"{label} score={row['score']:.2f} prefill={row['prefill_s']:.1f}s {row['answer'][:60]!r}")
            bar.update()
    finally:
        bar.close()
        builder.release()

    wanted = set(keys.values())
    rows = [r for r in read_rows(jsonl) if r.get("key") in wanted]
    latest: dict[str, dict[str, Any]] = {}
    for r in rows:  # the last successful row of each key wins
        if not r.get("error") or r["key"] not in latest:
            latest[r["key"]] = r
    rows = list(latest.values())
    ratios = sorted({r for _, r in runs[1:]}, key=lambda r: (r == DEFAULT_SETTINGS, r))
    table = aggregate(rows, config.tasks, [FULL] + methods, ratios)
    md_path = Path(str(config.out) + ".md")
    page = markdown(rows, table, config, skipped)
    png_path: Path | None = Path(str(config.out) + ".png")
    title = f"{config.model}, ~{config.length} tokens"
    try:
        plot(table, config.tasks, png_path, title=title)
    except ImportError:
        say("note: no plot written (matplotlib is missing: pip install 'compresskv[bench]')")
        png_path = None
    paths = [jsonl, md_path, png_path]
    if config.frontier:
        from .frontier import write_frontier

        section, written = write_frontier(table, config.out, title=f"quality per byte: {title}", log=say)
        page += "\n" + section
        paths += written
    md_path.write_text(page)
    return {"rows": rows, "table": table, "skipped": skipped, "paths": paths}


def _run_one(model: Any, tokenizer: Any, builder: Any, task_obj: Any, task: str, method: str, ratio: float) -> dict[str, Any]:
    """One row's measurements (or its ``error``), with the seconds it took, setup included."""
    from . import measure
    from .perplexity import run_perplexity

    start = time.perf_counter()
    result: dict[str, Any] = {}
    try:
        if method == FULL:
            builder.release()  # the baseline is the model exactly as loaded
            cache = None
        else:
            cache = builder.build(method, ratio)
        if task == PERPLEXITY:
            result = run_perplexity(model, task_obj, cache)
            result["score"] = None
        else:
            result = measure.run_task(model, tokenizer, task_obj, cache, question_after=task.endswith(AFTER))
            result["expected"] = task_obj.answers
        if cache is not None and hasattr(cache, "stats"):
            stored = [n for n in cache.stats().tokens_stored if n is not None]
            if stored:
                result["stored_min"], result["stored_max"] = min(stored), max(stored)
    except Exception as err:  # noqa: BLE001 - record it, go on, retry on the next run
        from ..core.attention import clear_pending

        result["error"] = f"{type(err).__name__}: {err}"
        clear_pending()
    result["seconds"] = time.perf_counter() - start
    return result


# -- the table ---------------------------------------------------------------------------------
def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.mean(vals) if vals else None


def aggregate(rows: Sequence[dict[str, Any]], tasks: Sequence[str], methods: Sequence[str], ratios: Sequence[float]) -> list[dict[str, Any]]:
    """One entry per (method, ratio) with rows: per-task score (0-100, mean over seeds),
    ``avg`` over the non-perplexity tasks, ``ppl`` (exp of the mean loss), and the ratios to the
    full-cache row of the same task and seed (bytes after prefill, peaks, prefill time, decode
    speed) plus the absolute means."""
    good = [r for r in rows if not r.get("error")]
    full = {(r["task"], r["seed"]): r for r in good if r["method"] == FULL}

    def paired(group: list[dict[str, Any]], name: str, only_tasks: bool = False) -> float | None:
        use = [r for r in group if r["task"] != PERPLEXITY] if only_tasks else group
        if only_tasks and not use:
            use = group
        vals = []
        for r in use:
            base = full.get((r["task"], r["seed"]), {}).get(name)
            if r.get(name) is not None and base:
                vals.append(r[name] / base)
        return _mean(vals)

    table = []
    combos = [(FULL, 0.0)] + [(m, float(r)) for m in methods if m != FULL for r in ratios]
    for method, ratio in combos:
        group = [r for r in good if r["method"] == method and abs(r["ratio"] - ratio) < 1e-9]
        errors = sum(1 for r in rows if r.get("error") and r["method"] == method and abs(r["ratio"] - ratio) < 1e-9)
        if not group and not errors:
            continue
        entry: dict[str, Any] = {"method": method, "ratio": ratio, "runs": len(group), "errors": errors, "scores": {}}
        for task in tasks:
            sub = [r for r in group if r["task"] == task]
            if not sub:
                continue
            if task == PERPLEXITY:
                entry["ppl"] = math.exp(statistics.mean(r["nll"] for r in sub))
            else:
                entry["scores"][task] = 100.0 * statistics.mean(r["score"] for r in sub)
        entry["avg"] = _mean(entry["scores"].values()) if entry["scores"] else None
        entry["cache_bytes"] = _mean(r.get("cache_bytes_prefill") for r in group)
        entry["bytes_vs_full"] = paired(group, "cache_bytes_prefill")
        entry["peak_prefill_bytes"] = _mean(r.get("peak_prefill_bytes") for r in group)
        entry["peak_decode_bytes"] = _mean(r.get("peak_decode_bytes") for r in group)
        entry["peak_prefill_vs_full"] = paired(group, "peak_prefill_bytes")
        entry["peak_decode_vs_full"] = paired(group, "peak_decode_bytes")
        entry["prefill_s"] = _mean(r.get("prefill_s") for r in group)
        entry["prefill_vs_full"] = paired(group, "prefill_s")
        gen = [r for r in group if r["task"] != PERPLEXITY] or group
        entry["decode_tok_s"] = _mean(r.get("decode_tok_s") for r in gen)
        entry["decode_vs_full"] = paired(group, "decode_tok_s", only_tasks=True)
        table.append(entry)
    return table


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _ratio_cell(entry: dict[str, Any]) -> str:
    if entry["ratio"] == DEFAULT_SETTINGS and entry.get("bytes_vs_full") is not None:
        return f"default ({1 - entry['bytes_vs_full']:.2f})"
    return ratio_label(entry["ratio"])


def table_markdown(table: Sequence[dict[str, Any]], tasks: Sequence[str]) -> str:
    """The Markdown table of :func:`aggregate`'s entries (scores 0-100, higher is better;
    perplexity lower is better; every "vs full" is a ratio to the DynamicCache rows)."""
    score_tasks = [t for t in tasks if t != PERPLEXITY]
    cols = ["method", "ratio", "cache MiB", "bytes vs full", *score_tasks]
    if len(score_tasks) > 1:
        cols.append("avg")
    if PERPLEXITY in tasks:
        cols.append("ppl")
    cols += ["peak prefill vs full", "peak decode vs full", "prefill vs full", "decode vs full"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join([":---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for e in table:
        cells = [
            "DynamicCache (full)" if e["method"] == FULL else e["method"],
            _ratio_cell(e),
            _fmt(e["cache_bytes"] / 2**20 if e["cache_bytes"] is not None else None, ".2f"),
            _fmt(e["bytes_vs_full"], ".3f"),
        ]
        cells += [_fmt(e["scores"].get(t), ".1f") for t in score_tasks]
        if len(score_tasks) > 1:
            cells.append(_fmt(e["avg"], ".1f"))
        if PERPLEXITY in tasks:
            cells.append(_fmt(e.get("ppl"), ".3f"))
        cells += [
            _fmt(e["peak_prefill_vs_full"], ".2f"), _fmt(e["peak_decode_vs_full"], ".2f"),
            _fmt(e["prefill_vs_full"], ".2f"), _fmt(e["decode_vs_full"], ".2f"),
        ]
        if e["errors"]:
            cells[0] += f" ({e['errors']} failed)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown(rows: Sequence[dict[str, Any]], table: Sequence[dict[str, Any]], config: BenchConfig, skipped: Sequence[str] = ()) -> str:
    """The results page: what was run, on what machine, the table, the baseline's absolute figures."""
    good = [r for r in rows if not r.get("error")]
    machine = good[-1]["machine"] if good else {}
    lengths = sorted({r["tokens"] for r in good if r.get("tokens")})
    seconds = sum(r.get("seconds", 0.0) for r in rows)
    full = next((e for e in table if e["method"] == FULL), None)
    stem = Path(str(config.out)).name
    out = [
        f"Model `{config.model}`, prompts of ~{config.length} tokens "
        f"(measured {lengths[0]}–{lengths[-1]})" if lengths else f"Model `{config.model}`",
        f"; tasks {', '.join(config.tasks)}; seeds {', '.join(map(str, config.seeds))}; "
        f"compression ratios {', '.join(f'{r:g}' for r in config.ratios)} (fraction of the prompt's cache removed)"
        + (f"; calibrated methods calibrated on `{Path(config.calibration).name}`" if config.calibration else "")
        + ". A method without a ratio option runs once at its default settings (`default`, with the fraction "
        "it removed).",
    ]
    lines = [
        "# compresskv bench: accuracy, perplexity, memory and speed vs compression ratio",
        "",
        "".join(out),
        "",
        "Scores are RULER-style (0–100, share of the expected strings in the greedy answer, mean over seeds); "
        "`ppl` is the perplexity of the continuation with the prefix held in the cache. Every *vs full* column "
        "is the mean of per-prompt ratios to the uncompressed `DynamicCache` run on the same prompt in the same "
        "benchmark: cache bytes measured right after prefill, peak memory added during prefill and during "
        "decoding (process RSS on CPU, `max_memory_allocated` on CUDA; model weights excluded), prefill time "
        "and decode tokens/s.",
        "",
        table_markdown(table, config.tasks),
    ]
    if any(t.startswith("longbench:") for t in config.tasks):  # their scores are LongBench's metrics
        lines[6:6] = ["`longbench:` tasks are scored with LongBench's metric for the task (0–100, best over the "
                      "reference answers; compresskv.eval.longbench), one prompt per record (the seeds index the "
                      "records), truncated in the middle to the prompt length.", ""]
    if full is not None:
        lines.append(
            f"DynamicCache absolute: cache {_fmt(full['cache_bytes'] / 2**20 if full['cache_bytes'] else None, '.1f')} MiB, "
            f"peak added {_fmt((full['peak_prefill_bytes'] or 0) / 2**20 if full['peak_prefill_bytes'] is not None else None, '.0f')} MiB "
            f"in prefill and {_fmt((full['peak_decode_bytes'] or 0) / 2**20 if full['peak_decode_bytes'] is not None else None, '.0f')} MiB "
            f"in decoding, prefill {_fmt(full['prefill_s'], '.2f')} s, decode {_fmt(full['decode_tok_s'], '.1f')} tokens/s."
        )
        lines.append("")
    if skipped:
        lines += [f"Skipped: {'; '.join(skipped)}.", ""]
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += [f"{len(errors)} runs failed; rerun the command to retry them. First: `{errors[0]['error']}`.", ""]
    if machine:
        lines.append(
            f"Machine: {machine.get('device')} ({machine.get('processor')}, {machine.get('threads')} threads), "
            f"torch {machine.get('torch')}, transformers {machine.get('transformers')}, compresskv "
            f"{machine.get('compresskv')}; load average {machine.get('loadavg_1min')} at the last run. "
            f"Run time {seconds / 60:.1f} min over {len(rows)} runs. Times on a shared CPU are indicative only."
        )
        lines.append("")
    if config.command:
        lines += [f"Reproduce: `{config.command}` (rerunning skips finished rows of `{stem}.jsonl`).", ""]
    return "\n".join(lines)
