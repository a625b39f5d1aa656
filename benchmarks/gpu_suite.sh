#!/usr/bin/env bash
# Every GPU measurement the kernels and the loader need, on one GPU and without Ray, in one command per
# part. Each step is bounded by a timeout, and its limits add up to under 10 minutes a part. Each step
# logs to OUT/NAME.log as it goes (its tail is printed after it), so a part stopped from outside still
# leaves what it measured; JSON results go to OUT too.
#
#   bash benchmarks/gpu_suite.sh OUT kernels   # GPU attention tests, attention TFLOP/s, UNet step stock vs auto
#                                              # attention vs auto attention + GroupNorm, by kernel family (~6 min)
#   bash benchmarks/gpu_suite.sh OUT norm      # GPU GroupNorm tests, GroupNorm+SiLU Triton vs torch (~2 min)
#   bash benchmarks/gpu_suite.sh OUT data      # DALI tests (GPU vs PIL); full-size demo shards: DALI GPU vs PIL vs
#                                              # no-decode img/s (~5 min)
#   bash benchmarks/gpu_suite.sh OUT wait      # a profiled xgem frontal-stage run on those shards (made again if
#                                              # WORK lost them): data wait vs step time (~5 min)
#
# Needs CUDA torch, triton, and this package's dependencies (benchmarks/offline_wheels.sh gathers the
# ones a stock CUDA PyTorch image lacks; kernels and norm need only its core set). WORK (default
# /tmp/xgem_gpu) holds data and the profiled run. CONFIG and DECODER (default xgem-frontal-256 and
# dali-gpu) pick the profiled run's preset and decoder (CONFIG=tiny-frontal DECODER=pil runs the data
# and wait parts' plumbing on a CPU).
set -uo pipefail
USAGE="usage: gpu_suite.sh OUT kernels|norm|data|wait"
OUT=${1:?$USAGE}
PART=${2:?$USAGE}
WORK=${WORK:-/tmp/xgem_gpu}
CONFIG=${CONFIG:-xgem-frontal-256}
DECODER=${DECODER:-dali-gpu}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # DeepSpeed's op builder cannot parse '9.0a'
failed=0

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  tail -n 30 "$OUT/$name.log"
  [ "$rc" = 0 ] || failed=1
}

make_shards() {  # full-size demo studies, sharded as they are and at --max-side 512, once per WORK
  [ -f "$WORK/shards-full/summary.json" ] && [ -f "$WORK/shards-512/summary.json" ] && return
  step make_shards 200 bash -c "
    python3 -m xgem_dist.cli make-demo '$WORK/mimic' --full-size --studies 96 > /dev/null &&
    python3 -m xgem_dist.cli shard --images '$WORK/mimic' --reports '$WORK/mimic' --out '$WORK/shards-full' \
      --samples-per-shard 32 --workers 8 &&
    python3 -m xgem_dist.cli shard --images '$WORK/mimic' --reports '$WORK/mimic' --out '$WORK/shards-512' \
      --samples-per-shard 32 --workers 8 --max-side 512"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

case "$PART" in
kernels)
  step kernel_tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "gpu or single_key or swapping"
  step attention 330 python3 benchmarks/attention_gpu.py --json "$OUT/attention_gpu.json"
  ;;
norm)
  step norm_tests 240 python3 -m pytest -q -p no:cacheprovider tests/test_group_norm.py
  step group_norm 240 python3 benchmarks/group_norm_gpu.py --json "$OUT/group_norm_gpu.json"
  ;;
data)
  step loader_tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_loader.py -k dali
  make_shards
  step loader 220 python3 benchmarks/loader_throughput.py --shards "$WORK/shards-full" --shards "$WORK/shards-512" \
    --decoder "$DECODER" --decoder pil --decoder read-only --batch 64 --steps 20 --json "$OUT/loader_throughput.json"
  ;;
wait)
  make_shards
  # token ids of small tokenizers are valid ids of the full-size vocabularies too
  python3 -c "from xgem_dist.data.demo import FINDINGS, IMPRESSIONS; from xgem_dist.model.tokenizers import \
train_small_tokenizers; train_small_tokenizers(FINDINGS + IMPRESSIONS).save('$WORK/tokenizers')"
  step data_wait 380 python3 -m xgem_dist.cli profile --launcher local --config "$CONFIG" \
    --shards "$WORK/shards-full" --steps 12 --out "$WORK/profile" --set global_batch=32 \
    --set tokenizers="$WORK/tokenizers" --set decoder="$DECODER"
  cp "$WORK/profile/profile.json" "$OUT/profile_data_wait.json"
  ;;
*)
  echo "unknown part $PART; $USAGE" >&2
  exit 2
  ;;
esac
exit $failed
