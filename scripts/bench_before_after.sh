#!/usr/bin/env bash
# The engine's headline figures measured with two builds in one run, alternating, so a change
# can be compared with the commit before it: LLaMA d 512 / 8 blocks training (and PyTorch on the
# same shapes), SUBLLM against LLaMA training and inference on the 24-block configs, and LLaMA
# d 512 decode and prefill. Prints one JSON line per measurement, tagged "before" or "after".
# Usage: BEFORE=path/to/old/subllm AFTER=build/subllm scripts/bench_before_after.sh [THREADS] [PYTORCH=1]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
PYTORCH=${2:-1}
BEFORE=${BEFORE:?set BEFORE to the subllm binary of the earlier commit}
AFTER=${AFTER:-build/subllm}
tag() { /usr/bin/python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); d["build"]=sys.argv[1]; d["what"]=sys.argv[2]; print(json.dumps(d))' "$1" "$2"; }
for bin in "$BEFORE" "$AFTER"; do
  name=$([ "$bin" = "$BEFORE" ] && echo before || echo after)
  "$bin" bench train --config configs/llama-d512-l8.json --seq 1024 --batch 4 --steps 3 --threads "$THREADS" --json \
    | tag "$name" "train llama-d512-l8 1024x4"
done
if [ "$PYTORCH" = 1 ]; then
  OMP_NUM_THREADS=$THREADS /usr/bin/python3 bench/pytorch_train_bench.py --config configs/llama-d512-l8.json \
    --seq 1024 --batch 4 --steps 3 --threads "$THREADS" 2>/dev/null | tag pytorch "train llama-d512-l8 1024x4"
fi
for bin in "$BEFORE" "$AFTER"; do
  name=$([ "$bin" = "$BEFORE" ] && echo before || echo after)
  "$bin" bench train --config configs/subllm-d512-l24.json --baseline configs/llama-d512-l24.json \
    --seq 1024 --batch 4 --steps 3 --threads "$THREADS" --json | tag "$name" "train subllm vs llama d512-l24 1024x4"
done
for bin in "$BEFORE" "$AFTER"; do
  name=$([ "$bin" = "$BEFORE" ] && echo before || echo after)
  "$bin" bench infer --config configs/subllm-d512-l24.json --baseline configs/llama-d512-l24.json \
    --prompt-len 2048 --gen 64 -t "$THREADS" --json | tag "$name" "infer subllm vs llama d512-l24 2048"
done
for rep in 1 2; do
  for bin in "$BEFORE" "$AFTER"; do
    name=$([ "$bin" = "$BEFORE" ] && echo before || echo after)
    "$bin" bench infer --config configs/llama-d512-l8.json --prompt-len 256 --gen 64 -t "$THREADS" --json \
      | tag "$name" "infer llama-d512-l8 256+64"
  done
done
