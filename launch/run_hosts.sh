#!/usr/bin/env bash
# Several nodes listed in an Open MPI hostfile ("host slots=GPUS" per line),
# one process per GPU:
#   launch/run_hosts.sh HOSTFILE train --config configs/long-2m-sp2.yaml [--set key=value]...
# The world size is the sum of the slots; sequence-parallel groups are
# consecutive ranks, so with --map-by slot they stay inside a node (NVLink)
# when parallel.sp divides the GPUs per node. Prints the command first.
set -euo pipefail
hostfile=${1:?usage: launch/run_hosts.sh HOSTFILE COMMAND [ARGS...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${REFORMER_BIN:-$here/build/reformer}
n=$(awk '!/^#/ && NF { for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { sub("slots=", "", $i); s += $i } }
         END { print s + 0 }' "$hostfile")
[ "$n" -gt 0 ] || { echo "run_hosts.sh: no slots= in $hostfile" >&2; exit 2; }
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
# The GPU defaults; REFORMER_BACKEND=mpi REFORMER_DEVICE=cpu runs the same layout on CPUs.
backend=${REFORMER_BACKEND:-nccl}
device=${REFORMER_DEVICE:-cuda}
root=()
[ "$(id -u)" -eq 0 ] && root=(--allow-run-as-root)
cmd=(mpirun "${root[@]}" --hostfile "$hostfile" -np "$n" --map-by slot --bind-to none
     -x NCCL_NVLS_ENABLE -x PATH -x LD_LIBRARY_PATH
     "$bin" "$1" --set parallel.backend="$backend" --set training.device="$device" --set parallel.dp=auto "${@:2}")
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
