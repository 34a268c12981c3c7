"""The ``compresskv`` command line: ``compresskv demo`` (the main job) and ``compresskv bench``
(every method at every ratio on long-context tasks, with a table and a plot)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence



def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# -- option values, checked by argparse before anything is loaded ------------------------------------
# Each is an argparse ``type=``: a bad value ends the command with one line naming the option and
# what it takes (``compresskv bench: error: argument --ratios: ...``) and exit status 2.
def _listed(text: str, what: str) -> list[str]:
    items = _names(text)
    if not items:
        raise argparse.ArgumentTypeError(f"got {text!r}; give {what}")
    return list(dict.fromkeys(items))  # in order, each once


def _ratios(text: str) -> list[float]:
    what = "comma-separated compression ratios in [0, 1) (the fraction of the cache removed), e.g. 0.5,0.875"
    ratios = []
    for item in _listed(text, what):
        try:
            ratio = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number; give {what}") from None
        if not 0.0 <= ratio < 1.0:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{item} is outside [0, 1); give {what}")
        ratios.append(ratio)
    return ratios


def _count(minimum: int, what: str):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {what}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}; give {what}")
        return value

    check.__name__ = "int"
    return check


def _seeds(text: str) -> list[int]:
    what = "comma-separated whole-number seeds, e.g. 0,1,2"
    seeds = []
    for item in _listed(text, what):
        try:
            seeds.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a whole number; give {what}") from None
    return seeds


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]; give a number in [0, 1] (0: start, 1: end)")
    return value


def _known(text: str, known: list[str], what: str) -> list[str]:
    """``text`` as a comma-separated list of names from ``known`` (``what``: "method", "task")."""
    names = _listed(text, f"comma-separated {what} names from {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def _methods(text: str) -> list[str]:
    from . import available_methods

    return _known(text, available_methods(), "method")


def _all_tasks() -> list[str]:
    from .eval.bench import PERPLEXITY
    from .eval.tasks import available_tasks

    return available_tasks() + [PERPLEXITY]


def _tasks(text: str) -> list[str]:
    return _known(text, _all_tasks(), "task")


def _text_source(text: str) -> str:
    """A text file that exists, or ``hf:NAME[:CONFIG[:SPLIT]]`` (a ``datasets`` corpus)."""
    if text.startswith("hf:"):
        if not text[3:].split(":")[0]:
            raise argparse.ArgumentTypeError(f"{text!r} names no data set; give a text file or hf:NAME[:CONFIG[:SPLIT]]")
        return text
    return _text_file(text, "a text file or hf:NAME[:CONFIG[:SPLIT]]")


def _text_file(text: str, what: str = "a text file") -> str:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no such file {text!r}; give {what}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a file; give {what}")
    return text


def _haystack(text: str) -> str:
    return _text_file(text, "a text file to hide the needles in")


def _model(text: str) -> str:
    """A hub id (``org/name``) or a local path; a path written as one (``/``, ``./``, ``../``,
    ``~``) must exist, or transformers would look it up on the hub."""
    if text.startswith(("/", "./", "../", "~")) and not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"no such model directory {text!r}; give a local model path or a hub id (org/name)")
    return str(Path(text).expanduser()) if text.startswith("~") else text


def _device(text: str) -> str:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here; give cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
    return text


_LENGTH = "a prompt length in tokens >= 1, e.g. 4096"
_THREADS = "a number of CPU threads >= 1"


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

    import torch

    torch.set_num_threads(args.threads)
    methods = args.methods or available_methods()
    model, tokenizer = load_model(args.model, device=args.device)
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (embedded)'} on {args.device}", file=sys.stderr)
    _check_needle_length(args, tokenizer)
    rows = demo_rows(model, tokenizer, methods, args.ratios, args.length, args.depth, args.seed,
                     calibration=args.calibration)
    print(format_table(rows))
    print(f"\nneedle: {rows[0]['expected']}; full-cache answer: {rows[0]['answer']!r}")
    return 0


def bench(args: argparse.Namespace) -> int:
    import shlex

    from . import available_methods, load_model
    from .eval.bench import PERPLEXITY, BenchConfig, run_bench, table_markdown
    from .eval.tasks import available_tasks

    import torch

    torch.set_num_threads(args.threads)
    methods = args.methods or available_methods()
    tasks = args.tasks or available_tasks() + ([PERPLEXITY] if args.text else [])
    from .models import DEFAULT_MODEL

    config = BenchConfig(
        methods=methods,
        ratios=args.ratios,
        tasks=tasks,
        length=args.length,
        seeds=args.seeds,
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("compresskv")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def _device_and_threads(sub: argparse.ArgumentParser) -> None:
    # Defaults are resolved after parsing (_resolve_defaults), so --help and --version need no torch.
    sub.add_argument("--device", type=_device, default=None,
                     help="torch device to run on, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    sub.add_argument("--threads", type=_count(1, _THREADS), default=None,
                     help="CPU threads torch may use (default: torch's own count, all cores; idle threads sleep, "
                     "OMP_WAIT_POLICY=PASSIVE, so a busy machine does not stall them)")


def _resolve_defaults(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "device", "unset") is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if getattr(args, "threads", "unset") is None:
        args.threads = max(1, torch.get_num_threads())


def build_parser() -> argparse.ArgumentParser:
    from .eval.results import DEFAULT_OUT

    parser = argparse.ArgumentParser(prog="compresskv", description="Compressed KV caches for transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="answer a ~4k-token needle question with every method at a few ratios")
    d.add_argument("--model", type=_model, default=None, help="hub id or local path (default: embedded SmolLM2-135M-Instruct)")
    d.add_argument("--methods", type=_methods, default=None, help="comma-separated method names (default: all)")
    d.add_argument("--ratios", type=_ratios, default="0.5,0.875",
                   help="fractions of the cache removed, each in [0, 1) (default: 0.5,0.875)")
    d.add_argument("--length", type=_count(1, _LENGTH), default=4096, help="prompt length in tokens (default: 4096)")
    d.add_argument("--depth", type=_fraction, default=0.5, help="needle depth in [0, 1] (default: 0.5)")
    d.add_argument("--seed", type=_count(-(2**63), "a whole number"), default=0,
                   help="seed that draws the needle (the number asked for) (default: 0)")
    d.add_argument("--calibration", type=_text_source, default=None, help="text the calibrated methods (pca, "
                   "matryoshka, elitekv) calibrate on, as in `compresskv bench`: a file or hf:NAME; without it they "
                   "are skipped")
    _device_and_threads(d)
    d.set_defaults(func=demo, parser=d)
    b = sub.add_parser(
        "bench",
        help="score every method at every ratio on long-context tasks vs DynamicCache; JSON lines, table, plot",
        description="Run every method at every ratio on RULER-style tasks (and perplexity with --text), against "
        "DynamicCache in the same run. pca, matryoshka and elitekv calibrate once on --calibration (kept under "
        "$COMPRESSKV_CACHE/bench); minicache, which has no ratio, runs once at its defaults. Writes OUT.jsonl "
        "(resumable: rerunning skips finished rows), OUT.md and OUT.png.",
    )
    b.add_argument("--model", type=_model, default=None, help="hub id or local path (default: embedded SmolLM2-135M-Instruct)")
    b.add_argument("--methods", type=_methods, default=None, help="comma-separated method names (default: all registered)")
    b.add_argument("--ratios", type=_ratios, default="0.5,0.75,0.875",
                   help="compression ratios, each in [0, 1) (default: 0.5,0.75,0.875)")
    b.add_argument("--tasks", type=_tasks, default=None, help="comma-separated: niah_single, niah_multikey, "
                   "niah_multivalue, niah_multiquery, vt, cwe, perplexity (default: all six RULER-style tasks, plus "
                   "perplexity with --text)")
    b.add_argument("--length", type=_count(1, _LENGTH), default=4096,
                   help="prompt (perplexity: prefix) length in tokens (default: 4096)")
    b.add_argument("--seeds", type=_seeds, default="0", help="comma-separated seeds, one prompt per task and seed (default: 0)")
    b.add_argument("--text", type=_text_source, default=None,
                   help="text for perplexity: a file, or hf:NAME[:CONFIG[:SPLIT]] (datasets)")
    b.add_argument("--calibration", type=_text_source, default=None, help="text the calibrated methods (pca, "
                   "matryoshka, elitekv) calibrate on: a file or hf:NAME (keep it apart from --text); without it "
                   "they are skipped")
    b.add_argument("--haystack", type=_haystack, default=None,
                   help="text file to hide needles in (default: RULER's noise sentences)")
    b.add_argument("--continuation", type=_count(1, "a number of tokens >= 1"), default=512,
                   help="perplexity: tokens scored after the prefix (default: 512)")
    b.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output stem, relative to the working directory (default: {DEFAULT_OUT})")
    _device_and_threads(b)
    b.set_defaults(func=bench, parser=b)
    return parser


def _check_options(args: argparse.Namespace) -> None:
    """What no single option shows: checked after parsing, still before any model is loaded."""
    if args.command == "bench" and args.tasks and "perplexity" in args.tasks and not args.text:
        args.parser.error("the perplexity task needs --text PATH (or hf:NAME)")


def _check_needle_length(args: argparse.Namespace, tokenizer: Any) -> None:
    """``demo --length`` below what the question itself takes would silently run a longer prompt."""
    from .eval.needle import make_needle_task

    shortest = make_needle_task(tokenizer, length=1, depth=args.depth, seed=args.seed).length
    if args.length < shortest:
        args.parser.error(f"argument --length: {args.length} is shorter than the needle question itself "
                          f"({shortest} tokens with this model's tokenizer); give a length >= {shortest}, e.g. 4096")


def _openmp_waits_passively() -> None:
    """Make idle OpenMP threads sleep instead of spinning, unless the user chose a policy.

    torch's CPU kernels and MKL's SVDs run on OpenMP threads that spin between parallel regions
    by default; beside any other busy process a spinning thread takes the time slice its partner
    needs, and every barrier stalls: with 2 threads on 2 cores we measured SVDs 5-30x and prefill
    5-12x slower than with 1 thread, and PASSIVE 0.5-0.8x the 1-thread time
    (benchmarks/results/threads.md). OpenMP reads the policy once, when torch is first imported,
    which in this command happens after this call.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``compresskv ARGS`` and return its exit status: 2, with a one-line message on stderr,
    for a bad option (checked before any model is loaded)."""
    _openmp_waits_passively()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        _resolve_defaults(args)
        _check_options(args)
        return int(args.func(args))
    except SystemExit as exit_:  # argparse's usage errors (and --help): the status, as the other outcomes
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
