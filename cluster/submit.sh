#!/usr/bin/env bash
# Submit XGeM training to a running Ray cluster (the A100 cluster of a100-cluster.yaml, a KubeRay
# RayCluster, or any Ray >= 2.60 cluster with ray[default] on the head).
#
#   RAY_ADDRESS=http://<head>:8265 SHARDS=s3://bucket/mimic-cxr-512 STORAGE=s3://bucket/xgem-runs \
#   TOKENIZERS=/fsx/tokenizers WORKERS=16 CONFIG=xgem-frontal-256 STEPS=172000 bash cluster/submit.sh
#
# USE_GPU=0 runs the workers on CPUs (gloo) for a cluster without GPUs. MIN_WORKERS makes the group
# elastic down to that many; every count from MIN_WORKERS to WORKERS must divide the global batch
# (xgem-dist refuses the job otherwise), so the default is a fixed group of WORKERS.
set -euo pipefail
: "${RAY_ADDRESS:?the Ray dashboard address, e.g. http://head:8265}"
: "${SHARDS:?shard set root (s3://..., gs://..., or a shared path)}"
: "${STORAGE:?checkpoint storage (s3://..., gs://..., or a shared path)}"
: "${TOKENIZERS:?folder with clip/ bert/ gpt2/ tokenizers, on every node}"
WORKERS="${WORKERS:-16}"
CONFIG="${CONFIG:-xgem-frontal-256}"
# ~100 epochs (the released recipe) of the ~220k MIMIC-CXR training studies at global batch 128
STEPS="${STEPS:-172000}"
NAME="${NAME:-$CONFIG}"           # reuse a name to resume that run from its latest checkpoint
GPU_ARGS=()
[[ "${USE_GPU:-1}" == 1 ]] && GPU_ARGS=(--use-gpu)
ELASTIC_ARGS=()
[[ -n "${MIN_WORKERS:-}" ]] && ELASTIC_ARGS=(--min-workers "$MIN_WORKERS")
cd "$(dirname "$0")/.."
exec ray job submit --address "$RAY_ADDRESS" --runtime-env cluster/runtime_env.yaml -- \
  xgem-dist train --config "$CONFIG" --address auto "${GPU_ARGS[@]}" --num-workers "$WORKERS" \
    "${ELASTIC_ARGS[@]}" --steps "$STEPS" --storage-path "$STORAGE" --name "$NAME" \
    --max-failures "${MAX_FAILURES:-10}" --shards "$SHARDS" --set "tokenizers=$TOKENIZERS" "$@"
