#!/usr/bin/env bash
# Training throughput of subllm against PyTorch (Debian python3-torch) on the same model
# and shapes, measured back to back in one run. Prints both JSON lines and the ratios.
# Usage: scripts/bench_train_vs_pytorch.sh [CONFIG] [STEPS] [THREADS] ["SEQxBATCH ..."]
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:-configs/llama-d512-l8.json}
STEPS=${2:-3}
THREADS=${3:-2}
SHAPES=${4:-"1024x4 2048x2"}
BIN=${BIN:-build/subllm}
[ -x "$BIN" ] || bash scripts/build.sh
/usr/bin/python3 -c "import torch" 2>/dev/null || bash scripts/setup.sh --tests  # the peer's PyTorch
for shape in $SHAPES; do
  seq=${shape%x*}; batch=${shape#*x}
  ours=$("$BIN" bench train --config "$CONFIG" --seq "$seq" --batch "$batch" --steps "$STEPS" --threads "$THREADS" --json)
  theirs=$(OMP_NUM_THREADS=$THREADS /usr/bin/python3 bench/pytorch_train_bench.py --config "$CONFIG" --seq "$seq" \
           --batch "$batch" --steps "$STEPS" --threads "$THREADS" 2>/dev/null)
  echo "$ours"
  echo "$theirs"
  /usr/bin/python3 - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"seq {a['seq']} batch {a['batch']}: subllm {a['tokens_per_s']:.1f} tok/s, pytorch {b['tokens_per_s']:.1f} tok/s, "
      f"speed x{a['tokens_per_s'] / b['tokens_per_s']:.2f}; MFU {100 * a['mfu']:.1f}% of sgemm {a['sgemm_gflops']:.0f} GFLOP/s; "
      f"peak RSS {a['peak_rss_mb']:.0f} MB vs {b['peak_rss_mb']:.0f} MB (x{a['peak_rss_mb'] / b['peak_rss_mb']:.2f})")
PY
done
