#!/usr/bin/env bash
# Builds ferrotune with `--features cuda` on a machine without a GPU or a CUDA install.
#
# nvcc, the CUDA headers and the libraries the final link names come from NVIDIA's PyPI wheels in a
# private venv; libcuda (which only a driver ships) is replaced at link time by a generated stub
# whose symbols are empty functions: the real libcuda.so.1 comes from the driver where the binary runs.
#
#   scripts/build-cuda.sh [--cap 90|80|86|89|70] [--tests] [--nccl]
#   scripts/build-cuda.sh --check      (CI: clippy -D warnings of every crate with the cuda feature;
#                                       needs only nvcc and headers, links nothing, runs nothing)
#
# Output: dist/cuda-sm<cap>/ferrotune.gz (stripped); with --tests also the GPU test binaries
# test-kernel_parity.gz, test-cuda_parity.gz and test-trainer_reference.gz, for scripts/gpu-check.sh.
# V100 (sm_70) needs a CUDA 11/12 toolkit, since CUDA 13 has no Volta target and PyPI's CUDA 12 wheels
# carry no nvcc (only ptxas): `--cap 70` uses the nvcc on PATH if it is CUDA 11.x or 12.x, and
# otherwise installs Debian 12's nvidia-cuda-toolkit (CUDA 11.8, from the non-free component, which
# it enables; needs root and apt). That build links CUDA 11's libraries (libcublas.so.11, ...),
# which the V100 machine must have (any CUDA 11.x runtime, or PyTorch's cu11x wheels); it goes to
# its own target folder (target/cuda-sm70) and dist/cuda-sm70/, and has no NCCL (Debian ships none).
set -euo pipefail
cd "$(dirname "$0")/.."

cap=90
tests=0
check=0
nccl=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cap) cap="$2"; shift 2 ;;
    --tests) tests=1; shift ;;
    --check) check=1; shift ;;
    --nccl) nccl=1; shift ;;
    *) echo "usage: scripts/build-cuda.sh [--cap 90|80|86|89|70] [--tests] [--nccl] | --check" >&2; exit 2 ;;
  esac
done
case "$cap" in
  80|86|89|90) ;;
  70) if [ "$nccl" = 1 ]; then
        echo "--cap 70 --nccl: the CUDA 11 toolkit this build uses comes without NCCL; build sm_70 without --nccl" >&2
        exit 2
      fi
      if [ "$check" = 1 ]; then
        echo "--check compiles with the CUDA 13 wheels (no --cap); --cap 70 is a build" >&2
        exit 2
      fi ;;
  *) echo "--cap $cap: expected 70, 80, 86, 89 or 90" >&2; exit 2 ;;
esac

# The sm_70 build: a CUDA 11/12 nvcc (Debian's CUDA 11.8 unless one is on PATH), system libraries.
if [ "$cap" = 70 ]; then
  cuda_release() { nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1.\2/p'; }
  case "$(cuda_release)" in
    11.*|12.*) ;;
    *)
      if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        echo "--cap 70 needs a CUDA 11 or 12 nvcc on PATH (found: $(cuda_release || true)); as root on Debian 12 this script installs one" >&2
        exit 1
      fi
      if ! apt-cache show nvidia-cuda-toolkit >/dev/null 2>&1; then
        printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: contrib non-free\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
          >/etc/apt/sources.list.d/ferrotune-cuda-nonfree.sources
        apt-get update -qq
      fi
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit >/dev/null
      hash -r
      ;;
  esac
  case "$(cuda_release)" in
    11.*|12.*) echo "sm_70 with nvcc $(cuda_release) ($(command -v nvcc))" ;;
    *) echo "no CUDA 11/12 nvcc after the install" >&2; exit 1 ;;
  esac
  unset CUDA_ROOT CUDA_PATH CUDA_HOME
  export CUDA_COMPUTE_CAP=70
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda-sm70}"
  out="dist/cuda-sm70"
  mkdir -p "$out"
  cargo build --release --features cuda -p ferrotune-cli
  strip -o "$out/ferrotune" "$CARGO_TARGET_DIR/release/ferrotune"
  gzip -9 -f "$out/ferrotune"
  if [ "$tests" = 1 ]; then
    cargo test --release --features cuda -p ferrotune-kernels -p ferrotune-model -p ferrotune-train --no-run --message-format=json 2>/dev/null \
      | python3 -c '
import json, sys
wanted = {"kernel_parity", "cuda_parity", "trainer_reference"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in wanted:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do strip -o "$out/test-$name" "$exe"; gzip -9 -f "$out/test-$name"; done
  fi
  echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!dist' || echo -dirty)" >"$out/commit"
  echo "$PWD" >"$out/built-in"
  ls -l "$out"
  exit 0
fi

toolchain="${FERROTUNE_CUDA_TOOLCHAIN:-$PWD/.cuda-toolchain}"
venv="$toolchain/venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# The nvvm/crt pins matter: left alone pip takes 13.5's front end, whose PTX ISA 9.5 neither
# ptxas 13.0 nor a 13.0 driver accepts.
compiler=('nvidia-cuda-nvcc==13.0.*' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*'
  'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*')
libraries=('nvidia-cuda-nvrtc==13.0.*' 'nvidia-cublas==13.0.*' 'nvidia-curand==10.4.0.*')
if [ "$check" = 1 ]; then libraries=(); fi
# Data parallelism over NCCL links libnccl (from NVIDIA's wheel); the ranks need libnccl.so.2 at
# run time (Azure ML's PyTorch environments and most GPU images carry it).
if [ "$nccl" = 1 ] && [ "$check" = 0 ]; then libraries+=('nvidia-nccl-cu13==2.28.*'); fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${compiler[@]}" "${libraries[@]}"

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cuda="$site/nvidia/cu13"
[ -x "$cuda/bin/nvcc" ] || { echo "no nvcc at $cuda/bin/nvcc after the install" >&2; exit 1; }

# Unversioned names for the linker, and a stub libcuda with every driver entry point cuda.h declares.
libs="$toolchain/lib"
mkdir -p "$libs"
for so in "$cuda"/lib/lib*.so.*; do
  base="$(basename "$so")"
  ln -sf "$so" "$libs/${base%%.so.*}.so"
done
if [ ! -f "$libs/libcuda.so" ]; then
  gcc -E -P "$cuda/include/cuda.h" | grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' | tr -d '( ' | sort -u \
    | awk '{ print "void " $1 "(void) {}" }' >"$toolchain/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$libs/libcuda.so" "$toolchain/libcuda_stub.c"
fi

export CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
export PATH="$cuda/bin:$PATH"
export CUDA_COMPUTE_CAP="$cap"
export LIBRARY_PATH="$libs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:-} -I$cuda/include"

cuda_crates=(-p ferrotune-kernels -p ferrotune-model -p ferrotune-train -p ferrotune-cli)
if [ "$check" = 1 ]; then
  cargo clippy "${cuda_crates[@]}" --features cuda,ferrotune-train/nccl,ferrotune-cli/nccl --all-targets --locked -- -D warnings
  exit 0
fi

# dist/cuda-sm<cap>/ holds only what travels to a GPU machine: gzipped, stripped binaries, the
# commit they were built from and the folder they were built in (tests find fixtures through it).
out="dist/cuda-sm$cap"
mkdir -p "$out"
pack() { # pack EXECUTABLE NAME
  strip -o "$out/$2" "$1"
  gzip -9 -f "$out/$2"
}
features=cuda
if [ "$nccl" = 1 ]; then
  so="$(find "$site/nvidia" -name 'libnccl.so*' | head -1)"
  [ -n "$so" ] || { echo "no libnccl.so in the nvidia-nccl-cu13 wheel" >&2; exit 1; }
  ln -sf "$so" "$libs/libnccl.so"
  features=cuda,nccl
fi
cargo build --release --features "$features" -p ferrotune-cli
pack target/release/ferrotune ferrotune
echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!dist' || echo -dirty)" >"$out/commit"
echo "$PWD" >"$out/built-in"

if [ "$tests" = 1 ]; then
  # The test targets that hold the GPU tests (ignored in normal runs, run by scripts/gpu-check.sh).
  test_features=cuda
  if [ "$nccl" = 1 ]; then test_features=cuda,ferrotune-train/nccl; fi
  cargo test --release --features "$test_features" -p ferrotune-kernels -p ferrotune-model -p ferrotune-train --no-run
  cargo test --release --features "$test_features" -p ferrotune-kernels -p ferrotune-model -p ferrotune-train --no-run --message-format=json 2>/dev/null \
    | "$venv/bin/python" -c '
import json, sys
wanted = {"kernel_parity", "cuda_parity", "trainer_reference", "nccl_parity"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in wanted:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do pack "$exe" "test-$name"; done
fi
ls -l "$out"
