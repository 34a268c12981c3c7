"""Decode speed of every registered compresskv method against a plain ``DynamicCache``, in one run.

Meant to show that a change to compresskv did not slow decoding down: the figures that matter are
the *ratios* to the ``DynamicCache`` baseline measured in the same round, not the absolute tokens/s
(which depend on the machine and its load). The script uses only API that every compresskv
version since the layout change has (``compresskv.load_model``, ``compresskv.make_cache`` through
``compresskv.eval.methods.MethodBuilder``, ``compresskv.available_methods``, transformers'
``DynamicCache`` and ``model.generate``), so the same file runs against two source trees::

    PYTHONPATH=/tmp/before/src python benchmarks/decode_speed.py --out /tmp/decode_before
    PYTHONPATH=src             python benchmarks/decode_speed.py --out /tmp/decode_after

What one measurement is: ``model.generate`` on one real-text prompt (``--prompt-tokens`` of
Persuasion, batch 1, greedy, ``min_new_tokens = max_new_tokens = --new-tokens`` so every cache
decodes the same count) with a fresh cache. A streamer timestamps each token as ``generate`` hands
it out: the first new token comes with the prefill, so decode time is from the first new token to
the last one, and decode tokens/s = (new tokens - 1) / that time. Prefill is reported too (from the
prompt's hand-out to the first token), but it is not what this benchmark is about.

How noise is kept apart from the methods: methods are interleaved, not run one after the other.
Every round runs ``DynamicCache``, then every method (in an order rotated by one each round), then
``DynamicCache`` again; a method's ratio in a round is its tokens/s over the mean of that round's
two baseline runs. The table gives the median over rounds (``--rounds``, at least 3) of tokens/s
and of the per-round ratios, with their spread. A short untimed warm-up of every method comes
first.

Methods with ``compression_ratio`` run at ``--ratio`` (default 0.5); ``minicache`` (no ratio) at
its defaults; ``pca``, ``matryoshka`` and ``elitekv`` are calibrated as ``compresskv bench`` does
(``MethodBuilder`` on ``--calibration``, artifacts kept under ``$COMPRESSKV_CACHE/bench`` and
reused). ``elitekv`` converts the model in place: it is converted once per round (not timed) and
reverted before anything else runs. Writes ``<out>.json`` (machine, command, config, every
measurement, the table) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

import compresskv
from compresskv.eval.machine import machine_info
from compresskv.eval.measure import cache_nbytes
from compresskv.eval.methods import DEFAULT_SETTINGS, MethodBuilder, ratio_label

BASELINE = "dynamiccache"
DATA = Path("/work/shared/data/austen")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median over them; at least 3 advised)")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated (min_new_tokens = max_new_tokens)")
    p.add_argument("--ratio", type=float, default=0.5, help="compression_ratio of the methods that take one")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--text", type=Path, default=DATA / "persuasion.txt", help="prompt text")
    p.add_argument("--offset", type=int, default=20000, help="character offset of the prompt in --text (skips front matter)")
    p.add_argument("--calibration", default=str(DATA / "emma.txt"), help="calibration text of pca/matryoshka/elitekv")
    p.add_argument("--warmup-tokens", type=int, default=128, help="prompt length of the untimed warm-up (0: none)")
    p.add_argument("--model", default=None, help="hub id or local path (default: the embedded model)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_speed"), help="output stem")
    return p.parse_args(argv)


class Stamps(BaseStreamer):
    """Timestamps of what ``generate`` hands out: first the prompt, then each new token."""

    def __init__(self) -> None:
        self.prompt: float | None = None
        self.tokens: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if self.prompt is None:
            self.prompt = now
        else:
            self.tokens.append(now)

    def end(self) -> None:
        pass


def generate_timed(model: Any, ids: torch.Tensor, cache: Any, new_tokens: int, pad: int) -> dict[str, Any]:
    """One greedy ``generate`` of exactly ``new_tokens`` with ``cache``; decode and prefill timings."""
    from compresskv import compat

    stamps = Stamps()
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, pad_token_id=pad, streamer=stamps, use_cache=True,
        **compat.cache_kwargs(cache),
    )
    total = time.perf_counter() - start
    tokens = out[0, ids.shape[1]:].tolist()
    n = len(stamps.tokens)
    decode = stamps.tokens[-1] - stamps.tokens[0] if n > 1 else None
    gaps = [b - a for a, b in zip(stamps.tokens, stamps.tokens[1:])]
    return {
        "new_tokens": len(tokens),
        "prefill_s": stamps.tokens[0] - stamps.prompt if n and stamps.prompt is not None else None,
        "decode_s": decode,
        "decode_tok_s": (n - 1) / decode if decode else None,
        "median_token_ms": 1000 * statistics.median(gaps) if gaps else None,
        "generate_s": total,
        "tokens": tokens,
    }


def prompt_ids(tokenizer: Any, path: Path, offset: int, length: int) -> torch.Tensor:
    text = path.read_text(encoding="utf-8", errors="replace")
    chunk = text[offset : offset + length * 12]
    ids = tokenizer(chunk, add_special_tokens=False).input_ids[:length]
    if len(ids) < length:
        raise ValueError(f"{path} has fewer than {length} tokens after character {offset}")
    return torch.tensor([ids])


class Runner:
    """Builds a fresh cache for a method (or the baseline) and runs one timed generate with it."""

    def __init__(self, model: Any, tokenizer: Any, builder: MethodBuilder, ratio: float) -> None:
        self.model, self.tokenizer, self.builder, self.ratio = model, tokenizer, builder, ratio
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def method_ratio(self, method: str) -> float:
        return DEFAULT_SETTINGS if self.builder.ratios_for(method, [self.ratio]) == [DEFAULT_SETTINGS] else self.ratio

    def cache(self, method: str) -> tuple[Any, float]:
        """A fresh cache and the seconds it took to build (an EliteKV conversion included)."""
        start = time.perf_counter()
        if method == BASELINE:
            self.builder.release()  # the model exactly as loaded: no conversion, compresskv's attention uninstalled
            cache = DynamicCache(config=self.model.config)
        else:
            cache = self.builder.build(method, self.method_ratio(method))
        return cache, time.perf_counter() - start

    def run(self, method: str, ids: torch.Tensor, new_tokens: int) -> dict[str, Any]:
        cache, setup = self.cache(method)
        row = generate_timed(self.model, ids, cache, new_tokens, self.pad)
        row["setup_s"] = setup
        try:
            row["cache_bytes"] = cache_nbytes(cache)
        except Exception:  # noqa: BLE001 - bytes are context only
            row["cache_bytes"] = None
        if method == "elitekv":
            self.builder.release()  # revert the conversion before anything else runs
        return row


def usable(runner: Runner, methods: list[str], log: Any) -> tuple[list[str], dict[str, str]]:
    """The methods that can be built (the calibrated ones are calibrated here, once); the rest and why."""
    ok, skipped = [], {}
    for method in methods:
        why = runner.builder.unusable(method)
        if why is None:
            try:
                start = time.perf_counter()
                runner.builder.build(method, runner.method_ratio(method))
                log(f"  {method}: built in {time.perf_counter() - start:.1f}s")
            except Exception as err:  # noqa: BLE001 - not buildable here: skip it, say why
                why = f"cannot be built ({type(err).__name__}: {err})"
            finally:
                runner.builder.release()
        if why:
            log(f"note: skipping {method!r}: {why}")
            skipped[method] = why
        else:
            ok.append(method)
    return ok, skipped


def agreement(tokens: list[int], reference: list[int]) -> int:
    """How many leading generated tokens equal the baseline's."""
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def aggregate(rows: list[dict[str, Any]], methods: list[str], rounds: int) -> list[dict[str, Any]]:
    table = []
    base_rows = [r for r in rows if r["method"] == BASELINE]
    base_by_round = {
        k: statistics.mean(r["decode_tok_s"] for r in base_rows if r["round"] == k) for k in range(rounds)
    }
    for method in [BASELINE, *methods]:
        group = [r for r in rows if r["method"] == method and r.get("decode_tok_s")]
        if not group:
            continue
        # the baseline's own row: each of its runs against its round's mean (its spread within rounds)
        ratios = [r["decode_tok_s"] / base_by_round[r["round"]] for r in group]
        table.append({
            "method": method,
            "ratio_asked": group[0]["ratio"],
            "runs": len(group),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in group),
            "decode_tok_s_min": min(r["decode_tok_s"] for r in group),
            "decode_tok_s_max": max(r["decode_tok_s"] for r in group),
            "vs_dynamic": statistics.median(ratios),
            "vs_dynamic_min": min(ratios),
            "vs_dynamic_max": max(ratios),
            "median_token_ms": statistics.median(r["median_token_ms"] for r in group),
            "prefill_s": statistics.median(r["prefill_s"] for r in group),
            "setup_s": statistics.median(r["setup_s"] for r in group),
            "cache_mib": (group[0]["cache_bytes"] / 2**20) if group[0].get("cache_bytes") is not None else None,
            "same_tokens_as_dynamic": min(r["agree"] for r in group),
        })
    return table


def _f(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    cfg, m = result["config"], result["machine"]
    lines = [
        "# Decode speed: compresskv methods vs DynamicCache",
        "",
        f"Model {cfg['model']}, prompt {cfg['prompt_tokens']} tokens of `{cfg['text']}` (from character "
        f"{cfg['offset']}), batch 1, greedy `generate` of exactly {cfg['new_tokens']} new tokens, "
        f"compression_ratio {cfg['ratio']:g} where a method takes one (else its defaults), "
        f"{cfg['threads']} torch thread(s), {cfg['rounds']} interleaved rounds (DynamicCache first and last in each, "
        "methods in an order rotated per round).",
        "",
        "Decode tok/s = (new tokens − 1) / time from the first to the last new token (the first comes with the "
        "prefill). *vs DynamicCache* is the median over rounds of the method's tokens/s over the mean of the same "
        "round's two DynamicCache runs (min–max over rounds in brackets); absolute figures depend on the machine's "
        "load, the ratios are what to compare between runs. *Same tokens* is the fewest leading generated tokens "
        "equal to DynamicCache's over the rounds.",
        "",
        "| method | ratio | decode tok/s (median) | vs DynamicCache (median) | [min–max] | ms/token (median) "
        "| prefill s | setup s | cache MiB after | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["table"]:
        ratio = "–" if e["method"] == BASELINE else ratio_label(e["ratio_asked"])
        lines.append(
            f"| {e['method']} | {ratio} | {_f(e['decode_tok_s'], '.1f')} | {_f(e['vs_dynamic'], '.3f')} "
            f"| [{_f(e['vs_dynamic_min'], '.3f')}–{_f(e['vs_dynamic_max'], '.3f')}] | {_f(e['median_token_ms'], '.1f')} "
            f"| {_f(e['prefill_s'], '.2f')} | {_f(e['setup_s'], '.2f')} | {_f(e['cache_mib'], '.2f')} "
            f"| {e['same_tokens_as_dynamic']}/{cfg['new_tokens']} |"
        )
    if result.get("skipped"):
        lines += ["", "Left out: " + "; ".join(f"`{k}`: {v}" for k, v in result["skipped"].items())]
    load = m.get("loadavg_at_start")
    lines += [
        "",
        f"- compresskv imported from `{result['compresskv_path']}`",
        f"- Machine: {m.get('processor')}, {m.get('cpus')} CPUs, {m.get('threads')} torch threads, "
        f"load average at start {load} and at end {m.get('loadavg_at_end')}; torch {m.get('torch')}, "
        f"transformers {m.get('transformers')}, Python {m.get('python')}; {m.get('platform')}",
        f"- Run {result['date']}, {result['wall_s']:.0f} s in all",
        f"- Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {text}", flush=True)

    machine = machine_info("cpu")
    machine["loadavg_at_start"] = machine["loadavg_1_5_15"]
    log(f"compresskv from {Path(compresskv.__file__).parent}, {args.threads} thread(s), load {machine['loadavg_1_5_15']}")
    model, tokenizer = compresskv.load_model(args.model) if args.model else compresskv.load_model()
    builder = MethodBuilder(model, tokenizer, args.calibration, [args.ratio], log=log)
    runner = Runner(model, tokenizer, builder, args.ratio)
    wanted = args.methods.split(",") if args.methods else list(compresskv.available_methods())
    wanted = [m.strip() for m in wanted if m.strip() and m.strip() != BASELINE]
    log(f"building (and calibrating where needed): {wanted}")
    methods, skipped = usable(runner, wanted, log)

    ids = prompt_ids(tokenizer, args.text, args.offset, args.prompt_tokens)
    if args.warmup_tokens:
        log("warm-up (untimed)")
        short = ids[:, : args.warmup_tokens]
        for method in [BASELINE, *methods]:
            runner.run(method, short, 4)

    rows: list[dict[str, Any]] = []
    reference: list[int] | None = None
    for k in range(args.rounds):
        shift = k % len(methods) if methods else 0
        order = [BASELINE, *methods[shift:], *methods[:shift], BASELINE]
        log(f"round {k + 1}/{args.rounds}: {order}")
        for method in order:
            row = runner.run(method, ids, args.new_tokens)
            if reference is None:
                reference = row["tokens"]
            row.update(round=k, method=method, ratio=runner.method_ratio(method) if method != BASELINE else 0.0,
                       agree=agreement(row["tokens"], reference))
            rows.append(row)
            log(f"  {method:>13}: decode {row['decode_tok_s']:.1f} tok/s, prefill {row['prefill_s']:.2f}s, "
                f"setup {row['setup_s']:.1f}s, {row['agree']}/{row['new_tokens']} tokens as DynamicCache's")
    builder.release()

    table = aggregate(rows, methods, args.rounds)
    machine["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "command": shlex.join(
            ([f"PYTHONPATH={os.environ['PYTHONPATH']}"] if os.environ.get("PYTHONPATH") else [])
            + ["python", *(sys.argv if argv is None else ["benchmarks/decode_speed.py", *argv])]
        ),
        "compresskv_path": str(Path(compresskv.__file__).parent),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - t0,
        "machine": machine,
        "config": {
            "model": args.model or compresskv.DEFAULT_MODEL, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "ratio": args.ratio, "threads": args.threads, "rounds": args.rounds,
            "text": str(args.text), "offset": args.offset, "calibration": args.calibration,
            "warmup_tokens": args.warmup_tokens, "methods": methods,
        },
        "skipped": skipped,
        "table": table,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(args.out) + ".json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    Path(str(args.out) + ".md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
