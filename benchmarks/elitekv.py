"""Benchmark EliteKV on the embedded model against the original model with a DynamicCache.

For every cache ratio (fraction of the original K/V cache kept per token) and every RoPE-pair
selection (RoPElite, uniform, contribution; same ``rope_pairs`` and ``kv_dim``), the original model
is converted training-free and measured on

* perplexity of a held-out novel: a ~4k-token prefix is prefilled into the cache, the loss is taken
  on the following ``--continuation`` tokens (fed in chunks on top of the cache);
* a ~4k-token needle-in-a-haystack question (greedy, 24 new tokens);
* the cache's measured bytes, and decode speed at ~4k tokens: the converted model's default
  (``W_up`` absorbed into the query side, MLA-style) and, for comparison, reconstructing K/V from the
  latent at every step, both against the original model with a ``DynamicCache``.

Also: weight-only vs activation-aware J-LRD (RoPElite), the selections alone (full-rank latent: only
the position-free dims differ from the original), and one short uptraining (distillation + LM loss)
at one setting, with its tokens, time and device.

Run from the repository root (about 30-60 minutes on 2 shared CPU cores; rerunning resumes)::

    python benchmarks/elitekv.py
    python benchmarks/elitekv.py --quick          # a small smoke run (short texts, one ratio)

Writes ``benchmarks/results/elitekv.json`` (machine, command, every row, the uptraining record)
and ``benchmarks/results/elitekv.md`` (the tables).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import compresskv
from compresskv import compat
from compresskv.eval.machine import machine_info
from compresskv.eval.results import floats
from compresskv import elitekv
from compresskv.eval.needle import dynamic_cache_nbytes, make_needle_task
from compresskv.eval.perplexity import load_text, make_perplexity_task, run_perplexity, tokenize_text

AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=compresskv.DEFAULT_MODEL)
    p.add_argument("--calib", default=str(AUSTEN / "emma.txt"), help="ranking / activation statistics text")
    p.add_argument("--train", default=f"{AUSTEN / 'emma.txt'},{AUSTEN / 'persuasion.txt'}", help="uptraining texts (comma-separated files)")
    p.add_argument("--text", default=str(AUSTEN / "pride_and_prejudice.txt"), help="held-out perplexity text")
    p.add_argument("--length", type=int, default=4096, help="prefix / needle prompt tokens")
    p.add_argument("--continuation", type=int, default=256, help="scored tokens after the prefix")
    p.add_argument("--ratios", type=floats, default=floats("0.5,0.375,0.25"), help="cache ratios (fraction kept)")
    p.add_argument("--selections", default="ropelite,uniform,contribution")
    p.add_argument("--rope-pairs", type=int, default=None, help="RoPE pairs per KV head (default: compresskv's rule)")
    p.add_argument("--svd", default="activation", help="J-LRD variant of the selection grid")
    p.add_argument("--compare-svd", default="weight", help="also run RoPElite with this variant ('' to skip)")
    p.add_argument("--no-selection-only", action="store_true", help="skip the full-rank-latent selection rows")
    p.add_argument("--depths", type=floats, default=floats("0.5"), help="needle depths (one question each)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--speed-steps", type=int, default=12, help="decode steps timed per path (interleaved)")
    p.add_argument("--rank-seq-len", type=int, default=1024)
    p.add_argument("--rank-windows", type=int, default=8)
    p.add_argument("--uptrain-ratio", type=float, default=0.25, help="cache ratio of the uptrained setting (<0: skip)")
    p.add_argument("--uptrain-selection", default="ropelite")
    p.add_argument("--uptrain-steps", type=int, default=48)
    p.add_argument("--uptrain-seq-len", type=int, default=512)
    p.add_argument("--uptrain-lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    p.add_argument("--work", default=str(compresskv.models.cache_root() / "elitekv-bench"), help="ranking + checkpoints")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/elitekv"))
    p.add_argument("--quick", action="store_true", help="smoke run: 1k tokens, one ratio, short everything")
    p.add_argument("--markdown-only", action="store_true", help="rewrite <out>.md from <out>.json and exit")
    args = p.parse_args(argv)
    if args.quick:
        args.length, args.continuation, args.ratios = 1024, 64, [0.5]
        args.rank_seq_len, args.rank_windows, args.uptrain_steps, args.uptrain_seq_len = 256, 2, 3, 128
        args.out = Path("/tmp/compresskv-elitekv-quick")
        args.work = str(Path(args.work) / "quick")
    return args




@torch.inference_mode()
def needle(model: Any, tokenizer: Any, task: Any, cache: Any, max_new: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Greedy answer with ``cache``; returns the row and the last token (the cache keeps the rest)."""
    ids = task.input_ids
    start = time.perf_counter()
    out = model(input_ids=ids, **compat.cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    token = out.logits[:, -1:].argmax(-1)
    generated = [token]
    eos = tokenizer.eos_token_id
    start = time.perf_counter()
    for _ in range(max_new - 1):
        out = model(input_ids=token, **compat.cache_kwargs(cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        generated.append(token)
    decode = time.perf_counter() - start
    tokens = torch.cat(generated, dim=-1)[0].tolist()
    cut = next((i for i, t in enumerate(tokens) if t == eos), len(tokens))
    text = tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()
    row = {
        "answer": text, "expected": task.answer, "correct": task.score(text), "prefill_s": prefill,
        "decode_tok_s": (max_new - 1) / decode,
        "cache_bytes": cache.nbytes() if hasattr(cache, "nbytes") else dynamic_cache_nbytes(cache),
        "tokens": task.length,
    }
    return row, token


#: the timed reads (their result keys keep the names "absorb"/"reconstruct") → EliteKV's read_mode
READ_MODE = {"absorb": "latent", "reconstruct": "model", "auto": "auto"}


def set_mode(model: Any, mode: str) -> None:
    for module in model.modules():
        if isinstance(module, elitekv.EliteKVAttention):
            module.read_mode = READ_MODE[mode]


@torch.inference_mode()
def decode_speed(model: Any, cache: Any, token: torch.Tensor, ref: tuple[Any, Any, torch.Tensor], steps: int) -> dict[str, float]:
    """Tokens/s of single-token decode steps, interleaved round-robin (so that a shared CPU's load
    affects all alike): the converted model absorbed and reconstructing over its filled cache, and
    the original model over its filled DynamicCache of the same prompt."""
    original, ref_cache, ref_token = ref
    seconds = {"absorb": 0.0, "reconstruct": 0.0, "original": 0.0}
    names = list(seconds)
    for step in range(steps):
        for name in names[step % 3:] + names[: step % 3]:
            start = time.perf_counter()
            if name == "original":
                original(input_ids=ref_token, **compat.cache_kwargs(ref_cache), use_cache=True)
            else:
                set_mode(model, name)
                model(input_ids=token, **compat.cache_kwargs(cache), use_cache=True)
            seconds[name] += time.perf_counter() - start
    set_mode(model, "auto")
    return {f"decode_tok_s_{k}": steps / v for k, v in seconds.items()}


class Results:
    """Rows kept in ``<out>.json`` and rewritten after each one, so a rerun resumes."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"rows": {}, "uptraining": None}
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("setup") == header["setup"]:
                self.data = old
        self.data.update(header)

    def done(self, key: str) -> bool:
        return key in self.data["rows"]

    def add(self, key: str, row: dict[str, Any]) -> None:
        row["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        row["loadavg_1min"] = round(os.getloadavg()[0], 2)
        self.data["rows"][key] = row
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def evaluate(model: Any, tokenizer: Any, ppl_task: Any, needles: list[Any], args: argparse.Namespace,
             speed_ref: Any = None, needle_too: bool = True) -> dict[str, Any]:
    converted = elitekv.is_converted(model)
    make = (lambda: compresskv.EliteKVCache(model)) if converted else (lambda: transformers.DynamicCache(config=model.config))
    ppl = run_perplexity(model, ppl_task, make())
    row: dict[str, Any] = {
        "ppl": ppl["ppl"], "nll": ppl["nll"], "ppl_prefill_s": ppl["prefill_s"],
        "cache_bytes_prefix": ppl["cache_bytes_prefill"],
    }
    if needle_too:
        runs = []
        for i, task in enumerate(needles):
            cache = make()
            run, token = needle(model, tokenizer, task, cache, args.max_new_tokens)
            if i == 0 and speed_ref is not None and converted:
                run.update(decode_speed(model, cache, token, speed_ref(), args.speed_steps))
            runs.append(run)
        row["needle"] = runs
        row["needle_accuracy"] = sum(r["correct"] for r in runs) / len(runs)
        row["decode_tok_s"] = sum(r["decode_tok_s"] for r in runs) / len(runs)
        row["prefill_s"] = sum(r["prefill_s"] for r in runs) / len(runs)
        row["cache_bytes"] = runs[0]["cache_bytes"]
        for k in ("decode_tok_s_absorb", "decode_tok_s_reconstruct", "decode_tok_s_original"):
            if k in runs[0]:
                row[k] = runs[0][k]
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown_only:
        md = Path(str(args.out) + ".md")
        md.write_text(markdown(json.loads(Path(str(args.out) + ".json").read_text()), args))
        print(md.read_text())
        return 0
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    original, tokenizer = compresskv.load_model(args.model)
    dims = elitekv.model_dims(original)
    selections = [s for s in args.selections.split(",") if s]
    setup = {
        "model": args.model, "length": args.length, "continuation": args.continuation, "ratios": args.ratios,
        "selections": selections, "svd": args.svd, "rope_pairs": args.rope_pairs, "depths": args.depths,
        "text": Path(args.text).name, "calib": Path(args.calib).name, "rank_seq_len": args.rank_seq_len,
        "rank_windows": args.rank_windows,
    }
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    res = Results(Path(str(args.out) + ".json"), {"setup": setup, "command": command, "machine": machine_info()})

    # -- RoPElite ranking (cached under --work) --------------------------------------------------------
    rank_dir = Path(args.work) / f"ranking-{Path(args.calib).stem}-{args.rank_seq_len}x{args.rank_windows}"
    if (rank_dir / "meta.json").exists():
        ranking = elitekv.FrequencyRanking.from_pretrained(rank_dir, original)
        print(f"ranking: loaded {rank_dir}", flush=True)
    else:
        start = time.perf_counter()
        calib = load_text(args.calib)
        ranking = elitekv.rank_frequencies(original, calib, tokenizer, seq_len=args.rank_seq_len,
                                           num_windows=args.rank_windows)
        ranking.options["seconds"] = time.perf_counter() - start
        ranking.save_pretrained(rank_dir)
    res.data["ranking"] = {**ranking.options, **{k: v for k, v in ranking.summary().items() if k != "shape"}}
    res.save()

    # -- tasks ---------------------------------------------------------------------------------------
    text_ids = tokenize_text(tokenizer, load_text(args.text))
    ppl_task = make_perplexity_task(tokenizer, text_ids, args.length, args.continuation, seed=0)
    needles = [make_needle_task(tokenizer, length=args.length, depth=d, seed=i) for i, d in enumerate(args.depths)]

    ref: dict[str, Any] = {}

    def speed_ref() -> tuple[Any, Any, torch.Tensor]:
        """The original model with its DynamicCache filled by the first needle prompt."""
        if "ref" not in ref:
            cache = transformers.DynamicCache(config=original.config)
            _, token = needle(original, tokenizer, needles[0], cache, 2)
            ref["ref"] = (original, cache, token)
        return ref["ref"]

    def run(key: str, build: Any, speed: bool = False, needle_too: bool = True, extra: dict | None = None) -> None:
        if res.done(key):
            print(f"{key}: done already", flush=True)
            return
        start = time.perf_counter()
        model = build()
        convert_s = time.perf_counter() - start
        row = {"convert_s": convert_s, **(extra or {})}
        if elitekv.is_converted(model):
            info = elitekv.conversion_info(model)
            row.update({k: info[k] for k in ("rope_pairs", "kv_dim", "selection", "svd", "cache_ratio")})
            errs = info.get("reconstruction_error", {})
            row["joint_error"] = {k: sum(v) / len(v) for k, v in errs.items()}
        row.update(evaluate(model, tokenizer, ppl_task, needles, args, speed_ref if speed else None, needle_too))
        row["seconds"] = time.perf_counter() - start
        res.add(key, row)
        acc = row.get("needle_accuracy")
        print(f"{key}: ppl={row['ppl']:.3f} needle={acc if acc is not None else '-'} "
              f"bytes={row.get('cache_bytes', row['cache_bytes_prefix'])} ({row['seconds']:.0f}s)", flush=True)
        if model is not original:
            del model

    def converted(ratio: float | None, selection: str, svd: str, kv_dim: int | None = None, rope_pairs: int | None = None):
        def build():
            m = copy.deepcopy(original)
            elitekv.convert(m, rope_pairs if rope_pairs is not None else args.rope_pairs, kv_dim, cache_ratio=ratio,
                            ranking=ranking, selection=selection, svd=svd, progress=False)
            return m
        return build

    r_default = elitekv.default_rope_pairs(dims["head_dim"], None, dims["kv_heads"])
    run("original", lambda: original, speed=False)
    for ratio in args.ratios:
        for i, selection in enumerate(selections):
            run(f"{selection}/{args.svd}@{ratio:g}", converted(ratio, selection, args.svd), speed=(i == 0))
        if args.compare_svd and args.compare_svd != args.svd:
            run(f"ropelite/{args.compare_svd}@{ratio:g}", converted(ratio, "ropelite", args.compare_svd), needle_too=False)
    if not args.no_selection_only:
        r = args.rope_pairs if args.rope_pairs is not None else r_default
        full = elitekv.joint_rank(dims, r)
        for selection in selections:
            run(f"{selection}/full-rank", converted(None, selection, "weight", kv_dim=full, rope_pairs=r), needle_too=False)

    # -- uptraining --------------------------------------------------------------------------------------
    if args.uptrain_ratio > 0:
        key = f"{args.uptrain_selection}/{args.svd}@{args.uptrain_ratio:g}+uptrain"
        run(key[: -len("+uptrain")], converted(args.uptrain_ratio, args.uptrain_selection, args.svd))  # training-free
        if not res.done(key):
            student = converted(args.uptrain_ratio, args.uptrain_selection, args.svd)()
            train_text = "\n\n".join(load_text(p) for p in args.train.split(",") if p)
            ckpt = Path(args.work) / f"uptrain-{args.uptrain_selection}-{args.svd}-{args.uptrain_ratio:g}"
            record = elitekv.uptrain(student, train_text, teacher=original, tokenizer=tokenizer,
                                     steps=args.uptrain_steps, seq_len=args.uptrain_seq_len, lr=args.uptrain_lr,
                                     checkpoint=ckpt, save_every=5)
            hist = record.pop("history")
            record["loss_first"], record["loss_last5"] = hist[0]["loss"], sum(h["loss"] for h in hist[-5:]) / min(5, len(hist))
            record["kl_first"], record["kl_last5"] = hist[0]["kl"], sum(h["kl"] for h in hist[-5:]) / min(5, len(hist))
            record["history"] = hist
            record["texts"] = [Path(p).name for p in args.train.split(",") if p]
            res.data["uptraining"] = record
            res.save()
            run(key, lambda: student, extra={"uptrain_tokens": record["tokens"], "uptrain_s": record["seconds"],
                                             "uptrain_device": record["device"]})
    res.data["total_seconds_last_run"] = time.perf_counter() - t_all
    res.data["total_seconds"] = res.data.get("total_seconds", 0.0) + res.data["total_seconds_last_run"]
    res.data["machine"] = machine_info()
    res.save()
    md = Path(str(args.out) + ".md")
    md.write_text(markdown(res.data, args))
    print(md.read_text())
    return 0


# -- the tables -----------------------------------------------------------------------------------------
def _f(value: Any, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(data: dict[str, Any], args: argparse.Namespace) -> str:
    rows, setup = data["rows"], data["setup"]
    base = rows.get("original", {})
    up = data.get("uptraining") or {}
    m = data.get("machine", {})
    lines = [
        "# EliteKV (RoPElite + J-LRD latent cache)",
        "",
        f"Model `{setup['model']}` (30 layers, GQA 9/3, head_dim 64, fp32, CPU). Perplexity: a {setup['length']}-token "
        f"prefix of *{setup['text']}* (held out) prefilled into the cache, loss on the next {setup['continuation']} "
        f"tokens. Needle: {len(setup['depths'])} question(s) of ~{setup['length']} tokens (depth "
        f"{', '.join(map(str, setup['depths']))}), greedy, {args.max_new_tokens} new tokens. RoPElite ranking and "
        f"activation statistics on *{setup['calib']}* ({data.get('ranking', {}).get('tokens')} tokens, "
        f"{setup['rank_seq_len']}-token windows). Cache ratio = bytes per token of the EliteKV cache / the "
        "original's DynamicCache (measured: `cache.nbytes()`); same `rope_pairs` (r) and `kv_dim` (c) for every "
        "selection at a ratio. Baseline: the original model with a `DynamicCache` in the same run.",
        "",
        "## Training-free conversion",
        "",
        "| cache ratio | selection | J-LRD | r | c | bytes vs full | ppl | needle |",
        "|---:|:---|:---|---:|---:|---:|---:|---:|",
    ]
    full_bytes = base.get("cache_bytes_prefix")
    lines.append(f"| 1.0 | original (DynamicCache) | – | 32 | – | 1.000 | {_f(base.get('ppl'), '.3f')} | "
                 f"{_f(base.get('needle_accuracy'), '.0%')} |")
    order = {s: i for i, s in enumerate(setup["selections"])}
    for ratio in setup["ratios"]:
        keyed = [(k, r) for k, r in rows.items() if k.endswith(f"@{ratio:g}")]
        keyed.sort(key=lambda kr: (kr[1]["svd"] != setup["svd"], order.get(kr[1]["selection"], 99)))
        for key, row in keyed:
            bytes_ratio = row["cache_bytes_prefix"] / full_bytes if full_bytes else None
            lines.append(
                f"| {ratio:g} | {row['selection']} | {row['svd']} | {row['rope_pairs']} | {row['kv_dim']} | "
                f"{_f(bytes_ratio, '.3f')} | {_f(row['ppl'], '.3f')} | {_f(row.get('needle_accuracy'), '.0%')} |"
            )
    sel_rows = [(k, r) for k, r in rows.items() if k.endswith("/full-rank")]
    if sel_rows:
        lines += [
            "",
            "## The selections alone (full-rank latent)",
            "",
            "c = the joint rank, so K_nope/V are exact and the only change from the original is that RoPE is kept on "
            "r pairs per KV head (the other dims position-free); the cache is then as large as the original's.",
            "",
            "| selection | r | c | ppl |",
            "|:---|---:|---:|---:|",
        ]
        lines += [f"| {r['selection']} | {r['rope_pairs']} | {r['kv_dim']} | {_f(r['ppl'], '.3f')} |" for _, r in sel_rows]
    speed = [(k, r) for k, r in rows.items() if "decode_tok_s_original" in r]
    if speed:
        lines += [
            "",
            "## Decode speed at ~{} tokens".format(setup["length"]),
            "",
            f"Tokens/s of single-token decode steps after the needle prompt, {args.speed_steps} steps each, interleaved "
            "round-robin so that the shared CPU's load hits all three alike: the converted model with `W_up` absorbed "
            "into the query side (MLA-style, the default for decoding: the latent is never expanded), the same model "
            "reconstructing K/V from the latent at every step, and the original model with a `DynamicCache`.",
            "",
            "| setting | absorbed | reconstructed | original (DynamicCache) | absorbed / original |",
            "|:---|---:|---:|---:|---:|",
        ]
        lines += [f"| {k} | {_f(r['decode_tok_s_absorb'], '.1f')} | {_f(r['decode_tok_s_reconstruct'], '.1f')} | "
                  f"{_f(r['decode_tok_s_original'], '.1f')} | "
                  f"{_f(r['decode_tok_s_absorb'] / r['decode_tok_s_original'], '.2f')} |" for k, r in speed]
    upkey = next((k for k in rows if k.endswith("+uptrain")), None)
    if upkey and up:
        row = rows[upkey]
        free = rows.get(upkey[: -len("+uptrain")], {})
        gap = None
        if free.get("nll") is not None and base.get("nll") is not None and row.get("nll") is not None:
            gap = (free["nll"] - row["nll"]) / (free["nll"] - base["nll"]) if free["nll"] != base["nll"] else None
        lines += [
            "",
            "## After a short uptraining",
            "",
            f"Setting `{upkey[: -len('+uptrain')]}`: {up['steps']} steps × {up['config']['batch_size']} × "
            f"{up['config']['seq_len']} tokens = **{up['tokens']} tokens** of {', '.join(up.get('texts', []))} "
            f"(not the perplexity text), **{up['seconds'] / 60:.1f} min on {up['device']}**; trained: the converted "
            f"attention layers ({up['config']['trainable']}), loss {up['config']['kl_weight']:g}·KL(original‖converted) + "
            f"{up['config']['lm_weight']:g}·CE, AdamW lr {up['config']['lr']:g}. KL {up['kl_first']:.3f} → "
            f"{up['kl_last5']:.3f} (mean of the last 5 steps).",
            "",
            "| model | ppl | needle |",
            "|:---|---:|---:|",
            f"| original (DynamicCache) | {_f(base.get('ppl'), '.3f')} | {_f(base.get('needle_accuracy'), '.0%')} |",
            f"| training-free | {_f(free.get('ppl'), '.3f')} | {_f(free.get('needle_accuracy'), '.0%')} |",
            f"| uptrained | {_f(row.get('ppl'), '.3f')} | {_f(row.get('needle_accuracy'), '.0%')} |",
            "",
            f"Share of the log-perplexity gap recovered: {_f(gap, '.0%')}.",
        ]
    rank = data.get("ranking", {})
    lines += [
        "",
        f"RoPElite ranking: {rank.get('tokens')} tokens in {rank.get('num_windows')} windows of {rank.get('seq_len')}, "
        f"{rank.get('samples_per_window')} sampled (query, key) pairs per window, "
        f"{_f(rank.get('seconds'), '.0f')} s. Machine: {m.get('device')} ({m.get('processor')}, torch threads "
        f"{m.get('threads')}, load average {m.get('loadavg_1_5_15')} at the end), torch {m.get('torch')}, transformers "
        f"{m.get('transformers')}. Times on a shared CPU are indicative only. Last run: "
        f"{_f(data.get('total_seconds_last_run', 0) / 60, '.1f')} min (all runs of this setup: "
        f"{_f(data.get('total_seconds', 0) / 60, '.1f')} min).",
        "",
        f"Reproduce: `{data.get('command')}` (rerunning resumes from `{Path(str(args.out)).name}.json`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
