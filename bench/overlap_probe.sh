#!/usr/bin/env bash
# Where the data-parallel step's extra time goes: per-op, per-rank times with
# and without the gradient sum (`reformer bench --breakdown` under mpirun), for
# 25 MB buckets started as soon as complete (lag 0) or one part of the
# backward later (lag 1), and one bucket after the backward (not overlapped).
#   bench/overlap_probe.sh OUT_DIR [LENGTH]
set -uo pipefail
out=${1:?output folder}
len=${2:-65536}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
n=$(nvidia-smi -L | wc -l)
for run in "25 0" "25 1" "100000 0"; do
  set -- $run
  log="$out/probe-$len-$1-lag$2.log"
  REFORMER_BIN=build-gpu/reformer timeout 300 launch/run_node.sh "$n" bench \
    --config configs/bench-peer.yaml --lengths "$len" --steps 6 --breakdown \
    --set training.batch_size="$n" --set parallel.bucket_mb="$1" --set parallel.bucket_lag="$2" \
    > "$log" 2>&1
  echo "== bucket_mb $1, bucket_lag $2, length $len"
  grep -A3 '^| layout' "$log" | tail -1
  grep 'ms/step with the sum' "$log"
  grep -A8 '^| op |' "$log"
  grep '^| all ops' "$log"
done
