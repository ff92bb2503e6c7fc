#!/usr/bin/env bash
# The project's test command (README, .ci/run): format, lints, then every test on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

# The blob upload tests run against Azurite, the official storage emulator (from npm).
scripts/install-azurite.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The CUDA kernels that have an emulator check, run on the CPU (seconds).
scripts/emulate-kernels.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  echo "cargo-nextest not found; using cargo test (install: cargo install cargo-nextest --locked)" >&2
  cargo test --workspace --locked --no-fail-fast
fi
