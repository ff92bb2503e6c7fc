#!/usr/bin/env bash
# The GPU checklist of shared/GPU.md in one command, on the device machine (a GPU, PyTorch with
# transformers + peft in `python3`, no Rust). Build first, here, with
#   scripts/build-cuda.sh --tests          (dist/cuda-sm90/: ferrotune + CUDA test binaries, gzipped)
# then run on the device from the repository root with dist/cuda-sm90 carried:
#   scripts/gpu-check.sh [--quick] [--only REGEX]
# --only runs just the steps whose names match REGEX (bash =~), e.g. after a change to one kernel
# with little device time left: --only 'kernel_parity|flash|bench_attention'.
# Writes $OUT/gpu-report.json (every number) and $OUT/gpu-check.log (everything printed).
# Each step runs under its own time limit and a failing step is recorded, not fatal.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
log="$OUT/gpu-check.log"
steps="$OUT/steps.jsonl"
: >"$log"
: >"$steps"
quick=0
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --only) only="${2:?--only needs a regular expression}"; shift 2 ;;
    *) echo "usage: scripts/gpu-check.sh [--quick] [--only REGEX]" >&2; exit 2 ;;
  esac
done
dist="${FERROTUNE_DIST:-dist/cuda-sm90}"

say() { echo "== $*" | tee -a "$log"; }
# record NAME STATUS SECONDS [JSON]: one line of steps.jsonl
record() {
  python3 - "$@" >>"$steps" <<'PY'
import json, sys
name, status, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
extra = None
if len(sys.argv) > 4 and sys.argv[4].strip():
    try:
        extra = json.loads(sys.argv[4])
    except ValueError:
        extra = sys.argv[4][-2000:]
print(json.dumps({"step": name, "exit": status, "seconds": round(secs, 1), "result": extra}))
PY
}
# run NAME LIMIT_S CMD...: runs CMD with its output in the log, records its exit status and time
run() {
  local name="$1" limit="$2"
  shift 2
  if [ -n "$only" ] && ! [[ "$name" =~ $only ]]; then
    return 0
  fi
  say "$name: $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/.last" 2>&1
  local rc=$?
  cat "$OUT/.last" >>"$log"
  echo "(exit $rc after $((SECONDS - t0)) s)" | tee -a "$log"
  local json_line
  json_line="$(grep -E '^\{' "$OUT/.last" | tail -1)"
  record "$name" "$rc" "$((SECONDS - t0))" "$json_line"
  return 0
}

# 1. Environment: the GPU, the driver, and the CUDA libraries PyTorch's wheels bring (cuBLAS,
#    cuRAND, NVRTC), which the dynamically linked binary loads.
say "environment"
nvidia-smi 2>&1 | tee -a "$log"
nvlib="$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]) if hasattr(nvidia, "__path__") else "")' 2>/dev/null)/nvidia"
libdirs="$(ls -d "$nvlib"/*/lib "$nvlib"/cu*/lib 2>/dev/null | sort -u | tr '\n' ':')"
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:-}"
env_json="$(python3 - <<'PY'
import json, subprocess, torch, transformers, peft
q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                    "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
print(json.dumps({"nvidia_smi": q, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "transformers": transformers.__version__, "peft": peft.__version__,
                  "gpu": torch.cuda.get_device_name(0)}))
PY
)"
echo "$env_json" | tee -a "$log"
record environment 0 0 "$env_json"

# The binaries, unpacked; tests find the fixtures through the path they were built in.
bin="$OUT/.bin"
mkdir -p "$bin"
for f in "$dist"/*.gz; do gunzip -c "$f" >"$bin/$(basename "${f%.gz}")"; done
chmod +x "$bin"/*
built_in="$(cat "$dist/built-in" 2>/dev/null || echo /work/main)"
if [ "$built_in" != "$PWD" ] && [ ! -e "$built_in" ]; then
  mkdir -p "$(dirname "$built_in")" && ln -s "$PWD" "$built_in"
fi
ft="$bin/ferrotune"

# 2 + 3. Per-op CUDA vs CPU parity (fwd+bwd, f32 and bf16) and the fixtures against their
#        transformers + PEFT references on CUDA (logits, loss, LoRA grads, generation, 10 trainer steps).
for t in "$bin"/test-*; do
  run "$(basename "$t")" 150 "$t" --ignored --nocapture --test-threads 1
done

# The bf16 fixture check again with the kernels off, to tell the kernels' share of bf16 error.
if [ -x "$bin/test-cuda_parity" ]; then
  run test-cuda_parity_bf16_kernels_off 150 env FERROTUNE_KERNELS=0 "$bin/test-cuda_parity" \
    --ignored --nocapture --test-threads 1 fixtures_in_bf16
fi

# The fixtures again with training attention through the flash kernel (FERROTUNE_TRAIN_ATTENTION=
# flash: bf16 on sm_80+; the f32 checks keep the composed path): loss, LoRA grads, recompute's
# hand-written backward, trainer steps and generation's prefill against transformers + PEFT.
if [ -x "$bin/test-cuda_parity" ]; then
  run test-cuda_parity_flash_attention 150 env FERROTUNE_TRAIN_ATTENTION=flash \
    "$bin/test-cuda_parity" --ignored --nocapture --test-threads 1
fi

# compute-sanitizer's memcheck over every kernel's parity test (odd sizes, all dtypes) and the
# hand-written layer backward on CUDA ([kernels]: "memcheck clean"). The device image carries the
# tool; where it is missing or refuses the device (gVisor) the step records that, and fails.
sanitizer="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
if [ -n "$sanitizer" ] && [ -x "$bin/test-kernel_parity" ]; then
  run memcheck_kernel_parity 150 "$sanitizer" --tool memcheck --error-exitcode 99 \
    "$bin/test-kernel_parity" --ignored --test-threads 1
  if [ -x "$bin/test-cuda_parity" ]; then
    run memcheck_hand_written_backward 120 "$sanitizer" --tool memcheck --error-exitcode 99 \
      "$bin/test-cuda_parity" --ignored --test-threads 1 hand_written_layer_backward_on_cuda
  fi
else
  say "memcheck: no compute-sanitizer on this machine"
  record memcheck 127 0 '"compute-sanitizer not found"'
fi

# End to end: `ferrotune train` of the bundled recipe on the GPU (prepare, train, eval, checkpoint).
# Outputs go to a scratch folder: $OUT brings back only a few files.
scratch="$(mktemp -d)"
run train_tiny_sample 150 "$ft" --json train --config configs/tiny_sample.yaml \
  --set device=cuda --set precision=bf16 --set "output_dir=$scratch/tiny"
cp "$scratch/tiny/metrics.jsonl" "$OUT/tiny_sample_metrics.jsonl" 2>/dev/null

# Kernels on and off (candle's composed ops), and an fp32 run for scale. bf16 runs drift apart
# as any two do (rounding differences compound), so the check is: the first 5 steps' losses agree
# within 5e-3, the eval loss after 20 steps within 1e-2; the distance of each bf16 curve from the
# fp32 one is reported alongside.
# fp16 (the V100 path: dynamic loss scaling) runs the same 20 steps, its distance from fp32 beside.
# flash: training attention through the flash kernel, against the kernels-on curve.
for mode in on off fp32 fp16 flash; do
  precision=bf16; kernels=1; attention=composed
  [ $mode = off ] && kernels=0
  [ $mode = flash ] && attention=flash
  [ $mode = fp32 ] && precision=fp32
  [ $mode = fp16 ] && precision=fp16
  run "train_20_steps_$mode" 150 env FERROTUNE_KERNELS=$kernels FERROTUNE_TRAIN_ATTENTION=$attention \
    "$ft" --json train --config configs/tiny_sample.yaml --set device=cuda --set precision=$precision \
    --set max_steps=20 --set logging_steps=1 --set eval_steps=20 --set save_steps=20 \
    --set "output_dir=$scratch/k$mode"
done
if [ -f "$scratch/kon/metrics.jsonl" ]; then  # skipped under --only
compare="$(python3 - "$scratch"/kon/metrics.jsonl "$scratch"/koff/metrics.jsonl "$scratch"/kfp32/metrics.jsonl "$scratch"/kfp16/metrics.jsonl "$scratch"/kflash/metrics.jsonl <<'PY'
import json, sys
def curve(path):
    recs = [json.loads(l) for l in open(path)]
    return ({r["step"]: r["loss"] for r in recs if r["type"] == "train"},
            [r["eval_loss"] for r in recs if r["type"] == "eval"][-1])
(on, eval_on), (off, eval_off), (f32, eval_f32) = (curve(p) for p in sys.argv[1:4])
try:
    f16, eval_f16 = curve(sys.argv[4])
    fp16 = {"eval_loss_fp16": eval_f16,
            "max_rel_diff_fp16_vs_fp32": max(abs(f16[k] - f32[k]) / abs(f32[k]) for k in f32 if k in f16)}
except Exception as e:  # the fp16 run failed: its own step says why
    fp16 = {"fp16": f"no curve ({e})"}
rel = lambda a, b: abs(a - b) / abs(b)
try:
    fl, eval_fl = curve(sys.argv[5])
    flash = {"eval_loss_flash": eval_fl,
             "flash_first_5_steps_max_rel_diff_vs_on": max(rel(fl[k], on[k]) for k in range(1, 6)),
             "flash_eval_rel_diff_vs_on": rel(eval_fl, eval_on)}
except Exception as e:  # the flash run failed: its own step says why
    flash = {"flash": f"no curve ({e})"}
first5 = max(rel(on[k], off[k]) for k in range(1, 6))
print(json.dumps({"steps": len(off), "first_5_steps_max_rel_diff": first5,
                  "eval_loss_on": eval_on, "eval_loss_off": eval_off, "eval_loss_fp32": eval_f32,
                  "eval_rel_diff": rel(eval_on, eval_off),
                  "max_rel_diff_on_vs_fp32": max(rel(on[k], f32[k]) for k in f32),
                  "max_rel_diff_off_vs_fp32": max(rel(off[k], f32[k]) for k in f32),
                  "max_rel_diff_on_vs_off": max(rel(on[k], off[k]) for k in off),
                  "within_bf16_tolerance": first5 <= 5e-3 and rel(eval_on, eval_off) <= 1e-2,
                  **fp16, **flash}))
PY
)"
echo "$compare" | tee -a "$log"
record kernels_on_off_loss_curves "$(echo "$compare" | grep -q '"within_bf16_tolerance": true'; echo $?)" 0 "$compare"
fi
rm -rf "$scratch"

# Training attention alone on Phi-3-mini's heads (32 x 96), flash against the kept probabilities:
# forward and backward milliseconds, TFLOP/s, kept bytes and how far the two results are apart.
for seq in 2048 4096; do
  run "bench_attention_phi3_mini_seq$seq" 120 "$ft" --json bench attention --device cuda --dtype bf16 \
    --heads 32 --head-dim 96 --seq $seq --iters 10 --warmup 3
done

# 4. Training throughput on Phi-3-mini-4k's exact shape, ferrotune and transformers + PEFT, same call.
mini=(--shape phi3-mini)
if [ "$quick" = 1 ]; then mini=(--layers 4 --hidden 3072 --intermediate 8192 --heads 32 --kv-heads 32 --vocab 32064); fi
run bench_train_phi3_mini 300 "$ft" --json bench train --device cuda --dtype bf16 --recompute \
  "${mini[@]}" --seq 2048 --batch 1 --r 16 --steps 5 --warmup 2 --python python3

# With LoRA dropout (PEFT's usual 0.05) on both sides: the masks are drawn on the device.
run bench_train_phi3_mini_dropout 300 "$ft" --json bench train --device cuda --dtype bf16 --recompute \
  "${mini[@]}" --seq 2048 --batch 1 --r 16 --steps 5 --warmup 2 --lora-dropout 0.05 --python python3

# The recompute's layer backward through candle's graph instead of the hand-written one, on the
# same machine: what the hand-written backward gains.
run bench_train_phi3_mini_graph_backward 300 env FERROTUNE_LAYER_BACKWARD=graph "$ft" --json bench \
  train --device cuda --dtype bf16 --recompute "${mini[@]}" --seq 2048 --batch 1 --r 16 --steps 5 \
  --warmup 2 --no-reference

# Training attention through the flash kernel instead of the kept probabilities, same machine.
run bench_train_phi3_mini_flash_attention 300 env FERROTUNE_TRAIN_ATTENTION=flash "$ft" --json bench \
  train --device cuda --dtype bf16 --recompute "${mini[@]}" --seq 2048 --batch 1 --r 16 --steps 5 \
  --warmup 2 --no-reference

run bench_train_phi3_mini_kernels_off 300 env FERROTUNE_KERNELS=0 "$ft" --json bench train \
  --device cuda --dtype bf16 --recompute "${mini[@]}" --seq 2048 --batch 1 --r 16 --steps 5 --warmup 2 \
  --no-reference

# 5. Decode throughput on the same shape, single stream and batched, against transformers' generate.
run bench_decode_phi3_mini 300 "$ft" --json bench decode --device cuda --dtype bf16 "${mini[@]}" \
  --prompt 512 --new-tokens 128 --batches 1,8,32 --python python3

# Decoding with the composed attention (scores GEMM, softmax, output GEMM) instead of the fused
# decode kernel, on the same machine: what the kernel gains per token.
run bench_decode_phi3_mini_composed_attention 200 env FERROTUNE_DECODE_ATTENTION=composed "$ft" \
  --json bench decode --device cuda --dtype bf16 "${mini[@]}" --prompt 512 --new-tokens 128 \
  --batches 1,8,32 --no-reference

python3 - "$steps" "$OUT/gpu-report.json" <<'PY'
import json, subprocess, sys
steps = [json.loads(l) for l in open(sys.argv[1])]
import os
dist = os.environ.get("FERROTUNE_DIST", "dist/cuda-sm90")
commit = open(f"{dist}/commit").read().strip() if os.path.exists(f"{dist}/commit") else None
report = {"commit": commit, "steps": steps,
          "failed": [s["step"] for s in steps if s["exit"] not in (0, 127)]}
json.dump(report, open(sys.argv[2], "w"), indent=1)
print(json.dumps(report)[:3000])
PY
rm -rf "$bin" "$OUT/.last" "$steps"
