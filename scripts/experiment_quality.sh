#!/usr/bin/env bash
# LLaMA against SUBLLM, each with AdamW and with the paper's ScaledAdam + Eden, trained on
# the default corpus with the same data order, steps and tokens. Writes runs/quality/<name>,
# a loss-curve plot and a summary table (docs/RESULTS.md quotes it).
# Usage: scripts/experiment_quality.sh [STEPS] [OUT]
#   RUNS="subllm-adamw subllm-scaledadam"  trains only these (the others must be in OUT already)
set -euo pipefail
STEPS=${1:-450}
OUT=${2:-runs/quality}
source "$(dirname "$0")/experiment_lib.sh"
# d 256, 12 blocks: 6 outside, 4 inside one subsampler, 2 inside both (the paper's 24-block
# layout halved), retention 0.64 at both levels.
COMMON=(--dim 256 --heads 4 --batch 8 --seq 512 --steps "$STEPS" --eval-every 50 --eval-batches 16
        --ckpt-every 0 --keep 1 --seed 1)
LLAMA=(--structure TTTTTTTTTTTT)
SUBLLM=(--structure "TTT(TT(TT)TT)TTT" --retention 0.64)
ADAMW=(--optimizer adamw --lr 2e-3 --warmup 50 --schedule cosine)
PAPER=(--recipe paper --warmup 50 --lr-batches 5000)
run llama-adamw "${LLAMA[@]}" "${ADAMW[@]}"
run subllm-adamw "${SUBLLM[@]}" "${ADAMW[@]}"
run llama-scaledadam "${LLAMA[@]}" "${PAPER[@]}"
run subllm-scaledadam "${SUBLLM[@]}" "${PAPER[@]}"
"$BIN" plot "$OUT/llama-adamw" "$OUT/subllm-adamw" "$OUT/llama-scaledadam" "$OUT/subllm-scaledadam" \
  -o "$OUT/curves.svg"
/usr/bin/python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
rows = {}
for name in ["llama-adamw", "subllm-adamw", "llama-scaledadam", "subllm-scaledadam"]:
    m = [json.loads(l) for l in open(os.path.join(out, name, "metrics.jsonl"))]
    val = [x for x in m if "val_loss" in x]
    tps = m[-1]["tokens"] / sum(x["step_s"] for x in m)
    rows[name] = dict(val=val[-1]["val_loss"], best=min(x["val_loss"] for x in val), tps=tps,
                      ret=val[-1].get("retention"), tokens=m[-1]["tokens"])
print("| run | final valid loss | best valid loss | train tokens/s | retention (inference) | tokens |")
print("|---|---|---|---|---|---|")
for k, r in rows.items():
    ret = " / ".join(f"{x:.3f}" for x in r["ret"]) if r["ret"] else "-"
    print(f"| {k} | {r['val']:.4f} | {r['best']:.4f} | {r['tps']:.0f} | {ret} | {r['tokens']} |")
for opt in ["adamw", "scaledadam"]:
    l, s = rows[f"llama-{opt}"], rows[f"subllm-{opt}"]
    print(f"\n{opt}: SUBLLM/LLaMA valid loss {s['val'] / l['val']:.4f} ({100 * (s['val'] / l['val'] - 1):+.2f}%), "
          f"training speed x{s['tps'] / l['tps']:.3f}")
PY
