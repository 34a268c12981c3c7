"""Why ``compresskv`` sets ``OMP_WAIT_POLICY=PASSIVE``: CPU speed with 1 and 2 threads, on a quiet
machine and beside another torch process, with OpenMP's default wait policy and the passive one.

torch's CPU kernels and MKL's LAPACK (the SVDs of xKV/SVD/PCA) run on OpenMP threads. Between
parallel regions, GNU OpenMP's threads spin-wait by default; when another process competes for
the cores, a spinning thread burns the time slice its descheduled partner needs, and every
barrier stalls. With ``OMP_WAIT_POLICY=PASSIVE`` waiting threads sleep at once. The policy is read
when the OpenMP runtime starts, so each configuration runs in its own child process::

    python benchmarks/threads.py --out benchmarks/results/threads

Measured per configuration (median of ``--repeats``): ``torch.linalg.svd`` of a 4096 x 768
float32 matrix (one xKV group at 4k tokens), the prefill of ``--prompt-tokens`` of the bundled
novel on the embedded model, and its decode tokens/s (``DynamicCache``, ``--new-tokens`` steps).
The load, when asked, is a second process running 2-thread float32 matmuls with the default wait
policy (as another torch job or a second test run would). Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [  # (threads, environment of the OpenMP runtime, "" for its defaults)
    (1, ""),
    (2, ""),
    (2, "OMP_WAIT_POLICY=PASSIVE"),
    (2, "GOMP_SPINCOUNT=1000"),
]
OMP_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
LOAD = (
    "import torch\ntorch.set_num_threads(2)\nx = torch.randn(1024, 1024)\n"
    "while True:\n    for _ in range(8):\n        x = (x @ x).tanh()\n"
)


def child(args: argparse.Namespace) -> dict:
    import torch
    from transformers import DynamicCache

    import compresskv
    from compresskv.eval.perplexity import tokenize_text

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 768, generator=gen)
    svd = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        torch.linalg.svd(x, full_matrices=False)
        svd.append(time.perf_counter() - start)
    model, tokenizer = compresskv.load_model()
    ids = torch.tensor([tokenize_text(tokenizer, compresskv.sample_text(args.prompt_tokens * 8))[: args.prompt_tokens]])
    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(args.repeats):
            cache = DynamicCache(config=model.config)
            start = time.perf_counter()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            prefill.append(time.perf_counter() - start)
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(args.new_tokens):
                token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            decode.append(args.new_tokens / (time.perf_counter() - start))
    return {"svd_s": statistics.median(svd), "prefill_s": statistics.median(prefill),
            "decode_tok_s": statistics.median(decode), "svd_all": svd, "prefill_all": prefill, "decode_all": decode}


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in OMP_VARS}


def run_config(args: argparse.Namespace, threads: int, policy: str) -> dict:
    env = _clean_env()
    if policy:
        name, value = policy.split("=")
        env[name] = value
    cmd = [sys.executable, __file__, "--child", "--threads", str(threads), "--repeats", str(args.repeats),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/threads"))
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for loaded in (False, True):
        load = subprocess.Popen([sys.executable, "-c", LOAD], env=_clean_env()) if loaded else None
        try:
            time.sleep(2 if loaded else 0)
            for threads, policy in CONFIGS:
                result = run_config(args, threads, policy)
                rows.append({"loaded": loaded, "threads": threads, "policy": policy or "defaults", **result})
                print(f"{'loaded' if loaded else 'quiet':>6} threads={threads} {policy or 'defaults':<24} "
                      f"svd {result['svd_s']:.3f} s  prefill {result['prefill_s']:.2f} s  "
                      f"decode {result['decode_tok_s']:.1f} tok/s", flush=True)
        finally:
            if load is not None:
                load.kill()
                load.wait()
    import torch

    from compresskv.eval.machine import machine_info

    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/threads.py", *(argv or sys.argv[1:])]),
              "machine": machine_info(torch.device("cpu")), "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "# CPU threads and OpenMP's wait policy", "",
        f"`{record['command']}` on {os.cpu_count()} cores, {record['date']}. Median of {args.repeats}: SVD of a "
        f"4096x768 float32 matrix, prefill of {args.prompt_tokens} tokens and decode tokens/s ({args.new_tokens} "
        "steps, DynamicCache) on the embedded model. *loaded*: beside a second process running 2-thread torch "
        "matmuls. Ratios are to 1 thread in the same condition.", "",
        "| machine | threads | OpenMP setting | SVD s | prefill s | decode tok/s | SVD vs 1 thread | prefill vs 1 thread | decode vs 1 thread |",
        "|:---|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        one = next(o for o in rows if o["loaded"] == r["loaded"] and o["threads"] == 1)
        lines.append(f"| {'loaded' if r['loaded'] else 'quiet'} | {r['threads']} | {r['policy']} | {r['svd_s']:.3f} | "
                     f"{r['prefill_s']:.2f} | {r['decode_tok_s']:.1f} | {r['svd_s'] / one['svd_s']:.2f} | "
                     f"{r['prefill_s'] / one['prefill_s']:.2f} | {r['decode_tok_s'] / one['decode_tok_s']:.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("wrote", args.out.with_suffix(".json"), args.out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
