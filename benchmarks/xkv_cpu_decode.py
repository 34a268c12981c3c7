"""xKV's CPU decode speed against DynamicCache at 4k tokens, and where its decode step goes (#19).

What one measurement is: the embedded model (fp32, CPU, ``--threads`` torch threads), one prompt
(``sample_text()[20000:]``, first ``--tokens`` tokens), prefilled once into a fresh cache, then
``--steps`` single-token steps ``model(input_ids=tok, position_ids=[[L+i]], cache=cache,
use_cache=True)``, timed one by one; a measurement's figure is the median ms/step. Every xKV
measurement is followed by a DynamicCache one (prefilled once per process and deep-copied for each
measurement) so the ratio of a round is taken against its neighbour, not against a baseline
measured minutes away: the machine is shared, so only ratios are compared.

Variants: ``after`` is the source tree this script sits in; ``--before-src DIR`` adds ``before``,
another compresskv source tree (e.g. ``git worktree add /tmp/before <commit>``: DIR is its
``src``). Each (round, variant) runs in its own process, variants alternating within a round.
``--profile`` adds one torch.profiler pass per variant (xKV at the first ratio, read_mode auto, and
DynamicCache) whose op times are split into the parts of a decode step.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/xkv_cpu_decode.py --before-src /tmp/before/src --profile

Writes ``<out>.json`` (every step time, the profiles, the machine) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "xkv_cpu_decode"
#: the line of the .md below which the hand-written analysis sits (kept when the table is rewritten)
ANALYSIS = "<!-- analysis: written by hand, kept by benchmarks/xkv_cpu_decode.py -->"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5])
    p.add_argument("--read-modes", nargs="+", default=["auto", "latent", "rebuild", "model", "fused"],
                   help="read modes measured at the first ratio (the other ratios: auto only)")
    p.add_argument("--before-modes", nargs="+", default=["auto"], help="read modes measured for --before-src")
    p.add_argument("--before-src", default=None)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=str(OUT))
    # one process's share (internal)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--configs", default="[]", help=argparse.SUPPRESS)
    p.add_argument("--profile-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- one process: measure ------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import DynamicCache

    import compresskv

    torch.set_num_threads(args.threads)
    model, tok = compresskv.load_model()
    model.eval()
    ids = tok(compresskv.sample_text()[20000:], return_tensors="pt").input_ids[:, : args.tokens]
    length = ids.shape[1]
    with torch.no_grad():
        base = DynamicCache(config=model.config)
        first = model(input_ids=ids, cache=base, use_cache=True).logits[:, -1:].argmax(-1)

    def decode(cache: Any, token: Any, steps: int) -> tuple[list[float], list[int]]:
        times, tokens = [], []
        with torch.no_grad():
            for i in range(steps):
                start = time.perf_counter()
                out = model(input_ids=token, position_ids=torch.tensor([[length + i]]), cache=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                times.append((time.perf_counter() - start) * 1e3)
                tokens.append(int(token))
        return times, tokens

    def xkv(config: dict[str, Any]) -> tuple[Any, Any]:
        cache = compresskv.make_cache(model, "xkv", compression_ratio=config["ratio"], read_mode=config["mode"])
        with torch.no_grad():
            token = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        return cache, token

    result: dict[str, Any] = {"variant": args.worker, "compresskv": compresskv.__file__, "runs": []}
    configs = json.loads(args.configs)
    if not args.profile_only:
        for config in configs:
            cache, token = xkv(config)
            times, tokens = decode(cache, token, args.steps)
            stats = cache.stats()
            dyn_times, dyn_tokens = decode(copy.deepcopy(base), first, args.steps)
            result["runs"].append({**config, "ms": times, "median_ms": statistics.median(times),
                                   "dyn_ms": dyn_times, "dyn_median_ms": statistics.median(dyn_times),
                                   "speed": statistics.median(dyn_times) / statistics.median(times),
                                   "ranks_k": stats.ranks_k, "ranks_v": stats.ranks_v, "nbytes": cache.nbytes(),
                                   "same_tokens_as_dynamic": tokens == dyn_tokens})
            print(f"[{args.worker}] {config} {statistics.median(times):.1f} ms vs dynamic "
                  f"{statistics.median(dyn_times):.1f} ms", file=sys.stderr, flush=True)
            del cache
        return result

    # profile: xKV (first config) and DynamicCache, 2 warm steps then 6 profiled ones each
    from torch.profiler import ProfilerActivity, profile

    def profiled(cache: Any, token: Any) -> list[dict[str, Any]]:
        decode(cache, token, 2)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for i in range(2, 8):
                token = model(input_ids=token, position_ids=torch.tensor([[length + i]]), cache=cache,
                              use_cache=True).logits[:, -1:].argmax(-1)
        return [{"name": e.key, "shapes": [list(s) for s in e.input_shapes], "calls": e.count / 6,
                 "self_ms": e.self_cpu_time_total / 1e3 / 6}
                for e in prof.key_averages(group_by_input_shape=True)]

    config = configs[0]
    cache, token = xkv(config)
    stats = cache.stats()
    result["profile"] = {"config": config, "ranks_k": stats.ranks_k, "ranks_v": stats.ranks_v,
                         "xkv": profiled(cache, token), "dynamic": profiled(copy.deepcopy(base), first)}
    # what the CPU's matmul reaches: the key rebuild's own shape, and a large square product
    a, b = torch.randn(1, 1024, max(r for r in stats.ranks_k if r)), None
    rates = {}
    for name, (x, y) in {"rebuild_block": (a, torch.randn(1, a.shape[-1], 192)),
                         "square_2048": (torch.randn(2048, 2048), torch.randn(2048, 2048))}.items():
        x @ y
        start = time.perf_counter()
        for _ in range(10):
            x @ y
        seconds = (time.perf_counter() - start) / 10
        rates[name] = x.numel() * y.shape[-1] / seconds / 1e9
    result["profile"]["gmac_per_s"] = rates
    del b
    return result


# -- profile breakdown ---------------------------------------------------------------------------
def categorize(row: dict[str, Any], ranks_k: set[int], ranks_v: set[int], width: int, dim: int) -> str:
    name, shapes = row["name"], [s for s in row["shapes"] if s]
    last = [s[-1] for s in shapes]
    if name in ("aten::mm", "aten::addmm", "aten::linear"):
        return "model: linear layers, lm head"
    if "scaled_dot_product" in name:
        return "attention: sdpa (DynamicCache)"
    if name == "aten::bmm" and len(shapes) == 2:
        (a, b) = shapes
        if a[-1] in ranks_k and b[-1] == width:
            return "xKV: key rebuild matmul (latent @ factor)"
        if b[-1] in ranks_v or (a[-1] in ranks_v and b[-1] == dim):
            return "xKV: value read in latent space (probs @ latent_v, @ factor_v)"
        if a[-1] == dim:
            return "xKV: q @ rebuilt keys (logits)"
    rope_ops = ("aten::mul", "aten::addcmul_", "aten::cos", "aten::sin", "aten::neg", "aten::add", "aten::cat",
                "aten::complex", "aten::view_as_complex", "aten::view_as_real")
    if name in rope_ops and any(len(s) >= 4 and s[1] >= 256 and s[-1] in (dim, dim // 2, 2) for s in shapes):
        return "xKV: RoPE of the rebuilt keys (cos/sin table, rotation)"
    return "other ops (norms, activations, softmax, cats, copies, query RoPE, ...)"


def breakdown(profile: dict[str, Any], which: str, width: int, dim: int) -> dict[str, float]:
    ranks_k = {r for r in profile["ranks_k"] if r}
    ranks_v = {r for r in profile["ranks_v"] if r}
    out: dict[str, float] = {}
    for row in profile[which]:
        key = categorize(row, ranks_k, ranks_v, width, dim)
        out[key] = out.get(key, 0.0) + row["self_ms"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# -- the whole run -------------------------------------------------------------------------------
def spawn(args: argparse.Namespace, variant: str, src: str, configs: list[dict[str, Any]], profile: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, __file__, "--worker", variant, "--configs", json.dumps(configs),
           "--tokens", str(args.tokens), "--steps", str(args.steps), "--threads", str(args.threads)]
    if profile:
        cmd.append("--profile-only")
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> None:
    started = time.time()
    after_src = str(HERE.parent / "src")
    variants = {"after": after_src}
    if args.before_src:
        variants = {"before": str(Path(args.before_src).resolve()), "after": after_src}
    plans = {}
    for variant in variants:
        modes = args.read_modes if variant == "after" else args.before_modes
        plan = [{"ratio": args.ratios[0], "mode": m} for m in modes]
        plan += [{"ratio": r, "mode": "auto"} for r in args.ratios[1:]]
        plans[variant] = plan
    runs, profiles = [], {}
    for rnd in range(args.rounds):
        order = list(variants) if rnd % 2 == 0 else list(variants)[::-1]
        for variant in order:
            plan = plans[variant][rnd % len(plans[variant]):] + plans[variant][: rnd % len(plans[variant])]
            got = spawn(args, variant, variants[variant], plan, profile=False)
            runs += [{**r, "round": rnd, "variant": variant} for r in got["runs"]]
    if args.profile:
        for variant, src in variants.items():
            profiles[variant] = spawn(args, variant, src, [{"ratio": args.ratios[0], "mode": "auto"}], True)["profile"]
    write(args, runs, profiles, started)


def fmt(x: float, nd: int = 1) -> str:
    return f"{x:.{nd}f}"


def write(args: argparse.Namespace, runs: list[dict], profiles: dict[str, Any], started: float) -> None:
    import torch

    import compresskv
    from compresskv.core.facts import model_dims

    model, _ = compresskv.load_model()
    dims = model_dims(model)
    n_kv, dim, n_q = dims["kv_heads"], dims["head_dim"], model.config.num_attention_heads
    n_layers, T = model.config.num_hidden_layers, args.tokens
    params = sum(p.numel() for p in model.parameters())
    load = os.getloadavg()[0]
    table = {}
    for r in runs:
        key = (r["variant"], r["ratio"], r["mode"])
        table.setdefault(key, []).append(r)
    rows = []
    for (variant, ratio, mode), rs in sorted(table.items(), key=lambda kv: (kv[0][1] * -1, kv[0][2], kv[0][0])):
        ratios = [r["speed"] for r in rs]
        rows.append({"variant": variant, "compression_ratio": ratio, "read_mode": mode, "rounds": len(rs),
                     "xkv_ms": statistics.median(r["median_ms"] for r in rs),
                     "dynamic_ms": statistics.median(r["dyn_median_ms"] for r in rs),
                     "speed_vs_dynamic": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                     "ranks_k": rs[0]["ranks_k"], "ranks_v": rs[0]["ranks_v"],
                     "same_tokens_as_dynamic": all(r["same_tokens_as_dynamic"] for r in rs)})
    # arithmetic per decode step, from the ranks (the first ratio)
    arith = {}
    for ratio in args.ratios:
        r0 = next(r for r in rows if r["compression_ratio"] == ratio)
        rk = [r for r in r0["ranks_k"] if r]
        rv = [r for r in r0["ranks_v"] if r]
        arith[str(ratio)] = {
            "rebuild_macs": sum(T * r * n_kv * dim for r in rk),
            "rebuild_output_bytes": len(rk) * T * n_kv * dim * 4,
            "xkv_compressed_bytes_read": sum((T * (a + b) + (a + b) * n_kv * dim) * 4 for a, b in zip(rk, rv)),
            "dynamic_kv_bytes_read": n_layers * 2 * T * n_kv * dim * 4,
            "dynamic_attention_macs": n_layers * 2 * n_q * T * dim,
            "weights_bytes": params * 4,
        }
    summary = {"rows": rows, "arithmetic_per_step": arith}
    if profiles:
        summary["breakdown_ms_per_step"] = {
            v: {"xkv": breakdown(p, "xkv", n_kv * dim, dim), "dynamic": breakdown(p, "dynamic", n_kv * dim, dim),
                "gmac_per_s": p["gmac_per_s"]} for v, p in profiles.items()}
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "threads": args.threads, "cpus": os.cpu_count(), "load_avg_1min_at_end": load,
               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine,
            "config": {k: v for k, v in vars(args).items() if k not in ("worker", "configs", "profile_only")},
            "minutes": (time.time() - started) / 60, "summary": summary, "runs": runs, "profiles": profiles}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    lines = ["# xKV decode on the CPU vs DynamicCache (generated table)", "",
             f"Embedded model, fp32, {args.threads} threads, {T}-token prompt, {args.steps} decode steps per "
             f"measurement (median ms/step), {args.rounds} rounds, each xKV measurement next to a DynamicCache one; "
             f"speed = DynamicCache ms / xKV ms (median over rounds, [min, max]). {data['date']}, "
             f"load {load:.1f} at the end. Command: `{data['command']}`.", "",
             "| variant | ratio | read_mode | ranks k/v (groups of 4, last of 2) | xKV ms/step | DynamicCache ms/step "
             "| speed vs DynamicCache | same tokens as DynamicCache |", "|---|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        rk = sorted({x for x in r["ranks_k"] if x}, reverse=True)
        rv = sorted({x for x in r["ranks_v"] if x}, reverse=True)
        lines.append(f"| {r['variant']} | {r['compression_ratio']:g} | {r['read_mode']} | {rk}/{rv} | "
                     f"{fmt(r['xkv_ms'])} | {fmt(r['dynamic_ms'])} | {fmt(r['speed_vs_dynamic'], 2)}x "
                     f"[{fmt(r['min'], 2)}, {fmt(r['max'], 2)}] | {r['same_tokens_as_dynamic']} |")
    if profiles:
        for v, b in summary["breakdown_ms_per_step"].items():
            lines += ["", f"Profile ({v}, ms per step, torch.profiler self CPU time, ratio {args.ratios[0]:g}, auto):",
                      "", "| part | xKV | DynamicCache |", "|---|---:|---:|"]
            for k in sorted(set(b["xkv"]) | set(b["dynamic"]), key=lambda k: -b["xkv"].get(k, 0)):
                lines.append(f"| {k} | {fmt(b['xkv'].get(k, 0))} | {fmt(b['dynamic'].get(k, 0))} |")
            lines.append(f"| total | {fmt(sum(b['xkv'].values()))} | {fmt(sum(b['dynamic'].values()))} |")
            lines.append(f"\nmatmul rate (GMAC/s): " + ", ".join(f"{k} {fmt(x)}" for k, x in b["gmac_per_s"].items()))
    lines += ["", "Arithmetic per decode step:", ""]
    for ratio, a in arith.items():
        lines.append(f"- ratio {ratio}: key rebuild {a['rebuild_macs'] / 1e9:.2f} GMAC, writing "
                     f"{a['rebuild_output_bytes'] / 2**20:.0f} MiB of rebuilt keys; xKV reads "
                     f"{a['xkv_compressed_bytes_read'] / 2**20:.0f} MiB of latents+factors; DynamicCache reads "
                     f"{a['dynamic_kv_bytes_read'] / 2**20:.0f} MiB of K/V with {a['dynamic_attention_macs'] / 1e6:.0f} M "
                     f"multiply-adds; the weights are {a['weights_bytes'] / 2**20:.0f} MiB")
    md = out.with_suffix(".md")
    kept = ""
    if md.exists() and ANALYSIS in md.read_text():  # the written analysis below the marker is kept
        kept = md.read_text().split(ANALYSIS, 1)[1]
    md.write_text("\n".join(lines) + "\n\n" + ANALYSIS + kept)
    print("\n".join(lines))


if __name__ == "__main__":
    ns = parse()
    if ns.worker:
        print(json.dumps(worker(ns)))
    else:
        main(ns)
