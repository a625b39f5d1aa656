#!/usr/bin/env bash
# Submit XGeM training to a running Ray cluster (the A100 cluster of a100-cluster.yaml, a KubeRay
# RayCluster, or any Ray >= 2.60 cluster with ray[default] on the head).
#
#   RAY_ADDRESS=http://<head>:8265 SHARDS=s3://bucket/mimic-cxr-512 STORAGE=s3://bucket/xgem-runs \
#   TOKENIZERS=/fsx/tokenizers WORKERS=16 CONFIG=xgem-frontal-256 bash cluster/submit.sh
set -euo pipefail
: "${RAY_ADDRESS:?the Ray dashboard address, e.g. http://head:8265}"
: "${SHARDS:?shard set root (s3://..., gs://..., or a shared path)}"
: "${STORAGE:?checkpoint storage (s3://..., gs://..., or a shared path)}"
: "${TOKENIZERS:?folder with clip/ bert/ gpt2/ tokenizers, on every node}"
WORKERS="${WORKERS:-16}"
CONFIG="${CONFIG:-xgem-frontal-256}"
NAME="${NAME:-$CONFIG}"           # reuse a name to resume that run from its latest checkpoint
cd "$(dirname "$0")/.."
exec ray job submit --address "$RAY_ADDRESS" --runtime-env cluster/runtime_env.yaml -- \
  xgem-dist train --config "$CONFIG" --address auto --use-gpu --num-workers "$WORKERS" \
    --min-workers "${MIN_WORKERS:-8}" --storage-path "$STORAGE" --name "$NAME" \
    --max-failures "${MAX_FAILURES:-10}" --shards "$SHARDS" --set "tokenizers=$TOKENIZERS" "$@"
