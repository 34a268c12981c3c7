"""MLA models (DeepSeek-V2/V3): every method that compresses their cache, exact at no compression and
with the bytes it holds measured against DynamicCache's, in one run.

No MLA model fits the tests' or this machine's budget with real weights, so the models are random,
built from configs scaled like DeepSeek's (``kv_lora_rank`` 4x the per-head key, a shared RoPE
key of a quarter of it, MoE layers after a dense first one; V3 with ``q_lora_rank``). Random
weights say nothing about quality: this measures that each method runs on what transformers caches
for these models, computes what DynamicCache computes when nothing is compressed (max |Δ logit| over
the prompt and ``--new-tokens`` greedy steps, batch 2 with left padding), and holds the bytes it
reports (``nbytes()`` and its ratio to DynamicCache's bytes for the same tokens, both measured).

    python benchmarks/mla.py

Results: ``benchmarks/results/mla.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config, DynamicCache

import compresskv
from compresskv.core.facts import mla_dims
from compresskv.eval.machine import machine_info
from compresskv.eval.results import write_result

VOCAB = 512


def model_for(kind: str, attn: str) -> torch.nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, kv_lora_rank=128, qk_rope_head_dim=32,
                  qk_nope_head_dim=32, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                  first_k_dense_replace=1, n_group=1, topk_group=1, max_position_embeddings=2048, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    config = (DeepseekV2Config(**common, q_lora_rank=None, topk_method="greedy") if kind == "deepseek_v2"
              else DeepseekV3Config(**common, q_lora_rank=96))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def settings(prompt: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, method, options): each method at no compression, then compressing."""
    return [
        ("snapkv (keep all)", "snapkv", dict(budget=4 * prompt, window_size=16)),
        ("snapkv 0.5", "snapkv", dict(compression_ratio=0.5, window_size=16)),
        ("pyramidkv 0.5", "pyramidkv", dict(compression_ratio=0.5, window_size=16)),
        ("streamingllm 0.5", "streamingllm", dict(compression_ratio=0.5)),
        ("knorm 0.5", "knorm", dict(compression_ratio=0.5)),
        ("xkv (full rank)", "xkv", dict(group_size=4, rank_k=4 * 128, rank_v=4 * 32)),
        ("xkv 0.5", "xkv", dict(group_size=4, compression_ratio=0.5)),
        ("xkv rank_k=128, RoPE keys at full rank", "xkv", dict(group_size=4, rank_k=128)),
        ("svd (full rank)", "svd", dict(rank_k=128, rank_v=32)),
        ("svd 0.5", "svd", dict(compression_ratio=0.5)),
    ]


@torch.inference_mode()
def run(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: Any, new_tokens: int) -> tuple[torch.Tensor, Any]:
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                         **compresskv.compat.cache_kwargs(cache))
    return torch.stack(out.logits, dim=1), cache


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mla"))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, args.prompt), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding on the second row
    ids[mask == 0] = 0
    rows = []
    for kind in ("deepseek_v2", "deepseek_v3"):
        for attn in ("eager", "sdpa"):
            model = model_for(kind, attn)
            want, full = run(model, ids, mask, DynamicCache(config=model.config), args.new_tokens)
            full_bytes = sum(t.numel() * t.element_size() for layer in full.layers for t in (layer.keys, layer.values))
            for label, method, options in settings(args.prompt):
                got, cache = run(model, ids, mask, compresskv.make_cache(model, method, **options), args.new_tokens)
                stats = cache.stats()
                rows.append({"model": kind, "attn": attn, "setting": label, "method": method, "options": options,
                             "cached": "latent" if mla_dims(model)["latent"] else "per-head keys/values",
                             "max_logit_diff": float((got - want).abs().max()), "nbytes": stats.nbytes,
                             "room_nbytes": stats.room_nbytes, "dynamic_nbytes": full_bytes,
                             "uncompressed_nbytes": stats.uncompressed_nbytes, "ratio": stats.ratio,
                             "token_ratio": stats.token_ratio})
                print(f"{kind} {attn} {label}: max |Δlogit| {rows[-1]['max_logit_diff']:.2e}, bytes ratio "
                      f"{stats.ratio:.3f}", flush=True)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join(["python", "benchmarks/mla.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine_info(), "config": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    write_result(args.out, result, markdown, echo=True)
    return result


def markdown(result: dict[str, Any]) -> str:
    m, rows = result["machine"], result["rows"]
    lines = ["# MLA models (DeepSeek-V2/V3, random weights): exactness and bytes", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {m.get('device')}, torch {m.get('torch')}, transformers {m.get('transformers')}; prompt "
             f"{result['config']['prompt']} tokens, batch 2 (row 2 left-padded by 37), "
             f"{result['config']['new_tokens']} greedy steps. transformers caches: {rows[0]['cached']}.", "",
             "max |Δ logit|: against DynamicCache over every generated step (0 up to rounding where nothing is "
             "compressed). Bytes: `nbytes()` over DynamicCache's bytes for the same tokens (`uncompressed_nbytes`, "
             "equal to the DynamicCache measured in the same run); tokens only: without decode-time room.", "",
             "| model | attn | setting | max \\|Δ logit\\| | bytes ratio | tokens only | DynamicCache bytes = formula |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['attn']} | {r['setting']} | {r['max_logit_diff']:.1e} | {r['ratio']:.3f} | "
                     f"{r['token_ratio']:.3f} | {'yes' if r['uncompressed_nbytes'] == r['dynamic_nbytes'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
