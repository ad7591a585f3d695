#!/usr/bin/env bash
# Does each subsampler's inference-mode retention reach its target? SUBLLM against LLaMA with
# the paper's recipe (ScaledAdam, Eden, 500 warm-up steps), for two SUBLLM layouts, each next
# to the LLaMA with the same blocks: the paper's layout halved (12 blocks, 6 of them outside
# the subsamplers) and a deep one (8 blocks, 6 inside one subsampler). Same data order for
# all. For each SUBLLM it reports the validation loss and the retention per subsampler over
# the run, and how much its inner blocks are worth at the end (validation loss with every
# token skipping them: keep threshold 1e9). Each SUBLLM runs twice: with the engine's default
# score balancer, which counts the positive fraction, and with the paper's
# (--balancer-fraction gaussian), which judges it from mean/std.
# Writes runs/retention/<name>, loss-curve plots and the tables.
# Usage: scripts/experiment_retention.sh [STEPS] [OUT]
#   RUNS="subllm-deep llama-8"  trains only these (the others must be in OUT already)
set -euo pipefail
STEPS=${1:-1500}
OUT=${2:-runs/retention}
source "$(dirname "$0")/experiment_lib.sh"
# d 256, 4 heads, 4 x 256 tokens per step.
COMMON=(--dim 256 --heads 4 --batch 4 --seq 256 --steps "$STEPS" --eval-every 300 --eval-batches 32
        --ckpt-every 0 --keep 1 --seed 1 --recipe paper)
run subllm-deep --structure "T(TTTTTT)T" --retention 0.64
run subllm-deep-gaussian --structure "T(TTTTTT)T" --retention 0.64 --balancer-fraction gaussian
run llama-8 --structure TTTTTTTT
run subllm-halved --structure "TTT(TT(TT)TT)TTT" --retention 0.64
run subllm-halved-gaussian --structure "TTT(TT(TT)TT)TTT" --retention 0.64 --balancer-fraction gaussian
run llama-12 --structure TTTTTTTTTTTT
"$BIN" plot "$OUT/llama-8" "$OUT/subllm-deep" "$OUT/llama-12" "$OUT/subllm-halved" \
  --label "LLaMA 8 blocks" --label "SUBLLM T(TTTTTT)T" --label "LLaMA 12 blocks" --label "SUBLLM TTT(TT(TT)TT)TTT" \
  -o "$OUT/curves.svg" --ylim 4.4,6 --title "LLaMA vs SUBLLM, d 256, ScaledAdam + Eden"
for name in subllm-deep subllm-deep-gaussian subllm-halved subllm-halved-gaussian; do
  for v in 0 1e9; do
    "$BIN" eval ppl -m "$OUT/$name" --data data/default --seq 256 --keep-threshold "$v" --json >"$OUT/$name.ppl-$v.json"
  done
done
/usr/bin/python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
load = lambda name: [json.loads(l) for l in open(os.path.join(out, name, "metrics.jsonl"))]
for name, base in [("subllm-deep", "llama-8"), ("subllm-deep-gaussian", "llama-8"),
                   ("subllm-halved", "llama-12"), ("subllm-halved-gaussian", "llama-12")]:
    llama = {x["step"]: x["val_loss"] for x in load(base) if "val_loss" in x}
    m = load(name)
    print(f"\n{name} against {base}\n")
    print("| step | tokens | LLaMA valid loss | SUBLLM valid loss | SUBLLM / LLaMA | retention per subsampler |")
    print("|---|---|---|---|---|---|")
    for x in m:
        if "val_loss" not in x:
            continue
        ll = llama[x["step"]]
        ret = " / ".join(f"{r:.3f}" for r in x["retention"])
        print(f"| {x['step']} | {x['tokens']} | {ll:.4f} | {x['val_loss']:.4f} | {x['val_loss'] / ll:.4f} | {ret} |")
    ppl = {v: json.load(open(os.path.join(out, f"{name}.ppl-{v}.json")))["results"][0] for v in ["0", "1e9"]}
    print(f"\nwhole validation split: loss {ppl['0']['loss']:.4f} (retention "
          + " / ".join(f"{r:.3f}" for r in ppl["0"]["retention"])
          + f") at threshold 0; {ppl['1e9']['loss']:.4f} with the inner blocks skipped "
          f"(they are worth {ppl['1e9']['loss'] - ppl['0']['loss']:.4f} nats)")
PY
