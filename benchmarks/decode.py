"""Decode speed of every method, eager and compiled, against DynamicCache and StaticCache + compile.

For each context length (``--contexts``) and thread count (``--threads``), one interleaved run of:

- ``dynamiccache``: transformers' ``DynamicCache``, eager (the baseline of every ratio);
- ``staticcache+compile``: transformers' ``StaticCache`` with ``torch.compile``'d decode steps,
  transformers' fastest path;
- every method at every ``--ratios`` value, eager, and compiled where the cache is compileable (the
  eviction and projected caches with ``decode_tokens``; the others are not).

One measurement: a prompt of ``L`` real-text tokens is prefilled once per configuration (eagerly,
with every thread), and each measurement decodes from a copy of that prefilled cache
(``copy.deepcopy``): ``--warmup`` untimed greedy steps, then ``--steps`` timed single-token
forwards with explicit positions (the loop ``generate`` runs, without its sampling machinery).
Compiled variants are compiled (``fullgraph=True, dynamic=False``) before the timed rounds, once
per thread count (inductor's CPU kernels keep the thread count they were built for), and must give
the eager variant's tokens (the ``same tokens`` column).

Interleaving, step by step: a configuration decodes in lockstep with a DynamicCache decoding from
its own copy of the same prompt, one step of each in turn (which of the two goes first alternates),
so both see the machine as it is within a tenth of a second; its ratio is the median over the
steps of DynamicCache's step time over its own. (Whole runs interleaved, as this script did
before, left the ratios at ±25% round to round on a shared machine, where the load of other tenants
changes over seconds.) Every round does this for every configuration, in an order rotated by one
each round; the table reports the median over all ``--rounds`` x ``--steps`` pairs, the range of
the rounds' medians, and ms/token as the median step. Results go to ``<out>.json`` /
``<out>.md`` after every (context, threads) cell; a cell already there is skipped unless
``--force``, so an interrupted run continues where it stopped.

``benchmarks/decode_speed.py`` measures through ``generate`` and runs against two source trees
(before/after a change); this script is the method x context x threads x compile matrix of #19.
``--smoke`` runs a tiny random model at 128/256 tokens (to test the script itself). ``--device cuda``
times on a GPU (bf16 by default; compiled rows with CUDA graphs, ``mode="reduce-overhead"``; each
step synchronised before its clock stops).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import itertools
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the compresskv command (benchmarks/threads.md)

import torch  # noqa: E402
from transformers import DynamicCache, StaticCache  # noqa: E402

import compresskv  # noqa: E402
from compresskv import compat  # noqa: E402
from compresskv.core.attention import install, uninstall  # noqa: E402
from compresskv.data import sample_text_path  # noqa: E402
from compresskv.eval.machine import machine_info  # noqa: E402
from compresskv.eval.measure import cache_nbytes  # noqa: E402
from compresskv.eval.methods import MethodBuilder  # noqa: E402

BASELINE = "dynamiccache"
STATIC = "staticcache+compile"
COMPILEABLE = ("snapkv", "pyramidkv", "streamingllm", "knorm", "pca", "matryoshka")  # take decode_tokens=


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default="1024,4096,8192", help="prompt lengths, comma-separated")
    p.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    p.add_argument("--methods", default="snapkv,pyramidkv,streamingllm,knorm,pca,svd,xkv",
                   help="methods (eager at every ratio; compiled where compileable)")
    p.add_argument("--ratios", default="0.5,0.75", help="compression ratios")
    p.add_argument("--compiled", default="snapkv:0.5,snapkv:0.75,pyramidkv:0.75,streamingllm:0.75,knorm:0.75,pca:0.5,pca:0.75",
                   help="method:ratio pairs also run compiled ('all': every compileable one; '': none)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed decode steps before them")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--text", type=Path, default=sample_text_path(), help="prompt text (default: the bundled novel)")
    p.add_argument("--offset", type=int, default=200_000, help="character offset of the prompt in --text")
    p.add_argument("--calibration", default=str(sample_text_path()), help="calibration text of pca/matryoshka")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decode"), help="output stem")
    p.add_argument("--force", action="store_true", help="re-measure cells already in <out>.json")
    p.add_argument("--smoke", action="store_true", help="tiny random model, short contexts (tests the script)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA: bf16, CUDA graphs, --threads ignored)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.device != "cpu":
        args.threads = "1"  # one cell per context: the CPU thread count is not what is measured
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one measurement -------------------------------------------------------------------------------
def stepper(forward: Any, cache: Any, token: torch.Tensor, start: int, before: Any = None) -> Iterator[tuple[float, int]]:
    """Greedy single-token steps from ``token`` at position ``start``: yields each step's seconds
    and token, endlessly; ``before()`` runs ahead of each step, untimed."""
    use_cache_position = "cache_position" in inspect.signature(getattr(forward, "forward", forward)).parameters
    device = token.device
    for i in itertools.count():
        if before is not None:
            before()
        extra = {"cache_position": torch.tensor([start + i], device=device)} if use_cache_position else {}
        _sync(device)
        began = time.perf_counter()
        with torch.no_grad():  # per step: a context held across a yield would leak into the caller's
            out = forward(input_ids=token, position_ids=torch.tensor([[start + i]], device=device), use_cache=True,
                          **compat.cache_kwargs(cache), **extra)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        yield time.perf_counter() - began, int(token)


def lockstep(a: Any, b: Any, warmup: int, steps: int) -> tuple[list[float], list[float], list[int]]:
    """Two :func:`stepper` runs one step each in turn (``a`` first on even steps, ``b`` on odd):
    the timed steps' seconds of each and ``b``'s tokens (the warm-up steps' too)."""
    times_a, times_b, tokens = [], [], []
    for i in range(warmup + steps):
        if i % 2:
            (tb, token), (ta, _) = next(b), next(a)
        else:
            (ta, _), (tb, token) = next(a), next(b)
        tokens.append(token)
        if i >= warmup:
            times_a.append(ta)
            times_b.append(tb)
    return times_a, times_b, tokens


class Config:
    """One row: a cache maker, eager or compiled; prefilled once, decoded from copies."""

    def __init__(self, name: str, ratio: float | None, compiled: bool, make: Any) -> None:
        self.name, self.ratio, self.compiled, self.make = name, ratio, compiled, make
        self.prefilled: Any = None
        self.first: torch.Tensor | None = None
        self.cache_bytes: int | None = None

    @property
    def key(self) -> str:
        ratio = "" if self.ratio is None else f"@{self.ratio:g}"
        return f"{self.name}{ratio}{'+compile' if self.compiled and self.name != STATIC else ''}"

    def attention(self, model: Any) -> None:
        """transformers' own caches run on the model's own attention, compresskv's on its hook."""
        if self.name in (BASELINE, STATIC):
            uninstall(model)
        else:
            install(model)

    def prefill(self, model: Any, ids: torch.Tensor) -> float:
        cache = self.make()
        self.attention(model)
        began = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, **compat.cache_kwargs(cache))
        seconds = time.perf_counter() - began
        self.first = out.logits[:, -1:].argmax(-1)
        self.cache_bytes = cache_nbytes(cache)
        self.prefilled = cache
        return seconds

    def measure(self, model: Any, compiled: Any, length: int, args: argparse.Namespace) -> tuple[float, list[int]]:
        """Median seconds per step of one run alone (after ``--warmup`` untimed steps) and its tokens."""
        done = list(itertools.islice(self.steps(model, compiled, length), args.warmup + args.steps))
        return statistics.median(t for t, _ in done[args.warmup:]), [tok for _, tok in done]

    def steps(self, model: Any, compiled: Any, length: int) -> Iterator[tuple[float, int]]:
        """:func:`stepper` from a copy of the prefilled cache, on this row's attention every step (the
        row it runs in lockstep with may switch it)."""
        return stepper(compiled if self.compiled else model, copy.deepcopy(self.prefilled), self.first, length,
                       lambda: self.attention(model))


def configs(model: Any, builder: MethodBuilder, args: argparse.Namespace, length: int) -> tuple[list[Config], dict[str, str]]:
    room = args.warmup + args.steps + 8
    rows = [Config(STATIC, None, True,
                   lambda: StaticCache(config=model.config, max_cache_len=length + room))]
    compiled = {(m, float(r)) for m, r in (pair.split(":") for pair in args.compiled.split(",") if pair and args.compiled != "all")}
    skipped: dict[str, str] = {}
    for method in [m for m in args.methods.split(",") if m]:
        why = builder.unusable(method)
        if why:
            skipped[method] = why
            continue
        for ratio in [float(r) for r in args.ratios.split(",")]:
            rows.append(Config(method, ratio, False, lambda m=method, r=ratio: builder.build(m, r)))
            if method in COMPILEABLE and (args.compiled == "all" or (method, ratio) in compiled):
                rows.append(Config(method, ratio, True, lambda m=method, r=ratio: builder.build(m, r, decode_tokens=room)))
    return rows, skipped


# -- one cell: a context length and a thread count, interleaved rounds --------------------------------
def run_cell(model: Any, rows: list[Config], base: Config, length: int, threads: int, args: argparse.Namespace,
             log: Any) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # inductor's CPU kernels are built for the thread count at compile time
    # on CUDA, CUDA graphs (what generate's compile_config uses there); the caches' buffers keep their addresses
    mode = "reduce-overhead" if args.device != "cpu" else "default"
    compiled = torch.compile(model, fullgraph=True, dynamic=False, mode=mode)
    eager_tokens: dict[str, list[int]] = {}
    compile_s: dict[str, float] = {}
    for row in rows:
        began = time.perf_counter()
        _, tokens = row.measure(model, compiled, length, args)  # compiles a compiled row's step
        if row.compiled:
            compile_s[row.key] = time.perf_counter() - began
        else:
            eager_tokens[row.key] = tokens
        log(f"  warm {row.key}: {time.perf_counter() - began:.1f}s")
    measurements: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for row in rows[r % len(rows):] + rows[: r % len(rows)]:
            base_s, row_s, tokens = lockstep(base.steps(model, compiled, length), row.steps(model, compiled, length),
                                             args.warmup, args.steps)
            measurements.append({"round": r, "config": row.key, "steps_ms": [t * 1000 for t in row_s],
                                 "dynamic_steps_ms": [t * 1000 for t in base_s], "tokens": tokens})
        log(f"  round {r + 1}/{args.rounds} done")
    table = []
    for row in [base, *rows]:
        own = "dynamic_steps_ms" if row is base else "steps_ms"  # DynamicCache: its steps in every pair
        mine = [m for m in measurements if row is base or m["config"] == row.key]
        pairs = [[b / t for b, t in zip(m["dynamic_steps_ms"], m[own])] for m in mine]
        per_round = [statistics.median(p) for p in pairs]
        ms = statistics.median(t for m in mine for t in m[own])
        eager_key = row.key.removesuffix("+compile")
        same = None
        if row.compiled and row.name != STATIC and eager_key in eager_tokens:
            same = mine[0]["tokens"] == eager_tokens[eager_key]
        table.append({
            "config": row.key, "method": row.name, "ratio": row.ratio, "compiled": row.compiled,
            "tok_s": 1000 / ms, "vs_dynamic": statistics.median(x for p in pairs for x in p),
            "vs_dynamic_min": min(per_round), "vs_dynamic_max": max(per_round),
            "ms_per_token": ms, "cache_bytes": row.cache_bytes,
            "compile_s": compile_s.get(row.key), "same_tokens_as_eager": same,
        })
    static = next(t for t in table if t["config"] == STATIC)
    for t in table:  # through the pairs with DynamicCache: both measured against it step by step
        t["vs_static_compile"] = t["vs_dynamic"] / static["vs_dynamic"]
    return {"context": length, "threads": threads, "table": table, "measurements": measurements}


# -- output ---------------------------------------------------------------------------------------
def _f(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    out = [
        "# Decode speed: eager and compiled compressed caches vs DynamicCache and StaticCache + compile", "",
        f"Model {result['model']} ({result['config'].get('device', 'cpu')}, {result['config'].get('dtype', 'float32')}), "
        f"prompt from `{Path(result['config']['text']).name}`, batch 1, greedy; "
        f"{result['config']['steps']} timed steps after {result['config']['warmup']} untimed, median ms/token; "
        f"{result['config']['rounds']} rounds per cell, each configuration decoding in lockstep with a DynamicCache "
        "(one step of each in turn). *vs Dynamic*: median over all steps of DynamicCache's step time over the "
        "configuration's [min–max of the rounds' medians]; *vs Static+compile*: its vs Dynamic over StaticCache + "
        "compile's. "
        "Compiled rows: `torch.compile(model, fullgraph=True, dynamic=False)`, eviction and projected caches with "
        "`decode_tokens`; *same tokens*: the compiled row generated the eager row's tokens. Cache MiB: after prefill.",
        "",
    ]
    for cell in result["cells"]:
        out += [f"## {cell['context']} tokens, {cell['threads']} thread(s)", "",
                "| config | ms/token | vs Dynamic | [min–max] | vs Static+compile | cache MiB | compile s | same tokens |",
                "|---|---|---|---|---|---|---|---|"]
        for t in cell["table"]:
            mib = None if t["cache_bytes"] is None else t["cache_bytes"] / 2**20
            same = "–" if t["same_tokens_as_eager"] is None else ("yes" if t["same_tokens_as_eager"] else "**no**")
            out.append(f"| {t['config']} | {t['ms_per_token']:.1f} | {t['vs_dynamic']:.2f}x | "
                       f"[{t['vs_dynamic_min']:.2f}–{t['vs_dynamic_max']:.2f}] | {t['vs_static_compile']:.2f}x | "
                       f"{_f(mib, '.1f')} | {_f(t['compile_s'], '.0f')} | {same} |")
        out.append("")
    if result.get("skipped"):
        out += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in result["skipped"].items()), ""]
    m = result["machine"]
    out += [f"- Machine: {m.get('processor', '')}, {m.get('cpus', '')} CPUs, load average at the start "
            f"{m.get('loadavg_1_5_15')}; torch {m.get('torch')}, transformers {m.get('transformers')}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; run {result['date']}",
            f"- Command: `{result['command']}`", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch._dynamo.config.recompile_limit = 256  # one graph per configuration's shapes
    torch._dynamo.config.accumulated_recompile_limit = 4096

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    if args.smoke:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from conftest import tiny_model
        from tiny_tokenizer import tiny_tokenizer

        model, tokenizer, name = tiny_model("llama", layers=2, vocab_size=400), tiny_tokenizer(), "tiny random llama"
        model.to(device=args.device, dtype=getattr(torch, args.dtype))
    else:
        model, tokenizer = compresskv.load_model(dtype=getattr(torch, args.dtype), device=args.device)
        name = getattr(model.config, "_name_or_path", "") or "embedded model"
    builder = MethodBuilder(model, tokenizer, args.calibration, [float(r) for r in args.ratios.split(",")], log=log)
    text = args.text.read_text(encoding="utf-8", errors="replace")[args.offset:]
    all_ids = tokenizer(text[: max(int(c) for c in args.contexts.split(",")) * 12], add_special_tokens=False).input_ids
    json_path = Path(str(args.out) + ".json")
    result: dict[str, Any] = json.loads(json_path.read_text()) if json_path.exists() and not args.force else {}
    result.update({
        "model": name, "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(args.device), "transformers": __import__("transformers").__version__,
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    result.setdefault("cells", [])
    done = {(c["context"], c["threads"]) for c in result["cells"]}
    threads = [int(t) for t in args.threads.split(",")]
    for length in [int(c) for c in args.contexts.split(",")]:
        if all((length, t) in done for t in threads):
            log(f"{length} tokens: already measured (--force to redo)")
            continue
        ids = torch.tensor([all_ids[:length]], device=args.device)
        torch.set_num_threads(max(threads))
        rows, skipped = configs(model, builder, args, length)
        result["skipped"] = skipped
        base = Config(BASELINE, None, False, lambda: DynamicCache(config=model.config))
        for row in [base, *rows]:
            log(f"{length} tokens: prefill {row.key}: {row.prefill(model, ids):.1f}s")
        for t in threads:
            if (length, t) in done:
                continue
            log(f"{length} tokens, {t} thread(s)")
            cell = run_cell(model, rows, base, length, t, args, log)
            result["cells"] = [c for c in result["cells"] if (c["context"], c["threads"]) != (length, t)] + [cell]
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(result, indent=1) + "\n")
            Path(str(args.out) + ".md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
