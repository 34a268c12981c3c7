#!/usr/bin/env bash
# One command for a GPU machine: the GPU tests, then the long-context benchmark, time-boxed and resumable.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--force] [--force-bench]
#
# 1. installs the wheels in .gpu_wheels/ (if any) with pip, offline (--no-index): compresskv itself is
#    NOT installed but imported from src/ (PYTHONPATH): `pip install -e .` would need setuptools>=77
#    from the network (build isolation), or the machine's own setuptools and --no-deps, and the
#    checks need nothing an editable install adds (no console script, no metadata);
# 2. prints the environment (nvidia-smi, python/torch/transformers/triton/accelerate versions, the
#    CUDA device, a hash of src/) into $OUT/gpu_check.log (the whole transcript);
# 3. runs `pytest -m gpu tests/test_gpu.py tests/test_xkv_kernel.py` under `timeout`, into
#    $OUT/gpu_pytest.log; its summary line goes into $OUT/gpu_check_summary.txt;
# 4. runs benchmarks/gpu_long_context.py --out $OUT/gpu: --shapes smollm2, then llama8b at 8k and
#    32k, then llama8b at 128k, each with --time-budget = the time left, so that the whole script
#    ends inside $GPU_CHECK_BUDGET seconds (default 540: the device tool allows 600 per command);
# 5. prints what to do next: copy $OUT's files into benchmarks/results/ and commit them.
#
# Resume: a GPU machine is bare each time, so the previous run's outputs are read from the checkout
# ($GPU_CHECK_RESULTS, default benchmarks/results/): a gpu_pytest.log that records a complete pass
# of the same mode is not re-run (--force re-runs it), and gpu.json is copied into $OUT first, so
# the benchmark skips the configurations already measured (--force-bench re-measures them, from the
# first on, within the time box). $OUT itself is looked at first (a second run into the same folder
# resumes too).
#
# $OUT holds at most 5 files, flat (the device tool brings back 8): gpu_check.log,
# gpu_check_summary.txt, gpu_pytest.log, gpu.json, gpu.md; their names are the ones they keep under
# benchmarks/results/.
#
# --dry-run (or GPU_CHECK_DRY_RUN=1): the same script on a CPU machine, in under 2 minutes on 2
# cores: pytest with COMPRESSKV_GPU_TESTS_ON=cpu on a subset of the GPU tests (the CUDA-only ones
# are skipped), the benchmark with --smoke (tiny shapes, 256 tokens; results gpu-smoke.{json,md}),
# a 110 s budget, and no resume from benchmarks/results/ (a CPU pass is never taken for a GPU one).
#
# Environment: OUT (default benchmarks/results/gpu_check), PYTHON (default: python3, else python:
# the one that imports torch), GPU_CHECK_WHEELS (default .gpu_wheels), GPU_CHECK_RESULTS,
# GPU_CHECK_BUDGET (seconds for the whole script), GPU_CHECK_PYTEST_TIMEOUT (seconds, default 300;
# capped so that the benchmark keeps a minute), GPU_CHECK_PYTEST_ARGS (more pytest arguments, e.g.
# "-n 4": pytest-xdist is on the H200 image; a committed pass resumes only with the same arguments).
#
# The wheels folder (.gpu_wheels/, ignored by git: it travels only when the device tool's `carry`
# names it) is optional. The H200 image has torch, transformers, accelerate, triton and pytest;
# of compresskv's dependencies it lacks only gguf, which only the embedded model's conversion
# imports (nothing here does). To ship it anyway, on a machine with pip and a network:
#   python -m pip download --no-deps --only-binary=:all: -d .gpu_wheels gguf==0.19.0
# (pure Python; its own needs, numpy, pyyaml, requests, tqdm, are on the image).
set -u
set -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
case "${GPU_CHECK_DRY_RUN:-0}" in 0|"") DRY_RUN=0 ;; *) DRY_RUN=1 ;; esac
FORCE=0         # re-run pytest even where a committed log records a pass
FORCE_BENCH=0   # re-measure the benchmark's configurations from the first one on (within the time box)
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        --force) FORCE=1 ;;
        --force-bench) FORCE_BENCH=1 ;;
        -h|--help) sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (use --dry-run, --force, --force-bench, --help)" >&2; exit 2 ;;
    esac
done

OUT=${OUT:-$ROOT/benchmarks/results/gpu_check}
mkdir -p "$OUT" || { echo "gpu_check: cannot create $OUT" >&2; exit 2; }
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 2

WHEELS=${GPU_CHECK_WHEELS:-.gpu_wheels}
if [ "$DRY_RUN" = 1 ]; then
    MODE=dry-run
    BUDGET=${GPU_CHECK_BUDGET:-110}
    PYTEST_TIMEOUT=${GPU_CHECK_PYTEST_TIMEOUT:-60}
    RESULTS=${GPU_CHECK_RESULTS:-}           # none: a CPU pass is never taken for a GPU one
    STEM=gpu-smoke
    MARGIN=8                                 # seconds kept for the summary at the end
    BENCH_STARTUP=6                          # python + torch import before the benchmark's clock starts
    MIN_STAGE=12                             # a benchmark stage with less time left is not started
    STAGES=("tiny-smollm2|" "tiny-llama8b|")
    BENCH_FLAGS=(--smoke)
    PYTEST_SELECT=(-k "covered or llama-gqa-sdpa-bf16-3 or llama-mha-eager-fp16-1 or layer-0-on-gpu or cpu_offloaded or on_gpu")
    export COMPRESSKV_GPU_TESTS_ON=cpu
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # many tiny ops: one thread is faster on 2 shared cores
else
    MODE=gpu
    BUDGET=${GPU_CHECK_BUDGET:-540}
    PYTEST_TIMEOUT=${GPU_CHECK_PYTEST_TIMEOUT:-300}
    RESULTS=${GPU_CHECK_RESULTS-benchmarks/results}
    STEM=gpu
    MARGIN=25
    BENCH_STARTUP=20
    MIN_STAGE=60
    STAGES=("smollm2|" "llama8b|8192,32768" "llama8b|131072")
    BENCH_FLAGS=()
    PYTEST_SELECT=()
fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export NO_MKDOCS_2_WARNING=1

LOG=$OUT/gpu_check.log
SUMMARY=$OUT/gpu_check_summary.txt
PYLOG=$OUT/gpu_pytest.log
FAILED=0
STOPPED=0

say() { printf '[gpu_check %4ds] %s\n' "$SECONDS" "$*"; }
quoted() { local w out=""; for w in "$@"; do out+="$(printf '%q' "$w") "; done; echo "${out% }"; }
note() { printf '%s\n' "$*" >>"$SUMMARY"; }
left() { echo $((BUDGET - SECONDS - MARGIN)); }

pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
            echo "$candidate"; return
        fi
    done
    echo python3
}

# A pytest log that records a complete pass in this mode of the same tests: our header lines (mode,
# selection), pytest's own summary with "passed" and neither "failed" nor "error", and our footer
# with exit 0.
pytest_log_passed() {
    local file=$1 selection=$2
    [ -f "$file" ] || return 1
    grep -q "^# gpu_check mode=$MODE " "$file" || return 1
    grep -qxF "# gpu_check selection: $selection" "$file" || return 1
    grep -q '^# gpu_check pytest exit=0$' "$file" || return 1
    local line
    line=$(pytest_summary_line "$file")
    case "$line" in *passed*) ;; *) return 1 ;; esac
    case "$line" in *failed*|*error*) return 1 ;; esac
    return 0
}

pytest_summary_line() {
    grep -E '^=* ?([0-9]+ [a-z]+|no tests ran).* in [0-9.]+s' "$1" | tail -n 1 | sed -e 's/=//g' -e 's/^ *//' -e 's/ *$//'
}

step_wheels() {
    say "1. wheels: $WHEELS"
    local wheels=()
    if [ -d "$WHEELS" ]; then
        shopt -s nullglob
        wheels=("$WHEELS"/*.whl)
        shopt -u nullglob
    fi
    if [ ${#wheels[@]} -eq 0 ]; then
        say "   no wheels to install (folder absent or empty): the checks use what the machine has"
        return
    fi
    local dry=()
    [ "$DRY_RUN" = 1 ] && dry=(--dry-run)   # on the CPU machine: resolve, change nothing
    local cmd=("$PY" -m pip install -q --disable-pip-version-check ${dry[@]+"${dry[@]}"} --no-index --find-links "$WHEELS" "${wheels[@]}")
    say "   $(quoted "${cmd[@]}")"
    if ! PIP_ROOT_USER_ACTION=ignore "${cmd[@]}"; then
        say "   WARNING: pip could not install the wheels offline; going on without them"
        note "wheels: pip install failed (see gpu_check.log)"
    fi
}

step_environment() {
    say "2. environment"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi 2>&1 | head -n 20
    else
        say "   no nvidia-smi on this machine"
    fi
    local src_hash
    src_hash=$(cd "$ROOT" && find src -name '*.py' -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
    local env_line
    env_line=$(GPU_CHECK_MODE=$MODE "$PY" - <<'EOF' 2>&1
import os, platform, sys
def version(name):
    try:
        return __import__(name).__version__
    except Exception as err:  # noqa: BLE001
        return f"missing ({type(err).__name__})"
import torch
cuda = torch.cuda.is_available()
device = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
import compresskv
print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
      f"transformers {version('transformers')} | accelerate {version('accelerate')} | triton {version('triton')} | "
      f"device: {device} | compresskv from {compresskv.__file__.rsplit('/', 2)[0]}")
sys.exit(3 if os.environ["GPU_CHECK_MODE"] == "gpu" and not cuda else 0)
EOF
    )
    local rc=$?
    echo "$env_line"
    note "environment: $env_line | src sha256 $src_hash"
    if [ $rc -eq 3 ]; then
        say "   ERROR: no CUDA device visible to torch (use --dry-run on a CPU machine)"
        note "stopped: no CUDA device"
        return 1
    elif [ $rc -ne 0 ]; then
        say "   ERROR: python cannot import torch or compresskv: nothing more can run"
        note "stopped: the environment check failed"
        return 1
    fi
}

step_pytest() {
    say "3. pytest -m gpu (timeout ${PYTEST_TIMEOUT}s)"
    local args=(-m gpu -q -rfEs --durations=15 -p no:cacheprovider
                tests/test_gpu.py tests/test_xkv_kernel.py ${PYTEST_SELECT[@]+"${PYTEST_SELECT[@]}"})
    # extra pytest arguments, split on spaces (e.g. "-n 4" with pytest-xdist, or "-x")
    local extra=()
    read -r -a extra <<<"${GPU_CHECK_PYTEST_ARGS:-}"
    args+=(${extra[@]+"${extra[@]}"})
    local selection
    selection=$(quoted "${args[@]}")
    local previous=""
    if [ "$FORCE" = 0 ]; then
        for candidate in "$PYLOG" ${RESULTS:+"$RESULTS/gpu_pytest.log"}; do
            if pytest_log_passed "$candidate" "$selection"; then previous=$candidate; break; fi
        done
    fi
    if [ -n "$previous" ]; then
        local line
        line=$(pytest_summary_line "$previous")
        [ "$previous" -ef "$PYLOG" ] || cp "$previous" "$PYLOG"
        say "   skipped: $previous records a complete pass ($line); --force re-runs it"
        note "pytest: $line (from $previous, not re-run; --force re-runs)"
        return 0
    fi
    local limit=$PYTEST_TIMEOUT
    local most=$(( $(left) - MIN_STAGE ))
    [ "$most" -lt 30 ] && most=30
    [ "$limit" -gt "$most" ] && limit=$most
    local cmd=("$PY" -m pytest "${args[@]}")
    {
        echo "# gpu_check mode=$MODE started $(date -u +%Y-%m-%dT%H:%M:%SZ) timeout ${limit}s"
        echo "# gpu_check selection: $selection"
        echo "# ${COMPRESSKV_GPU_TESTS_ON:+COMPRESSKV_GPU_TESTS_ON=$COMPRESSKV_GPU_TESTS_ON }$(quoted "${cmd[@]}")"
    } >"$PYLOG"
    say "   $(quoted "${cmd[@]}")"
    timeout -k 10 "$limit" "${cmd[@]}" 2>&1 | tee -a "$PYLOG"
    local rc=${PIPESTATUS[0]}
    echo "# gpu_check pytest exit=$rc" >>"$PYLOG"
    local line
    line=$(pytest_summary_line "$PYLOG")
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        line="TIMEOUT after ${limit}s${line:+ ($line)}; see gpu_pytest.log for how far it got"
        FAILED=1
    elif [ "$rc" != 0 ]; then
        line="${line:-no summary line}; exit $rc"
        FAILED=1
    fi
    say "   pytest: $line"
    note "pytest: $line (ran now, ${SECONDS}s into the check)"
}

step_benchmark() {
    say "4. benchmarks/gpu_long_context.py --out \$OUT/$STEM"
    if [ ! -f "$OUT/$STEM.json" ] && [ -n "$RESULTS" ] && [ -f "$RESULTS/$STEM.json" ]; then
        cp "$RESULTS/$STEM.json" "$OUT/$STEM.json"
        [ -f "$RESULTS/$STEM.md" ] && cp "$RESULTS/$STEM.md" "$OUT/$STEM.md"
        say "   resuming from $RESULTS/$STEM.json (configurations there are skipped)"
        note "benchmark: resumed from $RESULTS/$STEM.json"
    elif [ -f "$OUT/$STEM.json" ]; then
        say "   resuming from $OUT/$STEM.json"
        note "benchmark: resumed from $OUT/$STEM.json"
    fi
    local force=()
    [ "$FORCE_BENCH" = 1 ] && force=(--force)
    local stage shapes contexts remaining budget
    for stage in "${STAGES[@]}"; do
        shapes=${stage%%|*}
        contexts=${stage#*|}
        remaining=$(left)
        if [ "$remaining" -lt "$MIN_STAGE" ]; then
            say "   $shapes ${contexts:-default contexts}: not started, ${remaining}s left"
            note "benchmark $shapes ${contexts:-default contexts}: not started (${remaining}s left of the ${BUDGET}s budget)"
            continue
        fi
        budget=$((remaining - BENCH_STARTUP))
        local cmd=("$PY" benchmarks/gpu_long_context.py ${BENCH_FLAGS[@]+"${BENCH_FLAGS[@]}"} --shapes "$shapes")
        [ -n "$contexts" ] && cmd+=(--contexts "$contexts")
        cmd+=(--out "$OUT/$STEM" --time-budget "$budget" ${force[@]+"${force[@]}"})
        say "   $(quoted "${cmd[@]}")   (hard limit ${remaining}s)"
        local tmp
        tmp=$(mktemp)
        timeout -s INT -k 10 "$remaining" "${cmd[@]}" 2>&1 | tee "$tmp"
        local rc=${PIPESTATUS[0]}
        local outcome
        if [ "$rc" = 124 ] || [ "$rc" = 137 ] || [ "$rc" = 130 ]; then
            outcome="stopped at the time limit (${remaining}s); finished configurations are saved"
        elif [ "$rc" != 0 ]; then
            outcome="failed, exit $rc (see gpu_check.log)"
            FAILED=1
        elif grep -q ": nothing to do$" "$tmp" && ! grep -qE ": DynamicCache$" "$tmp"; then
            outcome="nothing to do (every configuration already measured)"
        elif grep -q "time budget reached" "$tmp"; then
            outcome="time budget reached: run again to continue"
        else
            outcome="complete"
        fi
        rm -f "$tmp"
        say "   $shapes ${contexts:-default contexts}: $outcome"
        note "benchmark $shapes ${contexts:-default contexts}: $outcome"
    done
    if [ -f "$OUT/$STEM.json" ]; then
        "$PY" - "$OUT/$STEM.json" <<'EOF' >>"$SUMMARY" 2>&1
import collections, json, sys
results = json.load(open(sys.argv[1]))
rows = results["rows"]
status = collections.Counter(r.get("status") for r in rows if r["method"] != "dynamic")
print(f"benchmark results: {len(rows)} rows ({', '.join(f'{n} {s}' for s, n in sorted(status.items()))}) "
      f"over {len(results['runs'])} runs; shapes/contexts: "
      + ", ".join(sorted({f"{r['shape']} {r['context']}" for r in rows})))
for t in results.get("targets", []):
    print(f"target: {t['result']}: {t['target']}")
EOF
    fi
}

finish() {
    local files
    files=$(find "$OUT" -mindepth 1 -maxdepth 1 -type f | wc -l)
    local dirs
    dirs=$(find "$OUT" -mindepth 1 -type d | wc -l)
    note "files in \$OUT: $files, folders: $dirs; elapsed ${SECONDS}s of the ${BUDGET}s budget"
    say "5. done in ${SECONDS}s (budget ${BUDGET}s); $OUT holds $files files:"
    ls -l "$OUT"
    if [ "$files" -gt 8 ] || [ "$dirs" -gt 0 ]; then
        say "   WARNING: the device tool brings back at most 8 files, flat"
    fi
    echo
    echo "--- summary ($SUMMARY) ---"
    cat "$SUMMARY"
    echo
    if [ "$STOPPED" = 1 ]; then
        echo "The check stopped before the tests (see above): nothing to commit."
    elif [ "$DRY_RUN" = 1 ]; then
        echo "Dry run: these files check the script, they are not GPU results; do not copy them into"
        echo "benchmarks/results/ (the dry run's evidence is kept in benchmarks/results/gpu_check_dryrun/)."
    else
        echo "Next: copy these files into the checkout and commit them (a later run resumes from them):"
        echo "  cp $OUT/* benchmarks/results/"
        echo "  git add benchmarks/results/gpu.json benchmarks/results/gpu.md benchmarks/results/gpu_pytest.log \\"
        echo "          benchmarks/results/gpu_check.log benchmarks/results/gpu_check_summary.txt"
        echo "  git commit -m 'GPU check on <device>: <pytest summary>; gpu_long_context <progress>'"
        echo "(with the device tool the files come back under its files_at folder: copy them from there.)"
        echo "If a benchmark stage was stopped by the time limit, run bash benchmarks/gpu_check.sh again after"
        echo "committing: it skips the passed tests and the measured configurations."
    fi
}

main() {
    SECONDS=0
    : >"$SUMMARY"
    PY=$(pick_python)
    note "gpu_check mode=$MODE $(date -u +%Y-%m-%dT%H:%M:%SZ) budget ${BUDGET}s force=$FORCE force_bench=$FORCE_BENCH"
    say "mode $MODE, out $OUT, budget ${BUDGET}s, python $PY, resume from ${RESULTS:-\$OUT only}"
    step_wheels
    if step_environment; then
        step_pytest
        step_benchmark
    else
        FAILED=1
        STOPPED=1
    fi
    finish
    return $FAILED
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
