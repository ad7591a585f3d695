#!/usr/bin/env bash
# Few-shot accuracy of the models trained by scripts/experiment_quality.sh on the spam task
# (spam-assassin e-mails, `subllm prepare --task spam`), three seeds each, both scorings.
# Usage: scripts/experiment_fewshot.sh [RUNS_DIR] [MAX_TEST]
#   MODELS="subllm-adamw subllm-scaledadam"  evaluates only these
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/quality}
MAX_TEST=${2:-100}
BIN=${BIN:-build/subllm}
[ -f data/spam/test.jsonl ] || "$BIN" prepare --task spam
for run in ${MODELS:-llama-adamw subllm-adamw llama-scaledadam subllm-scaledadam}; do
  for scoring in loglik generate; do
    "$BIN" eval fewshot -m "$RUNS/$run" --task spam --train data/spam/train.jsonl --test data/spam/test.jsonl \
      --shots 2 --seed 1 --seed 2 --seed 3 --max-test "$MAX_TEST" --scoring "$scoring" --json 2>/dev/null |
      /usr/bin/python3 -c "import json,sys; j=json.load(sys.stdin); print('| $run | $scoring | ' + ' / '.join(f'{s[\"accuracy\"]:.0f}' for s in j['seeds']) + f' | {j[\"mean\"]:.1f} ± {j[\"std\"]:.1f} |')"
  done
done
