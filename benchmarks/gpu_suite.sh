#!/usr/bin/env bash
# forgetkern's GPU run: correctness smoke tests and the headline benchmarks on one machine with no
# network, inside a time budget.
#
#   GPU_SUITE_BUDGET_S=300 benchmarks/gpu_suite.sh [OUT_DIR]    (default: $OUT, else benchmarks/results/gpu_suite)
#
# Within GPU_SUITE_BUDGET_S seconds (default 300) of its start, in this order, each step left out
# when too little time remains for it:
#  0. installs the wheels carried in .whl/ offline (pip --no-index, into /tmp/forgetkern-site);
#  1. starts building the CUDA extension for this GPU's architecture only, in the background (into
#     a scratch folder; the module is moved into forgetkern/ in one rename once it is complete);
#  2. smoke tests of the Triton kernels at small shapes (gpu-marked tests, a focused subset);
#  3. the headline benchmarks (benchmarks/suite.py --quick, main phase, providers that need no
#     extension) with one profiled iteration per case: fused-linear losses, the loss on logits and
#     the eigensolvers, then the training step, then the fused-linear losses on the real SmolLM2
#     inputs when .bench_inputs/smollm2.pt was carried;
#  4. once the build is done: the extension's smoke tests, then its providers;
#  5. if time remains: the late phase (torch.compile, max-autotune, TMA loads, the FoLoRA step);
#  6. if time remains: compute-sanitizer memcheck, then racecheck, over the extension's gpu tests.
# Every step runs under `timeout` to a deadline RESERVE_S (20) seconds before the budget and the
# benchmarks skip (and record) the cases that would not finish; each result is appended to the
# results files as it comes, so nothing finished is lost. OUT_DIR ends with at most 8 files:
#   results.jsonl results.csv rates.json profile.txt summary.txt suite.log build.log
# and the script prints one summary table last. Set FORGETKERN_COMMIT=<sha> when the copy of the
# tree has no .git (the records carry it). GPU_SUITE_DRY=1 runs the same steps on a machine without
# a GPU: the suite's dry mode (CPU tensors, tiny shapes, no GPU timing), no build, no GPU tests.
set -uo pipefail

START_EPOCH=$(date +%s)
BUDGET=${GPU_SUITE_BUDGET_S:-300}
case "$BUDGET" in ''|*[!0-9]*) echo "GPU_SUITE_BUDGET_S must be a whole number of seconds, got '$BUDGET'" >&2; exit 2;; esac
RESERVE_S=20
DEADLINE=$((START_EPOCH + BUDGET - RESERVE_S))
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/benchmarks/results/gpu_suite}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DRY="${GPU_SUITE_DRY:-0}"
SITE=/tmp/forgetkern-site
BUILD_DIR=/tmp/forgetkern-build
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOG="$OUT_DIR/suite.log"
exec > >(tee -a "$LOG") 2>&1

left() { echo $((DEADLINE - $(date +%s))); }
note() { echo "::: [$(( $(date +%s) - START_EPOCH ))s] $*"; }

step() {  # step NAME NEED MAX COMMAND...: run it if NEED seconds remain, for at most MAX (and the deadline)
  local name="$1" need="$2" max="$3"
  shift 3
  local l
  l=$(left)
  if [ "$l" -lt "$need" ]; then
    note "$name: left out ($l s left, needs $need)"
    return 0
  fi
  [ "$l" -gt "$max" ] && l=$max
  note "$name (up to $l s): $*"
  timeout --kill-after=5 "$l" "$@"
  note "$name: exit $?"
  return 0
}

finish() {
  "$PY" benchmarks/suite.py --summary "$OUT_DIR" > "$OUT_DIR/summary.txt" 2>&1
  note "done in $(( $(date +%s) - START_EPOCH )) s (budget $BUDGET s); files in $OUT_DIR:"
  ls -la "$OUT_DIR"
  echo
  cat "$OUT_DIR/summary.txt"
}
trap finish EXIT

# --- environment ---------------------------------------------------------------------------------
note "forgetkern GPU suite, budget $BUDGET s, commit ${FORGETKERN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}$([ "$DRY" = 1 ] && echo ', DRY RUN on the CPU')"
[ "$DRY" = 1 ] || nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 || true
"$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
command -v nvcc >/dev/null && nvcc --version | tail -2

# --- 0. carried wheels -------------------------------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  note "installing $(ls .whl/*.whl | wc -l) carried wheel(s) offline"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || note "wheel install failed: the peers they provide will be recorded as unavailable"
else
  note "no wheels in .whl/ (benchmarks/fetch_wheels.sh): Liger-Kernel and Cut Cross-Entropy will be unavailable"
fi

if [ "$DRY" = 1 ]; then
  SUITE=("$PY" benchmarks/suite.py --dry --out "$OUT_DIR" --deadline "$DEADLINE" --no-table)
  step bench_main 10 "$BUDGET" "${SUITE[@]}" --profile --phase main --only linear_tmkl,tmkl,generalized_eigh
  step bench_train 10 "$BUDGET" "${SUITE[@]}" --phase main --only train_step
  step bench_late 10 "$BUDGET" "${SUITE[@]}" --phase late --only linear_tmkl,tmkl,folora_step
  exit 0
fi

# --- 1. the extension, in the background ----------------------------------------------------------
ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
ARCH="${ARCH:-90}"
rm -f "$BUILD_DIR.rc"
(
  rm -rf "$BUILD_DIR"
  FORGETKERN_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" timeout --kill-after=5 "$(left)" \
    "$PY" setup.py build_ext --build-lib "$BUILD_DIR" --build-temp "$BUILD_DIR/tmp" > "$OUT_DIR/build.log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then
    so="$(ls "$BUILD_DIR"/forgetkern/_C*.so 2>/dev/null | head -1)"
    if [ -n "$so" ]; then
      cp "$so" "forgetkern/.$(basename "$so").partial" && mv -f "forgetkern/.$(basename "$so").partial" "forgetkern/$(basename "$so")"
    else
      rc=3
    fi
  fi
  echo "$rc" > "$BUILD_DIR.rc"
) &
BUILD_PID=$!
note "building the CUDA extension for sm_$ARCH in the background (build.log)"

# --- 2. smoke tests of the Triton kernels ------------------------------------------------------
PYTEST=("$PY" -m pytest -q -x -p no:cacheprovider -m gpu)
step smoke_triton 60 75 "${PYTEST[@]}" tests/test_linear_tmkl.py tests/test_generalized_eigh.py tests/test_tmkl.py \
  -k "not cuda and (default_tiles or large_batches or (triton and bf16 and 128256))"

# --- 3. headline benchmarks (providers that need no extension) --------------------------------
SUITE=("$PY" benchmarks/suite.py --quick --out "$OUT_DIR" --deadline "$DEADLINE" --no-table)
step bench_main 30 "$BUDGET" "${SUITE[@]}" --profile --phase main --extension skip --inputs synthetic \
  --only linear_tmkl,tmkl,generalized_eigh
step bench_train 30 "$BUDGET" "${SUITE[@]}" --profile --reuse-rates --phase main --only train_step
INPUTS=synthetic
if [ -f .bench_inputs/smollm2.pt ]; then
  INPUTS=synthetic,smollm2
  step bench_real 20 "$BUDGET" "${SUITE[@]}" --reuse-rates --phase main --extension skip --inputs smollm2 \
    --only linear_tmkl
else
  note "no .bench_inputs/smollm2.pt (benchmarks/smollm2_inputs.py writes it): no real-input records"
fi

# --- 4. the extension ----------------------------------------------------------------------------
note "waiting for the build (up to $(left) s)"
while kill -0 "$BUILD_PID" 2>/dev/null && [ "$(left)" -gt 0 ]; do sleep 2; done
if [ "$(cat "$BUILD_DIR.rc" 2>/dev/null || echo none)" = "0" ]; then
  note "extension built: $(ls forgetkern/_C*.so)"
  step smoke_cuda 40 45 "${PYTEST[@]}" tests/test_cuda.py tests/test_tmkl.py tests/test_generalized_eigh.py \
    -k "cuda and not compile and not 256000 and not fp16"
  step bench_extension 20 "$BUDGET" "${SUITE[@]}" --profile --reuse-rates --phase main --extension only \
    --inputs "$INPUTS" --only linear_tmkl,tmkl,generalized_eigh
else
  note "the extension is not built (build exit: $(cat "$BUILD_DIR.rc" 2>/dev/null || echo 'still running')); see build.log"
  tail -20 "$OUT_DIR/build.log" 2>/dev/null
fi

# --- 5. late phase ------------------------------------------------------------------------------
step bench_late 60 "$BUDGET" "${SUITE[@]}" --reuse-rates --phase late --only linear_tmkl,tmkl,generalized_eigh,folora_step

# --- 6. sanitizer -------------------------------------------------------------------------------
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
if [ -n "$SANITIZER" ] && compgen -G "forgetkern/_C*.so" >/dev/null; then
  for tool in memcheck racecheck; do
    step "sanitizer_$tool" 120 "$BUDGET" env FORGETKERN_CUDA_SYNC=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool "$tool" --error-exitcode 97 "${PYTEST[@]}" tests/test_cuda.py \
      -k "not compile and not 256000 and not 128256"
  done
else
  note "sanitizer: compute-sanitizer or the extension missing; not run"
fi
