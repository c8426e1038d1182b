#!/usr/bin/env bash
# Where the data-parallel step's extra time goes: per-op, per-rank times with
# and without the gradient sum (`reformer bench --breakdown` under mpirun), for
# 25 MB buckets (overlapped) and one bucket after the backward (not overlapped).
#   bench/overlap_probe.sh OUT_DIR [LENGTH]
set -uo pipefail
out=${1:?output folder}
len=${2:-65536}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
n=$(nvidia-smi -L | wc -l)
for mb in 25 100000; do
  REFORMER_BIN=build-gpu/reformer timeout 300 launch/run_node.sh "$n" bench \
    --config configs/bench-peer.yaml --lengths "$len" --steps 6 --breakdown \
    --set training.batch_size="$n" --set parallel.bucket_mb=$mb > "$out/probe-$len-$mb.log" 2>&1
  echo "== bucket_mb $mb, length $len"
  grep -A3 '^| layout' "$out/probe-$len-$mb.log"
  grep -A14 '^| op |' "$out/probe-$len-$mb.log"
done
