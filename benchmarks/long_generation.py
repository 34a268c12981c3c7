"""Long generation with a bounded cache (#17): perplexity of a long text streamed through the model
with each eviction cache's ``decode_budget``, against StreamingLLM's rolling cache and DynamicCache,
and the memory each holds as the text goes on.

A window of ``--tokens`` tokens of held-out text (Emma; the embedded model's calibration text is
Persuasion) is cut at a position drawn from ``--seed``. Its first ``--prompt`` tokens are the prompt
(prefilled, nothing evicted: fewer than any budget); the rest is fed ``--interval`` tokens per
forward, which is exactly decoding them one at a time with ``decode_interval=--interval`` (a bounded
cache evicts before a forward that would overflow, at the same points either way:
``tests/test_bounded_decode.py``), and every token is scored from the logits at the position before
it. Per budget in ``--budgets``: every method in ``--methods`` with ``budget=B, decode_budget=B``
(PyramidKV: ``B`` on average over layers), and StreamingLLM (4 sinks) with the same. DynamicCache runs
once, unbounded (``--no-full`` skips it).

Reported per run: perplexity over all scored tokens and per segment of ``--segment`` tokens, the
cache's bytes (``nbytes()``, every tensor it holds) at the end of each segment, the process's peak
memory during each segment above the memory before the run (RSS high-water mark on a CPU,
``max_memory_allocated`` on a GPU), and tokens/s. A bounded cache's memory is flat when its bytes and
peak stop growing once the budget is reached. The embedded model was trained to 8192 positions:
past them every cache sees positions it never saw in training (the bounded caches keep the positions
tokens had, as the rest of compresskv does).

    python benchmarks/long_generation.py                      # 16k tokens, budgets 1k/2k/4k
    python benchmarks/long_generation.py --tokens 4096 --budgets 1024 --methods snapkv

Results: ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/long_generation``), rewritten
after every run; a run already there is skipped unless ``--force``. ``--smoke`` uses a tiny random
model (to test the script).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the compresskv command (benchmarks/threads.md)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import compresskv  # noqa: E402
from compresskv import compat  # noqa: E402
from compresskv.eval.machine import machine_info  # noqa: E402
from compresskv.eval.measure import PeakMemory, _sync, cache_nbytes  # noqa: E402
from compresskv.eval.perplexity import tokenize_text  # noqa: E402
from compresskv.eval.results import ints, write_result  # noqa: E402

AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"
BASELINE = "streamingllm"
FULL = "dynamiccache"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model id or path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--text", type=Path, default=AUSTEN / "emma.txt", help="held-out text file")
    p.add_argument("--tokens", type=int, default=16384 + 256, help="tokens in the window (prompt + streamed)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens (fewer than every budget)")
    p.add_argument("--budgets", type=ints, default=[1024, 2048, 4096], help="decode budgets (tokens per layer)")
    p.add_argument("--methods", default="snapkv,pyramidkv", help="bounded eviction methods (StreamingLLM is the baseline)")
    p.add_argument("--interval", type=int, default=32, help="decode_interval, and tokens per forward")
    p.add_argument("--segment", type=int, default=2048, help="tokens per reported segment")
    p.add_argument("--rope-scaling", default="auto",
                   help="'auto' (YaRN by the factor that covers the window when it is longer than the model's "
                        "positions), 'none', or yarn:FACTOR / linear:FACTOR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-full", action="store_true", help="skip DynamicCache")
    p.add_argument("--force", action="store_true", help="rerun runs already in the results")
    p.add_argument("--smoke", action="store_true", help="a tiny random model (tests the script)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/long_generation"))
    return p.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and the window of token ids ``[1, tokens]``."""
    if args.smoke:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
        ids = torch.randint(3, 96, (1, args.tokens), generator=torch.Generator().manual_seed(args.seed))
        return model.to(args.device), ids
    from compresskv.models import load_model

    model, tokenizer = load_model(args.model, device=args.device)
    all_ids = tokenize_text(tokenizer, args.text.read_text(encoding="utf-8"))
    skip = len(all_ids) // 50  # title pages
    if len(all_ids) - skip < args.tokens:
        raise SystemExit(f"{args.text} has {len(all_ids)} tokens, fewer than --tokens {args.tokens} (+2% skipped)")
    start = skip + random.Random(f"long:{args.seed}").randint(0, len(all_ids) - skip - args.tokens)
    return model, torch.tensor([all_ids[start : start + args.tokens]], device=args.device)


def scale_rope(model: torch.nn.Module, spec: str, tokens: int) -> dict[str, Any] | None:
    """Extend the model's positions to ``tokens`` as ``spec`` says (see ``--rope-scaling``): the
    rotary embedding is rebuilt from the changed config. Returns the new ``rope_parameters`` (None:
    unchanged). Every cache, DynamicCache included, then runs on the same extended model."""
    config = model.config
    limit = int(config.max_position_embeddings)
    if spec == "none" or (spec == "auto" and tokens <= limit):
        return None
    kind, factor = ("yarn", float(math.ceil(tokens / limit))) if spec == "auto" else (spec.split(":")[0], float(spec.split(":")[1]))
    base = dict(config.rope_parameters)
    if base.get("rope_type", "default") != "default":
        raise SystemExit(f"--rope-scaling: the model's RoPE is already {base['rope_type']!r}; give --rope-scaling none")
    config.rope_parameters = {**base, "rope_type": kind, "factor": factor, "original_max_position_embeddings": limit}
    config.max_position_embeddings = int(limit * factor)
    backbone = model.model
    backbone.rotary_emb = type(backbone.rotary_emb)(config).to(next(model.parameters()).device)
    return config.rope_parameters


def make_cache(model: torch.nn.Module, method: str, budget: int | None, interval: int) -> Any:
    if method == FULL:  # (compresskv's attention, installed by the other caches, computes the model's own)
        return DynamicCache(config=model.config)
    if method == BASELINE:
        return compresskv.StreamingLLMCache(model, sink=4, budget=budget, decode_budget=budget, decode_interval=interval)
    return compresskv.make_cache(model, method, budget=budget, decode_budget=budget, decode_interval=interval)


@torch.inference_mode()
def run(model: torch.nn.Module, ids: torch.Tensor, method: str, budget: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """Stream ``ids`` through ``model`` with the cache of ``method``; perplexity and memory per segment."""
    device = ids.device
    cache = make_cache(model, method, budget, args.interval)
    mem = PeakMemory(device).start()
    total = ids.shape[1]
    nll_sum, count, segments = 0.0, 0, []
    seg_nll, seg_count, seg_end = 0.0, 0, args.prompt + args.segment
    phase = mem.phase().__enter__()
    started = time.perf_counter()
    bounds = [0, *range(args.prompt, total - 1, args.interval), total - 1]  # the last token predicts nothing
    for start, end in tqdm(list(zip(bounds, bounds[1:])), desc=f"{method}@{budget}", leave=False):
        out = model(input_ids=ids[:, start:end], use_cache=True, **compat.cache_kwargs(cache, model.forward))
        if start == 0 and hasattr(cache, "end_prompt"):
            cache.end_prompt()
        losses = F.cross_entropy(out.logits[0].float(), ids[0, start + 1 : end + 1], reduction="none")
        if start == 0:
            losses = losses[args.prompt - 1 :]  # score the streamed tokens only
        nll, n = float(losses.sum()), losses.numel()
        nll_sum, count, seg_nll, seg_count = nll_sum + nll, count + n, seg_nll + nll, seg_count + n
        if end >= seg_end or end == total - 1:
            _sync(device)
            phase.__exit__(None, None, None)
            segments.append({"end": end, "ppl": math.exp(seg_nll / seg_count), "cache_bytes": cache_nbytes(cache),
                             "peak_bytes": phase.peak_bytes})
            seg_nll, seg_count, seg_end = 0.0, 0, seg_end + args.segment
            phase = mem.phase().__enter__()
    _sync(device)
    elapsed = time.perf_counter() - started
    return {"method": method, "budget": budget, "interval": args.interval, "ppl": math.exp(nll_sum / count),
            "scored": count, "tok_s": (total - 1) / elapsed, "segments": segments}


def markdown(result: dict[str, Any]) -> str:
    runs, m, rope = result["runs"], result["machine"], result.get("rope_parameters")
    lines = [f"# Long generation: {result['config']['tokens'] - result['config']['prompt']} streamed tokens, "
             f"bounded caches", "", f"Command: `{result['command']}`", "",
             f"Machine: {m.get('device')}, {m.get('cpus')} CPUs, torch {m.get('torch')}, transformers "
             f"{m.get('transformers')}, {m.get('threads')} threads, {result['date']}.", "",
             "Positions: " + (f"the model's RoPE extended by {rope['rope_type']} x{rope['factor']:g} (from "
                              f"{rope['original_max_position_embeddings']}), for every cache alike." if rope else
                              "the model's own RoPE, unscaled."), "",
             *([result["note"], ""] if result.get("note") else []),
             "Perplexity over every streamed token (lower is better); vs StreamingLLM at the same budget. "
             "Cache MiB: `nbytes()` at the end of the first and of the last segment. Peak MiB: the process's peak "
             "during a segment above its memory before the run, for the second segment and the last (the first "
             "also holds the prompt's and the allocator's first growth); flat when they are equal.", "",
             "| budget | method | ppl | vs StreamingLLM | cache MiB (first → last) | peak MiB (2nd → last segment) | tok/s |",
             "|---|---|---|---|---|---|---|"]
    base = {r["budget"]: r["ppl"] for r in runs.values() if r["method"] == BASELINE}
    order = sorted(runs.values(), key=lambda r: (r["budget"] or 1 << 40, r["method"] != BASELINE, r["method"]))
    mib = 1 / 2**20
    for r in order:
        segs = r["segments"]
        peaks = [s["peak_bytes"] for s in segs if s["peak_bytes"] is not None]
        peak = f"{peaks[min(1, len(peaks) - 1)] * mib:.1f} → {peaks[-1] * mib:.1f}" if peaks else "n/a"
        rel = f"{r['ppl'] / base[r['budget']]:.3f}×" if r["budget"] in base else ""
        lines.append(f"| {r['budget'] or 'unbounded'} | {r['method']} | {r['ppl']:.3f} | {rel} | "
                     f"{segs[0]['cache_bytes'] * mib:.1f} → {segs[-1]['cache_bytes'] * mib:.1f} | {peak} | {r['tok_s']:.1f} |")
    lines += ["", "Perplexity per segment (tokens streamed at the segment's end):", "",
              "| budget | method | " + " | ".join(str(s["end"] - result["config"]["prompt"]) for s in order[0]["segments"]) + " |",
              "|---|---|" + "---|" * len(order[0]["segments"])]
    for r in order:
        lines.append(f"| {r['budget'] or 'unbounded'} | {r['method']} | " + " | ".join(f"{s['ppl']:.2f}" for s in r["segments"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.prompt >= min(args.budgets):
        raise SystemExit(f"--prompt {args.prompt} must be below every budget (the prompt is not what is measured)")
    model, ids = load(args)
    rope = scale_rope(model, args.rope_scaling, ids.shape[1])
    path = args.out.with_suffix(".json")
    old = json.loads(path.read_text()) if path.exists() and not args.force else {}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("force", "out")}
    same = old.get("config") == config
    runs: dict[str, Any] = old.get("runs", {}) if same else {}
    plan = [(m, b) for b in args.budgets for m in [BASELINE, *[x for x in args.methods.split(",") if x]]]
    if not args.no_full:
        plan.append((FULL, None))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join(["python", "benchmarks/long_generation.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info(args.device), "config": config, "rope_parameters": rope, "runs": runs}
    # Warm-up, unmeasured: the first run would otherwise carry the allocator's first growth in its peak.
    warm = argparse.Namespace(**{**vars(args), "segment": args.interval})
    run(model, ids[:, : args.prompt + 4 * args.interval], BASELINE, min(args.budgets), warm)
    for method, budget in plan:
        key = f"{method}@{budget}"
        if key in runs:
            continue
        runs[key] = run(model, ids, method, budget, args)
        print(f"{key}: ppl {runs[key]['ppl']:.3f}, {runs[key]['tok_s']:.1f} tok/s", flush=True)
        write_result(args.out, result, markdown)
    write_result(args.out, result, markdown, echo=True)
    return result


if __name__ == "__main__":
    main()
