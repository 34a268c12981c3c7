"""The ``compresskv`` command line: ``compresskv demo`` (the main job)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

import torch


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def demo_rows(
    model: Any, tokenizer: Any, methods: Sequence[str], ratios: Sequence[float], length: int, depth: float, seed: int
) -> list[dict[str, Any]]:
    """Answer one needle question with DynamicCache, then with every method at every ratio."""
    from tqdm.auto import tqdm

    from .eval.needle import make_needle_task, run_needle
    from .patching import make_cache, method_options

    task = make_needle_task(tokenizer, length=length, depth=depth, seed=seed)
    runs: list[tuple[str, float | None]] = [("dynamic", None)]
    runs += [(m, r) for m in methods if "compression_ratio" in method_options(m) for r in ratios]
    rows = []
    full_bytes = None
    for method, ratio in tqdm(runs, desc=f"needle @ {task.length} tokens", unit="run"):
        start = time.perf_counter()
        cache = None if method == "dynamic" else make_cache(model, method, compression_ratio=ratio)
        result = run_needle(model, tokenizer, task, cache, max_new_tokens=24)
        seconds = time.perf_counter() - start
        if full_bytes is None:
            full_bytes = result["cache_bytes"]
        rows.append(
            {
                "method": method,
                "ratio": ratio or 0.0,
                "cache_bytes": result["cache_bytes"],
                "bytes_ratio": result["cache_bytes"] / full_bytes,
                "correct": result["correct"],
                "answer": result["answer"],
                "expected": task.answer,
                "seconds": seconds,
            }
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = f"{'method':<14}{'ratio asked':>12}{'cache MiB':>11}{'bytes ratio':>13}{'correct':>9}{'seconds':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['method']:<14}{r['ratio']:>12.3f}{r['cache_bytes'] / 2**20:>11.2f}{r['bytes_ratio']:>13.3f}"
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
    rows = demo_rows(model, tokenizer, methods, _floats(args.ratios), args.length, args.depth, args.seed)
    print(format_table(rows))
    print(f"\nneedle: {rows[0]['expected']}; full-cache answer: {rows[0]['answer']!r}")
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
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    d.set_defaults(func=demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
