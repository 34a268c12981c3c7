"""EliteKV dimension allocation on the embedded model: held-out perplexity against the rotated RoPE
pairs ``r`` per KV head at cache ratios 0.25 and 0.5, the chosen ``r`` against the fixed rule's.

The ranking is computed on Austen's *Persuasion* (the bundled novel), the perplexity is measured on
*Emma* (held out), training-free, with ``compresskv.elitekv.allocate`` through the
``compresskv elitekv-allocate`` command (this script only fills in the texts and the output stem).

Run from the repository root (a few minutes on 2 CPU cores)::

    python benchmarks/elitekv_allocation.py
    python benchmarks/elitekv_allocation.py --quick     # a smoke run: short windows, one ratio

Writes ``benchmarks/results/elitekv_allocation.json`` (machine, command, every row),
``benchmarks/results/elitekv_allocation.md`` (the tables) and ``.png`` (perplexity vs r).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from compresskv import cli  # noqa: E402
from compresskv.data import sample_text_path  # noqa: E402
from compresskv.elitekv.allocation import report_markdown  # noqa: E402

AUSTEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"
markdown = report_markdown  # the JSON's Markdown, as the other benchmark scripts name it


def command(argv: list[str] | None = None) -> list[str]:
    """The ``compresskv`` arguments this benchmark runs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib", default=str(AUSTEN / "persuasion.txt" if (AUSTEN / "persuasion.txt").is_file()
                                          else sample_text_path()), help="ranking text")
    p.add_argument("--text", default=str(AUSTEN / "emma.txt"), help="held-out perplexity text ('' : hold out of --calib)")
    p.add_argument("--cache-ratios", default="0.25,0.5")
    p.add_argument("--seq-len", default="1024")
    p.add_argument("--windows", default="4")
    p.add_argument("--eval-windows", default="2")
    p.add_argument("--threads", default="2")
    p.add_argument("--out", default="benchmarks/results/elitekv_allocation")
    p.add_argument("--quick", action="store_true", help="smoke run: 256-token windows, ratio 0.5, /tmp output")
    args = p.parse_args(argv)
    if args.quick:
        args.cache_ratios, args.seq_len, args.windows, args.eval_windows = "0.5", "256", "2", "1"
        args.out = "/tmp/compresskv-elitekv-allocation-quick"
    out = ["elitekv-allocate", "--cache-ratios", args.cache_ratios, "--calibration", args.calib,
           "--seq-len", args.seq_len, "--windows", args.windows, "--eval-windows", args.eval_windows,
           "--threads", args.threads, "--device", "cpu", "--out", args.out]
    if args.text and Path(args.text).is_file():
        out += ["--text", args.text]
    return out


if __name__ == "__main__":
    sys.exit(cli.main(command()))
