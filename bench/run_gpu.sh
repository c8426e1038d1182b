#!/usr/bin/env bash
# On a GPU machine: build, run the GPU test suite, train the built-in default
# run, break a training step down by op (reformer bench --breakdown), time `reformer bench` on
# the peers' model and the 12-layer enwik8 recipe, then the peers themselves
# in the same call, 1M tokens in the leanest memory layout, and print the
# one-GPU target table (bench/target_table.py).
#   bench/run_gpu.sh OUT_DIR [LENGTHS [PEERS_SCRIPT [PEER_LENGTHS]]]
# e.g. bench/run_gpu.sh /tmp/out 16384,65536,1048576 .peers/peer_bench.py 65536
# RUN_GPU_TESTS=0 skips the test suite and the default run (the figures
# only, for a machine whose tests ran in an earlier call).
set -uo pipefail
out=${1:?output folder}
lengths=${2:-16384,65536,1048576}
peers=${3:-}
peer_lengths=${4:-$lengths}
mkdir -p "$out"
cd "$(dirname "$0")/.."

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvcc --version | tail -1; } \
  > "$out/machine.txt" 2>&1
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DREFORMER_BENCH=ON > "$out/build.log" 2>&1 && cmake --build build-gpu -j"$(nproc)" >> "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
if [ "${RUN_GPU_TESTS:-1}" != 0 ]; then
  ctest --test-dir build-gpu -L gpu -j8 --output-on-failure > "$out/gpu-tests.log" 2>&1
  echo "gpu tests: $(grep -E 'tests passed|tests failed' "$out/gpu-tests.log" | tail -1)"
  build-gpu/reformer train --set checkpoint.dir=/tmp/reformer-default-ckpt --set checkpoint.resume=none \
    > "$out/default.log" 2>&1
  echo "default run: $(grep -E '^eval' "$out/default.log" | tail -1)"
fi
build-gpu/reformer bench --config configs/bench-peer.yaml --lengths 65536 --steps 2 --breakdown \
  > "$out/breakdown.txt" 2>&1
tail -n 40 "$out/breakdown.txt"
build-gpu/reformer bench --config configs/bench-peer.yaml --lengths "$lengths" --steps 2 \
  > "$out/bench.log" 2>&1
grep -E '^\|' "$out/bench.log" || tail -20 "$out/bench.log"
if [ -n "$peers" ]; then
  for p in hf flash; do
    PYTHONUNBUFFERED=1 timeout 900 python3 "$peers" "$p" "$peer_lengths" > "$out/peer-$p.log" 2>&1
    grep '^{' "$out/peer-$p.log"
  done
fi
build-gpu/reformer bench --config configs/enwik8.yaml --set data.kind=duplication \
  --set training.batch_size=1 --lengths 65536 --steps 2 > "$out/enwik8.log" 2>&1
grep -E '^\| cuda' "$out/enwik8.log" || tail -5 "$out/enwik8.log"
# 1M in the leanest layout: one head and one hash round per attention call,
# no layer kept, 4K loss chunks; 6 layers with 16K feed-forward and 32K
# projection chunks (configs/long-1m-24gb.yaml's), 12 layers with 8K and 32K
# (memory against speed; docs/memory.md).
lean="--set model.attn_heads_per_pass=1 --set model.attn_rounds_per_pass=1 --set model.kept_layers=0 --set model.loss_chunk=4096"
build-gpu/reformer bench --config configs/bench-peer.yaml --lengths 1048576 --steps 2 $lean \
  --set model.ffn_chunk=16384 --set model.proj_chunk=32768 > "$out/lean-1m.log" 2>&1
grep -E '^\| cuda' "$out/lean-1m.log" || tail -5 "$out/lean-1m.log"
build-gpu/reformer bench --config configs/bench-peer.yaml --lengths 1048576 --steps 2 $lean \
  --set model.ffn_chunk=8192 --set model.proj_chunk=32768 --set model.n_layers=12 \
  > "$out/lean-1m-12.log" 2>&1
grep -E '^\| cuda' "$out/lean-1m-12.log" || tail -5 "$out/lean-1m-12.log"
build-gpu/reformer plan --config configs/bench-peer.yaml > "$out/plan.txt" 2>&1
python3 bench/target_table.py "$out"
