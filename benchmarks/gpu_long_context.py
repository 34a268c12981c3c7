"""Long-context speed and memory of every compresskv method against DynamicCache, on a GPU.

Random-weight models with the shapes of Llama-3.1-8B (32 layers, 32 query / 8 KV heads, head_dim
128) and of the embedded SmolLM2-135M (30 layers, 9 / 3 heads, head_dim 64), in bf16: weights do
not change speed or memory, so nothing is downloaded. For each shape and context (8k, 32k, 128k
where they fit), DynamicCache and every method at 2x, 4x and 8x compression, in one run:

- cache bytes right after prefill (``cache.nbytes()``; DynamicCache: its tensors) and their ratio;
- peak GPU memory added by prefill + decode at batch 1 (``max_memory_allocated`` minus what was
  allocated before, i.e. the weights are not counted), against DynamicCache's;
- prefill time and the compression overhead (prefill time minus DynamicCache's in the same run;
  low-rank caches also report the SVD/merge time they measured);
- decode tokens/s at batch 1 and at the largest batch that fits (the batch-1 prefilled cache is
  repeated along the batch, ``batch_repeat_interleave``, doubling until out of memory or
  ``--max-batch``: decode memory is what limits serving, prompts can be prefilled one by one);
- for xKV, the compressed bytes it reads per second (latents + factors x decode steps / decode
  time) against the GPU's device-to-device copy bandwidth measured in the same run. xKV runs with
  ``read_mode="fused"`` (the Triton decode kernel) when this compresskv has it.

Timing uses CUDA events after a warm-up (a short prefill and two decode steps with a fresh cache
of the same method). A configuration that runs out of memory is recorded as "does not fit" and
the run goes on. Methods that need calibration (MatryoshkaKV, PCA) are calibrated on random tokens
(uniform ranks; speed and memory depend on the ranks only); EliteKV is converted with uniform RoPE
pairs and the weight-only SVD (its conversion is offline and is timed separately). MiniCache
merges layer pairs and cannot go beyond about 2x: it runs at 2x only.

Runs are resumable: results go to ``<out>.json`` (and ``<out>.md``) after every configuration, a
configuration already there is skipped (``--force`` re-measures), and DynamicCache is measured
again in every invocation that has work for a (shape, context), so ratios always compare numbers
of the same run. ``--time-budget`` stops before starting a configuration that would not finish in
time; run the same command again to continue. On an H100, about::

    python benchmarks/gpu_long_context.py --shapes smollm2
    python benchmarks/gpu_long_context.py --shapes llama8b --contexts 8192,32768
    python benchmarks/gpu_long_context.py --shapes llama8b --contexts 131072   # repeat until complete

``--smoke`` runs tiny shapes on the CPU at 256 tokens (no CUDA-only measure: no CUDA events, peak
memory from the process's resident set) in well under a minute, to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import shlex
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import compresskv
from compresskv import compat
from compresskv.core import attention as ckv_attention
from compresskv import elitekv
from compresskv.eval.machine import machine_info
from compresskv.eval.results import write_result
from compresskv.eval.measure import PeakMemory
from compresskv.eval.needle import dynamic_cache_nbytes

DYNAMIC = "dynamic"
SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.1-8B (default RoPE with its theta: the rope type changes neither speed nor memory).
    "llama8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                    tie_word_embeddings=False),
    # The embedded SmolLM2-135M-Instruct.
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                    tie_word_embeddings=True),
}
SMOKE_SHAPES: dict[str, dict[str, Any]] = {
    "tiny-llama8b": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=32, rope_theta=500000.0,
                         tie_word_embeddings=False),
    "tiny-smollm2": dict(vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16, rope_theta=100000.0,
                         tie_word_embeddings=True),
}
EVICTION = ("snapkv", "pyramidkv", "streamingllm", "knorm", "expected_attention")
PROJECTED = ("matryoshka", "pca")
#: methods whose options set the bytes ratio exactly (up to rounding and small per-layer factors)
EXACT_RATIO = EVICTION + PROJECTED + ("xkv", "svd", "elitekv")
#: methods whose saving is fixed: the most they remove (x) and why. MiniCache with every layer pair
#: merged keeps a little over half the bytes; KIVI quantization alone keeps, of 16 bits, its codes
#: plus a 16-bit scale and zero per 32 elements (bits + 1).
FIXED_SAVING = {
    "minicache": (2.0, "MiniCache merges layer pairs"),
    **{f"int{bits}": (16 / (bits + 1), "its codes and scales") for bits in (2, 4, 8)},
}
TARGET_SPEEDUP = 1.5
TARGET_CONTEXT = 32768
TARGET_RATIO = 4.0
TARGET_BANDWIDTH = 0.6


# -- small helpers ---------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def is_oom(err: BaseException) -> bool:
    """An allocation failure (CUDA or host) rather than a bug."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(err, MemoryError))


def free_memory(device: torch.device) -> None:
    ckv_attention.clear_pending()  # a forward that raised leaves its layer pending
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Timer:
    """Seconds taken by a callable: CUDA events on a GPU (after a synchronize), wall time on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end) / 1000.0
        begin = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - begin


def copy_bandwidth(device: torch.device, nbytes: int, iters: int = 20) -> dict[str, Any]:
    """Device-to-device copy bandwidth: ``dst.copy_(src)`` of ``nbytes``, timed over ``iters``
    copies after three warm-up copies. ``read_write_GBps`` counts the bytes read plus written
    (what a memory-bound kernel moves); ``read_GBps`` the bytes read only."""
    timer = Timer(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)

    def run() -> None:
        for _ in range(iters):
            dst.copy_(src)

    _, seconds = timer(run)
    del src, dst
    free_memory(device)
    per_copy = seconds / iters
    return {"bytes": nbytes, "iters": iters, "seconds_per_copy": per_copy,
            "read_write_GBps": 2 * nbytes / per_copy / 1e9, "read_GBps": nbytes / per_copy / 1e9,
            "device": str(device)}


def cache_bytes(cache: Any) -> int:
    return int(cache.nbytes()) if hasattr(cache, "nbytes") else dynamic_cache_nbytes(cache)


def xkv_read_modes() -> tuple[str, ...]:
    from compresskv.crosslayer import xkv as xkv_module

    return tuple(getattr(xkv_module, "READ_MODES", ()))


def xkv_fused_option() -> dict[str, Any]:
    """``{"read_mode": "fused"}`` when this compresskv's xKV takes it (as an option of
    ``make_cache``), else nothing (the default read)."""
    if "read_mode" in compresskv.method_options("xkv") and "fused" in xkv_read_modes():
        return {"read_mode": "fused"}
    return {}


def json_safe(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        out[key] = value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return out


# -- models --------------------------------------------------------------------------------------
def build_model(shape: dict[str, Any], max_len: int, device: torch.device, dtype: torch.dtype, seed: int) -> Any:
    """A random-weight Llama-architecture model with ``shape``, created directly on ``device``."""
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, max_position_embeddings=max_len, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def random_ids(vocab: int, length: int, seed: int, device: torch.device, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g).to(device)


# -- one configuration -----------------------------------------------------------------------------
def decode(model: Any, cache: Any, token: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        out = model(input_ids=token, **compat.cache_kwargs(cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return token


def prefill(model: Any, cache: Any, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, **compat.cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def xkv_compressed_bytes(cache: Any) -> int | None:
    """Bytes of xKV's compressed prompt (group latents + per-layer factors), from its stats."""
    stats = cache.stats() if hasattr(cache, "stats") else None
    kinds = getattr(stats, "bytes_by_kind", None)
    if not kinds:
        return None
    return int(kinds.get("shared", 0) + kinds.get("per_layer", 0))


@torch.no_grad()
def measure(model: Any, make_cache: Callable[[], Any], context: int, args: argparse.Namespace,
            device: torch.device, method: str) -> dict[str, Any]:
    """Prefill ``context`` random tokens into a fresh cache, decode, search the largest batch.
    Raises on out-of-memory at prefill or batch-1 decode (the caller records "does not fit");
    an out-of-memory while growing the batch ends the search."""
    timer = Timer(device)
    vocab = model.config.vocab_size
    ids = random_ids(vocab, context, args.seed, device)

    # Warm-up: kernels, cuBLAS/cuSOLVER handles, Triton compilation, with a fresh cache.
    warm = make_cache()
    token = prefill(model, warm, ids[:, : min(context, args.warmup_tokens)])
    decode(model, warm, token, 2)
    del warm, token
    free_memory(device)

    mem = PeakMemory(device).start()
    row: dict[str, Any] = {}
    cache = make_cache()
    with mem.phase() as prefill_mem:
        token, row["prefill_s"] = timer(lambda: prefill(model, cache, ids))
    row["cache_bytes"] = cache_bytes(cache)
    stats = cache.stats() if hasattr(cache, "stats") else None
    if stats is not None:
        row["uncompressed_bytes"] = int(stats.uncompressed_nbytes)
        row["stats_ratio"] = float(stats.ratio)
        if getattr(stats, "compress_seconds", None) is not None:
            row["compress_s"] = float(stats.compress_seconds)
    if method == "xkv":
        row["xkv_compressed_bytes"] = xkv_compressed_bytes(cache)

    with mem.phase() as decode_mem:
        # Warm-up steps, not timed; an xKV cache accounts their reads (its fused reads: whether the
        # kernel ran), and the timed steps run without accounting (profile off, the default).
        profiled = method == "xkv" and isinstance(getattr(cache, "profile", None), bool)
        if profiled:
            cache.profile = True
        token = decode(model, cache, token, 2)
        if profiled:
            cache.profile = False
        token, seconds = timer(lambda: decode(model, cache, token, args.decode_tokens))
    row["decode_tokens"] = args.decode_tokens
    row["decode_s_b1"] = seconds
    row["decode_tok_s_b1"] = args.decode_tokens / seconds
    row["peak_prefill_bytes"] = prefill_mem.peak_bytes
    row["peak_decode_bytes"] = decode_mem.peak_bytes
    peaks = [p for p in (prefill_mem.peak_bytes, decode_mem.peak_bytes) if p is not None]
    row["peak_bytes"] = max(peaks) if peaks else None
    if row["peak_bytes"] is not None and mem.start_bytes is not None:
        row["peak_total_bytes"] = mem.start_bytes + row["peak_bytes"]  # weights included
    batches = [{"batch": 1, "steps": args.decode_tokens, "seconds": seconds, "tok_s": row["decode_tok_s_b1"]}]

    # Largest batch: repeat the prefilled cache along the batch, doubling.
    batch, stop = 1, f"--max-batch {args.max_batch}"
    while batch * 2 <= args.max_batch:
        try:
            cache.batch_repeat_interleave(2)
            token = token.repeat_interleave(2, dim=0)
            token = decode(model, cache, token, 1)
            token, seconds = timer(lambda: decode(model, cache, token, args.batch_decode_tokens))
        except Exception as err:  # noqa: BLE001 - out of memory ends the search; anything else is a bug
            if not is_oom(err):
                raise
            stop = f"out of memory at batch {batch * 2}"
            break
        batch *= 2
        batches.append({"batch": batch, "steps": args.batch_decode_tokens, "seconds": seconds,
                        "tok_s": batch * args.batch_decode_tokens / seconds})
    row["batches"] = batches
    row["max_batch"] = batches[-1]["batch"]
    row["max_batch_stop"] = stop
    row["decode_tok_s_max"] = batches[-1]["tok_s"]
    if method == "xkv" and stats is not None:
        after = cache.stats()
        total = getattr(after, "total_read", None) or {}
        row["xkv_fused_reads"] = total.get("fused_reads")  # counted over the profiled warm-up steps
        row["xkv_read_mode"] = getattr(cache, "read_mode", None)
    del cache, token
    return row


def run_config(model: Any, make_cache: Callable[[], Any], context: int, args: argparse.Namespace,
               device: torch.device, method: str) -> dict[str, Any]:
    """:func:`measure`, with out-of-memory recorded as "does not fit" (and memory released)."""
    start = time.perf_counter()
    try:
        row = measure(model, make_cache, context, args, device, method)
        row["status"] = "ok"
    except Exception as err:  # noqa: BLE001
        if not is_oom(err):
            raise
        row = {"status": "does not fit", "detail": str(err).splitlines()[0][:200]}
    free_memory(device)
    row["seconds"] = time.perf_counter() - start
    return row


# -- the methods -----------------------------------------------------------------------------------
def method_options(method: str, ratio: float, projections: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """``make_cache`` options of ``method`` at ``ratio``x (``None``: the method cannot reach it)."""
    if method in FIXED_SAVING and ratio > FIXED_SAVING[method][0]:
        return None
    removed = 1.0 - 1.0 / ratio  # kvpress convention: the fraction of the cache removed
    if method in EVICTION:
        return {"compression_ratio": removed}
    if method in PROJECTED:
        return {"projections": projections, "compression_ratio": removed}
    if method == "xkv":
        return {"compression_ratio": removed, "svd_solver": args.svd_solver, **xkv_fused_option()}
    if method == "svd":
        return {"compression_ratio": removed, "svd_solver": args.svd_solver}
    if method == "minicache":
        return {"start_layer": 0}  # every layer pair merged
    if method == "elitekv":
        return {"compression_ratio": removed, "selection": "uniform", "keep_original": True, "progress": False}
    if method in FIXED_SAVING:  # the quantizers
        return {}
    raise ValueError(f"gpu_long_context: no options known for method {method!r}")


# -- results file --------------------------------------------------------------------------------------
def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["shape"], row["context"], row["method"], row.get("ratio"))


def load_results(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": {}, "rows": []}


def save_results(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    results["targets"] = evaluate_targets(results)
    write_result(out, results, markdown)


def upsert(results: dict[str, Any], row: dict[str, Any]) -> None:
    """Replace the row of the same configuration (DynamicCache: of the same configuration and run)."""
    def same(other: dict[str, Any]) -> bool:
        if row_key(other) != row_key(row):
            return False
        return row["method"] != DYNAMIC or other.get("run_id") == row.get("run_id")

    results["rows"] = [r for r in results["rows"] if not same(r)] + [row]


def baseline_of(results: dict[str, Any], row: dict[str, Any]) -> dict[str, Any] | None:
    """The DynamicCache row measured in the same run, shape and context."""
    for other in results["rows"]:
        if (other["method"] == DYNAMIC and other.get("run_id") == row.get("run_id")
                and other["shape"] == row["shape"] and other["context"] == row["context"]):
            return other
    return None


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def add_ratios(row: dict[str, Any], base: dict[str, Any] | None, bandwidth: dict[str, Any] | None) -> None:
    """Ratio columns against the same run's DynamicCache row, and xKV's read bandwidth."""
    if base is None or base.get("status") != "ok" or row.get("status") != "ok":
        return
    row["bytes_ratio"] = _ratio(row.get("cache_bytes"), base.get("cache_bytes"))
    row["peak_ratio"] = _ratio(row.get("peak_bytes"), base.get("peak_bytes"))
    row["prefill_ratio"] = _ratio(row.get("prefill_s"), base.get("prefill_s"))
    if isinstance(row.get("prefill_s"), float) and isinstance(base.get("prefill_s"), float):
        row["overhead_s"] = row["prefill_s"] - base["prefill_s"]
    row["speedup_b1"] = _ratio(row.get("decode_tok_s_b1"), base.get("decode_tok_s_b1"))
    row["speedup_max"] = _ratio(row.get("decode_tok_s_max"), base.get("decode_tok_s_max"))
    row["speedup_same_batch"] = None
    same = {b["batch"]: b["tok_s"] for b in base.get("batches", [])}
    if row.get("max_batch") in same:
        row["speedup_same_batch"] = _ratio(row["decode_tok_s_max"], same[row["max_batch"]])
    compressed = row.get("xkv_compressed_bytes")
    if compressed and bandwidth:
        for entry in row.get("batches", []):
            rate = compressed * entry["batch"] * entry["steps"] / entry["seconds"]
            entry["xkv_read_GBps"] = rate / 1e9
            entry["xkv_read_fraction"] = rate / 1e9 / bandwidth["read_write_GBps"]
        row["xkv_read_fraction_b1"] = row["batches"][0]["xkv_read_fraction"]
        row["xkv_read_fraction_max"] = max(e["xkv_read_fraction"] for e in row["batches"])


# -- targets ---------------------------------------------------------------------------------------------
def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """PASS/FAIL (or "not measured") per target, from the rows present."""
    rows = [r for r in results["rows"] if r["method"] != DYNAMIC]
    shapes = sorted({r["shape"] for r in results["rows"]})
    targets: list[dict[str, Any]] = []
    for shape in shapes:
        for method in EVICTION + PROJECTED:
            match = [r for r in rows if r["shape"] == shape and r["method"] == method
                     and r["context"] == TARGET_CONTEXT and r.get("ratio") == TARGET_RATIO]
            name = (f"decode tok/s >= {TARGET_SPEEDUP}x DynamicCache ({method}, {TARGET_RATIO:g}x, "
                    f"{TARGET_CONTEXT // 1024}k, {shape})")
            if not match or match[0].get("speedup_max") is None:
                targets.append({"target": name, "result": "not measured",
                                "detail": match[0].get("status", "") if match else ""})
                continue
            r = match[0]
            targets.append({
                "target": name, "result": "PASS" if r["speedup_max"] >= TARGET_SPEEDUP else "FAIL",
                "value": r["speedup_max"],
                "detail": (f"{r['speedup_max']:.2f}x at each one's largest batch ({r['max_batch']} vs DynamicCache's); "
                           f"{_fmt(r.get('speedup_same_batch'), '.2f')}x at batch {r['max_batch']}; "
                           f"{_fmt(r.get('speedup_b1'), '.2f')}x at batch 1"),
            })
    peaks = [r for r in rows if r.get("peak_ratio") is not None]
    worst = max(peaks, key=lambda r: r["peak_ratio"]) if peaks else None
    over = [r for r in peaks if r["peak_ratio"] > 1.0]
    targets.append({
        "target": "no method's peak memory exceeds DynamicCache's (batch 1, prefill + decode)",
        "result": "not measured" if not peaks else ("FAIL" if over else "PASS"),
        "value": worst["peak_ratio"] if worst else None,
        "detail": ("; ".join(f"{r['method']} {_fmt(r.get('ratio'), 'g')}x {r['shape']} {r['context']}: "
                             f"{r['peak_ratio']:.3f}" for r in over[:8])
                   if over else (f"highest {worst['peak_ratio']:.3f} ({worst['method']} {_fmt(worst.get('ratio'), 'g')}x, "
                                 f"{worst['shape']}, {worst['context']})" if worst else "")),
    })
    reads = [r for r in rows if r["method"] == "xkv" and r.get("xkv_read_fraction_max") is not None]
    best = max(reads, key=lambda r: r["xkv_read_fraction_max"]) if reads else None
    if best is None:
        targets.append({"target": f"xKV fused decode reads >= {TARGET_BANDWIDTH:.0%} of copy bandwidth",
                        "result": "not measured", "detail": "no xKV row with a CUDA copy bandwidth"})
    else:
        entry = max(best["batches"], key=lambda e: e.get("xkv_read_fraction", 0.0))
        # The fused kernel ran: asked for, or chosen by read_mode="auto" (its reads are counted).
        fused = best.get("xkv_read_mode") == "fused" or (best.get("xkv_fused_reads") or 0) > 0
        targets.append({
            "target": f"xKV fused decode reads >= {TARGET_BANDWIDTH:.0%} of copy bandwidth",
            "result": "PASS" if best["xkv_read_fraction_max"] >= TARGET_BANDWIDTH and fused else "FAIL",
            "value": best["xkv_read_fraction_max"],
            "detail": (f"best {best['xkv_read_fraction_max']:.1%} ({entry['xkv_read_GBps']:.0f} GB/s) at "
                       f"{_fmt(best.get('ratio'), 'g')}x, {best['shape']}, {best['context']} tokens, batch {entry['batch']}; "
                       f"read_mode={best.get('xkv_read_mode')}" + ("" if fused else " (not the fused kernel)")),
        })
    return targets


# -- markdown -----------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None or not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value / scale, spec)


def markdown(results: dict[str, Any]) -> str:
    lines = ["# compresskv on a GPU: long contexts, every method vs DynamicCache", ""]
    for run_id, run in results["runs"].items():
        m, bw = run["machine"], run.get("copy_bandwidth") or {}
        gpu = m.get("gpu") or {}
        mem = f", {gpu['total_memory_bytes'] / 2**30:.0f} GiB" if gpu else ""
        lines.append(f"- Run `{run_id}` ({run['started']}): **{m['device']}**{mem}, torch {m['torch']}, "
                     f"transformers {m['transformers']}, compresskv {m['compresskv']}, triton {m.get('triton')}, "
                     f"flash-attn {m.get('flash_attn')}; copy bandwidth {_fmt(bw.get('read_write_GBps'), '.0f')} GB/s "
                     f"(read + write, {_fmt(bw.get('bytes'), '.0f', 2**20)} MiB device-to-device copy); "
                     f"`{run['command']}`")
    lines += [
        "",
        "Random weights (speed and memory do not depend on them); prompts are random tokens, batch 1. "
        "MatryoshkaKV and PCA use PCA projections calibrated on random tokens, with uniform ranks; EliteKV is "
        "converted with uniform RoPE pairs and the weight-only SVD (its conversion is offline: `conversion_s` in the "
        "JSON); xKV and SVD factorise with the run's `svd_solver` (see `args`). Peak memory is what prefill + decode at batch 1 "
        "added to the memory already allocated (weights excluded). The largest batch repeats the batch-1 prefilled "
        "cache along the batch (doubling until out of memory or the cap) and decodes. Ratios (×DC) compare with "
        "DynamicCache measured in the same run. xKV read bandwidth: compressed bytes (latents + factors) × batch × "
        "steps / decode time, as a share of the copy bandwidth.",
        "",
        "## Targets",
        "",
        "| target | result | detail |",
        "|---|---|---|",
    ]
    for t in results.get("targets") or evaluate_targets(results):
        lines.append(f"| {t['target']} | **{t['result']}** | {t.get('detail', '')} |")
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in results["rows"]:
        groups.setdefault((row["shape"], row["context"]), []).append(row)
    for (shape, context), rows in sorted(groups.items()):
        lines += ["", f"## {shape}, {context} tokens", "",
                  "| method | × | status | cache MiB | bytes ×DC | peak MiB | peak ×DC | prefill s | overhead s | "
                  "tok/s b1 | ×DC b1 | max batch | tok/s max | ×DC max | xKV read GB/s (share of copy bw) | run |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        dyn = [r for r in rows if r["method"] == DYNAMIC]
        latest = {}
        for r in rows:
            if r["method"] != DYNAMIC:
                latest[(r["method"], r.get("ratio"))] = r
        ordered = dyn[-1:] + sorted(latest.values(), key=lambda r: (r["method"], r.get("ratio") or 0))
        for r in ordered:
            name = "DynamicCache" if r["method"] == DYNAMIC else r["method"]
            ok = r.get("status") == "ok"
            xkv = ""
            if r.get("xkv_read_fraction_max") is not None:
                entry = max(r["batches"], key=lambda e: e.get("xkv_read_fraction", 0.0))
                xkv = f"{entry['xkv_read_GBps']:.0f} ({entry['xkv_read_fraction']:.0%}, batch {entry['batch']})"
            batch = f"{r['max_batch']}" + ("" if "out of memory" in str(r.get("max_batch_stop")) else "+") if ok else "–"
            lines.append(
                f"| {name} | {_fmt(r.get('ratio'), 'g')} | {r.get('status')} | {_fmt(r.get('cache_bytes'), '.1f', 2**20)} | "
                f"{_fmt(r.get('bytes_ratio'), '.3f')} | {_fmt(r.get('peak_bytes'), '.0f', 2**20)} | "
                f"{_fmt(r.get('peak_ratio'), '.3f')} | {_fmt(r.get('prefill_s'), '.3f')} | {_fmt(r.get('overhead_s'), '+.3f')} | "
                f"{_fmt(r.get('decode_tok_s_b1'), '.1f')} | {_fmt(r.get('speedup_b1'), '.2f')} | {batch} | "
                f"{_fmt(r.get('decode_tok_s_max'), '.0f')} | {_fmt(r.get('speedup_max'), '.2f')} | {xkv} | "
                f"{str(r.get('run_id', ''))[-4:]} |"
            )
    lines += ["", "`+` after a batch: the cap was reached, not memory. Overhead: prefill time minus DynamicCache's. "
              "run: the last characters of the run id (ratios compare with that run's DynamicCache).", ""]
    return "\n".join(lines)


# -- driver ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None, help="comma-separated: llama8b,smollm2 (smoke: tiny-llama8b,tiny-smollm2)")
    p.add_argument("--contexts", default=None, help="comma-separated prompt lengths (default 8192,32768,131072; smoke 256)")
    p.add_argument("--ratios", default="2,4,8", help="compression ratios (2 = half the bytes)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: every registered one)")
    p.add_argument("--decode-tokens", type=int, default=None, help="timed decode steps at batch 1 (default 32; smoke 4)")
    p.add_argument("--batch-decode-tokens", type=int, default=None, help="timed decode steps per batch size (default 8; smoke 2)")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch tried (default 128; smoke 4)")
    p.add_argument("--warmup-tokens", type=int, default=None, help="prompt length of the warm-up prefill (default 1024; smoke 64)")
    p.add_argument("--svd-solver", default="gram", help="xKV/SVD solver: gram (fast for long prompts) or svd")
    p.add_argument("--copy-bytes", type=int, default=None, help="bytes of the bandwidth copy (default 2 GiB; smoke 16 MiB)")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; stop before a configuration that would not finish in time (default 480)")
    p.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/gpu; smoke: .../gpu-smoke)")
    p.add_argument("--force", action="store_true", help="re-measure configurations already in the results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, 256 tokens: checks the script in under a minute")
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults = {
        "shapes": ",".join(SMOKE_SHAPES if smoke else SHAPES), "contexts": "256" if smoke else "8192,32768,131072",
        "decode_tokens": 4 if smoke else 32, "batch_decode_tokens": 2 if smoke else 8, "max_batch": 4 if smoke else 128,
        "warmup_tokens": 64 if smoke else 1024, "copy_bytes": 16 * 2**20 if smoke else 2 * 2**30,
        "time_budget": 120.0 if smoke else 480.0,
        "out": Path("benchmarks/results/gpu-smoke" if smoke else "benchmarks/results/gpu"),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    args.ratios = [float(r) for r in args.ratios.split(",") if r]
    known = {**SHAPES, **SMOKE_SHAPES}
    unknown = [s for s in args.shapes if s not in known]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {sorted(known)}")
    methods = compresskv.available_methods()
    args.methods = [m for m in args.methods.split(",") if m] if args.methods else methods
    if set(args.methods) - set(methods):
        p.error(f"unknown methods {sorted(set(args.methods) - set(methods))}; choose from {methods}")
    if any(r <= 1.0 for r in args.ratios):
        p.error("ratios are compression factors > 1 (2 = half the bytes)")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the results (also written to ``<out>.json`` / ``.md``)."""
    args = parse_args(argv)
    # Caches hold reference cycles, so memory is freed by gc.collect() between configurations;
    # freezing what is already alive (imported modules) makes each collection cost microseconds
    # instead of ~0.5 s.
    gc.collect()
    gc.freeze()
    try:
        return _run(args, argv)
    finally:
        gc.unfreeze()


def _run(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    started = time.perf_counter()
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_long_context: no CUDA device; use --smoke to check the script on the CPU")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    out: Path = args.out
    results = load_results(out.with_suffix(".json"))
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]
    words = [sys.argv[0], *sys.argv[1:]] if argv is None else ["benchmarks/gpu_long_context.py", *argv]
    command = "python " + " ".join(shlex.quote(w) for w in words)
    machine = machine_info(device)
    log(f"run {run_id} on {machine['device']}, torch {machine['torch']}, transformers {machine['transformers']}")
    bandwidth = copy_bandwidth(device, args.copy_bytes)
    log(f"copy bandwidth {bandwidth['read_write_GBps']:.0f} GB/s (read + write)")
    results["runs"][run_id] = {"machine": machine, "copy_bandwidth": bandwidth, "command": command,
                               "started": datetime.datetime.now().isoformat(timespec="seconds"),
                               "dtype": str(dtype).replace("torch.", ""), "xkv_options": xkv_fused_option(),
                               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    done = {row_key(r) for r in results["rows"] if r["method"] != DYNAMIC and r.get("status") in ("ok", "does not fit", "unsupported")}
    shapes = {**SHAPES, **SMOKE_SHAPES}
    last_seconds: dict[tuple[str, int], float] = {}
    conversion_estimate = 0.0 if args.smoke else 60.0  # EliteKV's conversion, until one is timed
    complete = True

    def pending(shape: str, context: int) -> list[tuple[str, float]]:
        return [(m, r) for m in args.methods for r in args.ratios
                if args.force or (shape, context, m, r) not in done]

    def time_left(shape: str, context: int, extra: float = 0.0) -> bool:
        # The slowest configuration seen at this shape and context, with a margin: methods differ.
        estimate = 1.5 * last_seconds.get((shape, context), 0.0) + extra
        return time.perf_counter() - started + estimate <= args.time_budget

    def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """A method that fails (not for lack of memory) is recorded as an error, and the run goes
        on: the other methods' numbers are still wanted. It is retried by the next run."""
        try:
            return fn()
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            free_memory(device)
            return {"status": "error", "detail": f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"}

    def record(row: dict[str, Any]) -> None:
        row.update(run_id=run_id)
        if row["method"] != DYNAMIC:
            add_ratios(row, baseline_of(results, row), bandwidth)
        upsert(results, row)
        save_results(results, out)
        key = (row["shape"], row["context"])
        last_seconds[key] = max(last_seconds.get(key, 0.0), row.get("seconds", 0.0))

    for shape_name in args.shapes:
        todo = {c: pending(shape_name, c) for c in args.contexts}
        if not any(todo.values()):
            log(f"{shape_name}: nothing to do")
            continue
        shape = shapes[shape_name]
        max_len = max(args.contexts) + args.decode_tokens + 3 * args.batch_decode_tokens * 8 + 64
        model = build_model(shape, max_len, device, dtype, args.seed)
        log(f"{shape_name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters on {device}")
        projections = None
        if any(m in PROJECTED for c in todo for m, _ in todo[c]):
            calib = random_ids(shape["vocab_size"], 256, args.seed + 1, torch.device("cpu"), batch=4)
            projections = compresskv.calibrate(model, calib, seq_len=256, max_windows=4, progress=False)

        # 1. DynamicCache for every context with work, first (the same-run baseline).
        for context in args.contexts:
            if not todo[context]:
                continue
            ckv_attention.uninstall(model)  # the baseline is the model as loaded
            log(f"{shape_name} {context}: DynamicCache")
            row = run_config(model, lambda: DynamicCache(config=model.config), context, args, device, DYNAMIC)
            row.update(shape=shape_name, context=context, method=DYNAMIC, ratio=None)
            record(row)

        # 2. Every method but EliteKV (which converts the model) per context and ratio.
        for context in args.contexts:
            for method, ratio in todo[context]:
                if method == "elitekv":
                    continue
                if not time_left(shape_name, context):
                    complete = False
                    break
                options = method_options(method, ratio, projections, args)
                base_row = dict(shape=shape_name, context=context, method=method, ratio=ratio)
                if options is None:
                    most, why = FIXED_SAVING[method]
                    record({**base_row, "status": "unsupported", "detail": f"{why}: at most about {most:.2g}x"})
                    continue
                log(f"{shape_name} {context}: {method} {ratio:g}x")
                row = guarded(lambda: run_config(model, lambda: compresskv.make_cache(model, method, **options),
                                                 context, args, device, method))
                record({**base_row, "options": json_safe(options), **row})

        # 3. EliteKV: convert once per ratio (timed: offline), measure every context, revert.
        for ratio in args.ratios:
            contexts = [c for c in args.contexts if ("elitekv", ratio) in todo[c]]
            if not contexts or "elitekv" not in args.methods:
                continue
            if not time_left(shape_name, contexts[0], extra=conversion_estimate):
                complete = False
                continue
            options = method_options("elitekv", ratio, projections, args)
            ckv_attention.uninstall(model)
            begin = time.perf_counter()
            compresskv.make_cache(model, "elitekv", **options)
            conversion = conversion_estimate = time.perf_counter() - begin
            log(f"{shape_name}: EliteKV {ratio:g}x converted in {conversion:.1f}s")
            try:
                for context in contexts:
                    if not time_left(shape_name, context):
                        complete = False
                        break
                    log(f"{shape_name} {context}: elitekv {ratio:g}x")
                    row = guarded(lambda: run_config(model, lambda: compresskv.EliteKVCache(model), context, args,
                                                     device, "elitekv"))
                    record(dict(shape=shape_name, context=context, method="elitekv", ratio=ratio,
                                options=json_safe(options), conversion_s=conversion, **row))
            finally:
                elitekv.revert(model)
        del model, projections
        free_memory(device)
        if not complete:
            break

    results["runs"][run_id]["seconds"] = time.perf_counter() - started
    results["runs"][run_id]["complete"] = complete
    save_results(results, out)
    log(("complete" if complete else "time budget reached: run the same command again to continue")
        + f"; wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    for t in results["targets"]:
        log(f"target: {t['result']:12s} {t['target']}")
    return results


if __name__ == "__main__":
    main()
