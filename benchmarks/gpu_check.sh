#!/usr/bin/env bash
# The one prepared GPU command (shared/GPU.md): versions, ceilings, GPU tests, benchmarks -> OUTDIR/results.{json,md}
#
#   bash benchmarks/gpu_check.sh OUTDIR            on the GPU machine, after
#                                                  python3 -m pip install --no-deps --no-build-isolation -e .
#   bash benchmarks/gpu_check.sh OUTDIR --dry-run  on any CPU machine: every step, tiny sizes, no CUDA, tests only
#                                                  collected (CI runs this so a typo never costs GPU time)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh ...   another interpreter (default: python3)
#
# Steps (each bounded by `timeout`; a failing or timed-out step is recorded and the next one still runs):
#   1 env        GPU name, torch / triton / CUDA versions
#   2 ceilings   device-to-device copy GB/s and bf16 matmul TFLOP/s, measured in this run
#   3 gpu_tests  python -m pytest -m gpu -q tests (bf16 numerics, torch.compile fullgraph, CUDA graphs)
#   4 kernels    patfast bench kernels: eager / torch.compile / Triton, fwd and fwd+bwd, PAT shapes, B 64/128/256
#                (HCL, KD, and RAA whole block + core, which also times SDPA with the flash / cuDNN backend pinned;
#                the dry run takes Triton RAA through the interpreter once per case and mode, untimed, like HCL/KD)
#   5 data       patfast bench data: loader-only img/s of the torch, dali and gpu backends on digits at 224, B 128,
#                beside the img/s an (eager, bf16) Swin-T -> ResNet18 PAT step consumes; the GPU machine has no
#                DALI (and no network to install it): its row says "not measured: not installed"
#   6 e2e        patfast bench train per pair at 224, B 128: fast path (compiled, bf16) vs reference path (eager, fp16
#                + scaler) vs floor (teacher + student passes alone, compiled), peak memory, time split; pairs in
#                order Swin-T -> ResNet18 (the target), ConvNeXt-T -> DeiT-T, ViT-S -> MobileNetV2; no new pair is
#                started after E2E_BUDGET s (the rest are reported not measured)
# results.json and results.md are rewritten after every step, so a run cut short still leaves what it measured;
# OUTDIR/gpu_check.log holds the whole output. Exit status 0 when every step ran cleanly, else 1 (results written).
# Expected on an H100: env ~5 s, ceilings ~10 s, gpu_tests ~1-2 min, kernels ~2 min (compiling the torch.compile
# reference is the expensive part: it is timed at B=128 only and stops starting new shapes after KERNELS_BUDGET s),
# data ~30 s, e2e ~1.5-3 min per pair (compilation). Worst case, every step running into its timeout:
# 25 + 40 + 120 + 140 + 60 + 180 = 565 s (each limit can be overridden: ENV_TIMEOUT, CEILINGS_TIMEOUT,
# TESTS_TIMEOUT, KERNELS_TIMEOUT, KERNELS_BUDGET, DATA_TIMEOUT, E2E_TIMEOUT, E2E_BUDGET;
# GPU_CHECK_KERNEL_ARGS adds flags to `patfast bench kernels`, e.g. "--quick"; GPU_CHECK_DATA_ARGS to
# `bench data`, GPU_CHECK_E2E_ARGS to `bench train`).
set -euo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
OUT=""
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) usage ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; usage ;;
        *) [[ -z "$OUT" ]] || usage; OUT="$arg" ;;
    esac
done
[[ -n "$OUT" ]] || usage

PY="${PYTHON:-python3}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PARTS="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
cd "$ROOT"
export PYTHONUNBUFFERED=1
exec 3>&1 4>&2
exec > >(tee "$OUT/gpu_check.log") 2>&1   # the whole output also lands in OUTDIR/gpu_check.log
TEE_PID=$!
finish() {  # let tee drain before the script ends (the last lines are the results table)
    exec 1>&3 2>&4 3>&- 4>&-
    wait "$TEE_PID" 2>/dev/null || true
    rm -rf "$PARTS"
}
trap finish EXIT

ENV_TIMEOUT="${ENV_TIMEOUT:-25}"
CEILINGS_TIMEOUT="${CEILINGS_TIMEOUT:-40}"
TESTS_TIMEOUT="${TESTS_TIMEOUT:-120}"
KERNELS_TIMEOUT="${KERNELS_TIMEOUT:-140}"
KERNELS_BUDGET="${KERNELS_BUDGET:-80}"   # seconds after which no new torch.compile shape is started
DATA_TIMEOUT="${DATA_TIMEOUT:-60}"
E2E_TIMEOUT="${E2E_TIMEOUT:-180}"
E2E_BUDGET="${E2E_BUDGET:-90}"   # seconds into the e2e step after which no new pair is started
E2E_PAIRS=(swin_tiny_patch4_window7_224,resnet18 convnext_tiny,deit_tiny_patch16_224 vit_small_patch16_224,mobilenetv2_100)
E2E_FLAGS=(--img-size 224 --batch-size 128 --steps 10 --warmup 4)
read -r -a EXTRA_E2E_FLAGS <<<"${GPU_CHECK_E2E_ARGS:-}"   # e.g. GPU_CHECK_E2E_ARGS="--no-split"
E2E_FLAGS+=("${EXTRA_E2E_FLAGS[@]}")

MERGE_FLAGS=()
CEILINGS_FLAGS=()
KERNEL_FLAGS=(--budget "$KERNELS_BUDGET")
DATA_FLAGS=(--data digits --data-backend all --img-size 224 --batch-size 128 --no-progress)
read -r -a EXTRA_DATA_FLAGS <<<"${GPU_CHECK_DATA_ARGS:-}"   # e.g. GPU_CHECK_DATA_ARGS="--batches 10"
DATA_FLAGS+=("${EXTRA_DATA_FLAGS[@]}")
read -r -a EXTRA_KERNEL_FLAGS <<<"${GPU_CHECK_KERNEL_ARGS:-}"   # e.g. GPU_CHECK_KERNEL_ARGS="--quick"
KERNEL_FLAGS+=("${EXTRA_KERNEL_FLAGS[@]}")
if (( DRY )); then
    # No CUDA whatever the machine has; Triton through its interpreter (the harness is checked, nothing timed).
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    MERGE_FLAGS+=(--dry-run)
    CEILINGS_FLAGS+=(--dry-run)
    KERNEL_FLAGS+=(--interpret-check)
    DATA_FLAGS+=(--dry-run)
    E2E_PAIRS=(dry-run,dry-run)   # --dry-run picks its own tiny pair
    E2E_FLAGS=(--dry-run "${EXTRA_E2E_FLAGS[@]}")
else
    unset TRITON_INTERPRET
fi

FAILED=()
# run_step NAME TIMEOUT_S CMD...: run, log, record exit status and seconds; never abort the script.
run_step() {
    local name="$1" limit="$2" rc=0 start
    shift 2
    echo
    echo "=== gpu_check: $name ($(date -u +%H:%M:%S), limit ${limit} s) ==="
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >>"$PARTS/steps.tsv"
    if (( rc != 0 )); then
        local why="exit $rc"
        if (( rc == 124 )); then why+=", timed out after ${limit} s"; fi
        FAILED+=("$name ($why)")
        echo "=== gpu_check: $name FAILED with exit status $rc ==="
    fi
    "$PY" -m patfast.bench.results merge --parts "$PARTS" --out "$OUT" --quiet "${MERGE_FLAGS[@]}" \
        || echo "=== gpu_check: writing results after $name failed ==="
}

if (( DRY )); then MODE="DRY RUN (CPU, tiny sizes)"; else MODE="GPU run"; fi
echo "gpu_check: $MODE -> $OUT, python: $PY"

# 1. GPU name and versions
if (( ! DRY )) && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
fi
run_step env "$ENV_TIMEOUT" "$PY" -m patfast.bench.results env --json "$PARTS/env.json"

# 2. Ceilings of this run: copy bandwidth and bf16 matmul rate
run_step ceilings "$CEILINGS_TIMEOUT" "$PY" -m patfast.bench.ceilings --json "$PARTS/ceilings.json" \
    "${CEILINGS_FLAGS[@]}"

# 3. GPU tests (a failure is recorded, the benchmarks still run)
TEST_CMD=("$PY" -m pytest -m gpu -q tests -p no:cacheprovider)
if (( DRY )); then
    TEST_CMD+=(--collect-only)
else
    TEST_CMD+=(--junitxml "$PARTS/gpu_tests.xml")
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then TEST_CMD+=(--timeout 120); fi
fi
run_step gpu_tests "$TESTS_TIMEOUT" bash -c '"$@" 2>&1 | tee "'"$PARTS"'/gpu_tests.log"; exit "${PIPESTATUS[0]}"' \
    _ "${TEST_CMD[@]}"
tests_rc="$(tail -n 1 "$PARTS/steps.tsv" | cut -f 2)"
GPU_TEST_FLAGS=(--rc "$tests_rc" --log "$PARTS/gpu_tests.log" --timeout "$TESTS_TIMEOUT")
if (( DRY )); then
    GPU_TEST_FLAGS+=(--collect-only --pytest-command "python -m pytest -m gpu -q tests --collect-only")
else
    GPU_TEST_FLAGS+=(--junit "$PARTS/gpu_tests.xml" --pytest-command "python -m pytest -m gpu -q tests")
fi
"$PY" -m patfast.bench.results gpu-tests "${GPU_TEST_FLAGS[@]}" --json "$PARTS/gpu_tests.json" \
    || FAILED+=("gpu_tests (reading the results)")

# 4. Kernel benchmarks (writes its JSON after every row: a timeout keeps what was measured); the ceilings of step 2,
#    or, if that step failed, measured again by the benchmark itself
if [[ -s "$PARTS/ceilings.json" ]]; then KERNEL_FLAGS+=(--ceilings "$PARTS/ceilings.json"); fi
run_step kernels "$KERNELS_TIMEOUT" "$PY" -m patfast bench kernels --json "$PARTS/kernels.json" "${KERNEL_FLAGS[@]}"

# 5. Data loaders (torch, dali, gpu) beside the PAT step rate
run_step data "$DATA_TIMEOUT" "$PY" -m patfast bench data --json "$PARTS/data.json" "${DATA_FLAGS[@]}"
# 6. End-to-end train step, one `patfast bench train` per pair (each writes e2e_N.json; merge lists them under
#    "e2e"); pairs not started within E2E_BUDGET s are written as not measured
run_step e2e "$E2E_TIMEOUT" bash -c '
    start=$(date +%s); n=0; py="$1"; budget="$2"; parts="$3"; shift 3
    flags=(); while [[ "$1" != "--" ]]; do flags+=("$1"); shift; done; shift
    rc=0
    for pair in "$@"; do
        n=$((n + 1))
        if (( $(date +%s) - start > budget )); then
            "$py" -m patfast.bench.results e2e-skipped --pair "$pair" --why "not started: past E2E_BUDGET=${budget} s"                 --json "$parts/e2e_$n.json" || rc=1
            continue
        fi
        "$py" -m patfast bench train --teacher "${pair%%,*}" --student "${pair##*,}" "${flags[@]}"             --json "$parts/e2e_$n.json" || rc=1
    done
    exit $rc' _ "$PY" "$E2E_BUDGET" "$PARTS" "${E2E_FLAGS[@]}" -- "${E2E_PAIRS[@]}"

# Final results: results.json + results.md in OUTDIR, the markdown printed last.
echo
echo "=== gpu_check: results ($OUT/results.json, $OUT/results.md) ==="
"$PY" -m patfast.bench.results merge --parts "$PARTS" --out "$OUT" "${MERGE_FLAGS[@]}"
if (( ${#FAILED[@]} )); then
    echo "gpu_check: steps that failed: ${FAILED[*]}"
    exit 1
fi
echo "gpu_check: all steps ran"
