#!/usr/bin/env bash
# One node, one process per GPU:
#   launch/run_node.sh NGPUS train --config configs/long-2m-sp2.yaml [--set key=value]...
# Starts `mpirun -np NGPUS build/reformer ...` with the NCCL backend on
# CUDA (the caller's --set options come after and win), and prints the command before running it. Each rank
# takes the GPU of its node-local rank and says which in its first line.
set -euo pipefail
n=${1:?usage: launch/run_node.sh NGPUS COMMAND [ARGS...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${REFORMER_BIN:-$here/build/reformer}
# NVLink multicast off (NCCL_NVLS_ENABLE=0) unless the caller chose otherwise.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# The GPU defaults; REFORMER_BACKEND=mpi REFORMER_DEVICE=cpu runs the same layout on CPUs.
backend=${REFORMER_BACKEND:-nccl}
device=${REFORMER_DEVICE:-cuda}
root=()
[ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
cmd=(mpirun "${root[@]}" -np "$n" --bind-to none -x NCCL_NVLS_ENABLE
     "$bin" "$1" --set parallel.backend="$backend" --set training.device="$device" --set parallel.dp=auto "${@:2}")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
