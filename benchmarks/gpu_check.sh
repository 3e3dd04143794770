#!/usr/bin/env bash
# The one prepared GPU command (shared/GPU.md): versions, ceilings, end-to-end step, kernels, GPU tests, data loaders
# -> OUTDIR/results.json and OUTDIR/results.md
#
#   bash benchmarks/gpu_check.sh OUTDIR [--install]     on the GPU machine; --install first runs
#                                                      python3 -m pip install --no-deps --no-build-isolation -e .
#   bash benchmarks/gpu_check.sh OUTDIR --dry-run       on any CPU machine: every step at tiny sizes, no CUDA, the
#                                                      Triton ops through the interpreter, the GPU tests collected
#                                                      only (CI runs this: a typo never costs GPU time)
#   bash benchmarks/gpu_check.sh OUTDIR --only STEP[,STEP...]   rerun some steps into the same OUTDIR; the other
#                                                      steps' earlier results are kept
#   bash benchmarks/gpu_check.sh --budget [--only ...] print the time budget table and exit (1 if over budget)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh ...     another interpreter (default: python3)
#
# Steps, most important figure first (each bounded by `timeout`; a step that fails or times out is recorded and
# the next one still runs):
#   env         GPU name; torch / triton / CUDA versions; `pip show timm setuptools wheel` (the image's packaging)
#   ceilings    device-to-device copy GB/s and bf16 matmul TFLOP/s, measured in this run: every bandwidth below
#               is a fraction of this copy, so it comes before any of them
#   e2e_target  patfast bench train, Swin-T -> ResNet18 at 224, B 128: fast path (compiled, bf16) vs reference
#               path (eager, fp16 + scaler) vs floor, peak memory, time split. Issue #6's figure, and the step most
#               at risk (compilation is most of it), so it runs while the whole budget is still ahead; its paths
#               are written as each finishes (fast, reference, floor), so a cut-off still keeps fast vs reference
#   kernels_hcl, kernels_raa, kernels_kd   patfast bench kernels --op hcl / raa / kd (issues #3, #4): eager,
#               torch.compile, SDPA (RAA), Triton, fwd and fwd+bwd, PAT shapes, B 64/128/256, target cases first;
#               one process each, so a kernel that breaks the CUDA context cannot take the other ops with it
#   gpu_tests   python -m pytest -m gpu -v tests: bf16 numerics, torch.compile fullgraph, CUDA graphs, the fast
#               path on CUDA. Checks, not figures; the report (benchmarks/pytest_report.py) is rewritten after
#               every test, so a timeout still gives the counts of what ran and the test that was running
#   data        patfast bench data: loader img/s of the torch, dali, gpu backends beside the PAT step rate (one
#               figure; no DALI on the GPU machine: "not measured: not installed")
#   e2e_others  the other pairs, ConvNeXt-T -> DeiT-T, ViT-S -> MobileNetV2: least important, and each needs a
#               compilation (~E2E_PAIR_S s), so they come last and get the budget the steps before left unused;
#               a pair is started only if E2E_PAIR_S s are left, else "not measured: past the budget"
#
# Budget (d): the limits below plus the install (INSTALL_TIMEOUT, also when it ran before the script) and the
# Python start-ups outside the steps (OVERHEAD_S: import check, a merge after each step, the last kill grace)
# must total at most GPU_CHECK_BUDGET_MAX = 420 s, leaving a 600-s command room for a rerun; every run prints
# the table and refuses to start over budget. Limits (s), each overridable by its variable:
#   INSTALL_TIMEOUT 30, ENV_TIMEOUT 15, CEILINGS_TIMEOUT 15, E2E_TARGET_TIMEOUT 150, KERNELS_HCL_TIMEOUT 35,
#   KERNELS_RAA_TIMEOUT 30, KERNELS_KD_TIMEOUT 25, TESTS_TIMEOUT 55, DATA_TIMEOUT 20, E2E_OTHERS_TIMEOUT 30,
#   OVERHEAD_S 10  (total 415 s); e2e_others also gets what the steps before it left unused, within the total
# Inside steps: KERNELS_RESERVE (15 s: no new torch.compile shape after limit - reserve), E2E_PAIR_S (90 s).
# --dry-run checks this table the same way but runs each step under max(its limit, DRY_STEP_TIMEOUT = 300 s),
# with one OpenMP thread (OMP_NUM_THREADS=1: a shared 2-core machine).
# GPU_CHECK_KERNEL_ARGS, GPU_CHECK_DATA_ARGS, GPU_CHECK_E2E_ARGS add flags to bench kernels / data / train.
#
# Files in OUTDIR (the GPU machine returns at most 8): results.json, results.md, gpu_check.log (appended by every
# run), parts.json (each step's raw output and exit status: what --only keeps) and, while a step runs, its output
# in inflight/ (rewritten as it measures; folded into parts.json by the merge after the step, or by the next run
# if this one was killed). A row whose code raised is FAILED in results.md, with the exception, and fails its step.
# Exit status: 0 when every step of this run ran cleanly; 1 if any FAILED or timed out; 2 on a usage error.
#
# patfast must import from this checkout: if `import patfast` (from outside the checkout) does not resolve here,
# e.g. because the editable install failed (setuptools without `wheel` cannot build it with --no-build-isolation),
# the script says so and falls back to this checkout through PYTHONPATH (a generated sitecustomize maps patfast and
# patfast.kernels to it, as the editable install does); results.md records which.
set -euo pipefail

usage() {
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run] [--install] [--only STEP[,STEP...]]" >&2
    echo "       bash benchmarks/gpu_check.sh --budget [--only STEP[,STEP...]]" >&2
    exit 2
}

STEPS=(env ceilings e2e_target kernels_hcl kernels_raa kernels_kd gpu_tests data e2e_others)
declare -A LIMIT=(
    [env]="${ENV_TIMEOUT:-15}" [ceilings]="${CEILINGS_TIMEOUT:-15}" [e2e_target]="${E2E_TARGET_TIMEOUT:-150}"
    [kernels_hcl]="${KERNELS_HCL_TIMEOUT:-35}" [kernels_raa]="${KERNELS_RAA_TIMEOUT:-30}"
    [kernels_kd]="${KERNELS_KD_TIMEOUT:-25}" [gpu_tests]="${TESTS_TIMEOUT:-55}" [data]="${DATA_TIMEOUT:-20}"
    [e2e_others]="${E2E_OTHERS_TIMEOUT:-30}"
)
INSTALL_S="${INSTALL_TIMEOUT:-30}"
OVERHEAD_S="${OVERHEAD_S:-10}"
BUDGET_MAX="${GPU_CHECK_BUDGET_MAX:-420}"
KILL_GRACE=5   # seconds between timeout's SIGTERM and its SIGKILL (counted in OVERHEAD_S)
DRY_STEP_TIMEOUT="${DRY_STEP_TIMEOUT:-300}"   # --dry-run: a step runs under max(its limit, this) on the CPU
KERNELS_RESERVE="${KERNELS_RESERVE:-15}"   # no new torch.compile shape in the last KERNELS_RESERVE s of a kernel step
E2E_PAIR_S="${E2E_PAIR_S:-90}"   # an e2e_others pair starts only with this many seconds of the step left

RUN_START=$(date +%s)
OUT="" DRY=0 INSTALL=0 BUDGET_ONLY=0 ONLY=""
while (( $# )); do
    case "$1" in
        --dry-run) DRY=1 ;;
        --install) INSTALL=1 ;;
        --budget) BUDGET_ONLY=1 ;;
        --only) [[ $# -ge 2 ]] || usage; ONLY="$2"; shift ;;
        --only=*) ONLY="${1#--only=}" ;;
        -h|--help) usage ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
        *) [[ -z "$OUT" ]] || usage; OUT="$1" ;;
    esac
    shift
done
(( BUDGET_ONLY )) || [[ -n "$OUT" ]] || usage
for name in "${STEPS[@]}" INSTALL_S OVERHEAD_S BUDGET_MAX DRY_STEP_TIMEOUT KERNELS_RESERVE E2E_PAIR_S; do
    value="${LIMIT[$name]:-${!name:-}}"
    [[ "$value" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: the time (s) of $name must be whole seconds, got '$value'" >&2
                                    exit 2; }
done

SELECTED=()   # the steps this run runs, in the script's order
if [[ -n "$ONLY" ]]; then
    IFS=, read -r -a wanted <<<"$ONLY"
    for name in "${wanted[@]}"; do
        [[ " ${STEPS[*]} " == *" $name "* ]] || { echo "gpu_check.sh: --only: unknown step '$name' (steps:" \
                                                      "${STEPS[*]})" >&2; exit 2; }
    done
    for name in "${STEPS[@]}"; do [[ ",$ONLY," == *",$name,"* ]] && SELECTED+=("$name"); done
else
    SELECTED=("${STEPS[@]}")
fi
want() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }

BUDGET_TOTAL=$((INSTALL_S + OVERHEAD_S))
for name in "${SELECTED[@]}"; do BUDGET_TOTAL=$((BUDGET_TOTAL + LIMIT[$name])); done
print_budget() {
    local cum=$INSTALL_S name
    echo "gpu_check budget (s): the step limits, the install and the start-ups outside the steps"
    printf '  %-12s %8s %13s\n' step "limit s" "cumulative s"
    printf '  %-12s %8s %13s  %s\n' install "$INSTALL_S" "$cum" \
        "$( (( INSTALL )) && echo "(--install)" || echo "(pip install -e ., before the script)")"
    for name in "${SELECTED[@]}"; do
        cum=$((cum + LIMIT[$name]))
        printf '  %-12s %8s %13s\n' "$name" "${LIMIT[$name]}" "$cum"
    done
    cum=$((cum + OVERHEAD_S))
    printf '  %-12s %8s %13s  %s\n' overhead "$OVERHEAD_S" "$cum" "(import check, merges, the last kill grace)"
    printf '  %-12s %8s %13s  (at most %s s)\n' total "$BUDGET_TOTAL" "" "$BUDGET_MAX"
}
if (( BUDGET_ONLY )); then
    print_budget
    (( BUDGET_TOTAL <= BUDGET_MAX )) || { echo "gpu_check: over budget: $BUDGET_TOTAL s > $BUDGET_MAX s"; exit 1; }
    exit 0
fi

PY="${PYTHON:-python3}"
if [[ "$PY" == */* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi  # steps change directory
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
export GPU_CHECK_PY="$ROOT/benchmarks/gpu_check.py"   # the run's store, results.json / results.md, the summary
mkdir -p "$OUT/inflight"
OUT="$(cd "$OUT" && pwd -P)"
PARTS="$OUT/inflight"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
cd "$ROOT"
export PYTHONUNBUFFERED=1
exec 3>&1 4>&2
exec > >(tee -a "$OUT/gpu_check.log") 2>&1   # the whole output also lands in OUTDIR/gpu_check.log
TEE_PID=$!
finish() {  # let tee drain before the script ends (the last lines are the summary)
    exec 1>&3 2>&4 3>&- 4>&-
    wait "$TEE_PID" 2>/dev/null || true
    rm -rf "$SCRATCH"
}
trap finish EXIT

if (( DRY )); then MODE=dry-run; else MODE=gpu; fi
RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)-$$"
echo
echo "=== gpu_check: $MODE run $RUN_ID -> $OUT, python: $PY, steps: ${SELECTED[*]} ==="
print_budget
if (( BUDGET_TOTAL > BUDGET_MAX )); then
    echo "gpu_check: over budget: $BUDGET_TOTAL s > $BUDGET_MAX s (lower the *_TIMEOUT variables or use --only)"
    exit 1
fi
if (( DRY )); then
    echo "gpu_check: dry run: the table is the GPU run's; here each step runs under max(its limit," \
         "DRY_STEP_TIMEOUT=${DRY_STEP_TIMEOUT} s) (2 CPU cores and the Triton interpreter are slower than the GPU)"
fi

FAILED=()

# --- Setup: the install (with --install) and where patfast imports from -------------------------------------
if (( INSTALL )); then
    echo
    echo "=== gpu_check: install ($(date -u +%H:%M:%S), limit ${INSTALL_S} s) ==="
    install_rc=0
    timeout --kill-after="$KILL_GRACE" "$INSTALL_S" "$PY" -m pip install --no-deps --no-build-isolation \
        --disable-pip-version-check --no-input -e "$ROOT" || install_rc=$?
    (( install_rc == 0 )) || echo "gpu_check: the editable install failed (exit $install_rc)"
fi
patfast_home() {  # where patfast and patfast.kernels import from, seen from outside the checkout
    (cd / && "$PY" -c 'import os, patfast, patfast.kernels as k
print(os.path.dirname(os.path.realpath(patfast.__file__)), os.path.dirname(os.path.realpath(k.__file__)))' \
        2>&1 | tail -n 1) || true
}
home="$(patfast_home)"
if [[ "$home" == "$ROOT/patfast $ROOT/kernels" ]]; then
    IMPORT_NOTE="this checkout ($ROOT), installed"
else
    why="'import patfast' from outside the checkout gives: $home"
    # The fallback: patfast and patfast.kernels (which lives in kernels/) mapped to this checkout, as the
    # editable install maps them, by a sitecustomize on PYTHONPATH that then runs the image's own one, if any.
    mkdir -p "$SCRATCH/path"
    cat >"$SCRATCH/path/sitecustomize.py" <<EOF
# Written by benchmarks/gpu_check.sh: import patfast from $ROOT without an install.
import importlib.abc, importlib.machinery, importlib.util, os, sys

_DIRS = {"patfast": "$ROOT", "patfast.kernels": "$ROOT"}  # patfast -> ROOT/patfast, patfast.kernels -> ROOT/kernels


class _Checkout(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.PathFinder.find_spec(name, [_DIRS[name]]) if name in _DIRS else None


sys.meta_path.insert(0, _Checkout())
_here = os.path.dirname(os.path.abspath(__file__))
_next = importlib.machinery.PathFinder.find_spec("sitecustomize", [p for p in sys.path
                                                                   if os.path.abspath(p or ".") != _here])
if _next is not None and _next.loader is not None:
    _next.loader.exec_module(importlib.util.module_from_spec(_next))
EOF
    export PYTHONPATH="$SCRATCH/path${PYTHONPATH:+:$PYTHONPATH}"
    home="$(patfast_home)"
    if [[ "$home" == "$ROOT/patfast $ROOT/kernels" ]]; then
        IMPORT_NOTE="this checkout ($ROOT) through PYTHONPATH: FALLBACK, the install is missing or elsewhere ($why)"
        echo "gpu_check: WARNING: patfast is not installed from this checkout ($why);" \
             "falling back to PYTHONPATH (a generated sitecustomize maps patfast and patfast.kernels to $ROOT)"
    else
        IMPORT_NOTE="FAILED: patfast cannot be imported from $ROOT ($home)"
        echo "gpu_check: $IMPORT_NOTE"
        FAILED+=("setup (patfast does not import from $ROOT)")
    fi
fi
echo "gpu_check: patfast imports from $IMPORT_NOTE"

ORDER="$(IFS=,; echo "${STEPS[*]}")"
merge() {  # merge [--step NAME --rc N --seconds S --limit L]: the store and results.json / results.md
    "$PY" "$GPU_CHECK_PY" merge --out "$OUT" --order "$ORDER" --run-id "$RUN_ID" --mode "$MODE" \
        --only "${ONLY:-}" --budget "$BUDGET_TOTAL" --patfast-import "$IMPORT_NOTE" --quiet "$@"
}
merge || echo "=== gpu_check: writing results failed ==="   # folds in what a killed earlier run left in inflight/

# run_step NAME CMD...: run under the step's limit, log, record exit status and seconds; never abort the script.
run_step() {
    local name="$1" limit="${LIMIT[$1]}" rc=0 start seconds
    shift
    if (( DRY && limit < DRY_STEP_TIMEOUT )); then limit=$DRY_STEP_TIMEOUT; fi
    echo
    echo "=== gpu_check: $name ($(date -u +%H:%M:%S), limit ${limit} s) ==="
    start=$(date +%s)
    timeout --kill-after="$KILL_GRACE" "$limit" "$@" || rc=$?
    seconds=$(( $(date +%s) - start ))
    if (( rc != 0 )); then
        local why="exit $rc"
        if (( rc == 124 || rc == 137 )); then why+=", timed out after ${limit} s"; fi
        FAILED+=("$name ($why)")
        echo "=== gpu_check: $name FAILED with exit status $rc ==="
    fi
    merge --step "$name" --rc "$rc" --seconds "$seconds" --limit "$limit" \
        || { echo "=== gpu_check: writing results after $name failed ==="; FAILED+=("$name (writing results)"); }
}

# run_pairs STEP MIN_S FLAGS... -- PAIRS...: `patfast bench train` per pair into inflight/STEP_N.json. Every pair
# is first written "not reached"; a pair starts only if MIN_S s of the step's limit are left (else: not measured,
# past the budget); a bench that dies before writing its row leaves a FAILED row.
run_pairs() {
    local step="$1" min_s="$2" deadline n=0 rc=0 pair_rc left why
    shift 2
    local flags=()
    while [[ "$1" != "--" ]]; do flags+=("$1"); shift; done
    shift
    deadline=$(( $(date +%s) + LIMIT_NOW ))
    "$PY" "$GPU_CHECK_PY" e2e-row "${@/#/--pair=}" --why "not reached" --json "$PARTS/${step}_{n}.json"
    for pair in "$@"; do
        n=$((n + 1))
        left=$(( deadline - $(date +%s) ))
        if (( left < min_s )); then
            why="not started: past the budget (${left} s of the $step step left, a pair needs E2E_PAIR_S=${min_s} s;"
            why+=" rerun with --only $step and a larger ${step^^}_TIMEOUT)"
            "$PY" "$GPU_CHECK_PY" e2e-row --pair "$pair" --json "$PARTS/${step}_$n.json" --why "$why" \
                || rc=1
            continue
        fi
        rm -f "$PARTS/${step}_$n.json"
        pair_rc=0
        "$PY" -m patfast bench train --teacher "${pair%%,*}" --student "${pair##*,}" "${flags[@]}" \
            --json "$PARTS/${step}_$n.json" || pair_rc=$?
        if (( pair_rc != 0 )); then
            rc=1
            [[ -s "$PARTS/${step}_$n.json" ]] || "$PY" "$GPU_CHECK_PY" e2e-row --pair "$pair" \
                --json "$PARTS/${step}_$n.json" --failed "bench train exited with status $pair_rc before writing its row"
        fi
    done
    return $rc
}
export -f run_pairs
export PY PARTS

# --- Settings of this mode ----------------------------------------------------------------------------------
E2E_TARGET_PAIRS=(swin_tiny_patch4_window7_224,resnet18)
E2E_OTHER_PAIRS=(convnext_tiny,deit_tiny_patch16_224 vit_small_patch16_224,mobilenetv2_100)
E2E_FLAGS=(--img-size 224 --batch-size 128 --steps 10 --warmup 4)
E2E_OTHER_FLAGS=("${E2E_FLAGS[@]}")
read -r -a EXTRA_E2E_FLAGS <<<"${GPU_CHECK_E2E_ARGS:-}"   # e.g. GPU_CHECK_E2E_ARGS="--no-split"
CEILINGS_FLAGS=()
# The performance model without its compile-only builds: they would spend the kernel steps' short budgets; the
# compile-only tests give the registers and spills (GPU_CHECK_KERNEL_ARGS can't turn this back on).
KERNEL_FLAGS=(--no-model-registers)
read -r -a EXTRA_KERNEL_FLAGS <<<"${GPU_CHECK_KERNEL_ARGS:-}"   # e.g. GPU_CHECK_KERNEL_ARGS="--quick"
DATA_FLAGS=(--data digits --data-backend all --img-size 224 --batch-size 128 --no-progress)
read -r -a EXTRA_DATA_FLAGS <<<"${GPU_CHECK_DATA_ARGS:-}"   # e.g. GPU_CHECK_DATA_ARGS="--batches 10"
TEST_FLAGS=(-m gpu -v -rfE tests -p no:cacheprovider -p pytest_report
            --report-json "$PARTS/gpu_tests.json")
if (( DRY )); then
    # No CUDA whatever the machine has; the Triton ops through the interpreter (the harness is checked: every
    # interpreter run that raises is FAILED and fails its step), nothing timed is a figure of anything.
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    # One intra-op thread: on a busy 2-core machine two OpenMP threads wait on each other (seen: a tiny train
    # step 10 s instead of 0.15 s); nothing a dry run times is a figure of anything.
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    CEILINGS_FLAGS+=(--dry-run)
    KERNEL_FLAGS+=(--interpret-check)
    DATA_FLAGS+=(--dry-run)
    E2E_TARGET_PAIRS=(dry-run,dry-run)   # --dry-run picks its own tiny pair; the fast path's ops run Triton
    E2E_OTHER_PAIRS=(dry-run,dry-run)    # the loop once more, on its cheapest path (the floor)
    E2E_FLAGS=(--dry-run)
    E2E_OTHER_FLAGS=(--dry-run --paths floor --no-split)
    E2E_PAIR_S=0
    TEST_FLAGS+=(--collect-only)
else
    unset TRITON_INTERPRET
fi

# --- The steps ------------------------------------------------------------------------------------------------
if want env; then
    run_step env bash -c '"$1" -m pip show --disable-pip-version-check timm setuptools wheel || true
        if command -v nvidia-smi >/dev/null && [[ "$3" == gpu ]]; then
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
        fi
        "$1" "$GPU_CHECK_PY" env --json "$2"' _ "$PY" "$PARTS/env.json" "$MODE"
fi
if want ceilings; then
    run_step ceilings "$PY" -m patfast.bench.ceilings --json "$PARTS/ceilings.json" "${CEILINGS_FLAGS[@]}"
fi
if want e2e_target; then
    export LIMIT_NOW="${LIMIT[e2e_target]}"
    run_step e2e_target bash -c 'run_pairs "$@"' _ e2e_target 0 \
        "${E2E_FLAGS[@]}" "${EXTRA_E2E_FLAGS[@]}" -- "${E2E_TARGET_PAIRS[@]}"
fi
for op in hcl raa kd; do
    want "kernels_$op" || continue
    limit="${LIMIT[kernels_$op]}"
    budget=$(( limit > KERNELS_RESERVE ? limit - KERNELS_RESERVE : 0 ))
    ceilings=()   # this run's (or, after --only, an earlier run's) ceilings; else bench kernels measures them
    [[ -s "$OUT/results.json" ]] && ceilings=(--ceilings "$OUT/results.json")
    run_step "kernels_$op" "$PY" -m patfast bench kernels --op "$op" --json "$PARTS/kernels_$op.json" \
        --budget "$budget" "${ceilings[@]}" "${KERNEL_FLAGS[@]}" "${EXTRA_KERNEL_FLAGS[@]}"
done
if want gpu_tests; then
    # the report plugin is benchmarks/pytest_report.py
    run_step gpu_tests env PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest "${TEST_FLAGS[@]}"
fi
if want data; then
    run_step data "$PY" -m patfast bench data --json "$PARTS/data.json" "${DATA_FLAGS[@]}" "${EXTRA_DATA_FLAGS[@]}"
fi
if want e2e_others; then
    # The budget the steps before left unused goes to these pairs: the run still ends within its total.
    spare=$(( RUN_START + BUDGET_TOTAL - (INSTALL ? 0 : INSTALL_S) - OVERHEAD_S - $(date +%s) ))
    (( spare > LIMIT[e2e_others] )) && LIMIT[e2e_others]=$spare
    export LIMIT_NOW="${LIMIT[e2e_others]}"
    run_step e2e_others bash -c 'run_pairs "$@"' _ e2e_others "$E2E_PAIR_S" \
        "${E2E_OTHER_FLAGS[@]}" "${EXTRA_E2E_FLAGS[@]}" -- "${E2E_OTHER_PAIRS[@]}"
fi

# --- Results: results.md, then the summary (every step's status and everything FAILED) last ------------------
echo
echo "=== gpu_check: results ($OUT/results.json, $OUT/results.md) ==="
cat "$OUT/results.md" || true
"$PY" "$GPU_CHECK_PY" summary --out "$OUT" || FAILED+=("summary")
if (( ${#FAILED[@]} )); then
    echo "gpu_check: FAILED in this run: ${FAILED[*]}"
    exit 1
fi
if [[ "$IMPORT_NOTE" == *FALLBACK* ]]; then
    echo "gpu_check: all steps ran, patfast imported through the PYTHONPATH fallback (the install is missing: see above)"
else
    echo "gpu_check: all steps ran"
fi
