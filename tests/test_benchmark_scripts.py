"""The benchmark scripts under ``benchmarks/`` render their Markdown from their JSON as a fresh run
records it (``machine_info()`` of today, not of the run that made the committed figures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compresskv.eval.machine import machine_info
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("eviction", "xkv", "lowrank", "elitekv")


@pytest.mark.parametrize("name", SCRIPTS)
def test_markdown_renders_with_todays_machine_record(name):
    module = load_benchmark(name)
    result = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
    machine = machine_info()
    result["machine"] = {**machine, "loadavg_at_start": machine["loadavg_1_5_15"]}
    if name == "elitekv":
        text = module.markdown(result, module.parse_args([]))
    else:
        text = module.markdown(result)
    assert text.startswith("# ") and "|" in text
    assert machine["torch"] in text or str(machine["threads"]) in text


def test_decode_speed_markdown_renders_from_the_committed_before_run():
    """``benchmarks/decode_speed.py`` (run against two source trees, so it keeps its own results file
    name) renders its Markdown from its JSON, every method with a ratio to DynamicCache."""
    module = load_benchmark("decode_speed")
    result = json.loads((ROOT / "benchmarks" / "results" / "decode_speed_before.json").read_text())
    text = module.markdown(result)
    assert text.startswith("# ") and "|" in text
    for entry in result["table"]:
        assert f"| {entry['method']} |" in text
    table = module.aggregate(result["rows"], result["config"]["methods"], result["config"]["rounds"])
    assert [e["method"] for e in table] == [e["method"] for e in result["table"]]
