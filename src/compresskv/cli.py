"""The ``compresskv`` command line: ``compresskv demo`` (the main job), ``compresskv bench``
(every method at every ratio on long-context tasks, with a table and a plot) and
``compresskv elitekv-allocate`` (EliteKV's perplexity-vs-rotated-pairs sweep, with a table and a plot)."""

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


def _fractions(text: str, what: str, removed: bool) -> list[float]:
    """Comma-separated numbers in [0, 1) (fractions removed) or, with ``removed=False``, in (0, 1]
    (fractions kept)."""
    values = []
    for item in _listed(text, what):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number; give {what}") from None
        if not (0.0 <= value < 1.0 if removed else 0.0 < value <= 1.0):  # also refuses nan
            raise argparse.ArgumentTypeError(f"{item} is outside {'[0, 1)' if removed else '(0, 1]'}; give {what}")
        values.append(value)
    return values


def _ratios(text: str) -> list[float]:
    return _fractions(text, "comma-separated compression ratios in [0, 1) (the fraction of the cache removed), "
                            "e.g. 0.5,0.875", removed=True)


def _cache_ratios(text: str) -> list[float]:
    return _fractions(text, "comma-separated cache ratios in (0, 1] (the fraction of the cache kept), e.g. 0.25,0.5",
                      removed=False)


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


def _known(text: str, known: list[str], what: str, also: Any = None, hint: str = "") -> list[str]:
    """``text`` as a comma-separated list of names from ``known`` (``what``: "method", "task"), or
    names ``also(name)`` accepts (described by ``hint``)."""
    names = _listed(text, f"comma-separated {what} names from {', '.join(known)}")
    unknown = [n for n in names if n not in known and not (also and also(n))]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(known)}{hint}")
    return names


def _methods(text: str) -> list[str]:
    from . import available_methods

    if text.strip() == "all":
        return available_methods()
    return _known(text, available_methods() + ["all"], "method")


def _bench_methods(text: str) -> list[str]:
    """As ``_methods``, plus compositions (``snapkv+int4``) and the ``quantizedcache_*`` baselines."""
    from . import available_methods
    from .eval.methods import BASELINES, resolves

    if text.strip() == "all":
        return available_methods()
    return _known(text, available_methods() + sorted(BASELINES), "method", also=resolves,
                  hint=", or a composition joined by + (e.g. snapkv+int4, snapkv+pca+int4)")


class _Given(argparse.Action):
    """Stores the value and notes that it was given (``--frontier`` has default ratios of its own)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, self.dest + "_given", True)


def _all_tasks() -> list[str]:
    from .eval.bench import AFTER, PERPLEXITY
    from .eval.longbench import PREFIX, available_longbench_tasks
    from .eval.tasks import available_tasks

    return (available_tasks() + [PERPLEXITY] + [t + AFTER for t in available_tasks()]
            + [PREFIX + t for t in available_longbench_tasks()])


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


def _folder(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder {text!r}; give a folder of LongBench <task>.jsonl files")
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


def demo(args: argparse.Namespace) -> int:
    from . import load_model
    from .eval.demo import conclusion, demo_runs, format_table

    import torch

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device)
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (embedded)'} on {args.device}, {args.threads} threads",
          file=sys.stderr)
    _check_needle_length(args, tokenizer)
    start = time.perf_counter()
    runs, tasks = demo_runs(model, tokenizer, args.methods, args.ratios, args.length, args.seeds,
                            calibration=args.calibration, log=lambda msg: print(msg, file=sys.stderr))
    print(format_table(runs))
    print()
    print(conclusion(runs, tasks))
    print(f"(demo took {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


def _bundled_text() -> str:
    from .data import sample_text_path

    return str(sample_text_path())


def bench(args: argparse.Namespace) -> int:
    import shlex

    from . import available_methods, load_model
    from .eval.bench import PERPLEXITY, BenchConfig, run_bench, table_markdown
    from .eval.frontier import FRONTIER_METHODS, FRONTIER_RATIOS
    from .eval.tasks import available_tasks
    from .models import DEFAULT_MODEL

    import torch

    torch.set_num_threads(args.threads)
    methods = args.methods or (list(FRONTIER_METHODS) if args.frontier else available_methods())
    ratios = list(FRONTIER_RATIOS) if args.frontier and not args.ratios_given else args.ratios
    tasks = args.tasks or available_tasks() + ([PERPLEXITY] if args.text else [])
    if args.question_after:  # each RULER-style task also with its question asked after compression
        from .eval.bench import AFTER

        tasks = tasks + [t + AFTER for t in tasks if t != PERPLEXITY and not t.endswith(AFTER) and t + AFTER not in tasks]
    config = BenchConfig(
        methods=methods, ratios=ratios, tasks=tasks, length=args.length, seeds=args.seeds, out=args.out,
        model=args.model or DEFAULT_MODEL, text=args.text, haystack=args.haystack, continuation=args.continuation,
        calibration=args.calibration or _bundled_text(), command=shlex.join(["compresskv", *(args.argv or [])]),
        longbench_dir=args.longbench_dir, frontier=args.frontier,
    )
    model, tokenizer = load_model(args.model, device=args.device)
    print(f"model: {config.model} on {args.device}; tasks {tasks}; methods {methods}", file=sys.stderr)
    result = run_bench(model, tokenizer, config, log=lambda msg: print(msg, file=sys.stderr))
    print(table_markdown(result["table"], config.tasks))
    print("wrote " + ", ".join(str(p) for p in result["paths"] if p is not None), file=sys.stderr)
    return 0


def elitekv_allocate(args: argparse.Namespace) -> int:
    import json
    import shlex

    import torch

    from . import load_model
    from .elitekv.allocation import allocate_ratios, report_markdown
    from .eval.machine import machine_info
    from .eval.perplexity import load_text
    from .eval.plots import plot_allocation
    from .eval.results import write_result
    from .models import DEFAULT_MODEL

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device)
    calibration = args.calibration or _bundled_text()
    start = time.perf_counter()
    ranking, allocations = allocate_ratios(
        model, load_text(calibration), args.cache_ratios, tokenizer=tokenizer,
        eval_texts=load_text(args.text) if args.text else None, seq_len=args.seq_len, num_windows=args.windows,
        eval_windows=args.eval_windows, grid=args.grid,
    )
    result = {
        "command": shlex.join(["compresskv", *(args.argv or [])]), "model": args.model or DEFAULT_MODEL,
        "calibration_source": Path(calibration).name, "eval_source": Path(args.text).name if args.text else
        "held out of the calibration text", "machine": machine_info(args.device),
        "seconds": time.perf_counter() - start, "allocations": [a.to_dict() for a in allocations],
    }
    text = write_result(args.out, result, report_markdown)
    plot_allocation(result["allocations"], args.out.with_suffix(".png"))
    if args.save:
        ranking.save_pretrained(args.save / "ranking")
        for a in allocations:
            a.save_pretrained(args.save / f"allocation-{a.cache_ratio:g}")
    print(text)
    print(json.dumps({f"{a.cache_ratio:g}": {"rope_pairs": a.rope_pairs, "kv_dim": a.kv_dim} for a in allocations}))
    print(f"wrote {args.out.with_suffix('.json')}, .md, .png", file=sys.stderr)
    return 0


def _lm_eval(args: argparse.Namespace) -> int:
    try:
        from .eval.harness import main as harness_main
    except ImportError as err:
        print(f"compresskv lm-eval: {err}", file=sys.stderr)
        return 2
    return harness_main(args.lm_eval_args)


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
    from .eval.demo import DEFAULT_LENGTH as DEMO_LENGTH, DEFAULT_METHODS as DEMO_METHODS, DEFAULT_RATIOS as DEMO_RATIOS
    from .eval.frontier import FRONTIER_METHODS
    from .eval.results import DEFAULT_OUT

    parser = argparse.ArgumentParser(prog="compresskv", description="Compressed KV caches for transformers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo", help="answer needle questions with a full cache and compressed ones; table and conclusion",
        description="Answer the bench's niah_single questions (a 7-digit number hidden in ~--length tokens, one "
        "question per seed, each at its own depth) with DynamicCache and with each method at each ratio; print what "
        "each cache held, how many needles it kept and how fast it ran, then a conclusion.",
    )
    d.add_argument("--model", type=_model, default=None, help="hub id or local path (default: embedded SmolLM2-135M-Instruct)")
    d.add_argument("--methods", type=_methods, default=",".join(DEMO_METHODS),
                   help=f"comma-separated method names, or all (default: {','.join(DEMO_METHODS)})")
    d.add_argument("--ratios", type=_ratios, default=",".join(f"{r:g}" for r in DEMO_RATIOS),
                   help="compression ratios: fractions of the prompt's cache removed, each in [0, 1) "
                   f"(default: {','.join(f'{r:g}' for r in DEMO_RATIOS)})")
    d.add_argument("--length", type=_count(1, _LENGTH), default=DEMO_LENGTH,
                   help=f"prompt length in tokens (default: {DEMO_LENGTH})")
    d.add_argument("--seeds", type=_seeds, default="0,1,2",
                   help="comma-separated seeds, one needle question each (default: 0,1,2)")
    d.add_argument("--calibration", type=_text_source, default=None, help="text the calibrated methods (pca, "
                   "matryoshka, elitekv) calibrate on, as in `compresskv bench`: a file or hf:NAME (default: the "
                   "bundled novel, Austen's Persuasion; the one-off result is kept under $COMPRESSKV_CACHE/bench)")
    _device_and_threads(d)
    d.set_defaults(func=demo, parser=d)
    b = sub.add_parser(
        "bench",
        help="score every method at every ratio on long-context tasks vs DynamicCache; JSON lines, table, plot",
        description="Run every method at every ratio on RULER-style tasks (and perplexity with --text), against "
        "DynamicCache in the same run. pca, matryoshka and elitekv calibrate once on --calibration (kept under "
        "$COMPRESSKV_CACHE/bench); minicache, which has no ratio, runs once at its defaults. Writes OUT.jsonl "
        "(resumable: rerunning skips finished rows), OUT.md and OUT.png; with --frontier also OUT_frontier.json "
        "and OUT_frontier.png.",
    )
    b.add_argument("--model", type=_model, default=None, help="hub id or local path (default: embedded SmolLM2-135M-Instruct)")
    b.add_argument("--methods", type=_bench_methods, default=None,
                   help="comma-separated method names, compositions (snapkv+int4, snapkv+pca+int4) or transformers' "
                   "QuantizedCache (quantizedcache_int4, _int2) (default: all registered; --frontier: its list)")
    b.add_argument("--ratios", type=_ratios, action=_Given, default="0.5,0.75,0.875",
                   help="compression ratios, each in [0, 1) (default: 0.5,0.75,0.875; with --frontier: "
                   "0.75,0.875,0.9375)")
    b.add_argument("--frontier", action="store_true",
                   help="quality per byte: the best row and best single method at 1/4, 1/8, 1/16 of the full "
                   "cache's bytes (in OUT.md, OUT_frontier.json), score vs bytes (OUT_frontier.png); default methods: "
                   f"{','.join(FRONTIER_METHODS)}")
    b.add_argument("--tasks", type=_tasks, default=None, help="comma-separated: niah_single, niah_multikey, "
                   "niah_multivalue, niah_multiquery, vt, cwe, perplexity, longbench:TASK (LongBench v1, e.g. "
                   "longbench:qasper; the seeds index its records, --length truncates its prompts) (default: all six "
                   "RULER-style tasks, plus perplexity with --text)")
    b.add_argument("--question-after", action="store_true",
                   help="also run each task with its question asked after the context alone was compressed (rows "
                   "named TASK:after, in the same run; the cache is compressed without knowing the question)")
    b.add_argument("--length", type=_count(1, _LENGTH), default=4096,
                   help="prompt (perplexity: prefix) length in tokens (default: 4096)")
    b.add_argument("--seeds", type=_seeds, default="0", help="comma-separated seeds, one prompt per task and seed (default: 0)")
    b.add_argument("--text", type=_text_source, default=None,
                   help="text for perplexity: a file, or hf:NAME[:CONFIG[:SPLIT]] (datasets)")
    b.add_argument("--calibration", type=_text_source, default=None, help="text the calibrated methods (pca, "
                   "matryoshka, elitekv) calibrate on: a file or hf:NAME, kept apart from --text (default: the "
                   "bundled novel, Austen's Persuasion)")
    b.add_argument("--haystack", type=_haystack, default=None,
                   help="text file to hide needles in (default: RULER's noise sentences)")
    b.add_argument("--continuation", type=_count(1, "a number of tokens >= 1"), default=512,
                   help="perplexity: tokens scored after the prefix (default: 512)")
    b.add_argument("--longbench-dir", type=_folder, default=None,
                   help="folder of LongBench JSON-lines files (DIR/<task>.jsonl) for longbench:TASK tasks (default: "
                   "$COMPRESSKV_LONGBENCH_DIR, else THUDM/LongBench from the hub)")
    b.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"output stem, relative to the working directory (default: {DEFAULT_OUT})")
    _device_and_threads(b)
    b.set_defaults(func=bench, parser=b, ratios_given=False)
    e = sub.add_parser(
        "elitekv-allocate", help="EliteKV: sweep the rotated RoPE pairs r per cache ratio by held-out perplexity",
        description="For each cache ratio, convert the model training-free (RoPElite pairs, activation-aware "
        "J-LRD) at a coarse-to-fine set of r (RoPE pairs per KV head; the latent takes the rest of the budget) and "
        "measure held-out perplexity (compresskv.elitekv.allocate). Writes OUT.json, OUT.md (the table, the chosen "
        "r and the fixed rule's) and OUT.png (perplexity vs r, chosen points marked).",
    )
    e.add_argument("--model", type=_model, default=None, help="hub id or local path (default: embedded SmolLM2-135M-Instruct)")
    e.add_argument("--cache-ratios", type=_cache_ratios, default="0.25,0.5",
                   help="cache ratios, fractions of the cache kept, each in (0, 1] (default: 0.25,0.5)")
    e.add_argument("--calibration", type=_text_source, default=None, help="text the ranking is computed on: a "
                   "file or hf:NAME (default: the bundled novel, Austen's Persuasion)")
    e.add_argument("--text", type=_text_source, default=None, help="held-out text the perplexity is measured on "
                   "(default: the last --eval-windows windows of --calibration, kept apart from the ranking's)")
    e.add_argument("--seq-len", type=_count(4, "a window length in tokens >= 4"), default=512,
                   help="tokens per window (default: 512)")
    e.add_argument("--windows", type=_count(1, "a number of windows >= 1"), default=4,
                   help="calibration windows for the ranking (default: 4)")
    e.add_argument("--eval-windows", type=_count(1, "a number of windows >= 1"), default=2,
                   help="held-out windows scored per r (default: 2)")
    e.add_argument("--grid", type=_count(2, "a number of coarse points >= 2"), default=5,
                   help="coarse values of r before refining around the best (default: 5)")
    e.add_argument("--out", type=Path, default=Path("compresskv-results/elitekv_allocation"),
                   help="output stem (default: compresskv-results/elitekv_allocation)")
    e.add_argument("--save", type=Path, default=None,
                   help="also save the ranking (DIR/ranking) and each allocation (DIR/allocation-RATIO) there")
    _device_and_threads(e)
    e.set_defaults(func=elitekv_allocate, parser=e)
    h = sub.add_parser(
        "lm-eval", add_help=False, help="lm-evaluation-harness's command line with the compresskv model registered",
        description="lm-eval's own command line (lm_eval ARGS), with compresskv's lm-eval model registered first: "
        "compresskv lm-eval --model compresskv --model_args method=snapkv,compression_ratio=0.5 --tasks TASKS. "
        "Needs pip install 'compresskv[lm-eval]'.",
    )
    h.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    h.set_defaults(func=_lm_eval, parser=h)
    return parser


def _check_options(args: argparse.Namespace) -> None:
    """What no single option shows: checked after parsing, still before any model is loaded."""
    if args.command == "bench" and args.tasks and "perplexity" in args.tasks and not args.text:
        args.parser.error("the perplexity task needs --text PATH (or hf:NAME)")


def _check_needle_length(args: argparse.Namespace, tokenizer: Any) -> None:
    """``demo --length`` below what the question itself takes is refused, naming the shortest."""
    from .eval.tasks import make_task

    try:
        make_task("niah_single", tokenizer, length=args.length, seed=args.seeds[0])
    except ValueError as err:
        args.parser.error(f"argument --length: {args.length} is too short for the needle question ({err}); "
                          "give e.g. 4096")


def _openmp_waits_passively() -> None:
    """Make idle OpenMP threads sleep instead of spinning, unless the user chose a policy.

    torch's CPU kernels and MKL's SVDs run on OpenMP threads that spin between parallel regions
    by default; beside any other busy process a spinning thread takes the time slice its partner
    needs and every barrier stalls: 2 threads on 2 cores decoded 5x slower than 1 thread, and
    SVDs ran up to 30x slower; with PASSIVE they are as fast as 1 thread or faster, at a cost of
    5-13% of decode speed on a quiet machine (benchmarks/results/threads.md). OpenMP reads the
    policy once, when torch is first imported, which in this command happens after this call.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``compresskv ARGS`` and return its exit status: 2, with a one-line message on stderr,
    for a bad option (checked before any model is loaded)."""
    _openmp_waits_passively()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # lm-eval's own options, passed on as they are (argparse would take them)
        return _lm_eval(argparse.Namespace(lm_eval_args=argv[1:]))
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
