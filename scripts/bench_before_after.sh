#!/usr/bin/env bash
# The engine's headline figures for two builds in one run, alternating, so a change can be
# compared with the commit before it: LLaMA d 512 / 8 blocks training against PyTorch, SUBLLM
# against LLaMA training and inference on the 24-block configs, and LLaMA d 512 decode and
# prefill. Each build's lines follow a "== before" or "== after" header.
# Usage: BEFORE=path/to/old/subllm [AFTER=build/subllm] scripts/bench_before_after.sh [THREADS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
ROUNDS=${2:-1}
BEFORE=${BEFORE:?set BEFORE to the subllm binary of the earlier commit}
AFTER=${AFTER:-build/subllm}
for round in $(seq "$ROUNDS"); do
  for build in before after; do
    bin=$([ "$build" = before ] && echo "$BEFORE" || echo "$AFTER")
    echo "== $build (round $round)"
    BIN=$bin bash scripts/bench_train_vs_pytorch.sh configs/llama-d512-l8.json 3 "$THREADS" 1024x4
    BIN=$bin bash scripts/bench_subllm_vs_llama.sh 3 "$THREADS" 1024x4
    "$bin" bench infer --config configs/subllm-d512-l24.json --baseline configs/llama-d512-l24.json \
      --prompt-len 2048 --gen 64 -t "$THREADS" --json
    "$bin" bench infer --config configs/llama-d512-l8.json --prompt-len 256 --gen 128 -t "$THREADS" --json
  done
done
