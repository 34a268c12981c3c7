"""The ``compresskv`` command line: ``compresskv demo`` (the main job) and ``compresskv bench``
(every method at every ratio on long-context tasks, with a table and a plot)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def demo_rows(
    model: Any, tokenizer: Any, methods: Sequence[str], ratios: Sequence[float], length: int, depth: float, seed: int,
    calibration: str | None = None,
) -> list[dict[str, Any]]:
    """Answer one needle question with DynamicCache, then with every method at every ratio (a
    method without a ratio option once, at its defaults). Methods are built as ``compresskv
    bench`` builds them (:class:`compresskv.eval.methods.MethodBuilder`): the calibrated ones
    only with a ``calibration`` text."""
    from tqdm.auto import tqdm

    from .eval.bench import usable_methods
    from .eval.methods import MethodBuilder
    from .eval.needle import make_needle_task, run_needle

    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    task = make_needle_task(tokenizer, length=length, depth=depth, seed=seed)
    builder = MethodBuilder(model, tokenizer, calibration, ratios, log=say)
    usable = usable_methods(model, methods, ratios, log=say, builder=builder)
    runs: list[tuple[str, float | None]] = [("dynamic", None)]
    runs += [(m, r) for m in usable for r in builder.ratios_for(m, ratios)]
    rows = []
    full_bytes = None
    try:
        for method, ratio in tqdm(runs, desc=f"needle @ {task.length} tokens", unit="run"):
            start = time.perf_counter()
            builder.release()  # e.g. revert the last EliteKV conversion: every run starts from the model as loaded
            cache = None if ratio is None else builder.build(method, ratio)
            result = run_needle(model, tokenizer, task, cache, max_new_tokens=24)
            seconds = time.perf_counter() - start
            if full_bytes is None:
                full_bytes = result["cache_bytes"]
            rows.append(
                {
                    "method": method,
                    "ratio": ratio,
                    "cache_bytes": result["cache_bytes"],
                    "bytes_ratio": result["cache_bytes"] / full_bytes,
                    "correct": result["correct"],
                    "answer": result["answer"],
                    "expected": task.answer,
                    "seconds": seconds,
                }
            )
    finally:
        builder.release()
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    from .eval.methods import ratio_label

    header = f"{'method':<14}{'ratio asked':>12}{'cache MiB':>11}{'bytes ratio':>13}{'correct':>9}{'seconds':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        asked = "-" if r["ratio"] is None else ratio_label(r["ratio"])
        lines.append(
            f"{r['method']:<14}{asked:>12}{r['cache_bytes'] / 2**20:>11.2f}{r['bytes_ratio']:>13.3f}"
            f"{'yes' if r['correct'] else 'no':>9}{r['seconds']:>9.1f}"
        )
    return "\n".join(lines)


def demo(args: argparse.Namespace) -> int:
    from . import available_methods, load_model

    torch.set_num_threads(args.threads)
    methods = _names(args.methods) if args.methods else available_methods()
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        print(f"compresskv demo: unknown methods {unknown}; available: {available_methods()}", file=sys.stderr)
        return 2
    model, tokenizer = load_model(args.model, device=args.device)
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (embedded)'} on {args.device}", file=sys.stderr)
    rows = demo_rows(model, tokenizer, methods, _floats(args.ratios), args.length, args.depth, args.seed,
                     calibration=args.calibration)
    print(format_table(rows))
    print(f"\nneedle: {rows[0]['expected']}; full-cache answer: {rows[0]['answer']!r}")
    return 0


def bench(args: argparse.Namespace) -> int:
    import shlex

    from . import available_methods, load_model
    from .eval.bench import PERPLEXITY, BenchConfig, run_bench, table_markdown
    from .eval.tasks import available_tasks

    torch.set_num_threads(args.threads)
    methods = _names(args.methods) if args.methods else available_methods()
    tasks = _names(args.tasks) if args.tasks else available_tasks() + ([PERPLEXITY] if args.text else [])
    bad = [t for t in tasks if t not in available_tasks() + [PERPLEXITY]]
    if bad:
        print(f"compresskv bench: unknown tasks {bad}; choose from {available_tasks() + [PERPLEXITY]}", file=sys.stderr)
        return 2
    if PERPLEXITY in tasks and not args.text:
        print("compresskv bench: the perplexity task needs --text PATH (or hf:NAME)", file=sys.stderr)
        return 2
    from .models import DEFAULT_MODEL

    config = BenchConfig(
        methods=methods,
        ratios=_floats(args.ratios),
        tasks=tasks,
        length=args.length,
        seeds=[int(s) for s in _names(args.seeds)],
        out=args.out,
        model=args.model or DEFAULT_MODEL,
        text=args.text,
        haystack=args.haystack,
        continuation=args.continuation,
        calibration=args.calibration,
        command=shlex.join(["compresskv", *(args.argv or [])]),
    )
    model, tokenizer = load_model(args.model, device=args.device)
    print(f"model: {config.model} on {args.device}; tasks {tasks}; methods {methods}", file=sys.stderr)
    result = run_bench(model, tokenizer, config, log=lambda msg: print(msg, file=sys.stderr))
    print(table_markdown(result["table"], config.tasks))
    print("wrote " + ", ".join(str(p) for p in result["paths"] if p is not None), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compresskv", description="Compressed KV caches for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="answer a ~4k-token needle question with every method at a few ratios")
    d.add_argument("--model", default=None, help="hub id or local path (default: embedded SmolLM2-135M-Instruct)")
    d.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    d.add_argument("--ratios", default="0.5,0.875", help="fractions of the cache removed (default: 0.5,0.875)")
    d.add_argument("--length", type=int, default=4096, help="prompt length in tokens (default: 4096)")
    d.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (default: 0.5)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--calibration", default=None, help="text the calibrated methods (pca, matryoshka, elitekv) "
                   "calibrate on, as in `compresskv bench`: a file or hf:NAME; without it they are skipped")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    d.set_defaults(func=demo)
    b = sub.add_parser(
        "bench",
        help="score every method at every ratio on long-context tasks vs DynamicCache; JSON lines, table, plot",
        description="Run every method at every ratio on RULER-style tasks (and perplexity with --text), against "
        "DynamicCache in the same run. pca, matryoshka and elitekv calibrate once on --calibration (kept under "
        "$COMPRESSKV_CACHE/bench); minicache, which has no ratio, runs once at its defaults. Writes OUT.jsonl "
        "(resumable: rerunning skips finished rows), OUT.md and OUT.png.",
    )
    b.add_argument("--model", default=None, help="hub id or local path (default: embedded SmolLM2-135M-Instruct)")
    b.add_argument("--methods", default=None, help="comma-separated method names (default: all registered)")
    b.add_argument("--ratios", default="0.5,0.75,0.875", help="compression ratios (default: 0.5,0.75,0.875)")
    b.add_argument("--tasks", default=None, help="comma-separated: niah_single, niah_multikey, niah_multivalue, "
                   "niah_multiquery, vt, cwe, perplexity (default: all six RULER-style tasks, plus perplexity with --text)")
    b.add_argument("--length", type=int, default=4096, help="prompt (perplexity: prefix) length in tokens (default: 4096)")
    b.add_argument("--seeds", default="0", help="comma-separated seeds, one prompt per task and seed (default: 0)")
    b.add_argument("--text", default=None, help="text for perplexity: a file, or hf:NAME[:CONFIG[:SPLIT]] (datasets)")
    b.add_argument("--calibration", default=None, help="text the calibrated methods (pca, matryoshka, elitekv) "
                   "calibrate on: a file or hf:NAME (keep it apart from --text); without it they are skipped")
    b.add_argument("--haystack", default=None, help="text file to hide needles in (default: RULER's noise sentences)")
    b.add_argument("--continuation", type=int, default=512, help="perplexity: tokens scored after the prefix (default: 512)")
    b.add_argument("--out", type=Path, default=Path("benchmarks/results/bench"), help="output stem (default: benchmarks/results/bench)")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    b.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    b.set_defaults(func=bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
