#!/usr/bin/env bash
# Download the wheels a GPU run installs offline (the GPU machine has no network) into .whl/, and
# check that what the run carries fits the 64 MiB it may carry.
#
#   benchmarks/fetch_wheels.sh            # on a machine with the package index
#
# Liger-Kernel and Cut Cross-Entropy, pinned, for CPython 3.12 on manylinux x86_64, without their
# dependencies: both need only torch and triton, which the GPU machine has (the script lists each
# wheel's requirements so that a new version needing more shows here). benchmarks/gpu_suite.sh
# installs them with `pip install --no-index --no-deps --target`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PY="${PYTHON:-python3}"
PINS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
LIMIT=$((64 * 1024 * 1024))

mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${PINS[@]}"

echo "wheels in $DEST:"
for whl in "$DEST"/*.whl; do
  reqs="$(unzip -p "$whl" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/Requires-Dist: //' | tr '\n' ' ')"
  printf '  %-48s %8d B  needs: %s\n' "$(basename "$whl")" "$(stat -c %s "$whl")" "${reqs:-nothing}"
done

# what a GPU run carries: the working tree (tracked and untracked files git does not ignore) plus
# the carried folders
cd "$ROOT"
tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
whl=$(du -sb "$DEST" | cut -f1)
inputs=0
[ -d .bench_inputs ] && inputs=$(du -sb .bench_inputs | cut -f1)
total=$((tree + whl + inputs))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "carried by a GPU run: tree $(mib "$tree") + .whl $(mib "$whl") + .bench_inputs $(mib "$inputs") = $(mib "$total") (limit 64 MiB)"
if [ "$total" -gt "$LIMIT" ]; then
  echo "over the limit: carry less" >&2
  exit 1
fi
