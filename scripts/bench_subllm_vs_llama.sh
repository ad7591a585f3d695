#!/usr/bin/env bash
# SUBLLM against LLaMA training throughput on the paper's 24-block layout at d 512, both
# measured in one run (`bench train --baseline`), at each sequence length given.
# Usage: scripts/bench_subllm_vs_llama.sh [STEPS] [THREADS] ["SEQxBATCH ..."]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-3}
THREADS=${2:-2}
SHAPES=${3:-"1024x4 2048x2"}
BIN=${BIN:-build/subllm}
[ -x "$BIN" ] || bash scripts/build.sh
for shape in $SHAPES; do
  seq=${shape%x*}; batch=${shape#*x}
  "$BIN" bench train --config configs/subllm-d512-l24.json --baseline configs/llama-d512-l24.json \
    --seq "$seq" --batch "$batch" --steps "$STEPS" --threads "$THREADS" --json
done
