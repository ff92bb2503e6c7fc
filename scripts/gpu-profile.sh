#!/usr/bin/env bash
# Where a ferrotune training step spends its GPU time: every kernel of one LoRA forward+backward
# step (recompute on, bf16) on a Phi-3-mini-shaped model cut to a few layers, timed by Nsight
# Compute (`ncu`, hardware durations, clocks left alone), grouped by kernel and summed; plus the
# step's wall time without the profiler, which tells GPU-bound from host/launch-bound.
# Run on the GPU machine after scripts/build-cuda.sh, with dist/cuda-sm90 carried:
#   scripts/gpu-profile.sh [LAYERS] [SEQ]
# Writes $OUT/profile.txt (the table), $OUT/profile.json and $OUT/wall.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-profile-out}"
mkdir -p "$OUT"
layers="${1:-2}"
seq="${2:-2048}"
dist="${FERROTUNE_DIST:-dist/cuda-sm90}"
nvlib="$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)/nvidia"
export LD_LIBRARY_PATH="$(ls -d "$nvlib"/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}"
bin="$OUT/.bin"
mkdir -p "$bin"
gunzip -c "$dist/ferrotune.gz" >"$bin/ferrotune" && chmod +x "$bin/ferrotune"
shape=(--layers "$layers" --hidden 3072 --intermediate 8192 --heads 32 --kv-heads 32 --vocab 32064
  --seq "$seq" --batch 1 --r 16 --device cuda --dtype bf16 --recompute)

# Wall time per step without the profiler (ferrotune and the reference, same shape).
"$bin/ferrotune" --json bench train "${shape[@]}" --steps 5 --warmup 2 --python python3 \
  | tee "$OUT/wall.json"

ncu="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)"
timeout 400 "$ncu" --clock-control none --print-units base --metrics gpu__time_duration.sum --csv --page raw \
  --log-file "$bin/profile.csv" "$bin/ferrotune" bench train "${shape[@]}" --steps 1 --warmup 0 \
  --no-reference >/dev/null 2>"$bin/ncu.err"
echo "ncu exit $?"; tail -3 "$bin/ncu.err"

python3 - "$OUT" "$bin/profile.csv" <<'PY'
import csv, json, re, sys
out = sys.argv[1]
rows = list(csv.DictReader(l for l in open(sys.argv[2]) if l.startswith('"')))
rows = [r for r in rows if r.get("gpu__time_duration.sum", "").replace(".", "").replace(",", "").isdigit()]
def short(name):
    name = re.sub(r"<.*", "", name)
    return re.sub(r"\(.*", "", name).strip()
groups = {}
for r in rows:
    unit_ns = float(r["gpu__time_duration.sum"].replace(",", ""))
    k = short(r["Kernel Name"])
    g = groups.setdefault(k, [0, 0.0])
    g[0] += 1
    g[1] += unit_ns
total = sum(g[1] for g in groups.values())
lines = [f"{len(rows)} kernels, {total / 1e6:.1f} ms of GPU time in one step"]
for k, (n, ns) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:40]:
    lines.append(f"{ns / 1e6:9.2f} ms {100 * ns / total:5.1f}%  {n:6d}x  {k[:110]}")
open(f"{out}/profile.txt", "w").write("\n".join(lines) + "\n")
json.dump({"kernels": len(rows), "gpu_ms": total / 1e6,
           "groups": {k: {"count": n, "ms": ns / 1e6} for k, (n, ns) in groups.items()}},
          open(f"{out}/profile.json", "w"), indent=1)
print("\n".join(lines))
PY
rm -rf "$bin"
