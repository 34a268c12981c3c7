"""Benchmark MatryoshkaKV / PCA projected caches against an uncompressed DynamicCache, in one run.

Stages (each artifact is saved under ``--work`` and reused by a rerun with ``--reuse``):

1. PCA calibration of post-RoPE keys and values on the calibration novels.
2. Matryoshka training of the projections (Cayley-parameterised, nested ranks, 0.25·KL + 0.75·CE).
3. Greedy rank allocation for every budget, for the PCA and for the trained projections.
4. Quality on a held-out novel, at each cache budget (fraction of the full cache kept), for
   ``pca-uniform`` (PCA, same rank everywhere), ``pca-allocated`` and ``trained-allocated`` as in
   the paper (every token projected), and the same three ``+sink``: the cache's ``sink_tokens``
   option keeps each prompt's first ``--sink-tokens`` tokens at full precision, with training and
   allocation run the same way (separate artifacts);
   perplexity of a continuation with a long prefix in the cache, and one needle-in-a-haystack
   question. Prefill attention runs on the full keys and values in every cache, so each prompt is
   prefilled once with a DynamicCache and every compressed cache is filled from it
   (``MatryoshkaKVCache.load_prefill``: the same state its own prefill would leave); the
   continuation and the answer are then computed through each cache.
5. Decode tokens/s at two context lengths for DynamicCache, attention in the projected space and
   reconstruct-on-read (both at 50%), interleaved in rounds so that load changes hit all alike.

Run from the repository root (defaults: embedded SmolLM2-135M-Instruct, Austen novels)::

    python benchmarks/lowrank.py
    python benchmarks/lowrank.py --quick        # a few minutes: checks the script, numbers meaningless

It writes ``benchmarks/results/lowrank.json`` (settings, machine, stage timings, raw rows, tables)
and ``benchmarks/results/lowrank.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import DynamicCache

import compresskv
from compresskv import compat
from compresskv.eval import perplexity
from compresskv.eval.machine import machine_info
from compresskv.eval.results import floats, ints, write_result
from compresskv.core.attention import install, uninstall
from compresskv.eval.needle import make_needle_task
from compresskv.eval.perplexity import make_perplexity_task, tokenize_text
from compresskv.projected import kept_fraction

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"
VARIANTS = ("pca-uniform", "pca-allocated", "trained-allocated")
SINK = "+sink"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=compresskv.DEFAULT_MODEL, help="hub id or local path (default: embedded)")
    p.add_argument("--data", type=Path, default=DATA, help="folder with the texts")
    p.add_argument("--calib", default="emma.txt,persuasion.txt", help="calibration/training texts (in --data)")
    p.add_argument("--heldout", default="pride_and_prejudice.txt", help="held-out text for perplexity and speed")
    p.add_argument("--budgets", type=floats, default=floats("0.75,0.5,0.375,0.25"), help="fractions of the cache kept")
    p.add_argument("--calib-seq-len", type=int, default=1024)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--train-steps", type=int, default=32)
    p.add_argument("--train-seq-len", type=int, default=512)
    p.add_argument("--train-lr", type=float, default=1e-3)
    p.add_argument("--alloc-seq-len", type=int, default=512)
    p.add_argument("--alloc-windows", type=int, default=2, help="one window from each calibration text, in turn")
    p.add_argument("--alloc-round", type=float, default=0.05, help="fraction of all rank steps removed per round")
    p.add_argument("--sink-tokens", type=int, default=1, help="tokens kept exact in the +sink variants (0: none)")
    p.add_argument("--length", type=int, default=4096, help="prefix tokens (perplexity) / needle prompt tokens")
    p.add_argument("--continuation", type=int, default=256, help="scored tokens after the prefix")
    p.add_argument("--depths", type=floats, default=floats("0.5"), help="needle depths (one question each)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--speed-lengths", type=ints, default=ints("4096,8000"), help="contexts for decode tokens/s")
    p.add_argument("--speed-budget", type=float, default=0.5)
    p.add_argument("--speed-tokens", type=int, default=8, help="decode tokens per timed round")
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (1 by default: on a shared 2-core machine, 2 threads spin-wait)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "compresskv" / "lowrank-bench",
                   help="where the projections are saved")
    p.add_argument("--reuse", action="store_true", help="reuse projections saved under --work by an earlier run")
    p.add_argument("--reallocate", action="store_true", help="with --reuse: recompute the rank allocations")
    p.add_argument("--quick", action="store_true", help="tiny settings to check the script end to end")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/lowrank"), help="output stem")
    args = p.parse_args(argv)
    if args.quick:
        args.calib_seq_len, args.calib_windows, args.train_steps, args.train_seq_len = 256, 2, 2, 128
        args.alloc_seq_len, args.alloc_round, args.length, args.continuation = 128, 0.2, 512, 32
        args.max_new_tokens, args.speed_lengths, args.speed_tokens, args.speed_rounds = 6, [512], 2, 1
        args.work = args.work.with_name(args.work.name + "-quick")
        args.out = args.out.with_name(args.out.name + "-quick")
    return args




def say(text: str) -> None:
    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {text}")


# -- stages 1-3: projections ----------------------------------------------------------------------
def projections(args: argparse.Namespace, model: Any, tokenizer: Any, timings: dict[str, float]) -> tuple[dict[str, Any], list[str]]:
    """PCA, trained and, with ``--sink-tokens``, sink-aware trained projections, each with its
    rank allocations (``"pca+sink"`` is the PCA with allocations made for the sink option), and
    the names of those loaded from ``--work`` rather than computed in this run."""
    texts = [(args.data / name).read_text(encoding="utf-8", errors="replace") for name in args.calib.split(",")]
    # Calibration, training and allocation read different parts of the calibration texts.
    ids = [tokenize_text(tokenizer, t) for t in texts]
    calib_ids = [s[: len(s) // 2] for s in ids]
    train_ids = [s[len(s) // 2 : 3 * len(s) // 4] for s in ids]
    alloc_ids = [s[3 * len(s) // 4 :] for s in ids]
    per_text = -(-args.alloc_windows // len(alloc_ids))
    alloc_text = [s[i * args.alloc_seq_len : (i + 1) * args.alloc_seq_len] for i in range(per_text) for s in alloc_ids]
    sinks = {"": 0, SINK: args.sink_tokens} if args.sink_tokens else {"": 0}

    def path(name: str) -> Path:
        return args.work / name.replace("+", "-")

    reused: list[str] = []

    def load(name: str) -> Any:
        if args.reuse and (path(name) / "meta.json").exists():
            say(f"reusing {path(name)}")
            reused.append(name)
            return compresskv.Projections.from_pretrained(path(name), model)
        return None

    out: dict[str, Any] = {}
    pca = load("pca")
    if pca is None:
        start = time.perf_counter()
        per_text = max(1, args.calib_windows // len(calib_ids))
        windows = [s[i * args.calib_seq_len : (i + 1) * args.calib_seq_len] for s in calib_ids for i in range(per_text)]
        pca = compresskv.calibrate(model, windows, seq_len=args.calib_seq_len, batch_size=1)
        timings["calibrate_s"] = time.perf_counter() - start
        say(f"PCA: {pca.options['tokens']} tokens in {timings['calibrate_s']:.0f} s")
        pca.save_pretrained(path("pca"))
    for tag, sink in sinks.items():
        out["pca" + tag] = pca if not tag else (load("pca" + tag) or pca.copy())
        trained = load("trained" + tag)
        if trained is None:
            start = time.perf_counter()
            trained = compresskv.train_projections(model, pca, train_ids, steps=args.train_steps, seq_len=args.train_seq_len,
                                                   lr=args.train_lr, sink_tokens=sink)
            timings[f"train{tag}_s"] = time.perf_counter() - start
            info = trained.options["training"]
            say(f"trained{tag}: {info['tokens']} tokens, {info['seconds']:.0f} s, loss {info['loss_first']:.3f} -> "
                f"{info['loss_last']:.3f}, ‖UᵀU−I‖ = {trained.orthogonality_error():.1e}")
            trained.save_pretrained(path("trained" + tag))
        out["trained" + tag] = trained
    for name, proj in out.items():
        if all(proj.allocation(compression_ratio=1 - b) is not None for b in args.budgets) and not args.reallocate:
            continue
        sink = sinks[SINK] if name.endswith(SINK) else 0
        start = time.perf_counter()
        compresskv.allocate_ranks(model, proj, alloc_text, compression_ratio=[1 - b for b in args.budgets],
                                  seq_len=args.alloc_seq_len,
                                  max_windows=args.alloc_windows, round_fraction=args.alloc_round, sink_tokens=sink)
        timings[f"allocate_{name}_s"] = time.perf_counter() - start
        say(f"allocated {name} ranks for {args.budgets} in {timings[f'allocate_{name}_s']:.0f} s")
        proj.save_pretrained(path(name))
    return out, reused


def variants(args: argparse.Namespace) -> list[str]:
    return list(VARIANTS) + ([v + SINK for v in VARIANTS] if args.sink_tokens else [])


def make_cache(model: Any, projs: dict[str, Any], variant: str, budget: float, mode: str = "projected",
               sink_tokens: int = 0) -> Any:
    base, sink = variant.split("+")[0], SINK in variant
    source, how = base.split("-")
    return compresskv.MatryoshkaKVCache(model, projs[source + (SINK if sink else "")], compression_ratio=1 - budget,
                                        read_mode={"projected": "latent", "reconstruct": "model"}.get(mode, mode),
                                        use_allocation=(how == "allocated"), sink_tokens=sink_tokens if sink else 0)


# -- stage 4: quality ---------------------------------------------------------------------------------
@torch.inference_mode()
def prefill(model: Any, ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor, float]:
    uninstall(model)
    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    out = model(input_ids=ids, **compat.cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1].float(), time.perf_counter() - start


def plain_or_compressed(model: Any, cache: Any) -> Any:
    if isinstance(cache, compresskv.CompressedCache):
        install(model)
    else:
        uninstall(model)
    return cache


def continuation_nll(model: Any, cache: Any, last: torch.Tensor, cont: torch.Tensor) -> float:
    """Mean NLL of ``cont`` given the prefix in ``cache`` (first token from the prefix's ``last`` logits)."""
    plain_or_compressed(model, cache)
    return perplexity.continuation_nll(model, cache, last, cont)


@torch.inference_mode()
def greedy_answer(model: Any, tokenizer: Any, cache: Any, last: torch.Tensor, max_new: int) -> tuple[str, float]:
    plain_or_compressed(model, cache)
    token = last.argmax(-1, keepdim=True)
    out = [token]
    start = time.perf_counter()
    for _ in range(max_new - 1):
        if int(token) == tokenizer.eos_token_id:
            break
        token = model(input_ids=token, **compat.cache_kwargs(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    seconds = time.perf_counter() - start
    return tokenizer.decode(torch.cat(out, dim=-1)[0], skip_special_tokens=True).strip(), seconds


def bytes_of(cache: Any) -> int:
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def quality(args: argparse.Namespace, model: Any, tokenizer: Any, projs: dict[str, Any], heldout: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    plan = [("dynamiccache", 1.0)] + [(v, b) for b in args.budgets for v in variants(args)]
    ppl_task = make_perplexity_task(tokenizer, heldout, args.length, args.continuation, seed=0)
    needles = [make_needle_task(tokenizer, args.length, depth, seed=i) for i, depth in enumerate(args.depths)]
    bar = tqdm(total=len(plan) * (1 + len(needles)), desc="quality", unit="run")
    base_cache, last, seconds = prefill(model, ppl_task.prefix)
    say(f"perplexity prefix: {ppl_task.length} tokens prefilled in {seconds:.1f} s")
    base_bytes = bytes_of(base_cache)
    for variant, budget in plan:
        if variant == "dynamiccache":
            cache = copy.deepcopy(base_cache)
        else:
            cache = make_cache(model, projs, variant, budget, sink_tokens=args.sink_tokens).load_prefill(base_cache)
        prefix_bytes = bytes_of(cache)
        nll = continuation_nll(model, cache, last, ppl_task.continuation)
        row = {"task": "perplexity", "variant": variant, "budget": budget, "nll": nll, "ppl": math.exp(nll),
               "prefix_bytes": prefix_bytes, "bytes_ratio": prefix_bytes / base_bytes, "tokens": ppl_task.length,
               "start": ppl_task.start}
        if variant != "dynamiccache":
            row.update(kept=cache.kept_fraction(), rank_source=cache.rank_source)
        rows.append(row)
        say(f"ppl {variant:>22} {budget:<6g} ppl={row['ppl']:.3f} bytes={row['bytes_ratio']:.3f}")
        bar.update()
        del cache
    del base_cache
    for needle in needles:
        base_cache, last, seconds = prefill(model, needle.input_ids)
        say(f"needle depth {needle.depth}: {needle.length} tokens prefilled in {seconds:.1f} s")
        for variant, budget in plan:
            if variant == "dynamiccache":
                cache = copy.deepcopy(base_cache)
            else:
                cache = make_cache(model, projs, variant, budget, sink_tokens=args.sink_tokens).load_prefill(base_cache)
            answer, decode_s = greedy_answer(model, tokenizer, cache, last, args.max_new_tokens)
            rows.append({"task": "needle", "variant": variant, "budget": budget, "depth": needle.depth,
                         "tokens": needle.length, "answer": answer, "expected": needle.answer,
                         "correct": needle.score(answer)})
            say(f"needle {variant:>22} {budget:<6g} correct={needle.score(answer)!s:5} {answer!r}")
            bar.update()
            del cache
        del base_cache
    bar.close()
    return rows


# -- stage 5: decode speed -------------------------------------------------------------------------------
@torch.inference_mode()
def speed(args: argparse.Namespace, model: Any, projs: dict[str, Any], heldout: list[int]) -> list[dict[str, Any]]:
    rows = []
    budget = args.speed_budget
    for length in args.speed_lengths:
        ids = torch.tensor([heldout[1000 : 1000 + length]])
        base, last, seconds = prefill(model, ids)
        say(f"speed: {length} tokens prefilled in {seconds:.1f} s")
        configs = {
            "dynamiccache": copy.deepcopy(base),
            "projected (trained-allocated)": make_cache(model, projs, "trained-allocated", budget).load_prefill(base),
            "projected (uniform)": make_cache(model, projs, "pca-uniform", budget).load_prefill(base),
            "reconstruct (uniform)": make_cache(model, projs, "pca-uniform", budget, mode="reconstruct").load_prefill(base),
        }
        del base
        tokens = {name: last.argmax(-1, keepdim=True) for name in configs}
        per_token: dict[str, list[float]] = {name: [] for name in configs}
        for round_ in range(args.speed_rounds + 1):  # round 0 warms up
            for name, cache in configs.items():
                plain_or_compressed(model, cache)
                token = tokens[name]
                start = time.perf_counter()
                for _ in range(args.speed_tokens):
                    token = model(input_ids=token, **compat.cache_kwargs(cache), use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                elapsed = time.perf_counter() - start
                tokens[name] = token
                if round_ > 0:
                    per_token[name].append(elapsed / args.speed_tokens)
        base_s = statistics.median(per_token["dynamiccache"])
        for name, cache in configs.items():
            s = statistics.median(per_token[name])
            rows.append({"length": length, "config": name, "budget": 1.0 if name == "dynamiccache" else budget,
                         "tok_s": 1.0 / s, "vs_dynamic": base_s / s, "bytes": bytes_of(cache),
                         "rounds_s_per_token": per_token[name]})
            say(f"speed {length} {name:>30}: {1.0 / s:.2f} tok/s ({base_s / s:.2f}x)")
        del configs
    return rows


# -- report ----------------------------------------------------------------------------------------------
def tables(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["rows"]
    ppl = {(r["variant"], r["budget"]): r for r in rows if r["task"] == "perplexity"}
    needle = {}
    for r in rows:
        if r["task"] == "needle":
            needle.setdefault((r["variant"], r["budget"]), []).append(r["correct"])
    base = ppl[("dynamiccache", 1.0)]
    out = []
    for key, r in ppl.items():
        n = needle.get(key, [])
        out.append({"variant": key[0], "budget": key[1], "ppl": r["ppl"], "ppl_vs_full": r["ppl"] / base["ppl"],
                    "bytes_ratio": r["bytes_ratio"], "kept": r.get("kept", 1.0),
                    "needle": f"{sum(n)}/{len(n)}" if n else "-"})
    return {"quality": out}


def markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    q = result["tables"]["quality"]
    budgets = s["budgets"]
    base = next(r for r in q if r["variant"] == "dynamiccache")
    names = list(dict.fromkeys(r["variant"] for r in q if r["variant"] != "dynamiccache"))
    lines = [
        "# MatryoshkaKV / PCA projected caches vs DynamicCache",
        "",
        f"Model `{result['model']}` (fp32, CPU). Calibration and training on {s['calib']}; perplexity and "
        f"decode speed on the held-out {s['heldout']}. Budget = fraction of the full cache kept "
        "(keys and values, all layers); `bytes` = measured `cache.nbytes()` after the prefix, over "
        "DynamicCache's bytes for the same tokens (includes the projection columns and means).",
        "",
        f"- Perplexity: {s['length']}-token prefix in the cache, NLL of the next {s['continuation']} tokens "
        f"(DynamicCache: ppl {base['ppl']:.3f}). Needle: {len(s['depths'])} question(s) at depth "
        f"{s['depths']}, ~{s['length']}-token chat prompt, greedy, {s['max_new_tokens']} new tokens.",
        f"- `+sink`: the cache's `sink_tokens={s['sink_tokens']}` option (an extension, not in the paper) keeps "
        "each prompt's first token(s) at full precision, and training/allocation were run the same way.",
        f"- PCA: {result['pca']['tokens']} tokens ({result['pca']['windows']} windows of {result['pca']['seq_len']}), "
        f"{result['pca'].get('calibration_seconds') or float('nan'):.0f} s.",
    ]
    for name, t in result["training"].items():
        lines.append(
            f"- Training `{name}`: {t['steps']} steps × {t['batch_size']}×{t['seq_len']} tokens = "
            f"**{t['tokens']} training tokens, {t['seconds'] / 60:.1f} min** on {t['device']} ({m['threads']} "
            f"thread(s)); lr {t['lr']}, ranks sampled from {t['rank_set']}; loss {t['loss_first']:.3f} → "
            f"{t['loss_last']:.3f}; ‖UᵀU − I‖ = {t['orthogonality']:.1e}.")
    allocs = result["allocation"]
    a0 = next(iter(allocs.values()))
    lines += [
        f"- Allocation: greedy, {a0['tokens']} tokens, step {a0['step']}, "
        + ", ".join(f"`{n}` {a['rounds']} rounds {a['seconds']:.0f} s" for n, a in allocs.items()) + ".",
        f"- Reproduce: `{result['command']}`; date {result['date']}; run time {result['run_seconds'] / 60:.1f} min "
        f"(artifacts reused from earlier runs are not in it: {', '.join(result['reused']) or 'none'}).",
        f"- Machine: {m['platform']}, {m['cpus']} CPUs, torch {m['torch']}, transformers {m['transformers']}, "
        f"load average {m['loadavg_at_start'][0]:.1f} at start, {m['loadavg_1_5_15'][0]:.1f} at end.",
        "",
        "| variant | " + " | ".join(f"{b:g}" for b in budgets) + " |",
        "|---|" + "---:|" * len(budgets),
    ]
    for variant in names:
        cells = []
        for b in budgets:
            r = next(x for x in q if x["variant"] == variant and x["budget"] == b)
            cells.append(f"ppl {r['ppl']:.2f} (×{r['ppl_vs_full']:.2f}), needle {r['needle']}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines.append(f"| dynamiccache (100%) | ppl {base['ppl']:.2f}, needle {base['needle']} |" + " |" * (len(budgets) - 1))
    lines += [
        "",
        "| variant | budget | kept (ranks) | bytes | ppl | ppl vs full | needle |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in q:
        lines.append(f"| {r['variant']} | {r['budget']:g} | {r['kept']:.3f} | {r['bytes_ratio']:.3f} | {r['ppl']:.3f} | "
                     f"{r['ppl_vs_full']:.3f} | {r['needle']} |")
    lines += [
        "",
        f"Decode tokens/s ({s['speed_tokens']} tokens × {s['speed_rounds']} interleaved rounds, median; budget "
        f"{s['speed_budget']:g}; one thread):",
        "",
        "| context | cache | tok/s | vs DynamicCache | cache MiB |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in result["speed"]:
        lines.append(f"| {r['length']} | {r['config']} | {r['tok_s']:.2f} | {r['vs_dynamic']:.2f} | {r['bytes'] / 2**20:.1f} |")
    lines.append("")
    lines += [f"- Note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load_before = machine_info()["loadavg_1_5_15"]
    model, tokenizer = compresskv.load_model(args.model)
    timings: dict[str, float] = {}
    projs, reused = projections(args, model, tokenizer, timings)
    heldout = tokenize_text(tokenizer, (args.data / args.heldout).read_text(encoding="utf-8", errors="replace"))
    start_eval = time.perf_counter()
    rows = quality(args, model, tokenizer, projs, heldout)
    timings["quality_s"] = time.perf_counter() - start_eval
    start_speed = time.perf_counter()
    speed_rows = speed(args, model, projs, heldout)
    timings["speed_s"] = time.perf_counter() - start_speed
    uninstall(model)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {
        "model": args.model,
        "settings": settings,
        "machine": {**machine_info(), "loadavg_at_start": load_before},
        "command": shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/lowrank.py", *argv])]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "timings": timings,
        "pca": {k: projs["pca"].options.get(k) for k in ("tokens", "windows", "seq_len", "calibration_seconds")},
        "reused": reused,
        "training": {n: {**{k: v for k, v in p.options["training"].items() if k != "history"},
                         "orthogonality": p.orthogonality_error(), "history": p.options["training"]["history"]}
                     for n, p in projs.items() if n.startswith("trained")},
        "allocation": {n: p.options["allocation"] for n, p in projs.items()},
        "allocations": {name: {f"{b:g}": {"ranks_k": p.allocation(compression_ratio=1 - b)[0].tolist(),
                                          "ranks_v": p.allocation(compression_ratio=1 - b)[1].tolist(),
                                          "kept": kept_fraction(*p.allocation(compression_ratio=1 - b), p.head_dim)}
                               for b in args.budgets} for name, p in projs.items()},
        "rows": rows,
        "speed": speed_rows,
        "notes": [
            "Each prompt is prefilled once (full-precision prefill attention, as in every compresskv cache) and "
            "every compressed cache is filled from that prefill with load_prefill; the continuation / answer then "
            "runs through each cache (stored tokens read in the projected space).",
            "Every run reuses the same prompts; a needle row is one question (0/1).",
            "Timings come from a 2-core machine shared with other jobs: compare ratios within this run only.",
        ],
    }
    result["run_seconds"] = time.perf_counter() - start
    result["tables"] = tables(result)
    write_result(args.out, result, markdown, echo=True)
    return result


if __name__ == "__main__":
    main()
