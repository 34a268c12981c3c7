"""The benchmark scripts under ``benchmarks/`` render their Markdown from their JSON as a fresh run
records it (``machine_info()`` of today, not of the run that made the committed figures)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compresskv.eval.machine import machine_info
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("eviction", "xkv", "lowrank", "elitekv", "mla", "long_generation")


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


def test_compare_bench_finds_identical_rows_and_a_changed_one(tmp_path):
    """``benchmarks/compare_bench.py`` on the committed before/after rows of the redesign finds them
    identical, and finds a row whose answer, bytes or perplexity changed."""
    module = load_benchmark("compare_bench")
    folder = ROOT / "benchmarks" / "results" / "redesign13"
    before, after = module.load(folder / "bench_before.jsonl"), module.load(folder / "bench_after.jsonl")
    result = module.compare(before, after)
    assert result["compared"] == len(before) > 0 and result["differing"] == []
    key = next(k for k, r in after.items() if r["task"] == "perplexity" and r["method"] != "full")
    after[key] = {**after[key], "ppl": after[key]["ppl"] * (1 + 1e-6), "cache_bytes_prefill": 1}
    changed = module.compare(before, after)
    assert [d["key"] for d in changed["differing"]] == [key]
    assert set(changed["differing"][0]["fields"]) == {"ppl", "cache_bytes_prefill"}
    out = module.main([str(folder / "bench_before.jsonl"), str(folder / "bench_after.jsonl"), "--out", str(tmp_path / "c")])
    assert "**0**" in (tmp_path / "c.md").read_text() and out["compared"] == result["compared"]


def test_decode_benchmark_pairs_steps_taking_turns_first():
    """``lockstep``: one step of each run in turn, the one going first alternating, warm-up steps
    untimed; the second run's tokens are kept."""
    module = load_benchmark("decode")
    order = []

    def run(name, seconds):
        for i in range(100):
            order.append(name)
            yield seconds, 10 * i

    times_a, times_b, tokens = module.lockstep(run("a", 1.0), run("b", 2.0), warmup=1, steps=4)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    assert times_a == [1.0] * 4 and times_b == [2.0] * 4 and tokens == [0, 10, 20, 30, 40]


@pytest.mark.slow
def test_decode_benchmark_smoke_runs_every_kind_of_row_and_resumes(tmp_path):
    """``benchmarks/decode.py --smoke``: DynamicCache, StaticCache + compile, a method eager and
    compiled (same tokens as eager) and a non-compileable one, ratios from one run; a second run
    finds the cell done."""
    module = load_benchmark("decode")
    argv = ["--smoke", "--contexts", "128", "--threads", "1", "--methods", "snapkv,svd", "--ratios", "0.5",
            "--compiled", "snapkv:0.5", "--rounds", "2", "--steps", "3", "--out", str(tmp_path / "d")]
    result = module.main(argv)
    (cell,) = result["cells"]
    rows = {t["config"]: t for t in cell["table"]}
    assert set(rows) == {"dynamiccache", "staticcache+compile", "snapkv@0.5", "snapkv@0.5+compile", "svd@0.5"}
    assert rows["dynamiccache"]["vs_dynamic"] == 1.0 and rows["staticcache+compile"]["vs_static_compile"] == 1.0
    assert rows["snapkv@0.5+compile"]["same_tokens_as_eager"] is True
    assert rows["snapkv@0.5"]["cache_bytes"] < rows["dynamiccache"]["cache_bytes"]
    assert all(t["ms_per_token"] > 0 for t in cell["table"])
    assert "| snapkv@0.5+compile |" in (tmp_path / "d.md").read_text()
    again = module.main(argv)
    assert again["cells"] == result["cells"]  # nothing re-measured


def test_long_generation_smoke_bounded_memory_is_flat_and_dynamic_grows(tmp_path):
    """``benchmarks/long_generation.py --smoke``: StreamingLLM, a bounded method and DynamicCache
    stream the same tokens; the bounded caches' bytes stop growing at the budget, DynamicCache's do not."""
    module = load_benchmark("long_generation")
    argv = ["--smoke", "--tokens", "600", "--prompt", "64", "--budgets", "128", "--methods", "snapkv",
            "--interval", "16", "--segment", "128", "--out", str(tmp_path / "lg")]
    result = module.main(argv)
    assert set(result["runs"]) == {"streamingllm@128", "snapkv@128", "dynamiccache@None"}
    for key in ("streamingllm@128", "snapkv@128"):
        sizes = [s["cache_bytes"] for s in result["runs"][key]["segments"]]
        assert len(sizes) == 5 and len(set(sizes)) == 1, (key, sizes)
    full = [s["cache_bytes"] for s in result["runs"]["dynamiccache@None"]["segments"]]
    assert full == sorted(full) and full[-1] > 3 * full[0]
    assert all(r["ppl"] > 1 and r["scored"] == 600 - 64 for r in result["runs"].values())
    text = (tmp_path / "lg.md").read_text()
    assert "| 128 | snapkv |" in text and "unbounded" in text
    again = module.main(argv)  # every run is in the results already: nothing reruns
    assert again["runs"] == result["runs"]
    assert result["rope_parameters"] is None  # 600 tokens fit the model's 4096 positions
    scaled = module.main(["--smoke", "--tokens", "300", "--prompt", "64", "--budgets", "128", "--methods", "snapkv",
                          "--no-full", "--rope-scaling", "yarn:2", "--out", str(tmp_path / "scaled")])
    assert scaled["rope_parameters"]["rope_type"] == "yarn" and scaled["rope_parameters"]["factor"] == 2.0
    assert "yarn x2" in (tmp_path / "scaled.md").read_text()
