#!/usr/bin/env bash
# Data-parallel scaling of the CPU backend, in one run: the same training (same global batch,
# hence the same result bit for bit) as one process with accumulation 2A and as 2 ranks with
# accumulation A, on the bundled model and sample. Prints tokens/s of both and the ratio.
#
#   scripts/bench-dist.sh [STEPS] [RANKS]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-40}"
ranks="${2:-2}"
F="${FERROTUNE:-target/release/ferrotune}"
[ -x "$F" ] || cargo build --release -q -p ferrotune-cli
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$F" run --workdir "$work/run" >/dev/null 2>&1   # the bundled model and prepared sample
cat >"$work/train.yaml" <<YAML
model: $work/run/assets/model
train_file_path: $work/run/data/train
max_steps: $steps
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
learning_rate: 0.01
lr_scheduler_type: cosine
precision: fp32
logging_steps: $steps
save_steps: 100000
device: cpu
YAML
tps() { grep -o '([0-9]* tokens/s)' | tr -dc '0-9'; }
one=$("$F" train --config "$work/train.yaml" --set output_dir="$work/one" --set gradient_accumulation_steps="$ranks" | tps)
"$F" train --config "$work/train.yaml" --set output_dir="$work/many" --nproc-per-node "$ranks" >"$work/many.out" 2>"$work/many.err"
many=$(tps <"$work/many.out")
reduce=$(grep -o 'rank 0: .* in gradient reductions' "$work/many.err" || echo "rank 0: (no reduction time logged)")
same=no
cmp -s "$work/one/adapter/adapter_model.safetensors" "$work/many/adapter/adapter_model.safetensors" && same=yes
echo "1 process, accumulation $ranks: $one tokens/s"
echo "$ranks ranks, accumulation 1:   $many tokens/s"
echo "$reduce (waiting for the slower rank included)"
echo "ratio $(python3 -c "print(f'{$many/$one:.2f}')")x on $(nproc) cores; identical adapters: $same"
