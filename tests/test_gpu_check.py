"""benchmarks/gpu_check.sh, the one command a GPU session runs: its dry run on the CPU (pytest on a
subset of the GPU tests with ``COMPRESSKV_GPU_TESTS_ON=cpu``, the benchmark's ``--smoke``), and its
GPU mode's control flow with a stand-in ``python`` (which stages run with which arguments, the
time box, resuming from the results committed in the checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
MAX_FILES = 8  # what the device tool brings back from $OUT, flat

# A stand-in for the GPU machine's python3: records its arguments, answers the environment check as
# an H200 would, "passes" the tests, and "measures" nothing (but writes the results file).
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_CALLS"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:2] == ["-m", "pytest"]:
    time.sleep(float(os.environ.get("FAKE_PYTEST_SLEEP", "0")))
    print("." * 40)
    print("264 passed in 100.00s")
    sys.exit(0)
if args[:2] == ["-m", "pip"]:
    sys.exit(0)
if args[:1] == ["-"]:
    script = sys.stdin.read()
    if "GPU_CHECK_MODE" in script:
        print("python 3.12.3 | torch 2.11.0+cu130 (CUDA 13.0) | transformers 5.17.0 | accelerate 1.15.0 | "
              "triton 3.6.0 | device: NVIDIA H200 | compresskv from src")
        sys.exit(0)
    sys.argv = args
    exec(compile(script, "<stdin>", "exec"))
    sys.exit(0)
if args[0] == "benchmarks/gpu_long_context.py":
    stem = args[args.index("--out") + 1]
    if not os.path.exists(stem + ".json"):
        with open(stem + ".json", "w") as f:
            json.dump({{"runs": {{}}, "rows": [], "targets": []}}, f)
    shapes = args[args.index("--shapes") + 1]
    print(f"[00:00:00] {{shapes}} 8192: DynamicCache")
    print("[00:00:00] time budget reached: run the same command again to continue")
    sys.exit(0)
sys.exit(99)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k not in ("OUT", "PYTHON")}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _files(out: Path) -> list[str]:
    assert all(p.is_file() for p in out.iterdir()), "everything under $OUT is a plain file, flat"
    return sorted(p.name for p in out.iterdir())


@pytest.fixture
def fake(tmp_path):
    """``(run, calls)``: ``run(out, *args, **env)`` runs the script in GPU mode with the stand-in
    python; ``calls(out)`` lists the argument lists it was called with in that run."""
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "gguf-0.19.0-py3-none-any.whl").write_bytes(b"")
    results = tmp_path / "results"
    results.mkdir()

    def run(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
        calls = out.with_name(out.name + ".calls")
        settings = dict(OUT=str(out), PYTHON=str(python), FAKE_CALLS=str(calls), GPU_CHECK_WHEELS=str(wheels),
                        GPU_CHECK_RESULTS=str(results))
        settings.update(env)
        return _run(list(args), _env(**settings), timeout=120)

    def calls(out: Path) -> list[list[str]]:
        path = out.with_name(out.name + ".calls")
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    run.results = results
    return run, calls


def _benchmark_calls(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if c[0] == "benchmarks/gpu_long_context.py"]


def _flag(call: list[str], name: str) -> str | None:
    return call[call.index(name) + 1] if name in call else None


def test_gpu_mode_runs_the_tests_then_each_benchmark_stage_inside_the_budget(fake, tmp_path):
    run, calls = fake
    out = tmp_path / "out"
    proc = run(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    made = calls(out)
    pip = [c for c in made if c[:2] == ["-m", "pip"]]
    assert len(pip) == 1 and "--no-index" in pip[0] and "--find-links" in pip[0] and "--dry-run" not in pip[0]
    (pytest_call,) = [c for c in made if c[:2] == ["-m", "pytest"]]
    assert pytest_call[2:4] == ["-m", "gpu"] and "-k" not in pytest_call
    assert "tests/test_gpu.py" in pytest_call and "tests/test_xkv_kernel.py" in pytest_call
    bench = _benchmark_calls(made)
    assert [(_flag(c, "--shapes"), _flag(c, "--contexts")) for c in bench] == [
        ("smollm2", None), ("llama8b", "8192,32768"), ("llama8b", "131072")]
    budgets = [float(_flag(c, "--time-budget")) for c in bench]
    assert all(0 < b <= 540 - 25 for b in budgets) and budgets == sorted(budgets, reverse=True)
    assert all(_flag(c, "--out") == str(out / "gpu") and "--smoke" not in c and "--force" not in c for c in bench)

    files = _files(out)
    assert files == ["gpu.json", "gpu_check.log", "gpu_check_summary.txt", "gpu_pytest.log"]
    summary = (out / "gpu_check_summary.txt").read_text()
    assert "device: NVIDIA H200" in summary and "pytest: 264 passed in 100.00s (ran now" in summary
    assert "benchmark llama8b 8192,32768: time budget reached" in summary
    log = (out / "gpu_check.log").read_text()
    assert f"cp {out}/* benchmarks/results/" in log and "git commit" in log


def test_gpu_mode_resumes_from_the_committed_results(fake, tmp_path):
    run, calls = fake
    first = tmp_path / "first"
    assert run(first).returncode == 0
    for name in ("gpu_pytest.log", "gpu.json"):  # what the session commits under benchmarks/results/
        shutil.copy(first / name, run.results / name)
    marker = {"runs": {"earlier": {}}, "rows": [], "targets": []}
    (run.results / "gpu.json").write_text(json.dumps(marker))

    again = tmp_path / "again"
    proc = run(again)
    assert proc.returncode == 0, proc.stdout[-3000:]
    made = calls(again)
    assert not [c for c in made if c[:2] == ["-m", "pytest"]], "a committed pass is not re-run"
    assert "earlier" in json.loads((again / "gpu.json").read_text())["runs"], "the benchmark continues the committed file"
    summary = (again / "gpu_check_summary.txt").read_text()
    assert "pytest: 264 passed in 100.00s (from" in summary and "not re-run" in summary
    assert (again / "gpu_pytest.log").read_text() == (first / "gpu_pytest.log").read_text()
    assert len(_benchmark_calls(made)) == 3

    forced = tmp_path / "forced"
    assert run(forced, "--force", "--force-bench").returncode == 0
    assert [c for c in calls(forced) if c[:2] == ["-m", "pytest"]]
    assert all("--force" in c for c in _benchmark_calls(calls(forced)))

    # other pytest arguments, or a pass recorded by a dry run, are not taken for this run's pass
    other = tmp_path / "other"
    assert run(other, GPU_CHECK_PYTEST_ARGS="-x").returncode == 0
    assert [c for c in calls(other) if c[:2] == ["-m", "pytest"]][0][-1] == "-x"
    log = (run.results / "gpu_pytest.log").read_text()
    (run.results / "gpu_pytest.log").write_text(log.replace("mode=gpu ", "mode=dry-run "))
    dry_pass = tmp_path / "dry_pass"
    assert run(dry_pass).returncode == 0
    assert [c for c in calls(dry_pass) if c[:2] == ["-m", "pytest"]]


def test_gpu_mode_time_box(fake, tmp_path):
    """A budget too small for the benchmark starts none of its stages; a pytest run past its timeout
    is stopped and recorded as such, and the script fails."""
    run, calls = fake
    out = tmp_path / "out"
    proc = run(out, GPU_CHECK_BUDGET="70", GPU_CHECK_PYTEST_TIMEOUT="1", FAKE_PYTEST_SLEEP="30")
    assert proc.returncode == 1
    assert not _benchmark_calls(calls(out))
    summary = (out / "gpu_check_summary.txt").read_text()
    assert "pytest: TIMEOUT after 1s" in summary
    assert summary.count("not started") == 3
    assert "# gpu_check pytest exit=124" in (out / "gpu_pytest.log").read_text()


def test_without_a_cuda_device_gpu_mode_stops_before_the_tests(tmp_path):
    """On this CPU machine the GPU mode stops at the environment check, saying so."""
    out = tmp_path / "out"
    proc = _run([], _env(OUT=str(out), PYTHON=sys.executable, GPU_CHECK_WHEELS=str(tmp_path / "absent")), timeout=120)
    if "device: no CUDA device" not in proc.stdout:
        pytest.skip("this machine has a CUDA device")
    assert proc.returncode == 1
    assert "no wheels to install" in proc.stdout
    assert "stopped: no CUDA device" in (out / "gpu_check_summary.txt").read_text()
    assert _files(out) == ["gpu_check.log", "gpu_check_summary.txt"]


@pytest.mark.slow
def test_dry_run_writes_its_files_and_a_second_run_resumes(tmp_path):
    """The real dry run (about 35 s, then 15 s): pytest on a subset of the GPU tests on the CPU and
    the benchmark's smoke run; the second run, given the first one's files as the committed results,
    re-runs neither the tests nor any configuration."""
    results = tmp_path / "results"
    results.mkdir()
    first = tmp_path / "first"
    env = _env(OUT=str(first), PYTHON=sys.executable, GPU_CHECK_RESULTS=str(results), GPU_CHECK_BUDGET="400",
               GPU_CHECK_WHEELS=str(tmp_path / "absent"))
    proc = _run(["--dry-run"], env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = _files(first)
    assert files == ["gpu-smoke.json", "gpu-smoke.md", "gpu_check.log", "gpu_check_summary.txt", "gpu_pytest.log"]
    assert len(files) <= MAX_FILES
    summary = (first / "gpu_check_summary.txt").read_text()
    pytest_line = next(line for line in summary.splitlines() if line.startswith("pytest: "))
    assert " passed" in pytest_line and "failed" not in pytest_line and "(ran now" in pytest_line
    assert "mode=dry-run" in summary and "device: no CUDA device" in summary
    assert "benchmark tiny-smollm2 default contexts: complete" in summary
    assert "benchmark tiny-llama8b default contexts: complete" in summary
    rows = json.loads((first / "gpu-smoke.json").read_text())["rows"]
    assert {r["shape"] for r in rows} == {"tiny-smollm2", "tiny-llama8b"}

    for name in files:
        shutil.copy(first / name, results / name)
    second = tmp_path / "second"
    proc = _run(["--dry-run"], {**env, "OUT": str(second)}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert len(_files(second)) <= MAX_FILES
    summary = (second / "gpu_check_summary.txt").read_text()
    assert "not re-run" in summary and pytest_line.split(" (")[0] in summary
    assert summary.count("nothing to do (every configuration already measured)") == 2
    assert json.loads((second / "gpu-smoke.json").read_text())["rows"] == rows
