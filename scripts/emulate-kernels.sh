#!/usr/bin/env bash
# Runs CUDA kernels on the CPU emulator (crates/ferrotune-kernels/emulator: one thread per CUDA
# thread, mma.sync rebuilt from the PTX ISA's fragment tables) against float64 references. This
# checks the kernels' index arithmetic and fragment layouts where there is no GPU; timing, memory
# ordering and the real tensor cores stay for scripts/gpu-check.sh on the device.
# Needs g++ 12+ (C++20 <barrier>, _Float16). Part of scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v g++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq g++ >/dev/null || { apt-get update -qq && apt-get install -y -qq g++ >/dev/null; }
  else
    echo "scripts/emulate-kernels.sh needs g++ 12 or later (apt-get install g++)" >&2
    exit 2
  fi
fi

emulator=crates/ferrotune-kernels/emulator
out="${CARGO_TARGET_DIR:-target}/emulator"
mkdir -p "$out"
status=0
for check in "$emulator"/*_check.cpp; do
  name="$(basename "${check%.cpp}")"
  g++ -std=c++20 -O2 -pthread -fno-strict-aliasing -D__CUDA_ARCH__=800 -I"$emulator" \
    -o "$out/$name" "$check"
  "$out/$name" || status=1
done
exit $status
