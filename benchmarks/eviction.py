"""Benchmark compresskv's eviction caches against an uncompressed DynamicCache, in one run.

For each needle-in-a-haystack question (one per depth, each with its own seed) this runs the
plain model with a transformers ``DynamicCache`` and then every (method, compression ratio), and
measures: needle accuracy, the cache's bytes after generation (``cache.nbytes()``; for the
baseline ``dynamic_cache_nbytes``), prefill seconds and decode tokens/s. Every ratio in the
table is taken against the baseline measured in the same run on the same prompts.

Run it from the repository root (defaults: embedded SmolLM2-135M-Instruct, 4096 tokens)::

    python benchmarks/eviction.py
    python benchmarks/eviction.py --length 2048 --ratios 0.5 --methods snapkv --depths 0.5

It writes ``benchmarks/results/eviction.json`` (machine, command, raw rows, table) and
``benchmarks/results/eviction.md`` (the table).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import compresskv
from compresskv.eval.machine import machine_info
from compresskv.eval.results import floats, write_result
from compresskv.core.attention import uninstall
from compresskv.eval.needle import make_needle_task, run_needle

BASELINE = "dynamiccache"
COLUMNS = [
    "method", "ratio asked", "cache bytes (MiB)", "bytes ratio", "needle accuracy",
    "prefill s", "prefill vs full", "decode tok/s", "decode vs full",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=compresskv.DEFAULT_MODEL, help="hub id or local path (default: embedded)")
    p.add_argument("--length", type=int, default=4096, help="target prompt length in tokens")
    p.add_argument("--ratios", type=floats, default=floats("0.5,0.75,0.875"), help="fractions of prompt evicted")
    p.add_argument("--depths", type=floats, default=floats("0.1,0.5,0.9"), help="needle depths (one task each)")
    p.add_argument("--methods", default="snapkv,pyramidkv,streamingllm", help="comma-separated methods")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--haystack", type=Path, default=None, help="text file to use as haystack")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/eviction"), help="output stem")
    return p.parse_args(argv)




def one_run(model: Any, tokenizer: Any, task: Any, method: str, ratio: float, max_new: int) -> dict[str, Any]:
    """One needle question with one cache; returns run_needle's row plus what was run."""
    if method == BASELINE:
        uninstall(model)  # the baseline is the model exactly as loaded, without compresskv's hook
        cache = None
    else:
        cache = compresskv.make_cache(model, method, compression_ratio=ratio)
    row = run_needle(model, tokenizer, task, cache, max_new_tokens=max_new)
    row.update(method=method, ratio=ratio, depth=task.depth, tokens=task.length)
    if cache is not None:
        stats = cache.stats()
        stored = [n for n in stats.tokens_stored if n is not None]
        row.update(stats_ratio=stats.ratio, stored_min=min(stored), stored_max=max(stored))
    return row


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per (method, ratio); ratios against the baseline rows of the same tasks."""
    base = [r for r in rows if r["method"] == BASELINE]
    base_bytes = {r["depth"]: r["cache_bytes"] for r in base}
    base_prefill = statistics.median(r["prefill_s"] for r in base)
    base_decode = statistics.median(r["decode_tok_s"] for r in base)
    keys = list(dict.fromkeys((r["method"], r["ratio"]) for r in rows))
    table = []
    for method, ratio in keys:
        group = [r for r in rows if (r["method"], r["ratio"]) == (method, ratio)]
        prefill = statistics.median(r["prefill_s"] for r in group)
        decode = statistics.median(r["decode_tok_s"] for r in group)
        table.append({
            "method": method,
            "ratio": ratio,
            "cache_bytes": statistics.mean(r["cache_bytes"] for r in group),
            "bytes_ratio": statistics.mean(r["cache_bytes"] / base_bytes[r["depth"]] for r in group),
            "accuracy": sum(r["correct"] for r in group) / len(group),
            "prefill_s": prefill,
            "prefill_vs_full": prefill / base_prefill,
            "decode_tok_s": decode,
            "decode_vs_full": decode / base_decode,
        })
    return table


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Eviction caches vs DynamicCache",
        "",
        f"Needle-in-a-haystack ({len(result['depths'])} depths {result['depths']}, one question each, "
        f"~{result['length']}-token prompts, greedy, {result['max_new_tokens']} new tokens) on "
        f"`{result['model']}`. Cache bytes are measured after generation; every ratio is against "
        "the DynamicCache baseline measured in the same run on the same prompts. Bytes are the mean "
        "over depths; seconds and tokens/s the median.",
        "",
        f"- Reproduce: `python benchmarks/eviction.py` (this run: `{result['command']}`)",
        f"- Date: {result['date']}, run time {result['run_seconds'] / 60:.1f} min",
        f"- Machine: {m['platform']}, {m['processor']}, torch {m['torch']}, transformers "
        f"{m['transformers']}, {m['threads']} threads, device {m['device']}",
    ]
    if "loadavg_at_start" in m:
        loads = (m["loadavg_at_start"][0], m["loadavg_1_5_15"][0])
        lines.append(f"- Load average (1 min): {loads[0]:.1f} at start, {loads[1]:.1f} at end")
        if max(loads) > (m.get("cpus") or 1) + 1:  # this run itself adds about `threads`
            lines.append("- **Other processes shared the CPU during this run: the timings are not reliable.**")
    lines += [f"- Note: {note}" for note in result.get("notes", [])]
    lines += [
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|",
    ]
    for t in result["table"]:
        cells = [
            t["method"], f"{t['ratio']:g}", f"{t['cache_bytes'] / 2**20:.2f}", f"{t['bytes_ratio']:.3f}",
            f"{t['accuracy']:.2f}", f"{t['prefill_s']:.2f}", f"{t['prefill_vs_full']:.2f}",
            f"{t['decode_tok_s']:.1f}", f"{t['decode_vs_full']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(compresskv.available_methods())
    if unknown:
        sys.exit(f"unknown methods {sorted(unknown)}; available: {compresskv.available_methods()}")
    haystack = args.haystack.read_text() if args.haystack else None
    model, tokenizer = compresskv.load_model(args.model)
    tasks = [make_needle_task(tokenizer, args.length, d, seed=i, haystack=haystack) for i, d in enumerate(args.depths)]
    plan = [(BASELINE, 0.0)] + [(m, r) for m in methods for r in args.ratios]
    load_before = machine_info()["loadavg_1_5_15"]
    start = time.perf_counter()
    rows = []
    with torch.inference_mode():
        model(input_ids=tasks[0].input_ids[:, :64])  # warm-up, so the first timed run is not penalised
        bar = tqdm(total=len(tasks) * len(plan), desc="eviction", unit="run")
        for task in tasks:
            for method, ratio in plan:
                bar.set_postfix_str(f"depth={task.depth} {method} {ratio:g}")
                row = one_run(model, tokenizer, task, method, ratio, args.max_new_tokens)
                rows.append(row)
                tqdm.write(f"depth={task.depth} {method:>13} ratio={ratio:<6g} ok={row['correct']!s:5} "
                           f"prefill={row['prefill_s']:.2f}s {row['answer']!r}")
                bar.update()
        bar.close()
    result = {
        "machine": {**machine_info(), "loadavg_at_start": load_before},
        "model": args.model,
        "length": max(t.length for t in tasks),
        "lengths": [t.length for t in tasks],
        "target_length": args.length,
        "depths": args.depths,
        "max_new_tokens": args.max_new_tokens,
        "haystack": str(args.haystack) if args.haystack else "noise filler",
        "command": shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/eviction.py", *argv])]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "run_seconds": time.perf_counter() - start,
        "rows": rows,
        "table": aggregate(rows),
    }
    write_result(args.out, result, markdown, echo=True)
    return result


if __name__ == "__main__":
    main()
