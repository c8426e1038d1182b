#!/usr/bin/env bash
# On a 2-GPU machine: a rank of an NCCL training job is frozen (SIGSTOP) or
# killed (SIGKILL) mid-run; prints how the job ended and how long it took.
#   bench/gpu_faults.sh OUT_DIR   (expects build-gpu/reformer)
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for sig in STOP KILL; do
  log="$out/fault-$sig.log"
  REFORMER_BIN=build-gpu/reformer launch/run_node.sh 2 train --config configs/multi-gpu-dp.yaml \
    --set parallel.timeout_s=10 --set training.steps=1000000 --set training.log_every=10 \
    --set checkpoint.dir=/tmp/fault-$sig --set checkpoint.resume=none > "$log" 2>&1 &
  job=$!
  for _ in $(seq 120); do grep -q '^step' "$log" && break; sleep 0.5; done
  victim=$(pgrep -f 'build-gpu/reformer train' | tail -1)
  t0=$(date +%s.%N)
  kill -$sig "$victim"
  status=timeout
  for _ in $(seq 240); do
    if ! kill -0 $job 2>/dev/null; then wait $job; status=$?; break; fi
    sleep 0.5
  done
  t1=$(date +%s.%N)
  kill -KILL "$victim" 2>/dev/null
  printf 'SIG%s to pid %s: job exit %s after %.1f s\n' "$sig" "$victim" "$status" \
    "$(awk "BEGIN { print $t1 - $t0 }")"
  grep -E 'did not complete|\[rank|exited on signal' "$log" | head -4
done
