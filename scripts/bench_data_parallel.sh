#!/usr/bin/env bash
# Data-parallel scaling on this machine: the same training job on 1 rank and on N ranks
# (mpirun), each rank with THREADS threads, the global batch the same (N ranks x --batch B
# against 1 rank x --grad-accum N). Prints the whole job's tokens/s of each, the ratio, and the
# share of step time the ranks spent waiting on communication (medians over the steps after
# the first).
# Usage: scripts/bench_data_parallel.sh [CONFIG] [SEQ] [BATCH] [STEPS] [RANKS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/llama-d512-l8.json}
SEQ=${2:-1024}
BATCH=${3:-2}
STEPS=${4:-6}
RANKS=${5:-2}
THREADS=${6:-1}
BIN=${BIN:-build/subllm}
[ -x "$BIN" ] || bash scripts/build.sh
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Any text does: the speed does not depend on it. The repository's docs make a small corpus.
"$BIN" prepare README.md docs -o "$work/data" --vocab 1000 --valid-every 2 >/dev/null
as_root=()
[ "$(id -u)" = 0 ] && as_root=(--allow-run-as-root)
common=(train --config "$CONFIG" --data "$work/data" --seq "$SEQ" --batch "$BATCH" --steps "$STEPS"
        --eval-every 0 --ckpt-every 0 -t "$THREADS" -q)
OMP_NUM_THREADS=$THREADS "$BIN" "${common[@]}" --grad-accum "$RANKS" --out "$work/one" >/dev/null
mpirun "${as_root[@]}" --oversubscribe --bind-to none -np "$RANKS" -x OMP_NUM_THREADS="$THREADS" \
  "$BIN" "${common[@]}" --out "$work/many" >/dev/null
/usr/bin/python3 - "$work/one/metrics.jsonl" "$work/many/metrics.jsonl" "$RANKS" "$THREADS" <<'PY'
import json, statistics, sys
def load(path):
    rows = [json.loads(l) for l in open(path)]
    rows = rows[1:] if len(rows) > 1 else rows  # the first step pays for planning and page faults
    per_step = [json.loads(l) for l in open(path)][0]["tokens"]
    tps = statistics.median(per_step / r["step_s"] for r in rows)
    comm = statistics.median(r.get("comm_share", 0.0) for r in rows)
    return tps, comm, per_step
one, many = load(sys.argv[1]), load(sys.argv[2])
ranks, threads = int(sys.argv[3]), int(sys.argv[4])
assert one[2] == many[2], "the two jobs must have the same global batch"
print(json.dumps({"tokens_per_step": one[2], "one_rank_tokens_per_s": round(one[0], 1),
                  "ranks": ranks, "threads_per_rank": threads, "ranks_tokens_per_s": round(many[0], 1),
                  "scaling": round(many[0] / one[0], 3), "comm_share": round(many[1], 4)}))
print(f"1 rank x {threads} thread(s): {one[0]:.0f} tok/s; {ranks} ranks x {threads}: {many[0]:.0f} tok/s; "
      f"x{many[0] / one[0]:.2f}; ranks waited on communication for {100 * many[1]:.1f}% of each step")
PY
