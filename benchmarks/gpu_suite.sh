#!/usr/bin/env bash
# The GPU suite of forgetkern: everything that needs a GPU, on one machine with no network.
#
#   benchmarks/gpu_suite.sh [OUT_DIR]        (default: $OUT, else benchmarks/results/gpu_suite-<date>)
#
# 1. builds the CUDA extension in place (python setup.py build_ext --inplace; needs nvcc, setuptools
#    and pybind11 or torch's bundled pybind11 headers; ninja if installed);
# 2. runs every `gpu`-marked test (pytest -m gpu);
# 3. if compute-sanitizer is available, runs memcheck and racecheck over the CUDA extension's GPU
#    tests (tests/test_cuda.py);
# 4. runs every benchmarks/bench_*.py (JSON/CSV results under OUT_DIR/bench), and the fused-linear
#    benchmark once more with FORGETKERN_TMA=1 (provider forgetkern-triton-tma).
#
# Every step's output goes to OUT_DIR/<step>.log (and the console); OUT_DIR/summary.txt lists each
# step's exit status. The script runs every step even when one fails, and exits non-zero if any did.
# Environment: GPU_SUITE_QUICK=1 runs the benchmarks' --quick shapes; GPU_SUITE_SKIP_SANITIZER=1
# skips step 3 and GPU_SUITE_SANITIZER_FILTER (a compute-sanitizer --kernel-name value) narrows it;
# FORGETKERN_CUDA_ARCHS (default: this GPU's architecture) and MAX_JOBS go to the build.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$ROOT/benchmarks/results/gpu_suite-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT"
# the in-place build of this checkout, whatever forgetkern is installed
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
FAILED=0

step() {  # step NAME COMMAND...: run, log to OUT_DIR/NAME.log, record the exit status
  local name="$1"
  shift
  echo "::: $name: $*"
  local start=$SECONDS
  "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  local cmd="${*//$'\n'/ }"
  printf '%-28s rc=%-3s %5ss  %.100s\n' "$name" "$rc" "$((SECONDS - start))" "$cmd" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || FAILED=1
  return "$rc"
}

# --- environment ----------------------------------------------------------------------------
{
  date -u
  git -C "$ROOT" rev-parse HEAD 2>/dev/null && git -C "$ROOT" status --short 2>/dev/null | head -20
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  command -v nvcc && nvcc --version
  "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$OUT_DIR/environment.txt" 2>&1

if [ -z "${FORGETKERN_CUDA_ARCHS:-}" ]; then
  cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
  export FORGETKERN_CUDA_ARCHS="${cap:-80;90}"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

# --- 1. build ---------------------------------------------------------------------------------
if step build "$PY" setup.py build_ext --inplace; then
  step info "$PY" -c "
import json, sys, forgetkern
info = forgetkern.info()
print(json.dumps(info, indent=2))
sys.exit(0 if info['cuda_extension'] and info['gpu'] else 1)"
fi
"$PY" -m forgetkern info > "$OUT_DIR/forgetkern_info.txt" 2>&1

# --- 2. gpu tests -----------------------------------------------------------------------------
step pytest_gpu "$PY" -m pytest -m gpu -rs -q tests --junitxml="$OUT_DIR/pytest_gpu.xml"

# --- 3. compute-sanitizer over the CUDA extension's GPU tests ---------------------------------
SANITIZER="$(command -v compute-sanitizer || true)"
for candidate in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
  [ -n "$SANITIZER" ] && break
  [ -n "$candidate" ] && [ -x "$candidate/bin/compute-sanitizer" ] && SANITIZER="$candidate/bin/compute-sanitizer"
done
if [ "${GPU_SUITE_SKIP_SANITIZER:-0}" = "1" ]; then
  echo "sanitizer: skipped (GPU_SUITE_SKIP_SANITIZER=1)" | tee -a "$SUMMARY"
elif [ -z "$SANITIZER" ]; then
  echo "sanitizer: compute-sanitizer not found; memcheck/racecheck not run" | tee -a "$SUMMARY"
else
  # every kernel is checked (torch's too): a name filter that silently matched nothing would
  # report a clean run; GPU_SUITE_SANITIZER_FILTER (e.g. "kns=tmkl_") narrows it on purpose
  FILTER=()
  [ -n "${GPU_SUITE_SANITIZER_FILTER:-}" ] && FILTER=(--kernel-name "$GPU_SUITE_SANITIZER_FILTER")
  # the largest vocabularies and torch.compile add time under instrumentation, not coverage
  SELECT=(-m gpu -q -x tests/test_cuda.py -k "not compile and not 256000 and not 128256")
  for tool in memcheck racecheck; do
    # without torch's caching allocator every tensor is its own allocation: memcheck then sees
    # an access past a tensor's end instead of landing in a cached neighbour
    step "sanitizer_$tool" env FORGETKERN_CUDA_SYNC=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool "$tool" ${FILTER[@]+"${FILTER[@]}"} --error-exitcode 97 \
      "$PY" -m pytest "${SELECT[@]}"
  done
fi

# --- 4. benchmarks ----------------------------------------------------------------------------
BENCH_ARGS=(--out "$OUT_DIR/bench")
[ "${GPU_SUITE_QUICK:-0}" = "1" ] && BENCH_ARGS+=(--quick)
for bench in benchmarks/bench_*.py; do
  [ -e "$bench" ] || continue
  name="$(basename "$bench" .py)"
  step "$name" "$PY" "$bench" "${BENCH_ARGS[@]}"
done
# the fused-linear kernels with TMA operand loads (opt-in, FORGETKERN_TMA=1), for the A/B
step bench_linear_tmkl_tma env FORGETKERN_TMA=1 "$PY" benchmarks/bench_linear_tmkl.py \
  "${BENCH_ARGS[@]}" --providers forgetkern-triton-tma

echo
echo "::: summary ($OUT_DIR)"
cat "$SUMMARY"
exit "$FAILED"
