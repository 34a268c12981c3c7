"""benchmarks/gpu_long_context.py on the CPU: its ``--smoke`` mode measures DynamicCache and every
method at every ratio on tiny shapes, with byte ratios that follow the asked compression, resumes
without re-measuring, and evaluates the GPU targets from the numbers it is given."""

from __future__ import annotations

import json

import pytest
import torch

import compresskv
from conftest import load_benchmark

RATIOS = (2.0, 4.0, 8.0)


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("gpu_long_context")


@pytest.fixture(scope="module")
def smoke(bench, tmp_path_factory):
    """One smoke run (about 20 s on two busy cores), shared by the tests below."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # many tiny ops: one thread is faster on a shared 2-core machine
    try:
        out = tmp_path_factory.mktemp("gpu-bench") / "gpu"
        results = bench.main(["--smoke", "--out", str(out)])
    finally:
        torch.set_num_threads(before)
    return out, results


def test_smoke_measures_every_method_at_every_ratio(bench, smoke):
    out, results = smoke
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results["rows"], default=str))
    (run,) = saved["runs"].values()
    assert run["complete"] and run["machine"]["device"] == "cpu"
    assert run["copy_bandwidth"]["read_write_GBps"] > 0
    rows = {(r["shape"], r["method"], r.get("ratio")): r for r in saved["rows"]}
    for shape in bench.SMOKE_SHAPES:
        base = rows[(shape, bench.DYNAMIC, None)]
        assert base["status"] == "ok" and base["context"] == 256
        assert base["cache_bytes"] > 0 and base["decode_tok_s_b1"] > 0 and base["max_batch"] == 4
        for method in compresskv.available_methods():
            for ratio in RATIOS:
                row = rows[(shape, method, ratio)]
                most = bench.FIXED_SAVING.get(method, (None,))[0]
                if most is not None and ratio > most:  # a fixed saving: more is not asked of it
                    assert row["status"] == "unsupported" and "at most" in row["detail"]
                    continue
                assert row["status"] == "ok", (shape, method, ratio, row.get("detail"))
                assert row["run_id"] == base["run_id"]
                assert row["prefill_s"] > 0 and row["decode_tok_s_b1"] > 0 and row["max_batch"] == 4
                assert [b["batch"] for b in row["batches"]] == [1, 2, 4]
                assert row["speedup_b1"] == pytest.approx(row["decode_tok_s_b1"] / base["decode_tok_s_b1"])
                assert row["bytes_ratio"] == pytest.approx(row["cache_bytes"] / base["cache_bytes"])
                if method in bench.EXACT_RATIO:
                    # the asked compression, up to rounding and the small per-layer factors kept
                    assert 0.75 / ratio <= row["bytes_ratio"] <= 1.25 / ratio, (shape, method, ratio, row["bytes_ratio"])
                elif method == "minicache":
                    assert 0.5 <= row["bytes_ratio"] <= 0.75
            if method == "xkv":
                assert row["xkv_compressed_bytes"] > 0 and row["xkv_read_fraction_max"] > 0
                if "fused" in bench.xkv_read_modes() and "read_mode" in compresskv.method_options("xkv"):
                    assert row["options"]["read_mode"] == "fused" and row["xkv_read_mode"] == "fused"


def test_smoke_markdown_names_the_device_and_every_method(smoke):
    out, _ = smoke
    text = out.with_suffix(".md").read_text()
    assert "**cpu**" in text and "copy bandwidth" in text and "## Targets" in text
    for name in ["DynamicCache", *compresskv.available_methods()]:
        assert f"| {name} |" in text
    assert "## tiny-llama8b, 256 tokens" in text and "## tiny-smollm2, 256 tokens" in text


def test_resume_skips_what_is_measured(bench, smoke):
    out, results = smoke
    again = bench.main(["--smoke", "--out", str(out), "--methods", "snapkv,xkv"])
    assert len(again["runs"]) == 2
    assert again["rows"] == json.loads(json.dumps(results["rows"], default=str))  # nothing re-measured


def _row(method, ratio, **numbers):
    row = dict(shape="s", context=32768, method=method, ratio=ratio, run_id="r", status="ok")
    row.update(numbers)
    return row


def test_targets_from_given_numbers(bench):
    """Ratios against the same run's DynamicCache row, and PASS/FAIL per target."""
    base = _row(bench.DYNAMIC, None, cache_bytes=1000, peak_bytes=2000, prefill_s=1.0, decode_tok_s_b1=10.0,
                decode_tok_s_max=80.0, max_batch=8,
                batches=[{"batch": 1, "steps": 4, "seconds": 0.4, "tok_s": 10.0},
                         {"batch": 8, "steps": 4, "seconds": 0.4, "tok_s": 80.0}])
    fast = _row("snapkv", 4.0, cache_bytes=250, peak_bytes=1500, prefill_s=1.1, decode_tok_s_b1=11.0,
                decode_tok_s_max=160.0, max_batch=32,
                batches=[{"batch": 1, "steps": 4, "seconds": 0.36, "tok_s": 11.0},
                         {"batch": 32, "steps": 4, "seconds": 0.8, "tok_s": 160.0}])
    slow = _row("pca", 4.0, cache_bytes=260, peak_bytes=2100, prefill_s=1.0, decode_tok_s_b1=9.0,
                decode_tok_s_max=100.0, max_batch=8,
                batches=[{"batch": 1, "steps": 4, "seconds": 0.44, "tok_s": 9.0},
                         {"batch": 8, "steps": 4, "seconds": 0.32, "tok_s": 100.0}])
    xkv = _row("xkv", 4.0, cache_bytes=250, peak_bytes=1000, prefill_s=1.5, decode_tok_s_b1=10.0,
               decode_tok_s_max=40.0, max_batch=4, xkv_compressed_bytes=10**9, xkv_read_mode="fused",
               batches=[{"batch": 1, "steps": 4, "seconds": 0.01, "tok_s": 400.0},
                        {"batch": 4, "steps": 4, "seconds": 0.02, "tok_s": 800.0}])
    bandwidth = {"read_write_GBps": 1000.0}
    results = {"runs": {}, "rows": [base]}
    for row in (fast, slow, xkv):
        bench.add_ratios(row, bench.baseline_of(results, row), bandwidth)
        results["rows"].append(row)
    assert fast["bytes_ratio"] == 0.25 and fast["speedup_max"] == 2.0 and fast["speedup_b1"] == pytest.approx(1.1)
    assert fast["overhead_s"] == pytest.approx(0.1) and slow["speedup_same_batch"] == pytest.approx(100 / 80)
    assert xkv["batches"][1]["xkv_read_GBps"] == pytest.approx(800.0)  # 1 GB x 4 rows x 4 steps / 0.02 s
    assert xkv["xkv_read_fraction_max"] == pytest.approx(0.8)
    targets = {t["target"]: t for t in bench.evaluate_targets(results)}
    speed = {name.split("(")[1].split(",")[0]: t["result"] for name, t in targets.items() if name.startswith("decode")}
    assert speed["snapkv"] == "PASS" and speed["pca"] == "FAIL" and speed["matryoshka"] == "not measured"
    memory = next(t for name, t in targets.items() if name.startswith("no method"))
    assert memory["result"] == "FAIL" and "pca" in memory["detail"]
    bandwidth_target = next(t for name, t in targets.items() if name.startswith("xKV"))
    assert bandwidth_target["result"] == "PASS" and bandwidth_target["value"] == pytest.approx(0.8)
    xkv["xkv_read_mode"] = "latent"  # not the fused kernel: the target is not met by it
    assert next(t for t in bench.evaluate_targets(results) if t["target"].startswith("xKV"))["result"] == "FAIL"


def test_out_of_memory_is_recorded_and_ends_the_batch_search(bench):
    """The GPU-only failure paths, simulated: an out-of-memory at prefill is "does not fit", one
    while growing the batch stops the search at the last batch that fitted."""
    from transformers import DynamicCache

    args = bench.parse_args(["--smoke"])
    model = bench.build_model(bench.SMOKE_SHAPES["tiny-llama8b"], 512, torch.device("cpu"), torch.float32, 0)
    calls = []

    def fails_after_warmup():
        calls.append(1)
        if len(calls) > 1:  # the measured prefill, after the warm-up's cache
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return DynamicCache(config=model.config)

    row = bench.run_config(model, fails_after_warmup, 64, args, torch.device("cpu"), bench.DYNAMIC)
    assert row["status"] == "does not fit" and "out of memory" in row["detail"]

    class GrowsOnce(DynamicCache):
        def batch_repeat_interleave(self, repeats):
            if self.layers[0].keys.shape[0] >= 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
            super().batch_repeat_interleave(repeats)

    row = bench.run_config(model, lambda: GrowsOnce(config=model.config), 64, args, torch.device("cpu"), bench.DYNAMIC)
    assert row["status"] == "ok" and row["max_batch"] == 2 and row["max_batch_stop"] == "out of memory at batch 4"
    assert [b["batch"] for b in row["batches"]] == [1, 2]

    def broken():
        raise ValueError("a bug, not a full GPU")

    with pytest.raises(ValueError, match="a bug"):
        bench.run_config(model, broken, 64, args, torch.device("cpu"), bench.DYNAMIC)
