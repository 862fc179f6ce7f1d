#!/usr/bin/env bash
# The GPU check (issue 17), one command on a CUDA machine after the README's install:
#
#     bash benchmarks/gpu_check.sh [--copy-to DIR [--overwrite]] [--skip STEP[,STEP...]]
#
# 1. preflight (gpu_preflight.py): the device, versions, Triton importable, the kernels compiled
#    (TRITON_INTERPRET is unset here), each op once through Triton against the CPU torch path;
# 2. configs (gpu_configs.py): every configuration benchmarks/triton_aot.py compiles ahead of
#    time, launched through its public call at 128^3, checked against float64 and timed against
#    the torch path; a launch the AOT enumeration did not compile fails it (they drifted);
# 3. tests/kernels on CUDA: the tests pick CUDA themselves when torch sees it (tests/conftest.py
#    sets TRITON_INTERPRET only without CUDA), so the Triton tests run compiled kernels;
# 4. the GPU benchmarks at GPU sizes (256^3 and 512^3), each writing
#    benchmarks/results/<bench>-<device>.md with every time as a fraction of its counted floor;
#    not run here: bench_busy.py and bench_live.py, CPU / napari benchmarks (a busy CPU, the GUI);
# 5. the summary (gpu_summary.py): benchmarks/results/gpu-check-<device>.md, printed last.
#
# Every step runs under `timeout`, capped by what is left of a budget (GPU_CHECK_BUDGET_S,
# default 440 s) so that the whole check ends within 8 minutes; a step with under 20 s left is
# not run (and fails the check). Step logs go to a temporary folder (named at the start);
# --copy-to DIR copies them and this run's results files there (e.g. $OUT on a lent machine); it
# must be empty or new unless --overwrite (nothing already there is replaced otherwise);
# --skip leaves steps out on purpose (e.g. bench-batch where zarr/dask are not installed): the
# summary lists them as skipped, not failed.
# Exit status: 0 all passed, 1 something failed, 2 no CUDA device or no torch (nothing written).
# PYTHON picks the interpreter (default: python, else python3); the checkout's src/ and kernels/
# come first on PYTHONPATH, so this checkout's code is what gets checked.

set -u
CALLER_DIR=$PWD
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

COPY_TO=""
OVERWRITE=0
SKIP=","
while [ $# -gt 0 ]; do
    case "$1" in
        --copy-to)
            [ $# -ge 2 ] || { echo "gpu_check: --copy-to needs a folder" >&2; exit 2; }
            case "$2" in /*) COPY_TO=$2 ;; *) COPY_TO=$CALLER_DIR/$2 ;; esac
            shift 2
            ;;
        --overwrite)
            OVERWRITE=1
            shift
            ;;
        --skip)
            [ $# -ge 2 ] || { echo "gpu_check: --skip needs step names" >&2; exit 2; }
            SKIP="$SKIP$2,"
            shift 2
            ;;
        -h | --help)
            sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "gpu_check: unknown argument '$1' (see --help)" >&2
            exit 2
            ;;
    esac
done

# --copy-to never replaces what is already in the folder, unless --overwrite.
if [ -n "$COPY_TO" ] && [ "$OVERWRITE" = 0 ] && [ -d "$COPY_TO" ] &&
    [ -n "$(ls -A "$COPY_TO" 2>/dev/null)" ]; then
    echo "gpu_check: --copy-to folder '$COPY_TO' is not empty; give an empty or new folder, or add --overwrite" >&2
    exit 2
fi

PY=${PYTHON:-$(command -v python || command -v python3 || true)}
if [ -z "$PY" ]; then
    echo "gpu_check: no python found; activate the README's environment or set PYTHON" >&2
    exit 2
fi
unset TRITON_INTERPRET
export PYTHONPATH="$ROOT/src:$ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"

# Without CUDA: fail fast and cleanly, before anything is written.
cuda_rc=0
cuda_err=$("$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)' 2>&1) ||
    cuda_rc=$?
if [ "$cuda_rc" = 3 ]; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a GPU machine after the README's install" >&2
    exit 2
elif [ "$cuda_rc" != 0 ]; then
    echo "gpu_check: '$PY' cannot import torch ($(printf '%s\n' "$cuda_err" | tail -n 1)); install as the README says, or set PYTHON" >&2
    exit 2
fi

BUDGET_S=${GPU_CHECK_BUDGET_S:-440}
MIN_STEP_S=20
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
touch "$LOGS/.start"
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
: >"$LOGS/steps.tsv"
echo "gpu_check: $("$PY" --version 2>&1) at $PY; logs in $LOGS; budget $BUDGET_S s"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader \
        >"$LOGS/nvidia-smi.txt" 2>&1 || true
    cat "$LOGS/nvidia-smi.txt"
fi

# step NAME TIMEOUT_S RESULTS_GLOB COMMAND...: run COMMAND under timeout, log, record a line.
step() {
    local name=$1 limit=$2 expect=$3
    shift 3
    local left=$((DEADLINE - $(date +%s)))
    if [[ "$SKIP" == *",$name,"* ]]; then
        echo "== $name: skipped (--skip)"
        printf '%s\tskip\t0\t0\t%s\t%s\n' "$name" "$expect" "$*" >>"$LOGS/steps.tsv"
        return
    fi
    if [ "$left" -lt "$MIN_STEP_S" ]; then
        echo "== $name: NOT RUN, ${left} s left of the budget"
        printf '%s\t-\t0\t0\t%s\t%s\n' "$name" "$expect" "$*" >>"$LOGS/steps.tsv"
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (timeout ${limit} s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    local took=$(($(date +%s) - t0))
    tail -n 4 "$LOGS/$name.log" | sed 's/^/   | /'
    echo "   -> exit $rc after ${took} s"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$limit" "$expect" "$*" >>"$LOGS/steps.tsv"
}

PYTEST_OPTS=()
if "$PY" -c 'import xdist' 2>/dev/null; then
    PYTEST_OPTS+=(-n 4) # the Triton compiles dominate: four processes share them out
fi
if ! "$PY" -c 'import pydantic' 2>/dev/null; then
    # pyproject.toml's filterwarnings names a pydantic warning class (for napari's tests); on a
    # bare GPU image without napari pytest could not resolve it: keep only "error" there.
    PYTEST_OPTS+=(-o filterwarnings=error)
fi

# The numbers are timeouts (s). Expected on an H200 (estimates, not yet measured; each benchmark
# worker is a fresh interpreter, ~2-3 s of start-up, and each new Triton specialisation compiles
# once, ~1-2 s): preflight ~10, configs ~50 (40 calls, ~45 compiles), kernel tests 60-120 (519
# tests, ~60 Triton compiles; faster with pytest-xdist), mlp ~50 (16 workers), pac ~75 (22),
# unpool ~40 (13), pipeline ~70 (6 segment() runs at 256^3 and 512^3), quality ~35 (sample + one
# seed, RF skipped: it is a CPU baseline), batch ~45 (segment_zarr of 512^3, 4 schedulers):
# ~450 s at the high estimates, over the 440 s budget, so the steps run in order of importance
# and what the budget cuts is the least central (batch).
step preflight 60 - \
    "$PY" benchmarks/gpu_preflight.py --json "$LOGS/preflight.json"
step configs 90 'configs-<device>.md' \
    "$PY" benchmarks/gpu_configs.py --device cuda --size 128 --repeats 3
step kernel-tests 170 - \
    "$PY" -m pytest tests/kernels -q -rs -p no:xvfb -p no:cacheprovider \
    ${PYTEST_OPTS[@]+"${PYTEST_OPTS[@]}"} --junitxml="$LOGS/kernel-tests-junit.xml"
step bench-mlp 100 'mlp-<device>.md' \
    "$PY" benchmarks/bench_mlp.py --device cuda --size 256 512 --widths 16 64 256
step bench-pac 120 'pac-<device>.md' \
    "$PY" benchmarks/bench_pac.py --device cuda --sizes 256 512 --channels 4 16 --kernels 3 5
step bench-unpool 75 'unpool-<device>.md' \
    "$PY" benchmarks/bench_unpool.py --device cuda --sizes 256 512 --channels 16 --kernels 2 4
step bench-pipeline 120 'pipeline-<device>.md' \
    "$PY" benchmarks/bench_pipeline.py --device cuda --size 256 512 --repeats 1
step bench-quality 90 'quality-<device>.md' \
    "$PY" benchmarks/bench_quality.py --device cuda --skip-rf --seeds 11 --repeats 2
step bench-batch 90 'batch-<device>.md' \
    "$PY" benchmarks/bench_batch.py --device cuda --depth 512 --height 512 --width 512

"$PY" benchmarks/gpu_summary.py --logs "$LOGS" --budget "$BUDGET_S" >"$LOGS/summary.log" 2>&1
status=$?
cat "$LOGS/summary.log"
[ "$status" = 0 ] || [ "$status" = 1 ] || status=1

if [ -n "$COPY_TO" ]; then
    mkdir -p "$COPY_TO/gpu-check-logs" &&
        cp -r "$LOGS"/. "$COPY_TO/gpu-check-logs/" &&
        find benchmarks/results -maxdepth 1 -name '*.md' -newer "$LOGS/.start" \
            -exec cp {} "$COPY_TO/" \; &&
        echo "gpu_check: logs and this run's results copied to $COPY_TO"
fi
echo "gpu_check: $([ "$status" = 0 ] && echo PASS || echo FAIL) in $(($(date +%s) - START)) s; logs in $LOGS"
exit "$status"
