#!/bin/sh
# usage: out_of_memory.sh REFORMER CONFIG WORK_DIR
#
# Trains CONFIG at a length no GPU holds (model.max_len 16M, about 2.5 times
# what fits one H200) and passes when the run ends with status 1 (not a
# signal) and says what it asked for, what the device has, what the memory
# plan needs and the longest max_len that fits. Skipped (77) without a GPU.
reformer=$1
config=$2
work=$3
if ! nvidia-smi -L > /dev/null 2>&1; then
  echo "out_of_memory: no GPU, skipped"
  exit 77
fi
out=$("$reformer" train --config "$config" --set training.device=cuda \
  --set model.max_len=16777216 --set training.steps=1 --set checkpoint.resume=none \
  --set checkpoint.dir="$work" 2>&1)
rc=$?
printf '%s\n' "$out"
if [ "$rc" -ne 1 ]; then
  echo "out_of_memory: exit status $rc, expected 1"
  exit 1
fi
for regex in \
  "^reformer: error: out of device memory: .* asked for [0-9.]+ GiB; the device has [0-9.]+ GiB free of [0-9.]+ GiB" \
  "the memory plan \(reformer plan\) says a step at model.max_len = 16777216 needs [0-9.]+ GiB per GPU; the longest max_len that fits in [0-9.]+ GiB is [0-9]+$"; do
  if ! printf '%s\n' "$out" | grep -Eq -- "$regex"; then
    echo "out_of_memory: output does not match '$regex'"
    exit 1
  fi
done
echo "out_of_memory: the run ended with status 1 and the plan's figures"
