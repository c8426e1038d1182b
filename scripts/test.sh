#!/usr/bin/env bash
# Sets up, builds and runs every test: the checkpoint (format, reliability,
# corruption campaign) and config suites under AddressSanitizer and UBSan first, then every CTest test: the
# cpu and mpi labels always, the gpu label too (its tests skip themselves
# where no GPU exists).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1


if [ "${REFORMER_SKIP_ASAN:-0}" != 1 ]; then
  asan_tests="test_checkpoint test_checkpoint_reliability test_checkpoint_corruption test_config"
  # The corruption campaign also runs the program itself: build it sanitized too.
  BUILD_DIR=build-asan BUILD_TYPE=Debug CMAKE_ARGS="-DREFORMER_ASAN=ON -DREFORMER_CUDA=OFF" \
    TARGETS="$asan_tests reformer" scripts/setup.sh >/dev/null
  for t in $asan_tests; do
    echo "== $t under AddressSanitizer + UBSan"
    ASAN_OPTIONS=detect_leaks=1 LSAN_OPTIONS=suppressions=tests/lsan.supp \
      UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "build-asan/$t" --gtest_brief=1
  done
fi

# The full suite last, so its summary closes the output.
scripts/setup.sh
ctest --test-dir build --output-on-failure -j "${JOBS:-$(nproc)}"
