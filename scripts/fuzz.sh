#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ (clang, with AddressSanitizer and UBSan) in build-fuzz
# and runs each on a copy of its seed corpus (the checked-in corpus never grows) for
# SECONDS_PER_TARGET seconds, 15 by default: about a minute for the four targets.
# Fails when a target finds a crash, a sanitizer report, an exception other than
# subllm::Error, a hang (over 10 s on one input) or an allocation over 512 MB; the inputs
# that did are saved under build-fuzz/crashes/<target>/ and printed, with the command that
# replays one.
# The mutations follow a fixed seed (FUZZ_SEED, 1 by default), so that a run repeats the one
# before on the same code; FUZZ_SEED=0 draws a new seed each run, for long runs that explore.
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#   FUZZ_TARGETS="config dataset" FUZZ_SEED=0 scripts/fuzz.sh 600    # some of the targets, longer
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-15}
build=${FUZZ_BUILD_DIR:-build-fuzz}
read -r -a targets <<< "${FUZZ_TARGETS:-safetensors config dataset tokenizer}"

log="$build/build.log"
mkdir -p "$build"
if ! { CC=clang CXX=clang++ cmake -S . -B "$build" -DSUBLLM_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo &&
       cmake --build "$build" -j"${JOBS:-2}"; } > "$log" 2>&1; then
  cat "$log"
  echo "fuzz: building the fuzz targets failed (clang and libclang-rt-14-dev: scripts/setup.sh --tests)" >&2
  exit 1
fi

work="$build/run"
rm -rf "$work"
mkdir -p "$work/tmp"
failed=0
for t in "${targets[@]}"; do
  [ -d "fuzz/corpus/$t" ] || { echo "fuzz: no target '$t' (have: $(ls fuzz/corpus | tr '\n' ' '))" >&2; exit 2; }
  cp -r "fuzz/corpus/$t" "$work/corpus-$t"
  crashes="$build/crashes/$t"
  mkdir -p "$crashes"
  touch "$work/start-$t"
  rc=0
  # The targets write their inputs to files under TMPDIR, kept inside the build folder.
  TMPDIR="$work/tmp" "$build/fuzz/fuzz_$t" -seed="${FUZZ_SEED:-1}" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -malloc_limit_mb=512 -artifact_prefix="$crashes/" -print_final_stats=1 "$work/corpus-$t" \
    > "$work/$t.log" 2>&1 || rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
  if [ "$rc" -eq 0 ]; then
    echo "fuzz $t: ok, ${runs:-?} inputs in ${seconds} s"
  else
    failed=1
    echo "fuzz $t: FAILED (exit $rc) after ${runs:-?} inputs; the end of its log ($work/$t.log):"
    grep -E "ERROR|runtime error|SUMMARY|uncaught|terminate|Test unit written" "$work/$t.log" | head -20 | sed 's/^/  /'
    find "$crashes" -type f -newer "$work/start-$t" | while read -r f; do
      echo "  input: $f  (replay: $build/fuzz/fuzz_$t $f)"
    done
  fi
done
rm -rf "$work/tmp"
exit "$failed"
