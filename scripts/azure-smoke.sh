#!/usr/bin/env bash
# Live smoke test of `ferrotune azure` against a real Azure ML workspace: the source document's
# steps 8-11 (register, endpoint, deployment "demo", traffic, score, delete) and, with SUBMIT=1,
# the fine-tuning job itself. CI never runs it (no Azure is reachable from CI); run it by hand.
#
# Needs: credentials (AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET, `az login`, or a
# managed identity), the workspace (config.json here or above, or FERROTUNE_AZURE_SUBSCRIPTION_ID,
# FERROTUNE_AZURE_RESOURCE_GROUP, FERROTUNE_AZURE_WORKSPACE), quota for INSTANCE_TYPE, and for
# SUBMIT=1 a GPU cluster (COMPUTE), a training config (SUBMIT_CONFIG) and a CUDA build
# (scripts/build-cuda.sh --cap 80 → dist/cuda-sm80/ferrotune.gz).
#
#   scripts/azure-smoke.sh                    # register → endpoint → deploy → traffic → invoke → delete
#   SUBMIT=1 COMPUTE=gpu-a100 SUBMIT_CONFIG=train.yaml scripts/azure-smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
F="${FERROTUNE:-target/release/ferrotune}"
[ -x "$F" ] || cargo build --release -p ferrotune-cli
INSTANCE_TYPE="${INSTANCE_TYPE:-Standard_NC6s_v3}"
work="$(mktemp -d)"
ts="$(date +%s)"

"$F" azure login --check
if [ -n "${COMPUTE:-}" ]; then
  "$F" azure compute check --compute "$COMPUTE"
fi

if [ "${SUBMIT:-0}" = 1 ]; then
  : "${COMPUTE:?SUBMIT=1 needs COMPUTE (a GPU cluster)}" "${SUBMIT_CONFIG:?SUBMIT=1 needs SUBMIT_CONFIG}"
  "$F" run --workdir "$work/run" >/dev/null   # only for sample_score.json
  "$F" azure run --config "$SUBMIT_CONFIG" --compute "$COMPUTE" --instance-type "$INSTANCE_TYPE" \
    --endpoint "ferrotune-smoke-$ts" --score-file "$work/run/sample_score.json" --delete
  exit 0
fi

# A local fine-tune of the bundled tiny model gives an MLflow folder to register and serve.
"$F" run --workdir "$work/run"
name=ferrotune-smoke-ultrachat-200k
ep="ferrotune-smoke-$ts"
"$F" azure register --path "$work/run/export" --name "$name" --version "$ts"
"$F" azure register --path "$work/run/export" --name "$name" --version "$((ts + 1))"   # uploads nothing
"$F" azure endpoint create "$ep"
trap '"$F" azure delete --endpoint "$ep" --yes' EXIT
"$F" azure deploy --endpoint "$ep" --name demo --model "$name:$ts" --instance-type "$INSTANCE_TYPE"
"$F" azure traffic --endpoint "$ep" demo=100
"$F" azure keys --endpoint "$ep"
"$F" azure invoke --endpoint "$ep" --deployment demo --file "$work/run/sample_score.json"
echo "azure smoke test passed"
