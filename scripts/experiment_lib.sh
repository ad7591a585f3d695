# Shared by the experiment scripts (sourced): builds the engine and prepares the default corpus
# when missing, and defines `run NAME ARGS...`, which trains OUT/NAME with COMMON plus ARGS
# (progress in OUT/NAME.log, the summary printed and kept in OUT/NAME.summary).
# With RUNS="name1 name2" in the environment only those runs train; every other one must
# already be in OUT (from an earlier run of the same script).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${BIN:-build/subllm}
[ -x "$BIN" ] || bash scripts/build.sh
[ -f data/default/manifest.json ] || "$BIN" prepare
run() {
  local name=$1; shift
  mkdir -p "$OUT"
  if [ -n "${RUNS:-}" ] && [[ " $RUNS " != *" $name "* ]]; then
    if [ ! -f "$OUT/$name/metrics.jsonl" ]; then
      echo "error: $OUT/$name is missing: add $name to RUNS, or leave RUNS empty to train every run" >&2
      exit 1
    fi
    echo "== $name (kept from $OUT/$name)"
    return 0
  fi
  echo "== $name"
  "$BIN" train -o "$OUT/$name" "${COMMON[@]}" "$@" 2>"$OUT/$name.log" | tee "$OUT/$name.summary"
}
