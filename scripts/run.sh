#!/usr/bin/env bash
# The main job on a fresh machine: install dependencies, build, fetch and tokenize the
# default corpus (State of the Union addresses + Moby-Dick), train the small default LLaMA
# for about five minutes on all cores, report its validation loss, plot its loss curves and
# generate a sample from it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
BIN=build/subllm
[ -f data/default/manifest.json ] || "$BIN" prepare
# Run again with no arguments, the main job replaces its own previous run (train refuses a
# folder that holds a run unless told so); with arguments, they decide.
if [ $# -eq 0 ] && [ -f runs/default/metrics.jsonl ]; then
  echo "run.sh: replacing the previous run in runs/default"
  set -- --overwrite
fi
"$BIN" train --out runs/default "$@"
"$BIN" plot runs/default -o runs/default/curves.png
echo
"$BIN" generate -m runs/default -p "The state of the Union" -n 80 --temp 0.8 --seed 1 --stats
