#!/usr/bin/env bash
# Builds the library, the CLI and the unit tests with AddressSanitizer and UBSan (g++, -O1 -g1,
# CPU only) in build-asan and runs the unit suite under them; any sanitizer report fails the
# run. Left out, by the gtest filter below: DistMpi.*, DistTrain.*, DistAbortChild.* and
# DistRankChild.*, which start ranks with mpirun: LeakSanitizer reports OpenMPI's own
# allocations (MPI_Init's, never freed) in every rank. Everything else runs, the PyTorch
# oracle included. Line tables only (-g1: a report's stack still names file and line) and the
# test files, the CLI and the server at -O0 (CMakeLists.txt) build in half the time of full
# debug information at -O1; the test and CLI files compile in batches (unity build, CMakeLists.txt).
# On 2 cores: about 6.5 min to build, 6 min to run.
# Extra arguments go to the test binary (e.g. --gtest_filter=Safetensors.*).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${ASAN_BUILD_DIR:-build-asan}
flags="-O1 -g1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"

log="$build/build.log"
mkdir -p "$build"
# Build type "Sanitize" has no flags of its own: the ones above are all.
if ! { cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Sanitize -DSUBLLM_CUDA=OFF -DSUBLLM_BUILD_TESTS=ON \
         -DSUBLLM_BUILD_BENCH=OFF -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_C_FLAGS="$flags" \
         -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" &&
       cmake --build "$build" -j"${JOBS:-$(nproc)}" --target subllm subllm_tests; } > "$log" 2>&1; then
  tail -50 "$log"
  echo "sanitize: the ASan/UBSan build failed (full log: $log)" >&2
  exit 1
fi

# fontconfig keeps its configuration and cairo's font caches for the life of the process, by
# design; LeakSanitizer counts them at exit. Nothing else is suppressed.
supp="$(cd "$build" && pwd)/lsan.supp"
cat > "$supp" <<'SUPP'
leak:libfontconfig.so
SUPP
export LSAN_OPTIONS=suppressions=$supp
export ASAN_OPTIONS=halt_on_error=1:detect_leaks=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# The server's load test runs 20 s here instead of 60 (the sanitized build is slower).
export SUBLLM_SERVE_LOAD_SECONDS=${SUBLLM_SERVE_LOAD_SECONDS:-20}
excluded="DistMpi.*:DistTrain.*:DistAbortChild.*:DistRankChild.*"
cd "$build"
./subllm_tests --gtest_brief=1 --gtest_filter="-$excluded" "$@"
