"""Builds passage_retrieval_en.jsonl here: LongBench-format records (fields input, context, answers,
length, dataset, language, all_classes, _id) made from Jane Austen's *Emma* (public domain), for
running ``compresskv bench --tasks longbench:passage_retrieval_en`` where the real LongBench data
cannot be downloaded. Like LongBench's passage_retrieval_en, the context is numbered paragraphs and
the answer is "Paragraph N"; unlike it, there are 8 paragraphs (not 30) and the "abstract" is one
sentence of the paragraph, quoted verbatim (LongBench's are written summaries).

    python tests/data/longbench_austen/make_records.py /work/shared/data/austen/emma.txt
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

N_RECORDS, N_PARAGRAPHS = 8, 8


def paragraphs(text: str) -> list[str]:
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if 60 <= len(p.split()) <= 140 and not p.isupper()]


def sentence_of(paragraph: str, others: list[str], rng: random.Random) -> str | None:
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", paragraph) if len(s.split()) >= 10]
    sentences = [s for s in sentences if not any(s in o for o in others)]
    return rng.choice(sentences) if sentences else None


def main(source: str) -> None:
    rng = random.Random(0)
    pool = paragraphs(Path(source).read_text(encoding="utf-8"))
    records = []
    while len(records) < N_RECORDS:
        chosen = rng.sample(pool, N_PARAGRAPHS)
        target = rng.randrange(N_PARAGRAPHS)
        quote = sentence_of(chosen[target], chosen[:target] + chosen[target + 1:], rng)
        if quote is None:
            continue
        context = "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(chosen))
        records.append({
            "input": quote, "context": context, "answers": [f"Paragraph {target + 1}"],
            "length": len(context.split()), "dataset": "passage_retrieval_en", "language": "en",
            "all_classes": None, "_id": f"austen-emma-{len(records)}",
        })
    out = Path(__file__).resolve().parent / "passage_retrieval_en.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} records to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/data/austen/emma.txt")
