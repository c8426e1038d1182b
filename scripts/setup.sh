#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages the build needs (where missing and where
# apt-get is usable), then configures and builds into ${BUILD_DIR:-build}.
#   BUILD_DIR=build-asan CMAKE_ARGS="-DREFORMER_ASAN=ON" TARGETS="test_checkpoint" scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(cmake ninja-build g++ libhdf5-dev libyaml-cpp-dev libopenmpi-dev openmpi-bin libgtest-dev hdf5-tools)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  # Only what is absent is installed; a machine that cannot install (no
  # network, not root) still builds if the libraries are there by other means.
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/tmp/reformer-apt.log 2>&1; then
    echo "setup: apt-get failed (see /tmp/reformer-apt.log); trying to build with what is installed"
  fi
fi

build=${BUILD_DIR:-build}
jobs=${JOBS:-$(nproc)}
# shellcheck disable=SC2086
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-Release} ${CMAKE_ARGS:-}
# shellcheck disable=SC2086
cmake --build "$build" -j "$jobs" ${TARGETS:+--target $TARGETS}
