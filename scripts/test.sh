#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole test suite: installs dependencies, builds,
# runs CTest (GoogleTest cases, including the PyTorch oracle) and the oracle's self-check,
# then a minute of fuzzing of the file readers (scripts/fuzz.sh) and the unit suite built with
# AddressSanitizer and UBSan (scripts/test_sanitize.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
bash scripts/build.sh -DSUBLLM_BUILD_TESTS=ON -DSUBLLM_BUILD_BENCH=ON
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# The official OpenAI client library for the server tests, at the version the lock file pins.
(cd tests/serve && npm ci --no-audit --no-fund --loglevel=error)
/usr/bin/python3 tests/oracle/check_reference.py
(cd "${BUILD_DIR:-build}" && ctest --output-on-failure --timeout 600 -j1)
bash scripts/fuzz.sh
bash scripts/test_sanitize.sh
