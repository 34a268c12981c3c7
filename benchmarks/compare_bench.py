"""Compare two ``compresskv bench`` runs (their ``.jsonl`` rows) made by two versions of the code:
which rows differ in what must not change (answers, scores, bytes, perplexity), and each row's
decode speed relative to the full cache of its own run.

    python benchmarks/compare_bench.py BEFORE.jsonl AFTER.jsonl --out benchmarks/results/NAME

Writes ``NAME.json`` and ``NAME.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from compresskv.eval.results import write_result

#: fields a refactor must leave bit-identical
SAME = ("answer", "score", "ppl", "nll", "cache_bytes_prefill", "cache_bytes", "tokens", "stored_min", "stored_max",
        "error")


def load(path: Path) -> dict[str, dict[str, Any]]:
    return {row["key"]: row for row in map(json.loads, path.read_text().splitlines()) if row}


def compare(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    def full(rows: dict[str, dict[str, Any]], row: dict[str, Any]) -> dict[str, Any] | None:
        return next((r for r in rows.values() if r["method"] == "full" and (r["task"], r["seed"]) == (row["task"], row["seed"])), None)

    keys = sorted(set(before) & set(after))
    differing, speed = [], []
    for key in keys:
        b, a = before[key], after[key]
        bad = {k: [b.get(k), a.get(k)] for k in SAME if b.get(k) != a.get(k)}
        if bad:
            differing.append({"key": key, "fields": bad})
        fb, fa = full(before, b), full(after, a)
        if b["method"] != "full" and fb and fa and b.get("decode_tok_s") and a.get("decode_tok_s"):
            speed.append({"method": b["method"], "ratio": b["ratio"], "task": b["task"],
                          "before": b["decode_tok_s"] / fb["decode_tok_s"], "after": a["decode_tok_s"] / fa["decode_tok_s"]})
    return {"compared": len(keys), "only_before": sorted(set(before) - set(after)),
            "only_after": sorted(set(after) - set(before)), "fields": list(SAME), "differing": differing,
            "decode_vs_full": speed}


def markdown(result: dict[str, Any]) -> str:
    out = [f"# {result['title']}", "",
           f"Rows compared: {result['compared']} (only before: {len(result['only_before'])}, only after: "
           f"{len(result['only_after'])}). Rows differing in {', '.join(result['fields'])}: "
           f"**{len(result['differing'])}**.", ""]
    out += [f"- `{d['key']}`: {d['fields']}" for d in result["differing"]]
    out += ["", "Decode tokens/s relative to the full cache of the same run (the bench decodes a few tokens per "
            "row; on a loaded machine these ratios are noisy: see the decode-speed benchmark for speed).", "",
            "| method | ratio | task | before | after |", "|---|---|---|---|---|"]
    out += [f"| {s['method']} | {s['ratio']} | {s['task']} | {s['before']:.2f} | {s['after']:.2f} |"
            for s in result["decode_vs_full"]]
    out += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--title", default="compresskv bench: before vs after")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_bench"))
    args = p.parse_args(argv)
    result = compare(load(args.before), load(args.after))
    result["title"] = args.title
    result["command"] = f"python benchmarks/compare_bench.py {args.before} {args.after} --out {args.out}"
    write_result(args.out, result, markdown, echo=True)
    return result


if __name__ == "__main__":
    main()
