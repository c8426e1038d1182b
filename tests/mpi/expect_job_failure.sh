#!/bin/sh
# usage: expect_job_failure.sh STATUS REGEX COMMAND [ARG]...
#
# Runs COMMAND (an mpirun job that is meant to fail) and passes when it exits
# with status STATUS and its output (stdout and stderr) matches the extended
# regular expression REGEX. A job that hangs instead is caught by the CTest
# TIMEOUT of the test.
status=$1
regex=$2
shift 2
out=$("$@" 2>&1)
rc=$?
printf '%s\n' "$out"
if [ "$rc" -ne "$status" ]; then
  echo "expect_job_failure: exit status $rc, expected $status"
  exit 1
fi
if ! printf '%s\n' "$out" | grep -Eq -- "$regex"; then
  echo "expect_job_failure: output does not match '$regex'"
  exit 1
fi
echo "expect_job_failure: the job ended with status $rc as expected"
