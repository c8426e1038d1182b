#!/usr/bin/env bash
# On a machine with 2 or more GPUs: build, run the GPU suites (NCCL included),
# check that dp and sp runs over NCCL give the one-GPU losses, then time the
# single-GPU baseline and the multi-GPU layouts with `reformer bench` under
# mpirun. Logs go to OUT_DIR; the tables are printed last.
#   bench/run_multi_gpu.sh OUT_DIR [DP_LENGTH [SP_LENGTH [LONGEST...]]]
# RANKS=N (default: one per GPU) and BACKEND=mpi (default nccl) run the same
# steps with N ranks sharing fewer GPUs, the collectives staged through host
# memory: a rehearsal of the script on one GPU (the losses are checked; the
# speeds say nothing of NCCL).
set -uo pipefail
out=${1:?output folder}
dp_len=${2:-65536}
sp_len=${3:-1048576}
shift 3 2>/dev/null
longest=("$@")
mkdir -p "$out"
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
gpus=$(nvidia-smi -L | wc -l)
n=${RANKS:-$gpus}
backend=${BACKEND:-nccl}
mpi="mpirun --oversubscribe --bind-to none -np $n"
R=build-gpu/reformer
peer=configs/bench-peer.yaml

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvcc --version | tail -1; } \
  > "$out/machine.txt" 2>&1
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  > "$out/build.log" 2>&1 && cmake --build build-gpu -j"$(nproc)" >> "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; exit 1; }
timeout 600 ctest --test-dir build-gpu -L gpu -j8 --output-on-failure > "$out/gpu-tests.log" 2>&1
echo "gpu tests ($gpus GPUs): $(grep -E 'tests passed|tests failed' "$out/gpu-tests.log" | tail -1)"
grep -E '^\s*[0-9]+ - .*(Failed|Timeout)' "$out/gpu-tests.log" | head

# Same function over $backend: tiny.yaml on CUDA, 20 steps, one GPU vs each layout.
tiny="--config configs/tiny.yaml --set training.device=cuda --set training.steps=20
      --set training.batch_size=$n --set model.n_heads=$n --set training.log_every=1
      --set checkpoint.resume=none"
# shellcheck disable=SC2086
$R train $tiny --set checkpoint.dir=/tmp/ck1 --metrics "$out/tiny-1gpu.jsonl" > "$out/tiny-1gpu.log" 2>&1
layouts=("dp=$n sp=1 heads" "dp=1 sp=$n heads" "dp=1 sp=$n sort")
[ $((n % 2)) = 0 ] && [ "$n" -ge 4 ] && layouts+=("dp=2 sp=$((n / 2)) heads")
for layout in "${layouts[@]}"; do
  set -- $layout
  tag="${1/=/}_${2/=/}_$3"
  # shellcheck disable=SC2086
  timeout 120 $mpi $R train $tiny --set parallel.backend=$backend --set parallel.$1 --set parallel.$2 \
    --set parallel.sp_mode=$3 \
    --set checkpoint.dir=/tmp/ck-$tag --metrics "$out/tiny-$tag.jsonl" > "$out/tiny-$tag.log" 2>&1
  echo "tiny $tag exit $?: $(head -2 "$out/tiny-$tag.log" | tr '\n' ' ')"
  python3 - "$out/tiny-1gpu.jsonl" "$out/tiny-$tag.jsonl" <<'PY'
import json, sys
a = {j["step"]: j["loss"] for j in map(json.loads, open(sys.argv[1])) if "loss" in j}
b = {j["step"]: j["loss"] for j in map(json.loads, open(sys.argv[2])) if "loss" in j}
common = sorted(set(a) & set(b))
worst = max((abs(a[s] - b[s]) / abs(a[s]) for s in common), default=float("nan"))
print(f"  {len(common)} steps compared, largest relative loss difference {worst:.2e}, "
      f"first {a.get(1)} vs {b.get(1)}, last {a.get(common[-1]) if common else None} vs {b.get(common[-1]) if common else None}")
PY
done

# Baseline on one GPU, then the layouts (rank 0 prints the table).
$R bench --config $peer --lengths "$dp_len,$sp_len" --steps 3 > "$out/bench-1gpu.log" 2>&1
grep -E '^\|' "$out/bench-1gpu.log" || tail -5 "$out/bench-1gpu.log"
run() {  # tag, extra arguments
  local tag=$1; shift
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-400}" $mpi $R bench --config $peer --steps 3 --set parallel.backend=$backend \
    --set training.device=cuda "$@" > "$out/bench-$tag.log" 2>&1
  echo "bench $tag (exit $?):"; grep -E '^\|' "$out/bench-$tag.log" | tail -1 || tail -5 "$out/bench-$tag.log"
}
run dp --lengths "$dp_len" --set parallel.dp=$n --set training.batch_size=$n
# The gradient sum with larger buckets (default 25 MB): bandwidth against overlap.
[ "$backend" = nccl ] && run dpb100 --lengths "$dp_len" --set parallel.dp=$n --set training.batch_size=$n \
  --set parallel.bucket_mb=100
run sp --lengths "$sp_len" --set parallel.sp=$n --set parallel.dp=1
for L in "${longest[@]}"; do
  run "long$L" --lengths "$L" --set parallel.sp=$n --set parallel.dp=1
done
grep -h -E '^\| layout' "$out"/bench-dp.log | head -1
python3 bench/target_table_multi.py "$out" "$n"
