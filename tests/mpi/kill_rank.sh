#!/bin/sh
# usage: kill_rank.sh SIGNAL SECONDS REGEX COMMAND [ARG]...
#
# Starts COMMAND (an mpirun training job of two or more ranks that would run
# far longer than SECONDS) in the background, waits until its output shows a
# training step, sends SIGNAL (KILL: a dead rank; STOP: a frozen one) to the
# process of rank 1, and passes when the whole job then ends within SECONDS
# with a non-zero status, its output matches the extended regular expression
# REGEX, and no rank process is left. For STOP the watchdog's message must
# also name rank 1 as the rank that did not arrive or no longer runs. Whatever happens, nothing it started
# outlives it: the signalled rank is continued and killed, and a job still
# running at the deadline is killed.
sig=$1
seconds=$2
regex=$3
shift 3
out=$(mktemp)
job=
ranks=
target=

# The process ids under $1, its children first.
descendants() {
  for c in $(pgrep -P "$1"); do
    echo "$c"
    descendants "$c"
  done
}

# The value of environment variable $2 in process $1 ("" when unset or gone).
env_of() {
  tr '\0' '\n' < "/proc/$1/environ" 2>/dev/null | sed -n "s/^$2=//p"
}

cleanup() {
  for p in $target $ranks; do
    kill -CONT "$p" 2>/dev/null
    kill -KILL "$p" 2>/dev/null
  done
  if [ -n "$job" ]; then
    for p in $(descendants "$job"); do kill -KILL "$p" 2>/dev/null; done
    kill -KILL "$job" 2>/dev/null
  fi
  rm -f "$out"
}
trap cleanup EXIT

finish() {
  printf '%s\n' "--- job output" ; cat "$out"; printf '%s\n' "---"
  echo "kill_rank: $1"
  exit "$2"
}

"$@" > "$out" 2>&1 &
job=$!

# Training has started once a step line is out (rank 0 logs the first step).
waited=0
until grep -Eq '^step +[0-9]+/' "$out"; do
  kill -0 "$job" 2>/dev/null || finish "the job ended before training started" 1
  [ "$waited" -ge 600 ] && finish "no training step within 60 s" 1
  sleep 0.1
  waited=$((waited + 1))
done

for p in $(descendants "$job"); do
  r=$(env_of "$p" OMPI_COMM_WORLD_RANK)
  [ -z "$r" ] && r=$(env_of "$p" PMI_RANK)
  [ -z "$r" ] && continue
  ranks="$ranks $p"
  [ "$r" = 1 ] && target=$p
done
[ -n "$target" ] || finish "found no process of rank 1 under mpirun (pid $job)" 1

start=$(date +%s)
kill -"$sig" "$target"
echo "kill_rank: sent SIG$sig to rank 1 (pid $target)"
while kill -0 "$job" 2>/dev/null; do
  if [ $(($(date +%s) - start)) -ge "$seconds" ]; then
    finish "the job still runs $seconds s after SIG$sig to rank 1" 1
  fi
  sleep 0.2
done
wait "$job"
rc=$?
job=
took=$(($(date +%s) - start))

# mpirun has ended; give the ranks a moment to be reaped, then none may remain.
sleep 1
for p in $ranks; do
  state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$p/status" 2>/dev/null)
  [ -n "$state" ] && [ "$state" != Z ] &&
    finish "rank process $p is still there (state $state) after the job ended" 1
done
[ "$rc" -ne 0 ] || finish "the job ended with status 0 after SIG$sig to rank 1" 1
grep -Eq -- "$regex" "$out" || finish "the output does not match '$regex'" 1
named='did not complete within [0-9.]+ s: (.*; )?rank 1 (did not arrive|entered it but is not running)'
[ "$sig" != STOP ] || grep -Eq -- "$named" "$out" ||
  finish "the watchdog's message does not name rank 1 ('$named')" 1
finish "the job ended with status $rc within $took s of SIG$sig to rank 1" 0
