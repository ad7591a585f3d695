#!/usr/bin/env bash
# The main job on a fresh machine: install dependencies, build, fetch and tokenize the
# default corpus (State of the Union addresses + Moby-Dick), train the default SUBLLM (two
# nested subsamplers, T(TT(TT)TT)T, d 256) on all cores, plot its loss and retention curves,
# generate a sample from it, time a few training steps of it against the same-size LLaMA, and
# end with a summary: validation loss, each subsampler's retention, the speed-up.
# Arguments go to `subllm train` (e.g. --steps 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
BIN=build/subllm
SUBLLM=configs/subllm-d256-l8.json
LLAMA=configs/llama-d256-l8.json
[ -f data/default/manifest.json ] || "$BIN" prepare
# Run again with no arguments, the main job replaces its own previous run (train refuses a
# folder that holds a run unless told so); with arguments, they decide.
if [ $# -eq 0 ] && [ -f runs/default/metrics.jsonl ]; then
  echo "run.sh: replacing the previous run in runs/default"
  set -- --overwrite
fi
mkdir -p runs
"$BIN" train --config "$SUBLLM" --out runs/default "$@" | tee runs/train.out
"$BIN" plot runs/default -o runs/default/curves.png
"$BIN" plot runs/default --retention -o runs/default/retention.png
echo
"$BIN" generate -m runs/default -p "The state of the Union" -n 80 --temp 0.8 --seed 1 --stats
echo
echo "=== training speed: the same SUBLLM and LLaMA on random tokens, measured now"
"$BIN" bench train --config "$SUBLLM" --baseline "$LLAMA" --seq 256 --batch 16 --steps 4 --warmup 1 |
  tee runs/bench.out

# The summary, from the lines the two commands above printed.
echo
echo "=== summary"
awk '/^steps /{
  for (i = 1; i <= NF; i++) {
    if ($i == "validation") loss = $(i + 2)
    if ($i == "retention") { r = ""; for (j = i + 1; j <= NF; j++) r = r " " $j }
  }
  printf "SUBLLM T(TT(TT)TT)T, d 256, 8 blocks: validation loss %s (inference mode), after %s steps\n", loss, $2
  printf "retention per subsampler:%s (target 0.64 each)\n", r
}' runs/train.out
awk '/^speed vs baseline/{ sub(/^speed vs baseline +/, ""); print "training speed against the same-size LLaMA: " $0 }' runs/bench.out
echo "curves: runs/default/curves.png, runs/default/retention.png"
